"""Composition: Stack, BatchSplit, Average, Parallel, and the SVD average."""

from __future__ import annotations

import pytest
import torch
from conftest import GPT2_INTERFACE, IDS, build_gpt2, init, logits, randomise

from adapters import AdapterSetup, Average, BatchSplit, Parallel, Stack
from adapters.errors import ConfigError
from adapters_lora import IA3Config, LoRAConfig


@pytest.fixture
def two(llama):
    for name, seed in (("a", 1), ("b", 2)):
        llama.add_adapter(name, LoRAConfig(r=2, attn_matrices=("q",)))
        randomise(llama, name, seed)
    return llama


def _q_out(model, setup, x):
    with AdapterSetup(setup), torch.no_grad():
        return model.model.layers[0].self_attn.q_proj(x)


def test_stack_adds_the_deltas(two):
    x = torch.randn(2, 3, 32)
    base = _q_out(two, None, x)
    da, db = _q_out(two, "a", x) - base, _q_out(two, "b", x) - base
    torch.testing.assert_close(
        _q_out(two, Stack("a", "b"), x), base + da + db, atol=1e-6, rtol=1e-5
    )


def test_stack_of_scale_adapters_multiplies(llama):
    for name, seed in (("a", 1), ("b", 2)):
        llama.add_adapter(name, IA3Config(attn_matrices=("q",), intermediate_lora=False))
        randomise(llama, name, seed, around_one=True)
    x = torch.randn(2, 3, 32)
    base = _q_out(llama, None, x)
    sa, sb = (
        llama.get_adapter(n)["model.layers.0.self_attn.q_proj"].lora_B.view(-1) for n in ("a", "b")
    )
    torch.testing.assert_close(
        _q_out(llama, Stack("a", "b"), x), base * sa * sb, atol=1e-6, rtol=1e-5
    )


def test_average_is_the_weighted_sum_of_deltas_without_extra_division(two):
    x = torch.randn(2, 3, 32)
    base = _q_out(two, None, x)
    da, db = _q_out(two, "a", x) - base, _q_out(two, "b", x) - base
    got = _q_out(two, Average("a", "b", weights=[3, 1]), x)
    torch.testing.assert_close(got, base + 0.75 * da + 0.25 * db, atol=1e-6, rtol=1e-5)


def test_batch_split_gives_each_adapter_its_rows(two):
    with AdapterSetup("a"):
        out_a = logits(two)
    with AdapterSetup("b"):
        out_b = logits(two)
    with AdapterSetup(BatchSplit("a", "b", batch_sizes=[1, 1])):
        split = logits(two)
    torch.testing.assert_close(split[0], out_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(split[1], out_b[1], atol=1e-5, rtol=0)


def test_parallel_runs_every_branch_on_the_whole_batch(two):
    with AdapterSetup("a"):
        out_a = logits(two)
    with AdapterSetup("b"):
        out_b = logits(two)
    two.set_active_adapters(Parallel("a", "b"))
    both = logits(two)
    assert both.shape[0] == 2 * IDS.shape[0]
    torch.testing.assert_close(both[:2], out_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(both[2:], out_b, atol=1e-5, rtol=0)


def test_fused_qkv_composes(llama):
    model = init(build_gpt2(), GPT2_INTERFACE)
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, LoRAConfig(r=2))
        randomise(model, name, seed)
    c_attn = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 3, 32)
    outs = {}
    for key, setup in (("0", None), ("a", "a"), ("b", "b"), ("ab", Stack("a", "b"))):
        with AdapterSetup(setup), torch.no_grad():
            outs[key] = c_attn(x)
    torch.testing.assert_close(outs["ab"], outs["a"] + outs["b"] - outs["0"], atol=1e-6, rtol=1e-5)


def test_svd_average_reproduces_the_weighted_delta(two):
    two.average_adapter(
        "avg", ["a", "b"], weights=[0.3, 0.7], combine_strategy="lora_delta_w_svd", svd_rank=2
    )
    x = torch.randn(2, 3, 32)
    base = _q_out(two, None, x)
    expected = base + 0.3 * (_q_out(two, "a", x) - base) + 0.7 * (_q_out(two, "b", x) - base)
    # rank(0.3 dA + 0.7 dB) <= 4 > 2: compare with the best rank-2 approximation
    unit = two.get_adapter("avg")["model.layers.0.self_attn.q_proj"]
    ua, ub = (two.get_adapter(n)["model.layers.0.self_attn.q_proj"] for n in ("a", "b"))
    full = 0.3 * ua.delta_weight() + 0.7 * ub.delta_weight()
    u, s, vh = torch.linalg.svd(full.detach())
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(unit.delta_weight().detach(), best, atol=1e-5, rtol=1e-4)
    got = _q_out(two, "avg", x)
    assert (got - expected).abs().max() < (expected - base).abs().max()


def test_svd_average_exact_when_rank_suffices(llama):
    llama.add_adapter("a", LoRAConfig(r=4, attn_matrices=("q",)))
    llama.add_adapter("b", LoRAConfig(r=4, attn_matrices=("q",)))
    randomise(llama, "a", 1)
    with torch.no_grad():  # b has rank 2 in a rank-4 adapter, so a+b... keep it rank<=4
        for key, unit in llama.get_adapter("b").items():
            unit.lora_A.copy_(llama.get_adapter("a")[key].lora_A)
            unit.lora_B.copy_(2 * llama.get_adapter("a")[key].lora_B)
    llama.average_adapter("avg", ["a", "b"], combine_strategy="lora_delta_w_svd")
    x = torch.randn(2, 3, 32)
    base = _q_out(llama, None, x)
    expected = base + 0.5 * (_q_out(llama, "a", x) - base) + 0.5 * (_q_out(llama, "b", x) - base)
    torch.testing.assert_close(_q_out(llama, "avg", x), expected, atol=1e-5, rtol=1e-4)


def test_svd_average_with_other_rank_raises(two):
    with pytest.raises(ConfigError, match="svd_rank=5"):
        two.average_adapter("avg", ["a", "b"], combine_strategy="lora_delta_w_svd", svd_rank=5)
    assert "avg" not in two.adapters_config
