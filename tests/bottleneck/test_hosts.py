"""Bottleneck hosts are core's `AdapterHost`s: a failed add leaves the model exactly as it was
(no module, no hook, no weight change), a delete leaves no hook, and copies of the model keep
working (their hooks are removed through the copied handles)."""

from __future__ import annotations

import copy

import pytest
import torch

import adapters_bottleneck.plugin as bn_plugin
from adapters import AdapterSetup
from adapters.hosts import AdapterHost
from adapters.testing import assert_same_fingerprint, model_fingerprint
from adapters_bottleneck.placement import InvertibleHost, SubBlockHost

from .conftest import randomize, toy


class Boom(RuntimeError):
    pass


def hook_counts(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }


def run(model, ids, setup=None):
    with torch.no_grad():
        if setup is None:
            return model(ids)
        with AdapterSetup(setup):
            return model(ids)


def fail_on_call(monkeypatch, target: str, call: int) -> None:
    """Make ``adapters_bottleneck.plugin.<target>`` raise `Boom` at its ``call``-th call."""
    original = getattr(bn_plugin, target)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise Boom(f"{target} call {call}")
        return original(*args, **kwargs)

    monkeypatch.setattr(bn_plugin, target, failing)


def test_hosts_are_core_adapter_hosts(ids):
    model = toy(False)
    model.add_adapter("a", config="seq_bn_inv")
    host = model.layers[1].bottleneck_output
    assert isinstance(host, SubBlockHost) and isinstance(host, AdapterHost)
    assert isinstance(model.embed.bottleneck_invertible, InvertibleHost)
    # seq_bn: the FFN sub-block (layer pre-hook, residual pre-hook, output hook) and the
    # invertible adapter (embeddings hook, head pre-hook): every handle is the host's own
    assert len(host._handles) == 3
    assert len(model.embed.bottleneck_invertible._handles) == 2
    # parameter names are unchanged (AdapterHub-like, part of saved models)
    assert "layers.1.bottleneck_output.adapters.a.adapter_up.weight" in model.state_dict()


@pytest.mark.parametrize("post_ln", [True, False])
@pytest.mark.parametrize("failing", ["BottleneckAdapter", "invertible_adapter"])
def test_failed_add_leaves_the_model_bit_identical(monkeypatch, post_ln, failing, ids):
    """A failure on the last layer (or in the invertible part, after every layer's host was
    hooked) rolls back the hosts, their hooks and units; with an adapter already there, whose
    hosts switch to replace-the-add mode for the new one (post-LN), the old mode comes back."""
    model = toy(post_ln, layers=3)
    model.add_adapter("first", config="seq_bn")
    randomize(model, "first")
    before = model_fingerprint(model)
    hooks = hook_counts(model)
    base, adapted = run(model, ids), run(model, ids, "first")
    # 3 layers x (mh + output) adapters; the failing call is the last layer's FFN adapter
    call = 6 if failing == "BottleneckAdapter" else 1
    fail_on_call(monkeypatch, failing, call)
    config = "double_seq_bn_inv[original_ln_after=False]" if post_ln else "double_seq_bn_inv"
    with pytest.raises(Boom):
        model.add_adapter("second", config=config)
    assert_same_fingerprint(before, model_fingerprint(model))
    assert hook_counts(model) == hooks
    assert "second" not in model.adapters_config
    assert not hasattr(model.embed, "bottleneck_invertible")
    assert not hasattr(model.layers[0], "bottleneck_attention")
    for layer in model.layers:
        host = layer.bottleneck_output
        assert list(host.adapters) == ["first"] and not host.replacing
        assert len(host._handles) == 3
    torch.testing.assert_close(run(model, ids), base, atol=0, rtol=0)
    torch.testing.assert_close(run(model, ids, "first"), adapted, atol=0, rtol=0)
    # the model still takes the adapter afterwards, and deleting both leaves no hook
    monkeypatch.undo()
    model.add_adapter("second", config=config)
    randomize(model, "second", seed=2)
    assert (run(model, ids, "second") - base).abs().max() > 1e-2
    if post_ln:
        assert model.layers[2].bottleneck_output.replacing
    model.delete_adapter("second")
    assert not model.layers[2].bottleneck_output.replacing
    torch.testing.assert_close(run(model, ids, "first"), adapted, atol=0, rtol=0)
    model.delete_adapter("first")
    torch.testing.assert_close(run(model, ids), base, atol=0, rtol=0)


def test_failed_fusion_add_removes_its_layers(monkeypatch, ids):
    model = toy(True, layers=3)
    model.add_adapter("a", config="seq_bn")
    model.add_adapter("b", config="seq_bn")
    before = model_fingerprint(model)
    fail_on_call(monkeypatch, "BottleneckFusion", 3)
    with pytest.raises(Boom):
        model.add_adapter_fusion(["a", "b"])
    assert_same_fingerprint(before, model_fingerprint(model))
    assert all(len(layer.bottleneck_output.fusions) == 0 for layer in model.layers)
    assert not model.adapter_fusions


@pytest.mark.parametrize("post_ln", [True, False])
def test_delete_leaves_no_hook(post_ln, ids):
    model = toy(post_ln)
    before = model_fingerprint(model)
    hooks = hook_counts(model)
    base = run(model, ids)
    configs = {
        "seq": "seq_bn",
        "double_inv": "double_seq_bn_inv",
        "par": "par_bn",
        "plus": "adapterplus" if post_ln else "seq_bn[original_ln_after=False]",
        "compacter": "compacter[reduction_factor=2]",
    }
    for name, config in configs.items():
        model.add_adapter(name, config=config)
        randomize(model, name)
    assert hook_counts(model) != hooks
    for name in configs:
        model.delete_adapter(name)
    assert hook_counts(model) == hooks
    assert_same_fingerprint(before, model_fingerprint(model))
    torch.testing.assert_close(run(model, ids), base, atol=0, rtol=0)


def test_delete_on_a_deep_copy_removes_the_copys_hooks_only(ids):
    model = toy(True)
    hooks = hook_counts(model)
    model.add_adapter("a", config="adapterplus")
    model.add_adapter("b", config="seq_bn_inv")
    randomize(model, "a")
    randomize(model, "b", seed=3)
    adapted = run(model, ids, "a")
    with_hooks = hook_counts(model)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(run(clone, ids, "a"), adapted, atol=0, rtol=0)
    clone.delete_adapter("a")
    clone.delete_adapter("b")
    assert hook_counts(clone) == hooks
    assert hook_counts(model) == with_hooks
    torch.testing.assert_close(run(model, ids, "a"), adapted, atol=0, rtol=0)
    torch.testing.assert_close(run(clone, ids), run(model, ids), atol=0, rtol=0)
