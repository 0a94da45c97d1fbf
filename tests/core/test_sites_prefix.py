"""KV prefixes (prefix tuning's primitive): per layer ``k, v`` of shape
``[batch, num_kv_heads, n, head_dim]`` prepended to the attention, proved by an in-test
prefix plugin against transformers' own prefix path (a pre-filled KV cache and an extended
mask), with grouped-query attention, padding, ``generate`` and activation checkpointing."""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import adapters
from adapters import (
    AdapterConfig,
    AdapterModelInterface,
    InterfaceError,
    MethodSpec,
    Stack,
    hookimpl,
    plugins,
)
from adapters._runtime.resolution import resolve_sites
from adapters.context import context_for
from adapters.prefix import register_kv_prefix

from .. import models
from ..upstream import relies_on
from .conftest import SEED_INTERFACE, llama

N = 3


@dataclass(frozen=True)
class ToyPrefixConfig(AdapterConfig):
    method: ClassVar[str] = "toy_prefix"
    n: int = N


def _names(setup):
    if isinstance(setup, str):
        yield setup
    elif setup is not None:
        for child in setup.children:
            yield from _names(child)


class PrefixHost(nn.Module):
    """One per attention module: each adapter's keys and values for this layer."""

    def __init__(self, model):
        super().__init__()
        self.units = nn.ModuleDict()
        self.__dict__["model"] = model
        self.handle = None

    def provide(self, module):
        names = [n for n in _names(context_for(self.model).setup) if n in self.units]
        if not names:
            return None
        return (
            torch.cat([self.units[n].k for n in names], dim=2),
            torch.cat([self.units[n].v for n in names], dim=2),
        )


class PrefixUnit(nn.Module):
    def __init__(self, kv_heads, n, head_dim):
        super().__init__()
        self.k = nn.Parameter(torch.zeros(1, kv_heads, n, head_dim))
        self.v = nn.Parameter(torch.zeros(1, kv_heads, n, head_dim))


class ToyPrefixPlugin:
    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_register_methods(self, register):
        register(MethodSpec("toy_prefix", (ToyPrefixConfig,), {}, compositions=(Stack,)))

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyPrefixConfig):
            return None
        created = {}
        for layer in sites.layers:
            attn = layer.self_attn
            kv_heads, head_dim = attn.require("num_kv_heads", "head_dim")
            host = attn.attn.module._modules.get("toy_prefix")
            if host is None:
                host = PrefixHost(model)
                attn.attn.module.toy_prefix = host
                host.handle = register_kv_prefix(model, attn, host.provide)
            host.units[name] = PrefixUnit(kv_heads, config.n, head_dim)
            created[attn.attn.path] = host.units[name]
        return created

    @hookimpl
    def adapters_delete_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyPrefixConfig):
            return None
        for layer in sites.layers:
            module = layer.self_attn.attn.module
            host = module.toy_prefix
            del host.units[name]
            if not len(host.units):
                host.handle.remove()
                del module.toy_prefix
        return True


@pytest.fixture
def plugin():
    registry = plugins.get_registry()
    registry.register(ToyPrefixPlugin(), "toy_prefix")
    yield
    registry.unregister("toy_prefix")


def prefixed_llama(seed=1, **overrides):
    model = llama(**overrides)
    interface = AdapterModelInterface(**{**SEED_INTERFACE, "adapter_methods": ["toy_prefix"]})
    adapters.init(model, interface=interface)
    model.add_adapter("p", ToyPrefixConfig(), set_active=True)
    gen = torch.Generator().manual_seed(seed)
    prefixes = []
    with torch.no_grad():
        for layer in model.adapter_sites.layers:
            unit = layer.self_attn.attn.module.toy_prefix.units["p"]
            unit.k.copy_(torch.randn(unit.k.shape, generator=gen))
            unit.v.copy_(torch.randn(unit.v.shape, generator=gen))
            prefixes.append((unit.k.detach().clone(), unit.v.detach().clone()))
    return model, prefixes


