"""Sites beyond projections: attention geometry, model-level sites (final norm, LM head),
per-stack paths (T5) and parameter sites (3-D MoE expert tensors), each used by a small
in-test plugin through the public contract."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import adapters
from adapters import (
    AdapterConfig,
    AdapterModelInterface,
    InterfaceError,
    MethodSpec,
    hookimpl,
    plugins,
)
from adapters._runtime.resolution import resolve_sites
from adapters.interface import INTERFACE_FILENAME

from .. import models
from .conftest import SEED_INTERFACE, SEED_INTERFACE_2, gemma2, llama


def _interface(fields, methods=("x",), **overrides):
    return AdapterModelInterface(**{**fields, "adapter_methods": list(methods), **overrides})


# --------------------------------------------------------------------------- c. geometry
def test_gqa_geometry_of_llama_from_module_and_shapes():
    model = llama()
    attn = resolve_sites(model, _interface(SEED_INTERFACE)).layers[1].self_attn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (4, 2, 8)
    assert attn.cache_index == 1
    assert attn.positional == "rotary"


def test_head_dim_not_hidden_over_heads_is_read_right_on_gemma2():
    model = gemma2(head_dim=16)  # q width 64 on a 32-wide model
    attn = resolve_sites(model, _interface(SEED_INTERFACE)).layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (4, 2, 16)


def test_fused_gpt2_geometry_and_absolute_positions():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50))
    sites = resolve_sites(model, _interface(models.GPT2_INTERFACE))
    attn = sites.layers[1].self_attn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.cache_index) == (2, 2, 8, 1)
    assert sites.positional == "absolute"


def test_t5_geometry_cache_index_per_stack_and_relative_positions():
    sites = resolve_sites(models.t5(), _interface(models.T5_INTERFACE))
    assert [s.cache_index for s in sites.layers] == [0, 1, 0, 1]
    cross = sites.layers[3].cross_attn
    assert (cross.num_heads, cross.num_kv_heads, cross.head_dim) == (4, 4, 8)
    assert sites.positional == "relative"


def test_bart_decoder_heads_come_from_its_own_modules_not_the_encoder_config():
    model = models.bart(decoder_attention_heads=2)
    sites = resolve_sites(model, _interface(models.BART_INTERFACE))
    assert sites.layers[0].self_attn.num_heads == 4
    assert sites.layers[2].self_attn.num_heads == 2
    assert sites.layers[2].self_attn.head_dim == 16
    assert sites.positional == "absolute"


def test_config_is_used_when_the_module_has_no_head_attributes():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (
                nn.Linear(8, 8),
                nn.Linear(8, 4),
                nn.Linear(8, 4),
                nn.Linear(8, 8),
            )

    class Net(nn.Module):
        def __init__(self, config=None):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Module()])
            self.blocks[0].attn = Attn()
            if config is not None:
                self.config = config

    interface = AdapterModelInterface(
        adapter_methods=["x"],
        model_layers="blocks",
        layer_self_attn="attn",
        attn_q_proj="q",
        attn_k_proj="k",
        attn_v_proj="v",
        attn_o_proj="o",
    )
    config = type("Config", (), {"num_attention_heads": 4, "hidden_size": 8})()
    attn = resolve_sites(Net(config), interface).layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (4, 2, 2)
    assert attn.geometry_source == "config"

    unknown = resolve_sites(Net(), interface).layers[0].self_attn
    assert unknown.num_heads is None and unknown.geometry_source is None
    assert unknown.cache_index == 0
    with pytest.raises(InterfaceError, match=r"num_kv_heads of attention blocks\.0\.attn is"):
        unknown.require("num_kv_heads", "head_dim")
    with pytest.raises(InterfaceError, match="positional kind"):
        unknown.require("positional")


# --------------------------------------------------------------------- d. model-level sites
def test_final_norm_and_lm_head_sites():
    model = llama()
    sites = resolve_sites(model, _interface(SEED_INTERFACE, model_final_norm="norm"))
    assert sites.final_norm.module is model.model.norm
    assert sites.final_norm.path == "model.norm"
    # not named: the model's get_output_embeddings()
    assert sites.lm_head.module is model.lm_head and sites.lm_head.path == "lm_head"
    assert sites.tied_embeddings is False
    named = resolve_sites(model, _interface(SEED_INTERFACE, model_lm_head="lm_head"))
    assert named.lm_head.module is model.lm_head


def test_tied_lm_head_is_reported():
    model = gemma2()  # Gemma ties its LM head to the input embeddings
    sites = resolve_sites(model, _interface(SEED_INTERFACE))
    assert sites.tied_embeddings is True


def test_a_bad_final_norm_path_explains_itself():
    with pytest.raises(adapters.InterfacePathError, match="did you mean 'norm'"):
        resolve_sites(llama(), _interface(SEED_INTERFACE, model_final_norm="nrom"))


@dataclass(frozen=True)
class ToyInvertibleConfig(AdapterConfig):
    """Adds a learned vector to the embeddings' output and subtracts it after the final norm."""

    method: ClassVar[str] = "toy_invertible"


