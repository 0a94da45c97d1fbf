"""Contract 1.1: one way into the forward pass. `AdapterHost` registers hooks, sub-block hooks,
virtual tokens and KV prefixes, keeps one kind of handle (`Handle`) and undoes every
registration when an operation fails; `SharedParameters` is the home of parameters shared
across layers (saved, loaded, copied and counted once)."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import adapters
from adapters.plugin import (
    AdapterConfig,
    AdapterHost,
    Handle,
    MethodSpec,
    SharedParameters,
    Stack,
    VirtualTokens,
    context_for,
    hookimpl,
)

from .conftest import SEED_INTERFACE, llama

N = 2  # prefix slots


@dataclass(frozen=True)
class SharedPrefixConfig(AdapterConfig):
    method: ClassVar[str] = "shared_prefix"
    fail_at_layer: int = -1  # raise after registering this layer's prefix (rollback tests)
    prompt: bool = False  # also prepend a virtual token


class SharedKV(nn.Module):
    """One adapter's keys and values, shared by every layer."""

    def __init__(self, kv_heads: int, head_dim: int, hidden: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.k = nn.Parameter(torch.randn(1, kv_heads, N, head_dim, generator=gen))
        self.v = nn.Parameter(torch.randn(1, kv_heads, N, head_dim, generator=gen))
        self.prompt = nn.Parameter(torch.randn(1, 1, hidden, generator=gen))


class LayerGain(nn.Module):
    """One adapter's scale of the shared prefix at one layer (holds the shared unit by plain
    reference, not as a submodule)."""

    def __init__(self, shared: SharedKV) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.__dict__["shared"] = shared


class PrefixHost(AdapterHost):
    def on_attach(self, module):  # no forward hook: the KV prefix is the way in
        pass

    def provide(self, module):
        setup = context_for(self.model).setup
        names = [n for n in ([] if setup is None else setup.flatten()) if self.owns(n)]
        if not names:
            return None
        units = [self.units[n] for n in names]
        k = torch.cat([u.gain * u.shared.k for u in units], dim=2)
        v = torch.cat([u.gain * u.shared.v for u in units], dim=2)
        return k, v


class PromptHost(SharedParameters):
    def tokens(self, ctx):
        names = [] if ctx.setup is None else [n for n in ctx.setup.flatten() if self.owns(n)]
        if not names or not self.units[names[0]].__dict__.get("with_prompt"):
            return None
        return VirtualTokens(self.units[names[0]].prompt)


class SharedPrefixPlugin:
    ADAPTERS_CONTRACT = "1.1"

    @hookimpl
    def adapters_register_methods(self, register):
        register(MethodSpec("shared_prefix", (SharedPrefixConfig,), {}, compositions=(Stack,)))

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        attn = sites.layers[0].self_attn
        kv_heads, head_dim = attn.require("num_kv_heads", "head_dim")
        shared = PromptHost.of(model, sites, "shared_prefix")
        unit = shared.add_unit(name, SharedKV(kv_heads, head_dim, sites.hidden_size))
        unit.__dict__["with_prompt"] = config.prompt
        if config.prompt and len(shared.units) == 1:
            shared.add_virtual_tokens(shared.tokens)
        created = {shared.key: unit}
        for layer in sites.layers:
            host = PrefixHost.attach(layer.self_attn.attn.module, "shared_prefix", model)
            if len(host.units) == 0:
                host.add_kv_prefix(layer.self_attn, host.provide)
            created[layer.self_attn.attn.path] = host.add_unit(name, LayerGain(unit))
            if layer.index == config.fail_at_layer:
                raise RuntimeError("boom")
        return created

    @hookimpl
    def adapters_delete_adapter(self, model, sites, name, config):
        for layer in sites.layers:
            host = layer.self_attn.attn.module.shared_prefix
            host.remove_unit(name)
            if host.is_empty:
                host.detach()
        shared = PromptHost.of(model, sites, "shared_prefix")
        shared.remove_unit(name)
        if shared.is_empty:
            shared.detach()
        return True


@pytest.fixture(autouse=True)
def plugin():
    registry = adapters.registry.get_registry()
    registry.register(SharedPrefixPlugin(), "shared_prefix")
    yield
    registry.unregister("shared_prefix")


INTERFACE = {**SEED_INTERFACE, "adapter_methods": ["shared_prefix"]}
IDS = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(1))


def adapted(**config):
    model = llama()
    adapters.init(model, interface=adapters.AdapterModelInterface(**INTERFACE))
    model.eval()
    base = model(IDS).logits.detach()
    model.add_adapter("p", SharedPrefixConfig(**config), set_active=True)
    return model, base


def _trace(model):
    """Everything a registration leaves on a model."""
    return (
        model.config._attn_implementation,
        sorted(n for n, m in model.named_modules() if "_adapters_kv_prefix" in m.__dict__),
        sorted(n for n, _ in model.named_modules() if "shared_prefix" in n),
        len(adapters._runtime.state.get_state(model).virtual_providers),
    )


