"""Checkpoint formats are owned per (format, method) and detected by content: adapters-lora's
``peft`` reader claims only the PEFT types it reads (LoRA, IA³), so a third party can serve
``peft`` for its own method. Proved with an in-test VeRA plugin reading a PEFT VeRA folder,
equal to PEFT's own VeRA."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import adapters
from adapters.plugin import (
    AdapterConfig,
    AdapterHost,
    CheckpointError,
    CheckpointFormat,
    MethodSpec,
    SharedParameters,
    Stack,
    context_for,
    hookimpl,
)

from ..models import SEED_INTERFACE

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

R = 4


@dataclass(frozen=True)
class ToyVeraConfig(AdapterConfig):
    method: ClassVar[str] = "toy_vera"
    r: int = R
    targets: tuple[str, ...] = ("q", "v")


class VeraMatrices(nn.Module):
    """The random A (r x in_max) and B (out_max x r) every adapted projection shares."""

    def __init__(self, r: int, in_max: int, out_max: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.zeros(r, in_max), requires_grad=False)
        self.B = nn.Parameter(torch.zeros(out_max, r), requires_grad=False)


class VeraScales(nn.Module):
    def __init__(self, shared: VeraMatrices, in_features: int, out_features: int) -> None:
        super().__init__()
        self.lambda_b = nn.Parameter(torch.zeros(out_features))
        self.lambda_d = nn.Parameter(torch.ones(shared.A.shape[0]))
        self.__dict__["shared"] = shared  # a plain reference: saved and counted once
        self.in_features, self.out_features = in_features, out_features


class VeraHost(AdapterHost):
    def hook(self, module, args, output):
        setup = context_for(self.model).setup
        if not self.is_active(setup):
            return None
        x = args[0]
        for name in setup.flatten():
            if self.owns(name):
                unit = self.units[name]
                a = unit.shared.A[:, : unit.in_features]
                b = unit.shared.B[: unit.out_features, :]
                output = output + unit.lambda_b * nn.functional.linear(
                    unit.lambda_d * nn.functional.linear(x, a), b
                )
        return output


def _targets(sites, config):
    for layer in sites.layers:
        for role in config.targets:
            yield getattr(layer.self_attn, role)


def peft_vera_detect(path):
    try:
        with open(os.path.join(path, "adapter_config.json")) as handle:
            return json.load(handle).get("peft_type") == "VERA"
    except (OSError, ValueError):
        return False


def peft_vera_read(path, model, sites, config):
    meta = json.load(open(os.path.join(path, "adapter_config.json")))
    raw = load_file(os.path.join(path, "adapter_model.safetensors"))
    roles = {"q_proj": "q", "v_proj": "v", "k_proj": "k", "o_proj": "o"}
    cfg = ToyVeraConfig(r=meta["r"], targets=tuple(roles[t] for t in meta["target_modules"]))
    shared = SharedParameters.of(model, sites, "toy_vera").key
    tensors = {f"{shared}.A": raw["base_model.vera_A"], f"{shared}.B": raw["base_model.vera_B"]}
    for site in _targets(sites, cfg):
        for param in ("lambda_b", "lambda_d"):
            tensors[f"{site.path}.{param}"] = raw[f"base_model.model.{site.path}.vera_{param}"]
    return cfg, tensors


class ToyVeraPlugin:
    ADAPTERS_CONTRACT = "1.1"

    @hookimpl
    def adapters_register_methods(self, register):
        register(MethodSpec("toy_vera", (ToyVeraConfig,), {}, compositions=(Stack,)))

    @hookimpl
    def adapters_register_checkpoint_formats(self, register):
        register(
            CheckpointFormat(
                name="peft", methods=("toy_vera",), detect=peft_vera_detect, read=peft_vera_read
            )
        )

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        targets = list(_targets(sites, config))
        in_max = max(int(t.in_features) for t in targets)
        out_max = max(int(t.out_features) for t in targets)
        shared = SharedParameters.of(model, sites, "toy_vera")
        matrices = shared.add_unit(name, VeraMatrices(config.r, in_max, out_max))
        created = {shared.key: matrices}
        for site in targets:
            host = VeraHost.attach(site.module, "toy_vera", model)
            unit = VeraScales(matrices, int(site.in_features), int(site.out_features))
            created[site.path] = host.add_unit(name, unit)
        return created


@pytest.fixture
def vera_plugin():
    registry = adapters.registry.get_registry()
    registry.register(ToyVeraPlugin(), "toy_vera")  # no conflict with adapters-lora's "peft"
    yield registry
    registry.unregister("toy_vera")


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def peft_vera(tmp_path):
    """A PEFT VeRA folder (random lambdas) and PEFT's logits with it."""
    base = tiny_llama()
    model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.VeraConfig(r=R, target_modules=["q_proj", "v_proj"], save_projection=True),
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    model.eval()
    model.save_pretrained(str(tmp_path / "vera"))
    with torch.no_grad():
        expected = model(IDS).logits
    return base, str(tmp_path / "vera"), expected


def _ours(base, methods):
    model = copy.deepcopy(base)
    interface = adapters.AdapterModelInterface(**{**SEED_INTERFACE, "adapter_methods": methods})
    adapters.init(model, interface=interface)
    return model


def test_lora_reads_only_the_peft_types_it_understands(peft_vera):
    from adapters_lora.interop import PEFT_FORMAT

    _, folder, _ = peft_vera
    assert PEFT_FORMAT.methods == ("lora",)
    assert not PEFT_FORMAT.detect(path=folder)


def test_a_third_party_serves_peft_for_its_own_method(vera_plugin, peft_vera):
    base, folder, expected = peft_vera
    model = _ours(base, ["toy_vera", "lora"])
    name = model.load_adapter(folder, load_as="v", set_active=True)
    assert model.adapters_config[name].method == "toy_vera"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    summary = {r["name"]: r["#param"] for r in model.adapter_summary(as_dict=True)}
    assert summary["v"] == R * 32 + 32 * R + 2 * (32 + R) + 2 * (16 + R)  # A, B counted once


def test_a_peft_lora_folder_still_goes_to_adapters_lora(vera_plugin, tmp_path):
    base = tiny_llama()
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(str(tmp_path / "lora"))
    model = _ours(base, ["toy_vera", "lora"])
    name = model.load_adapter(str(tmp_path / "lora"), load_as="l")
    assert model.adapters_config[name].method == "lora"


def test_without_a_vera_plugin_the_folder_is_refused_with_the_fix(peft_vera):
    base, folder, _ = peft_vera
    model = _ours(base, ["lora"])
    with pytest.raises(CheckpointError, match="install the plugin that reads it"):
        model.load_adapter(folder)