class ToyInvertible(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(width))

    def forward_hook(self, module, args, output):
        return output + self.shift

    def inverse_hook(self, module, args, output):
        return output - self.shift


class ToyInvertiblePlugin:
    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_register_methods(self, register):
        register(MethodSpec("toy_invertible", (ToyInvertibleConfig,), {}))

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyInvertibleConfig):
            return None
        unit = ToyInvertible(sites.hidden_size)
        sites.base_model.module.toy_invertible = unit
        unit.handles = [
            sites.embeddings.module.register_forward_hook(unit.forward_hook),
            sites.final_norm.module.register_forward_hook(unit.inverse_hook),
        ]
        return {"invertible": unit}

    @hookimpl
    def adapters_delete_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyInvertibleConfig):
            return None
        for handle in sites.base_model.module.toy_invertible.handles:
            handle.remove()
        del sites.base_model.module.toy_invertible
        return True


@pytest.fixture
def register():
    registry = plugins.get_registry()
    names = []

    def add(plugin, name):
        registry.register(plugin, name)
        names.append(name)

    yield add
    for name in names:
        registry.unregister(name)


def test_an_invertible_plugin_uses_embeddings_and_final_norm(register, ids):
    register(ToyInvertiblePlugin(), "toy_invertible")
    model = llama()
    base = model(ids).logits
    adapters.init(
        model, interface=_interface(SEED_INTERFACE, ["toy_invertible"], model_final_norm="norm")
    )
    model.add_adapter("inv", ToyInvertibleConfig())
    with torch.no_grad():
        model.get_adapter("inv")["invertible"].shift.fill_(0.3)
    shifted = model(ids).logits
    reference = copy.deepcopy(model)
    reference.delete_adapter("inv")
    # reference: shift the embeddings' output by hand, unshift the final norm's output
    inner = reference.model
    h = inner.embed_tokens(ids) + 0.3
    handle = inner.embed_tokens.register_forward_hook(lambda m, a, o: o + 0.3)
    handle2 = inner.norm.register_forward_hook(lambda m, a, o: o - 0.3)
    expected = reference(ids).logits
    handle.remove(), handle2.remove()
    assert h.shape[-1] == 32
    torch.testing.assert_close(shifted, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(shifted, base, atol=1e-3)
    model.delete_adapter("inv")
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)


# ------------------------------------------------------------------------ e. per-stack paths
def test_t5_stacks_get_their_own_sub_paths():
    model = models.t5()
    sites = resolve_sites(model, _interface(models.T5_INTERFACE))
    assert [s.stack for s in sites.layers] == ["encoder.block"] * 2 + ["decoder.block"] * 2
    encoder, decoder = sites.layers[1], sites.layers[3]
    assert encoder.output.module is model.encoder.block[1].layer[1].DenseReluDense.wo
    assert decoder.output.module is model.decoder.block[1].layer[2].DenseReluDense.wo
    assert decoder.pre_ffn.module is model.decoder.block[1].layer[2].layer_norm
    assert encoder.cross_attn is None and encoder.pre_cross_attn is None
    assert decoder.cross_attn.q.module is model.decoder.block[1].layer[1].EncDecAttention.q
    assert sites.final_norm.module is model.decoder.final_layer_norm
    assert sites.lm_head.module is model.lm_head


def test_without_stack_paths_the_t5_decoder_ffn_is_lost():
    fields = {k: v for k, v in models.T5_INTERFACE.items() if k != "stack_paths"}
    fields["layer_cross_attn"] = "layer.1.EncDecAttention"
    # decoder layer.1 is the cross-attention block: it has no DenseReluDense, so with shared
    # paths the decoder counts as a stack without a feed-forward
    sites = resolve_sites(models.t5(), _interface(fields))
    assert [s.output is None for s in sites.layers] == [False, False, True, True]


def test_a_part_absent_from_a_stack_by_override_is_allowed():
    overrides = {"encoder.layers": {"layer_cross_attn": None}}
    sites = resolve_sites(models.bart(), _interface(models.BART_INTERFACE, stack_paths=overrides))
    assert sites.layers[0].cross_attn is None and sites.layers[2].cross_attn is not None


