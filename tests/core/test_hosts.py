"""`adapters.hosts.AdapterHost` and the undo log of `adapters._runtime.rollback`: a failed operation
leaves no trace (no class swap, no base tensor touched, no hook, no module), hosts own their
hook handles (also in copies), and the activity cache follows changes."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from adapters import AdapterConfig, MethodSpec, Stack, hookimpl, plugins
from adapters._runtime.rollback import UndoLog, operation, record_undo
from adapters.composition import apply_setup
from adapters.context import context_for
from adapters.hosts import AdapterHost, unparametrize

from .conftest import init_toy, randomize


@dataclass(frozen=True)
class ToyParamConfig(AdapterConfig):
    """Scales q_proj's weight through a parametrisation; ``fail_at`` makes adding fail on that
    layer, after the parametrisation and a base-weight edit are in place."""

    method: ClassVar[str] = "toy_param"
    fail_at: int = -1


class Scale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.ones(width, 1))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.factor


class ParamHost(AdapterHost):
    def hook(self, module, args, output):
        setup = context_for(self.model).setup
        if not self.is_active(setup):
            return None
        return apply_setup(setup, output, lambda name, h, rows: h * 1.5, owns=self.owns)


class ToyParamPlugin:
    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_register_methods(self, register):
        register(
            MethodSpec("toy_param", (ToyParamConfig,), {"toy_param": ToyParamConfig()}, (Stack,))
        )

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyParamConfig):
            return None
        created = {}
        for layer in sites.layers:
            q = layer.self_attn.q
            host = ParamHost.attach(q.module, "toy_param", model)
            host.protect(q.module, "weight")
            with torch.no_grad():
                q.module.weight.add_(1.0)  # an in-place edit of a base tensor, undone by protect
            scale = Scale(q.module.weight.shape[0])
            host.parametrize(q.module, "weight", scale)
            created[q.path] = host.add_unit(name, scale)
            if layer.index == config.fail_at:
                raise RuntimeError(f"toy_param fails on layer {layer.index}")
        return created

    @hookimpl
    def adapters_delete_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyParamConfig):
            return None
        for layer in sites.layers:
            q = layer.self_attn.q.module
            host = q.toy_param
            unparametrize(q, "weight", host.units[name])
            host.remove_unit(name)
            if host.is_empty:
                host.detach()
        return True


@pytest.fixture
def param_plugin(toy_plugins):
    registry = plugins.get_registry()
    registry.register(ToyParamPlugin(), "toy_param")
    yield
    registry.unregister("toy_param")


def _fingerprint(model):
    return {
        "classes": {n: type(m) for n, m in model.named_modules()},
        "params": {n: (p, p.detach().clone()) for n, p in model.named_parameters()},
        "keys": list(model.state_dict()),
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
        },
    }


def _assert_unchanged(model, before):
    after = _fingerprint(model)
    assert after["classes"] == before["classes"]  # no ParametrizedLinear left behind
    assert after["keys"] == before["keys"]
    assert after["hooks"] == before["hooks"]
    assert after["params"].keys() == before["params"].keys()
    for name, (param, value) in before["params"].items():
        now = after["params"][name][0]
        assert now is param  # the same Parameter object (optimizers keep working)
        assert torch.equal(now, value), name  # bit-identical


def test_a_failed_add_adapter_with_a_parametrisation_leaves_no_trace(param_plugin, ids):
    model = init_toy(methods=["toy_lora", "toy_shift", "toy_bottleneck", "toy_param"])
    base = model(ids).logits
    before = _fingerprint(model)
    with pytest.raises(RuntimeError, match="fails on layer 1"):
        model.add_adapter("p", config=ToyParamConfig(fail_at=1))
    _assert_unchanged(model, before)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and not hasattr(q, "parametrizations")
    assert not model.has_adapters()
    assert torch.equal(model(ids).logits, base)


def test_the_parametrising_plugin_works_and_deletes_cleanly(param_plugin, ids):
    model = init_toy(methods=["toy_lora", "toy_shift", "toy_bottleneck", "toy_param"])
    base = model(ids).logits
    before = _fingerprint(model)
    model.add_adapter("p", config="toy_param")
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is not nn.Linear  # parametrised while the adapter exists
    model.set_active_adapters("p")
    assert (model(ids).logits - base).abs().max() > 1e-3
    model.delete_adapter("p")
    assert type(q) is nn.Linear and not hasattr(q, "toy_param")
    assert {n: type(m) for n, m in model.named_modules()} == before["classes"]


def test_a_failed_overwrite_keeps_the_old_adapter_working(toy_plugins, ids, monkeypatch):
    from .toy_plugins import ToyLoRAUnit

    model = init_toy()
    model.add_adapter("a", config="toy_lora", set_active=True)
    randomize(model, "a")
    adapted = model(ids).logits
    before = _fingerprint(model)
    original = ToyLoRAUnit.__init__
    calls = {"n": 0}

    def fail_on_third(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        original(self, *args)

    monkeypatch.setattr(ToyLoRAUnit, "__init__", fail_on_third)
    with pytest.raises(RuntimeError, match="out of memory"):
        model.add_adapter("a", config="toy_lora", overwrite_ok=True)
    _assert_unchanged(model, before)
    assert torch.equal(model(ids).logits, adapted)  # old units and hooks are back


def test_the_host_owns_its_hooks_and_detach_removes_them(toy_plugins, ids):
    model = init_toy()
    q = model.model.layers[0].self_attn.q_proj
    hooks = len(q._forward_hooks)
    model.add_adapter("a", config="toy_lora")
    host = q.toy_lora
    assert isinstance(host, AdapterHost) and len(q._forward_hooks) == hooks + 1
    model.delete_adapter("a")
    assert len(q._forward_hooks) == hooks and not hasattr(q, "toy_lora")
    assert host.site_module is None


def test_a_deep_copy_has_its_own_hooks(toy_plugins, ids):
    model = init_toy()
    base = model(ids).logits
    model.add_adapter("a", config="toy_lora", set_active=True)
    randomize(model, "a")
    adapted = model(ids).logits
    twin = copy.deepcopy(model)
    twin.delete_adapter("a")  # removes the copy's hooks through the copy's handles
    assert torch.equal(twin(ids).logits, base)
    assert not any(len(m._forward_hooks) for m in twin.model.layers.modules())
    assert torch.equal(model(ids).logits, adapted)  # the original keeps its hooks


def test_activity_follows_units_merges_and_setups(toy_plugins):
    model = init_toy()
    model.add_adapter("a", config="toy_lora")
    host = model.model.layers[0].self_attn.q_proj.toy_lora
    assert host.is_active(Stack("a")) and not host.is_active(Stack("b"))
    assert not host.is_active(None)
    host.mark_merged("a")
    assert not host.owns("a") and not host.is_active(Stack("a"))
    host.unmark_merged("a")
    assert host.is_active(Stack("a"))


def test_the_undo_log_runs_newest_first_and_nested_operations_join(toy_plugins):
    model = init_toy()
    order = []
    with pytest.raises(KeyError):
        with operation(model):
            record_undo(model, lambda: order.append("outer first"))
            with operation(model):
                record_undo(model, lambda: order.append("inner"))
            record_undo(model, lambda: order.append("outer last"))
            raise KeyError("boom")
    assert order == ["outer last", "inner", "outer first"]
    record_undo(model, lambda: order.append("outside"))  # no operation: nothing recorded
    assert order == ["outer last", "inner", "outer first"]
    log = UndoLog()
    log.record(lambda: order.append("x"))
    assert len(log) == 1


class SubBlockEditHost(AdapterHost):
    """Adds 1 to a sub-block's output through core's sub-block hooks (no plugin needed)."""

    def on_attach(self, module):
        pass

    def edit(self, out, residual):
        return out + 1.0


def _hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_sub_block_hooks_belong_to_the_host(toy_plugins, ids):
    model = init_toy()
    site = model.adapter_sites.layers[1].sub_block("ffn")
    layer = site.layer.module
    before, base = _hook_counts(model), model(ids).logits
    with pytest.raises(KeyError), operation(model):
        host = SubBlockEditHost.attach(layer, "edit_host", model)
        host.add_sub_block_hook(site, host.edit)
        assert _hook_counts(model) != before
        raise KeyError("a later failure")
    assert _hook_counts(model) == before and not hasattr(layer, "edit_host")
    host = SubBlockEditHost.attach(layer, "edit_host", model)
    handle = host.add_sub_block_hook(site, host.edit)
    assert len(host._handles) == len(handle.handles) == 3  # layer, residual source, output
    edited = model(ids).logits
    assert (edited - base).abs().max() > 1e-3
    twin = copy.deepcopy(model)
    twin.model.layers[1].edit_host.detach()  # the copy's handles remove the copy's hooks
    assert _hook_counts(twin) == before and torch.equal(twin(ids).logits, base)
    assert torch.equal(model(ids).logits, edited)
    host.detach()
    assert _hook_counts(model) == before and torch.equal(model(ids).logits, base)
