"""merge_adapter / reset_adapter / merge_and_unload."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import transformers as tf

import adapters
from adapters.errors import ConfigError
from adapters_lora import DoRAConfig, IA3Config, LoRAConfig

from .lora_helpers import (
    BERT_INTERFACE,
    GPT2_INTERFACE,
    GQA_INTERFACE,
    LLAMA_INTERFACE,
    TinyGQA,
    build_gpt2,
    build_llama,
    build_qwen2,
    init,
    logits,
    randomise,
)


def build_bert(seed: int = 0):
    """Tiny BERT with non-trivial biases on every projection."""
    torch.manual_seed(seed)
    config = tf.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
    )
    bert = tf.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in bert.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return bert


CASES = {
    "lora-llama": (
        build_llama,
        LLAMA_INTERFACE,
        LoRAConfig(
            r=4, attn_matrices=("q", "k", "v", "o"), intermediate_lora=True, output_lora=True
        ),
        False,
    ),
    "ia3-qwen2-bias": (
        build_qwen2,
        LLAMA_INTERFACE,
        IA3Config(attn_matrices=("q", "k", "v")),
        True,
    ),
    "dora-qwen2-bias": (
        build_qwen2,
        LLAMA_INTERFACE,
        DoRAConfig(r=4, attn_matrices=("q", "v"), output_lora=True),
        False,
    ),
    "lora-gpt2-fused": (
        build_gpt2,
        GPT2_INTERFACE,
        LoRAConfig(r=2, attn_matrices=("q", "v", "o"), intermediate_lora=True),
        False,
    ),
    "ia3-gpt2-fused-bias": (
        partial(build_gpt2, biased=True),
        GPT2_INTERFACE,
        IA3Config(attn_matrices=("q", "v", "o"), output_lora=True),
        True,
    ),
    "ia3-bert-bias": (build_bert, BERT_INTERFACE, IA3Config(output_lora=True), True),
    "dora-gpt2-conv1d": (
        build_gpt2,
        GPT2_INTERFACE,
        DoRAConfig(r=2, attn_matrices=("o",), output_lora=True),
        False,
    ),
    "lora-gqa": (TinyGQA, GQA_INTERFACE, LoRAConfig(r=2, attn_matrices=("q", "k")), False),
}


def _prepared(case: str):
    build, interface, config, around_one = CASES[case]
    model = init(build(), interface)
    base = logits(model)
    model.add_adapter("a", config, set_active=True)
    randomise(model, "a", around_one=around_one)
    return model, base


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_equals_unmerged(case):
    model, base = _prepared(case)
    unmerged = logits(model)
    assert (unmerged - base).abs().max() > 1e-4
    model.merge_adapter("a")
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_reset_restores_the_base_model(case):
    model, base = _prepared(case)
    model.set_active_adapters(None)
    model.merge_adapter("a")
    assert (logits(model) - base).abs().max() > 1e-4
    model.reset_adapter("a")
    torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=0)


def test_dora_reset_really_assigns_the_weight():
    model, _ = _prepared("dora-qwen2-bias")
    weight = model.model.layers[0].self_attn.q_proj.weight
    original = weight.detach().clone()
    model.merge_adapter("a")
    assert not torch.allclose(weight, original)
    model.reset_adapter("a")
    assert torch.equal(weight, original)


def test_merged_adapter_is_not_applied_twice():
    model, _ = _prepared("lora-llama")
    unmerged = logits(model)
    model.merge_adapter("a")  # still the active setup
    assert model.active_adapters is not None
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)


def test_merge_and_unload_keeps_the_merged_weights():
    model, _ = _prepared("ia3-qwen2-bias")
    unmerged = logits(model)
    plain = model.merge_and_unload("a")
    assert plain is model and type(model) is tf.Qwen2ForCausalLM
    assert not adapters.is_initialized(model)
    assert not any("adapters_lora" in k for k in model.state_dict())
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)


def test_two_merged_adapters_reset_one_at_a_time():
    model = init(build_llama(), LLAMA_INTERFACE)
    base = logits(model)
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, LoRAConfig(r=2))
        randomise(model, name, seed)
    model.set_active_adapters("b")
    only_b = logits(model)
    model.set_active_adapters(None)
    model.merge_adapter("a")
    model.merge_adapter("b")
    model.reset_adapter("a")
    torch.testing.assert_close(logits(model), only_b, atol=1e-5, rtol=0)
    model.reset_adapter("b")
    torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=0)


def test_gated_adapter_cannot_merge():
    model = init(build_llama(), LLAMA_INTERFACE)
    model.add_adapter("a", LoRAConfig(use_gating=True))
    with pytest.raises(ConfigError, match="use_gating"):
        model.merge_adapter("a")
    assert not model.is_merged("a")


def _weights_and_biases(model) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.named_parameters()
        if "adapters_lora" not in k and k.endswith((".weight", ".bias"))
    }


@pytest.mark.parametrize("case", ["ia3-bert-bias", "ia3-qwen2-bias", "ia3-gpt2-fused-bias"])
def test_ia3_merge_scales_the_bias_and_reset_restores_it_bit_exactly(case):
    model, _ = _prepared(case)
    before = _weights_and_biases(model)
    unmerged = logits(model)
    model.merge_adapter("a")
    merged = _weights_and_biases(model)
    changed = [k for k in before if not torch.equal(before[k], merged[k])]
    assert any(k.endswith(".bias") for k in changed)  # the merge scales the bias
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    model.reset_adapter("a")
    after = _weights_and_biases(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merging_ia3_twice_and_resetting_one_keeps_the_other():
    model = init(build_bert(), BERT_INTERFACE)
    base = _weights_and_biases(model)
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, IA3Config(output_lora=True))
        randomise(model, name, seed, around_one=True)
    model.set_active_adapters("b")
    only_b = logits(model)
    model.set_active_adapters(None)
    model.merge_adapter("a")
    model.merge_adapter("b")
    model.reset_adapter("a")
    torch.testing.assert_close(logits(model), only_b, atol=1e-5, rtol=0)
    model.reset_adapter("b")
    assert all(torch.equal(v, _weights_and_biases(model)[k]) for k, v in base.items())


def test_deleting_a_merged_ia3_resets_it_and_keeps_the_other_merged():
    model = init(build_bert(), BERT_INTERFACE)
    model.add_adapter("a", IA3Config(output_lora=True))
    randomise(model, "a", 1, around_one=True)
    model.add_adapter("b", LoRAConfig(r=2, output_lora=True))
    randomise(model, "b", 2)
    model.set_active_adapters("b")
    only_b = logits(model)
    model.set_active_adapters(None)
    model.merge_adapter("a")
    model.merge_adapter("b")
    model.delete_adapter("a")  # reset first: its change leaves the weights and biases
    assert model.is_merged("b")
    torch.testing.assert_close(logits(model), only_b, atol=1e-5, rtol=0)


def test_merge_and_unload_of_two_merged_adapters_keeps_both():
    model = init(build_bert(), BERT_INTERFACE)
    model.add_adapter("a", IA3Config(output_lora=True))
    randomise(model, "a", 1, around_one=True)
    model.add_adapter("b", LoRAConfig(r=2, output_lora=True))
    randomise(model, "b", 2)
    model.merge_adapter("a")
    model.merge_adapter("b")
    both = logits(model)
    plain = model.merge_and_unload("a")
    torch.testing.assert_close(logits(plain), both, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config", [LoRAConfig(), IA3Config(), DoRAConfig()], ids=["lora", "ia3", "dora"]
)
def test_float64_merge_keeps_float64_precision(config):
    model = init(build_qwen2().double(), LLAMA_INTERFACE)
    model.add_adapter("a", config, set_active=True)
    randomise(model, "a", around_one=config.composition_mode == "scale")
    unmerged = logits(model)
    model.merge_adapter("a")
    torch.testing.assert_close(logits(model), unmerged, atol=1e-12, rtol=0)


def test_fresh_dora_is_exactly_the_base_model_in_float64():
    model = init(build_qwen2().double(), LLAMA_INTERFACE)
    base = logits(model)
    model.add_adapter("a", DoRAConfig(), set_active=True)
    torch.testing.assert_close(logits(model), base, atol=1e-12, rtol=0)