@pytest.mark.parametrize(
    ("stack_paths", "message"),
    [
        ({"decoder.blocks": {}}, "not in model_layers"),
        ({"decoder.block": {"model_embeddings": "x"}}, "cannot override"),
        ({"decoder.block": {"attn_qkv_proj": "qkv"}}, "not both"),
        ({"decoder.block": "layer.2"}, "dict of field overrides"),
    ],
)
def test_bad_stack_paths_are_refused(stack_paths, message):
    with pytest.raises(InterfaceError, match=message):
        _interface(models.T5_INTERFACE, stack_paths=stack_paths)


def test_t5_interface_round_trips_through_adapter_interface_json(tmp_path):
    interface = _interface(models.T5_INTERFACE)
    interface.save(tmp_path)
    again = AdapterModelInterface.load(tmp_path)
    assert again == interface
    assert again.stack_paths["decoder.block"]["layer_output_proj"] == "layer.2.DenseReluDense.wo"
    assert again.for_stack("decoder.block").layer_pre_ffn == "layer.2.layer_norm"
    assert again.for_stack("encoder.block").layer_pre_ffn == "layer.1.layer_norm"


def test_an_interface_without_new_fields_writes_only_0_1_keys(tmp_path):
    old_keys = {
        "adapter_methods",
        "model_embeddings",
        "model_layers",
        "layer_self_attn",
        "layer_cross_attn",
        "attn_q_proj",
        "attn_k_proj",
        "attn_v_proj",
        "attn_o_proj",
        "attn_qkv_proj",
        "layer_intermediate_proj",
        "layer_output_proj",
        "layer_pre_self_attn",
        "layer_pre_cross_attn",
        "layer_pre_ffn",
        "layer_ln_1",
        "layer_ln_2",
        "base_model",
    }
    interface = AdapterModelInterface(**SEED_INTERFACE_2)
    assert set(interface.to_dict()) == old_keys
    # and a 0.1 file (every old key, nothing new) loads
    (tmp_path / INTERFACE_FILENAME).write_text(json.dumps(interface.to_dict()))
    assert AdapterModelInterface.load(tmp_path) == interface


def test_toy_lora_adapts_both_t5_stacks(toy_plugins):
    model = models.t5()
    enc = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    dec = torch.zeros(2, 3, dtype=torch.long)
    base = model(input_ids=enc, decoder_input_ids=dec).logits
    adapters.init(model, interface=_interface(models.T5_INTERFACE, ["toy_lora"]))
    created = model.add_adapter("a", "toy_lora[targets=('q', 'v')]", set_active=True)
    del created
    keys = set(model.get_adapter("a"))
    assert "decoder.block.1.layer.1.EncDecAttention.q" in keys
    assert "encoder.block.0.layer.0.SelfAttention.v" in keys
    torch.testing.assert_close(
        model(input_ids=enc, decoder_input_ids=dec).logits, base, rtol=0, atol=0
    )


# ----------------------------------------------------------------------- f. parameter sites
class ToyExperts(nn.Module):
    """Dense mixture of experts holding its weights as 3-D parameters (the transformers 5
    layout: ``gate_up_proj`` (experts, 2 * inner, hidden), ``down_proj`` (experts, hidden,
    inner))."""

    def __init__(self, experts=3, hidden=8, inner=6):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, hidden) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inner) * 0.3)
        self.router = nn.Linear(hidden, experts)

    def forward(self, x):
        weights = self.router(x).softmax(-1)  # (b, s, e)
        gate, up = torch.einsum("bsh,eih->bsei", x, self.gate_up_proj).chunk(2, dim=-1)
        out = torch.einsum("bsei,ehi->bseh", nn.functional.silu(gate) * up, self.down_proj)
        return x + (weights[..., None] * out).sum(-2)


class ToyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module(), nn.Module()])
        for layer in self.layers:
            layer.mlp = nn.Module()
            layer.mlp.experts = ToyExperts()

    def forward(self, x):
        for layer in self.layers:
            x = layer.mlp.experts(x)
        return x


MOE_INTERFACE = dict(
    adapter_methods=["toy_expert_scale"],
    model_layers="layers",
    layer_parameters={"experts.gate_up": "mlp.experts.gate_up_proj"},
)


@dataclass(frozen=True)
class ToyExpertScaleConfig(AdapterConfig):
    """Scales each expert's slice of the named parameter by ``1 + scale[expert]``."""

    method: ClassVar[str] = "toy_expert_scale"
    parameter: str = "experts.gate_up"