def test_a_kv_prefix_through_the_host_changes_the_output_and_leaves_with_the_adapter():
    model, base = adapted()
    assert model.config._attn_implementation == "adapters_prefix_sdpa"
    assert not torch.allclose(model(IDS).logits, base)
    model.delete_adapter("p")
    assert _trace(model) == ("sdpa", [], [], 0)
    torch.testing.assert_close(model(IDS).logits, base)


@pytest.mark.parametrize("prompt", [False, True])
def test_a_failed_add_takes_every_registration_off_again(prompt):
    model = llama()
    adapters.init(model, interface=adapters.AdapterModelInterface(**INTERFACE))
    model.eval()
    before, base = _trace(model), model(IDS).logits.detach()
    with pytest.raises(RuntimeError, match="boom"):
        model.add_adapter("p", SharedPrefixConfig(fail_at_layer=1, prompt=prompt))
    assert _trace(model) == before == ("sdpa", [], [], 0)
    assert "p" not in model.adapters_config
    torch.testing.assert_close(model(IDS).logits, base)


def test_every_registration_returns_a_handle():
    model, _ = adapted(prompt=True)
    host = model.model.layers[0].self_attn.shared_prefix
    shared = model.model.adapters_shared_prefix_shared
    handles = [*host._handles, *shared._handles]
    handles.append(host.add_hook(model.model.layers[0], lambda *a: None))
    site = model.adapter_sites.layers[0].sub_block("self_attn")
    handles.append(host.add_sub_block_hook(site, lambda out, residual: None))
    assert len(handles) == 4 and all(isinstance(h, Handle) for h in handles)
    host.remove_hooks()
    assert host._handles == []
    assert "_adapters_kv_prefix" not in model.model.layers[0].self_attn.__dict__


def test_virtual_tokens_through_a_shared_host_prepend_and_leave_with_the_adapter():
    model, base = adapted(prompt=True)
    with_prompt = model(IDS).logits
    assert with_prompt.shape == base.shape  # the virtual position is stripped
    model.delete_adapter("p")
    assert _trace(model) == ("sdpa", [], [], 0)


def test_shared_parameters_are_counted_saved_and_loaded_once(tmp_path):
    model, _ = adapted()
    layers = len(model.adapter_sites.layers)
    unit = model.model.adapters_shared_prefix_shared.units["p"]
    shared_count = sum(p.numel() for p in unit.parameters())
    row = next(r for r in model.adapter_summary(as_dict=True) if r["name"] == "p")
    assert row["#param"] == shared_count + layers
    state = model.adapter_state_dict("p")
    assert sum(k.startswith("model.adapters_shared_prefix_shared.") for k in state) == 3
    with torch.no_grad():
        unit.k.mul_(3.0)
        model.model.layers[1].self_attn.shared_prefix.units["p"].gain.fill_(0.5)
    expected = model(IDS).logits.detach()
    model.save_adapter(str(tmp_path / "p"), "p")
    fresh = llama()
    adapters.init(fresh, interface=adapters.AdapterModelInterface(**INTERFACE))
    fresh.eval()
    fresh.load_adapter(str(tmp_path / "p"), set_active=True)
    torch.testing.assert_close(fresh(IDS).logits, expected)
    layer_unit = fresh.model.layers[0].self_attn.shared_prefix.units["p"]
    assert layer_unit.shared is fresh.model.adapters_shared_prefix_shared.units["p"]


def test_shared_parameters_survive_deepcopy_and_pickle():
    model, _ = adapted()
    expected = model(IDS).logits.detach()
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(copied(IDS).logits, expected)
        shared = copied.model.adapters_shared_prefix_shared.units["p"]
        layer_unit = copied.model.layers[1].self_attn.shared_prefix.units["p"]
        assert layer_unit.shared is shared  # one object in the copy too, not two
        with torch.no_grad():
            shared.k.zero_()
        assert not torch.allclose(copied(IDS).logits, expected)
        torch.testing.assert_close(model(IDS).logits, expected)  # the original is untouched


class DirectPrefixPlugin:
    """A contract-1.0 plugin that registers a KV prefix with the module-level function (no
    host) and then fails."""

    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_register_methods(self, register):
        register(MethodSpec("direct_prefix", (DirectPrefixConfig,), {}, compositions=(Stack,)))

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        from adapters.prefix import register_kv_prefix

        register_kv_prefix(model, sites.layers[0].self_attn, lambda module: None)
        raise RuntimeError("boom")


@dataclass(frozen=True)
class DirectPrefixConfig(AdapterConfig):
    method: ClassVar[str] = "direct_prefix"


def test_a_kv_prefix_registered_without_a_host_is_taken_off_when_the_add_fails():
    registry = adapters.registry.get_registry()
    registry.register(DirectPrefixPlugin(), "direct_prefix")
    try:
        model = llama()
        interface = adapters.AdapterModelInterface(
            **{**SEED_INTERFACE, "adapter_methods": ["direct_prefix"]}
        )
        adapters.init(model, interface=interface)
        with pytest.raises(RuntimeError, match="boom"):
            model.add_adapter("p", DirectPrefixConfig())
    finally:
        registry.unregister("direct_prefix")
    assert _trace(model) == ("sdpa", [], [], 0)
