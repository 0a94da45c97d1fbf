"""Composition: Stack, BatchSplit, Average, Parallel, and the SVD average."""

from __future__ import annotations

import pytest
import torch

from adapters import AdapterSetup, Average, BatchSplit, Parallel, Stack
from adapters.errors import ConfigError
from adapters_lora import IA3Config, LoRAConfig

from .lora_helpers import GPT2_INTERFACE, IDS, build_gpt2, init, logits, randomise


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


def _weighted_q_delta(model, weights):
    units = [model.get_adapter(n)["model.layers.0.self_attn.q_proj"] for n in weights]
    return sum(w * u.delta_weight().detach() for w, u in zip(weights.values(), units))


def test_svd_average_with_a_smaller_rank_is_the_best_approximation(two):
    two.average_adapter(
        "avg", ["a", "b"], weights=[0.3, 0.7], combine_strategy="lora_delta_w_svd", svd_rank=1
    )
    config = two.adapters_config["avg"]
    assert (config.r, config.alpha) == (1, 4.0)  # r=2, alpha=8 → r=1, alpha=4: same s=4
    unit = two.get_adapter("avg")["model.layers.0.self_attn.q_proj"]
    assert tuple(unit.lora_A.shape) == (1, 32) and unit.scaling == 4.0
    u, s, vh = torch.linalg.svd(_weighted_q_delta(two, {"a": 0.3, "b": 0.7}))
    torch.testing.assert_close(
        unit.delta_weight().detach(), s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5, rtol=1e-4
    )


def test_svd_average_with_a_larger_rank_is_exact(two):
    # two rank-2 adapters: their weighted sum has rank <= 4
    two.average_adapter(
        "avg", ["a", "b"], weights=[0.3, 0.7], combine_strategy="lora_delta_w_svd", svd_rank=4
    )
    config = two.adapters_config["avg"]
    assert (config.r, config.scaling) == (4, two.adapters_config["a"].scaling)
    x = torch.randn(2, 3, 32)
    base = _q_out(two, None, x)
    expected = base + 0.3 * (_q_out(two, "a", x) - base) + 0.7 * (_q_out(two, "b", x) - base)
    torch.testing.assert_close(_q_out(two, "avg", x), expected, atol=1e-5, rtol=1e-4)


def test_svd_average_keeps_the_rslora_scaling(llama):
    for name, seed in (("a", 1), ("b", 2)):
        llama.add_adapter(name, LoRAConfig(r=4, alpha=8, use_rslora=True, attn_matrices=("q",)))
        randomise(llama, name, seed)
    llama.average_adapter("avg", ["a", "b"], combine_strategy="lora_delta_w_svd", svd_rank=8)
    config = llama.adapters_config["avg"]
    assert config.r == 8 and config.use_rslora
    assert abs(config.scaling - 4.0) < 1e-12  # 8 / sqrt(4), kept: alpha = 8 * sqrt(2)
    unit = llama.get_adapter("avg")["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(
        unit.delta_weight().detach(),
        _weighted_q_delta(llama, {"a": 0.5, "b": 0.5}),
        atol=1e-5,
        rtol=1e-4,
    )


def test_svd_average_of_sources_with_different_ranks(llama):
    llama.add_adapter("a", LoRAConfig(r=2, alpha=4, attn_matrices=("q",)))
    llama.add_adapter("b", LoRAConfig(r=3, alpha=12, attn_matrices=("q",)))
    randomise(llama, "a", 1)
    randomise(llama, "b", 2)
    llama.average_adapter("avg", ["a", "b"], combine_strategy="lora_delta_w_svd", svd_rank=5)
    unit = llama.get_adapter("avg")["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(
        unit.delta_weight().detach(),
        _weighted_q_delta(llama, {"a": 0.5, "b": 0.5}),
        atol=1e-5,
        rtol=1e-4,
    )


def test_svd_average_on_a_fused_projection_works_per_slice():
    model = init(build_gpt2(), GPT2_INTERFACE)
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, LoRAConfig(r=2))
        randomise(model, name, seed)
    model.average_adapter("avg", ["a", "b"], combine_strategy="lora_delta_w_svd", svd_rank=4)
    units = [model.get_adapter(n)["transformer.h.0.attn.c_attn"] for n in ("a", "b", "avg")]
    assert tuple(units[2].lora_A.shape) == (8, 32)  # q and v slices, rank 4 each
    torch.testing.assert_close(
        units[2].delta_weight().detach(),
        0.5 * units[0].delta_weight().detach() + 0.5 * units[1].delta_weight().detach(),
        atol=1e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize(
    "options, message",
    [({"svd_rank": 0}, "svd_rank=0"), ({"svd_rank": 2.5}, "svd_rank=2.5"), ({"rank": 2}, "rank")],
)
def test_svd_average_with_bad_options_raises(two, options, message):
    with pytest.raises(ConfigError, match=message):
        two.average_adapter("avg", ["a", "b"], combine_strategy="lora_delta_w_svd", **options)
    assert "avg" not in two.adapters_config


def test_svd_average_of_different_targets_raises(llama):
    llama.add_adapter("a", LoRAConfig(attn_matrices=("q",)))
    llama.add_adapter("b", LoRAConfig(attn_matrices=("v",)))
    with pytest.raises(ConfigError, match="adapts other modules"):
        llama.average_adapter("avg", ["a", "b"], combine_strategy="lora_delta_w_svd")
    assert "avg" not in llama.adapters_config


def test_svd_average_of_ia3_raises(llama):
    llama.add_adapter("a", IA3Config())
    with pytest.raises(ConfigError, match="plain LoRA"):
        llama.average_adapter("avg", ["a"], combine_strategy="lora_delta_w_svd")