class ExpertScale(nn.Module):
    """A parametrisation: the weight as the owner sees it, one scale per expert."""

    def __init__(self, experts):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(experts, 1, 1))

    def forward(self, weight):
        return weight * (1 + self.scale)


class ToyExpertScalePlugin:
    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_register_methods(self, register):
        register(MethodSpec("toy_expert_scale", (ToyExpertScaleConfig,), {}))

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyExpertScaleConfig):
            return None
        created = {}
        for layer in sites.layers:
            site = layer.parameters[config.parameter]
            unit = ExpertScale(site.shape[0])
            parametrize.register_parametrization(site.module, site.name, unit)
            created[site.path] = unit
        return created

    @hookimpl
    def adapters_delete_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyExpertScaleConfig):
            return None
        for layer in sites.layers:
            site = layer.parameters[config.parameter]
            parametrize.remove_parametrizations(site.module, site.name, leave_parametrized=False)
        return True


def test_parameter_sites_resolve_with_shape_and_path():
    model = ToyMoE()
    sites = resolve_sites(model, AdapterModelInterface(**MOE_INTERFACE))
    site = sites.layers[1].parameters["experts.gate_up"]
    assert site.path == "layers.1.mlp.experts.gate_up_proj"
    assert site.module is model.layers[1].mlp.experts and site.name == "gate_up_proj"
    assert tuple(site.shape) == (3, 12, 8)
    assert site.value is model.layers[1].mlp.experts.gate_up_proj


def test_a_bad_parameter_path_names_the_parameters_there():
    bad = {**MOE_INTERFACE, "layer_parameters": {"experts.gate_up": "mlp.experts.gate_proj"}}
    with pytest.raises(adapters.InterfacePathError) as info:
        resolve_sites(ToyMoE(), AdapterModelInterface(**bad))
    message = str(info.value)
    assert "layer_parameters['experts.gate_up']='mlp.experts.gate_proj'" in message
    assert "did you mean 'gate_up_proj'?" in message
    assert "down_proj" in message


def test_layer_parameters_must_be_a_mapping_of_paths():
    with pytest.raises(InterfaceError, match="layer_parameters"):
        AdapterModelInterface(**{**MOE_INTERFACE, "layer_parameters": {"x": 3}})


def test_a_plugin_scales_3d_expert_weights_through_a_parameter_site(register):
    register(ToyExpertScalePlugin(), "toy_expert_scale")
    torch.manual_seed(0)
    model = ToyMoE()
    x = torch.randn(2, 4, 8)
    base = model(x)
    reference = copy.deepcopy(model)
    adapters.init(model, interface=AdapterModelInterface(**MOE_INTERFACE))
    model.add_adapter("s", ToyExpertScaleConfig(), set_active=True)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)  # zero-initialised
    scales = torch.tensor([0.5, -0.25, 2.0]).view(3, 1, 1)
    with torch.no_grad():
        for unit in model.get_adapter("s").values():
            unit.scale.copy_(scales)
        for layer in reference.layers:
            layer.mlp.experts.gate_up_proj.mul_(1 + scales)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)
    model.delete_adapter("s")
    assert type(model.layers[0].mlp.experts) is ToyExperts
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)


def test_transformers_5_mixtral_experts_are_parameter_sites(register):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(
        MixtralConfig(**{**models.TINY_DECODER, "num_local_experts": 4})
    ).eval()
    experts = model.model.layers[0].mlp.experts if hasattr(model.model.layers[0], "mlp") else None
    if experts is None or not isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter):
        pytest.skip("this transformers keeps Mixtral experts as nn.Linear modules (4.x)")
    register(ToyExpertScalePlugin(), "toy_expert_scale")
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    base = model(ids).logits
    interface = AdapterModelInterface(
        **{
            **SEED_INTERFACE,
            "adapter_methods": ["toy_expert_scale"],
            "layer_intermediate_proj": None,
            "layer_output_proj": None,
            "layer_parameters": {"experts.gate_up": "mlp.experts.gate_up_proj"},
        }
    )
    adapters.init(model, interface=interface)
    site = model.adapter_sites.layers[0].parameters["experts.gate_up"]
    assert site.shape[0] == 4 and len(site.shape) == 3
    model.add_adapter("s", ToyExpertScaleConfig(), set_active=True)
    scales = torch.tensor([0.5, -0.25, 2.0, 0.1]).view(4, 1, 1)
    with torch.no_grad():
        for unit in model.get_adapter("s").values():
            unit.scale.copy_(scales)
        for layer in reference.model.layers:
            layer.mlp.experts.gate_up_proj.mul_(1 + scales)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    assert not torch.allclose(model(ids).logits, base, atol=1e-4)
    model.delete_adapter("s")
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