def batch():
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def transformers_prefix(model, ids, mask, positions, prefixes):
    """transformers' own way: the prefixes as a pre-filled KV cache, the mask extended."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(prefixes):
        cache.update(k.expand(ids.shape[0], -1, -1, -1), v.expand(ids.shape[0], -1, -1, -1), i)
    params = inspect.signature(type(model).forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    full_mask = torch.cat([torch.ones(ids.shape[0], N, dtype=mask.dtype), mask], dim=1)
    with adapters.AdapterSetup(None):
        return model(
            ids, attention_mask=full_mask, position_ids=positions, **{cache_arg: cache}
        ).logits


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_gqa_prefixes_equal_transformers_cache_prefix(plugin, attn_implementation):
    model, prefixes = prefixed_llama(attn_implementation=attn_implementation)
    attn = model.adapter_sites.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (4, 2)  # grouped-query attention
    assert prefixes[0][0].shape == (1, 2, N, 8)
    ids, mask, positions = batch()
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=positions).logits
        expected = transformers_prefix(model, ids, mask, positions, prefixes)
        with adapters.AdapterSetup(None):
            base = model(ids, attention_mask=mask, position_ids=positions).logits
        unmasked = model(ids[1:]).logits  # no mask: the causal path builds its own
    sdpa = relies_on("sdpa", lambda: llama(attn_implementation="sdpa"))
    with sdpa if attn_implementation == "sdpa" else contextlib.nullcontext():
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(unmasked, expected[1:], rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-2


def test_generate_with_a_cache_equals_uncached_steps(plugin):
    model, _ = prefixed_llama(seed=4)
    ids, mask, _ = batch()
    with relies_on("cached_generation", llama), torch.no_grad():
        generated = model.generate(
            ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
        tokens = models.greedy_uncached(model, ids, mask, 4)
        assert torch.equal(generated, tokens)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_prefix_gradients(plugin, reentrant):
    ids, mask, _ = batch()

    def grads(checkpointing):
        model, _ = prefixed_llama()
        model.train_adapter("p")
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant}
            )
            # transformers' documented step for reentrant checkpointing with frozen embeddings
            model.enable_input_require_grads()
        model(ids, attention_mask=mask).logits.square().mean().backward()
        units = model.get_adapter("p").values()
        return [p.grad.clone() for unit in units for p in (unit.k, unit.v)]

    for plain, checkpointed in zip(grads(False), grads(True)):
        assert plain.abs().max() > 0
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)


def test_inactive_and_deleted_prefixes_cost_nothing_and_restore_the_model(plugin):
    ids, mask, positions = batch()
    reference = llama()
    with torch.no_grad():
        base = reference(ids, attention_mask=mask, position_ids=positions).logits
    model, _ = prefixed_llama()
    assert model.config._attn_implementation == "adapters_prefix_sdpa"
    copied = copy.deepcopy(model)
    with torch.no_grad(), adapters.AdapterSetup(None):
        torch.testing.assert_close(
            model(ids, attention_mask=mask, position_ids=positions).logits, base, rtol=0, atol=0
        )
    model.delete_adapter("p")
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, attention_mask=mask, position_ids=positions).logits, base, rtol=0, atol=0
        )
    assert copied.config._attn_implementation == "adapters_prefix_sdpa"  # the copy keeps its own


def test_models_without_attention_dispatch_are_refused_with_the_fix():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Module()])
            self.layers[0].attn = nn.MultiheadAttention(8, 2)

    interface = AdapterModelInterface(
        adapter_methods=["x"], model_layers="layers", layer_self_attn="attn"
    )
    net = Net()
    site = resolve_sites(net, interface).layers[0].self_attn
    with pytest.raises(InterfaceError, match="config._attn_implementation"):
        register_kv_prefix(net, site, lambda module: None)
    flex = models.llama()
    flex.config._attn_implementation = "flash_attention_2"
    site = resolve_sites(
        flex, AdapterModelInterface(**{**SEED_INTERFACE, "adapter_methods": ["x"]})
    )
    with pytest.raises(InterfaceError, match="attn_implementation='sdpa'"):
        register_kv_prefix(flex, site.layers[0].self_attn, lambda module: None)


@pytest.mark.skipif(
    not hasattr(adapters.context, "is_compiling"),
    reason="core's forward context is not compile-safe yet (issue 7.1)",
)
def test_the_whole_model_compiles_fullgraph_with_kv_prefixes(plugin):
    model, _ = prefixed_llama()
    ids, mask, _ = batch()
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(
            compiled(ids, attention_mask=mask).logits, eager, rtol=0, atol=1e-5
        )
    torch._dynamo.reset()
