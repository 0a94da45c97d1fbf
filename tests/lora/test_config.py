"""Configs, presets and config strings."""

from __future__ import annotations

import pytest

import adapters
from adapters.errors import ConfigError
from adapters_lora import DoRAConfig, IA3Config, LoRAConfig

from .lora_helpers import LLAMA_INTERFACE, build_llama, init


def test_adapters_namespace_resolves_the_plugin_classes():
    assert adapters.LoRAConfig is LoRAConfig
    assert adapters.IA3Config is IA3Config
    assert adapters.DoRAConfig is DoRAConfig


def test_defaults_match_adapterhub():
    lora, ia3 = LoRAConfig(), IA3Config()
    assert (lora.r, lora.alpha, lora.attn_matrices, lora.composition_mode) == (
        8,
        8,
        ("q", "v"),
        "add",
    )
    assert (ia3.r, ia3.alpha, ia3.attn_matrices, ia3.intermediate_lora) == (1, 1, ("k", "v"), True)
    assert ia3.composition_mode == "scale" and ia3.init_weights == "ia3"
    assert DoRAConfig().use_dora is True


def test_scaling_is_alpha_over_r_or_sqrt_r_with_rslora():
    assert LoRAConfig(r=4, alpha=8).scaling == 2.0
    assert LoRAConfig(r=4, alpha=8, use_rslora=True).scaling == 4.0


def test_config_string_with_overrides_builds_the_adapter(llama):
    llama.add_adapter("a", config="lora[r=16, alpha=32, attn_matrices=['q','v']]")
    config = llama.adapters_config["a"]
    assert (config.r, config.alpha, config.attn_matrices) == (16, 32, ("q", "v"))
    unit = llama.get_adapter("a")["model.layers.0.self_attn.q_proj"]
    assert tuple(unit.lora_A.shape) == (16, 32)


@pytest.mark.parametrize("preset", ["lora", "ia3", "dora"])
def test_presets_are_registered(llama, preset):
    llama.add_adapter(preset, config=preset)
    assert llama.adapters_config[preset].method == "lora"


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(r=4, attn_matrices=("q", "k", "v", "o"), leave_out=(1,)),
        IA3Config(attn_matrices=("q",)),
        DoRAConfig(r=2, output_lora=True),
    ],
    ids=["lora", "ia3", "dora"],
)
def test_to_dict_round_trips_to_the_same_class(config):
    again = adapters.AdapterConfig.from_dict(config.to_dict())
    assert type(again) is type(config)
    assert again == config


@pytest.mark.parametrize(
    "options, message",
    [
        ({"r": 0}, "r=0"),
        ({"attn_matrices": ("q", "x")}, "attn_matrices"),
        ({"attn_matrices": "qv"}, "must be a list"),
        ({"composition_mode": "mul"}, "composition_mode='mul'"),
        ({"init_weights": "xavier"}, "init_weights='xavier'"),
        ({"composition_mode": "scale", "r": 2}, "needs r=1"),
        ({"dropout": 1.5}, "dropout"),
        ({"dtype": "float77"}, "dtype"),
        ({"dtype": "int8"}, "dtype='int8' is not a floating-point"),
        ({"dropout": "0.1"}, "dropout='0.1'"),
        ({"init_weights_seed": "7"}, "init_weights_seed='7'"),
        ({"use_dora": True, "use_gating": True}, "use_gating"),
        ({"selfattn_lora": False}, "adapts nothing"),
    ],
)
def test_bad_options_raise_naming_the_value(options, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        LoRAConfig(**options)


def test_leave_out_outside_the_model_raises():
    model = init(build_llama(), LLAMA_INTERFACE)
    with pytest.raises(ConfigError, match=r"leave_out=\[5\]"):
        model.add_adapter("a", LoRAConfig(leave_out=(5,)))
    assert not model.has_adapters()


def test_option_needing_a_missing_interface_field_raises():
    interface = {k: v for k, v in LLAMA_INTERFACE.items() if k != "attn_o_proj"}
    model = init(build_llama(), interface)
    with pytest.raises(ConfigError, match="attn_o_proj"):
        model.add_adapter("a", LoRAConfig(attn_matrices=("q", "o")))
