"""average_adapter for LoRA/IA3: linear averaging of adapters that differ in dropout or
init_weights, and "lora_linear_only_negate_b", against AdapterHub 1.3.0's outputs (fixtures
llama/ah_avg_a, llama/ah_avg_b made by tests/fixtures/lora/make_fixtures.py)."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from adapters.errors import ConfigError
from adapters_lora import DoRAConfig, IA3Config, LoRAConfig

from .lora_helpers import FIXTURES, LLAMA_INTERFACE, build_llama, init, logits, randomise

EXPECTED = load_file(os.path.join(FIXTURES, "expected.safetensors"))


@pytest.fixture
def ah_sources():
    model = init(
        tf.LlamaForCausalLM.from_pretrained(os.path.join(FIXTURES, "llama", "base")),
        LLAMA_INTERFACE,
    )
    for name in ("ah_avg_a", "ah_avg_b"):
        model.load_adapter(os.path.join(FIXTURES, "llama", name))
    a, b = model.adapters_config["ah_avg_a"], model.adapters_config["ah_avg_b"]
    assert (a.dropout, a.init_weights) != (b.dropout, b.init_weights)
    assert a.replace(dropout=b.dropout, init_weights=b.init_weights) == b
    return model


@pytest.mark.parametrize(
    "strategy, weights",
    [("linear", [0.25, 0.75]), ("lora_linear_only_negate_b", [1.0, -0.5])],
)
def test_average_gives_adapterhubs_outputs(ah_sources, strategy, weights):
    model = ah_sources
    model.average_adapter(
        "avg",
        ["ah_avg_a", "ah_avg_b"],
        weights=weights,
        combine_strategy=strategy,
        normalize_weights=False,
        svd_rank=None,  # AdapterHub's signature always has it
    )
    # AdapterHub gives the average the first source's config
    assert model.adapters_config["avg"] == model.adapters_config["ah_avg_a"]
    model.set_active_adapters("avg")
    out = logits(model)
    assert (out - EXPECTED["llama/base"]).abs().max() > 1e-3
    torch.testing.assert_close(out, EXPECTED[f"llama/ah_avg_{strategy}"], atol=1e-5, rtol=0)


@pytest.fixture
def llama():
    return init(build_llama(), LLAMA_INTERFACE)


def test_negate_b_negates_only_b(llama):
    llama.add_adapter("a", LoRAConfig(r=2))
    llama.add_adapter("b", LoRAConfig(r=2, dropout=0.2))
    randomise(llama, "a", 1)
    randomise(llama, "b", 2)
    llama.average_adapter(
        "avg",
        ["a", "b"],
        weights=[0.6, -0.4],
        combine_strategy="lora_linear_only_negate_b",
        normalize_weights=False,
    )
    key = "model.layers.0.self_attn.q_proj"
    a, b, avg = (llama.get_adapter(n)[key] for n in ("a", "b", "avg"))
    torch.testing.assert_close(avg.lora_A, 0.6 * a.lora_A + 0.4 * b.lora_A)
    torch.testing.assert_close(avg.lora_B, 0.6 * a.lora_B - 0.4 * b.lora_B)


def test_negate_b_on_ia3_is_the_weighted_sum_of_the_vectors(llama):
    llama.add_adapter("a", IA3Config())
    llama.add_adapter("b", IA3Config(init_weights="bert"))
    randomise(llama, "a", 1, around_one=True)
    randomise(llama, "b", 2, around_one=True)
    llama.average_adapter(
        "avg",
        ["a", "b"],
        weights=[1.5, -0.5],
        combine_strategy="lora_linear_only_negate_b",
        normalize_weights=False,
    )
    key = "model.layers.1.self_attn.k_proj"
    a, b, avg = (llama.get_adapter(n)[key] for n in ("a", "b", "avg"))
    torch.testing.assert_close(avg.lora_B, 1.5 * a.lora_B - 0.5 * b.lora_B)


@pytest.mark.parametrize(
    "second, message",
    [
        (LoRAConfig(r=4), "equal configs"),
        (DoRAConfig(r=2), "equal configs"),
    ],
)
def test_negate_b_refuses_other_configs(llama, second, message):
    llama.add_adapter("a", LoRAConfig(r=2))
    llama.add_adapter("b", second)
    with pytest.raises(ConfigError, match=message):
        llama.average_adapter("avg", ["a", "b"], combine_strategy="lora_linear_only_negate_b")
    assert "avg" not in llama.adapters_config


def test_negate_b_refuses_dora(llama):
    llama.add_adapter("a", DoRAConfig(r=2))
    with pytest.raises(ConfigError, match="use_dora=True"):
        llama.average_adapter("avg", ["a"], combine_strategy="lora_linear_only_negate_b")
    assert "avg" not in llama.adapters_config


def test_linear_average_still_refuses_other_ranks(llama):
    llama.add_adapter("a", LoRAConfig(r=2))
    llama.add_adapter("b", LoRAConfig(r=4, dropout=0.1))
    with pytest.raises(ConfigError, match="identical configs"):
        llama.average_adapter("avg", ["a", "b"])
    assert "avg" not in llama.adapters_config


def test_svd_rank_none_uses_the_default_rank(llama):
    llama.add_adapter("a", LoRAConfig(r=2))
    llama.add_adapter("b", LoRAConfig(r=2))
    randomise(llama, "a", 1)
    randomise(llama, "b", 2)
    llama.average_adapter("avg", ["a", "b"], combine_strategy="lora_delta_w_svd", svd_rank=None)
    assert llama.adapters_config["avg"].r == 2  # the first source's r
