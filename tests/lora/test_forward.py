"""The adapted forward pass: the math, the targets, and several architectures."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from adapters import AdapterSetup
from adapters.errors import ConfigError
from adapters_lora import IA3Config, LoRAConfig

from .lora_helpers import (
    BART_INTERFACE,
    GPT2_INTERFACE,
    GQA_INTERFACE,
    IDS,
    LLAMA_INTERFACE,
    TinyGQA,
    build_bart,
    build_gpt2,
    build_llama,
    build_qwen2,
    init,
    logits,
    randomise,
)


def test_fresh_lora_leaves_outputs_unchanged_because_b_is_zero(llama):
    base = logits(llama)
    llama.add_adapter("a", "lora", set_active=True)
    assert torch.equal(logits(llama), base)


def test_lora_adds_scaled_low_rank_delta_to_the_projection(llama):
    llama.add_adapter("a", LoRAConfig(r=4, alpha=8), set_active=True)
    randomise(llama, "a")
    proj = llama.model.layers[0].self_attn.q_proj
    unit = llama.get_adapter("a")["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 3, 32)
    with AdapterSetup("a"), torch.no_grad():
        got = proj(x)
    expected = x @ proj.weight.T + 2.0 * (x @ unit.lora_A.T @ unit.lora_B.T)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_rslora_scales_by_alpha_over_sqrt_r(llama):
    llama.add_adapter("a", LoRAConfig(r=4, alpha=8, use_rslora=True), set_active=True)
    randomise(llama, "a")
    proj = llama.model.layers[0].self_attn.v_proj
    unit = llama.get_adapter("a")["model.layers.0.self_attn.v_proj"]
    x = torch.randn(2, 3, 32)
    with AdapterSetup("a"), torch.no_grad():
        got = proj(x)
    torch.testing.assert_close(
        got, x @ proj.weight.T + 4.0 * (x @ unit.lora_A.T @ unit.lora_B.T), atol=1e-6, rtol=1e-5
    )


def test_output_differs_from_base_once_b_is_nonzero(llama):
    base = logits(llama)
    llama.add_adapter("a", "lora", set_active=True)
    randomise(llama, "a")
    assert (logits(llama) - base).abs().max() > 1e-2


def test_inactive_adapter_leaves_outputs_bit_identical(llama):
    base = logits(llama)
    llama.add_adapter("a", "lora")
    randomise(llama, "a")
    assert torch.equal(logits(llama), base)


def test_lora_init_is_kaiming_uniform_a_and_zero_b(llama):
    llama.add_adapter("a", LoRAConfig(r=8), set_active=True)
    unit = llama.get_adapter("a")["model.layers.0.self_attn.q_proj"]
    bound = math.sqrt(6.0 / (6.0 * 32))  # gain sqrt(2/(1+5)), fan_in 32
    assert unit.lora_A.abs().max() <= bound and unit.lora_A.abs().max() > bound / 2
    assert torch.count_nonzero(unit.lora_B) == 0


def test_bert_init_is_normal_002_for_both(llama):
    llama.add_adapter("a", LoRAConfig(r=8, init_weights="bert", attn_matrices=("q",)))
    unit = llama.get_adapter("a")["model.layers.0.self_attn.q_proj"]
    assert 0.01 < unit.lora_B.std() < 0.03 and 0.01 < unit.lora_A.std() < 0.03


def test_init_weights_seed_makes_initialisation_deterministic():
    a = init(build_llama(), LLAMA_INTERFACE)
    b = init(build_llama(), LLAMA_INTERFACE)
    config = LoRAConfig(init_weights="bert", init_weights_seed=7)
    a.add_adapter("x", config)
    b.add_adapter("x", config)
    for key, tensor in a.adapter_state_dict("x").items():
        assert torch.equal(tensor, b.adapter_state_dict("x")[key])


def test_o_in_attn_matrices_adapts_the_output_projection(llama):
    llama.add_adapter("a", LoRAConfig(attn_matrices=("o",)), set_active=True)
    assert list(llama.get_adapter("a")) == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    base = logits(llama)
    randomise(llama, "a")
    assert (logits(llama) - base).abs().max() > 1e-2


def test_targets_follow_the_config_flags_and_leave_out(llama):
    llama.add_adapter(
        "a",
        LoRAConfig(attn_matrices=("k",), intermediate_lora=True, output_lora=True, leave_out=(0,)),
    )
    assert sorted(llama.get_adapter("a")) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.self_attn.k_proj",
    ]


def test_ia3_scales_the_whole_output_bias_included_on_qwen2():
    # (W x + b) * s, as AdapterHub's forward and PEFT compute it (pitfall 5)
    model = init(build_qwen2(), LLAMA_INTERFACE)
    model.add_adapter("a", IA3Config(), set_active=True)
    randomise(model, "a", around_one=True)
    proj = model.model.layers[0].self_attn.k_proj
    unit = model.get_adapter("a")["model.layers.0.self_attn.k_proj"]
    x = torch.randn(2, 3, 32)
    with AdapterSetup("a"), torch.no_grad():
        got = proj(x)
        factor = unit.lora_B.view(-1)
        expected = (x @ proj.weight.T + proj.bias) * factor
        bias_unscaled = (x @ proj.weight.T) * factor + proj.bias
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert (got - bias_unscaled).abs().max() > 0.05  # the bias matters here


def test_ia3_fresh_adapter_is_identity():
    model = init(build_qwen2(), LLAMA_INTERFACE)
    base = logits(model)
    model.add_adapter("a", "ia3", set_active=True)
    torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=0)


def test_dora_fresh_adapter_is_identity_and_follows_the_paper(llama):
    base = logits(llama)
    llama.add_adapter("a", "dora", set_active=True)
    torch.testing.assert_close(logits(llama), base, atol=1e-5, rtol=0)
    randomise(llama, "a")
    proj = llama.model.layers[0].self_attn.q_proj
    unit = llama.get_adapter("a")["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 3, 32)
    with AdapterSetup("a"), torch.no_grad():
        got = proj(x)
    adapted = proj.weight + unit.scaling * unit.lora_B @ unit.lora_A
    expected = x @ (unit.magnitude[:, None] * adapted / adapted.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_gating_replaces_the_scaling_with_a_sigmoid_gate(llama):
    llama.add_adapter("a", LoRAConfig(use_gating=True, attn_matrices=("q",)), set_active=True)
    randomise(llama, "a")
    proj = llama.model.layers[0].self_attn.q_proj
    unit = llama.get_adapter("a")["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 3, 32)
    with AdapterSetup("a"), torch.no_grad():
        got = proj(x)
    gate = torch.sigmoid(unit.gate(x)).mean(dim=1, keepdim=True)
    expected = x @ proj.weight.T + (x @ unit.lora_A.T @ unit.lora_B.T) * gate
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_only_adapter_parameters_train_and_change(llama):
    llama.add_adapter("a", LoRAConfig(intermediate_lora=True))
    llama.train_adapter("a")
    randomise(llama, "a")
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    opt = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = llama(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in llama.state_dict().items() if not torch.equal(v, before[k])}
    adapter_keys = {k for k in before if ".adapters_lora.units.a." in k}
    assert changed == adapter_keys and adapter_keys
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable == adapter_keys


def test_eval_mode_model_stays_in_eval_after_add():
    model = init(build_llama(), LLAMA_INTERFACE)
    model.add_adapter("a", LoRAConfig(dropout=0.5), set_active=True)
    assert not any(m.training for m in model.modules())
    randomise(model, "a")
    assert torch.equal(logits(model), logits(model))


def test_gpt2_fused_conv1d_adapts_only_the_selected_slices():
    model = init(build_gpt2(), GPT2_INTERFACE)
    model.add_adapter("a", LoRAConfig(r=2, attn_matrices=("q", "v")), set_active=True)
    randomise(model, "a")
    c_attn = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        base = x @ c_attn.weight + c_attn.bias
        with AdapterSetup("a"):
            got = c_attn(x)
    diff = (got - base).abs().amax(dim=(0, 1))
    assert diff[:32].min() > 0 and diff[64:].min() > 0
    assert torch.equal(got[..., 32:64], base[..., 32:64])


def test_gqa_fused_widths_come_from_the_model_config():
    model = init(TinyGQA(), GQA_INTERFACE)  # q 16, k 8, v 8
    model.add_adapter("a", LoRAConfig(r=2, attn_matrices=("k",)), set_active=True)
    unit = model.get_adapter("a")["blocks.0.attn.qkv"]
    assert unit.slices == [(16, 24)] and tuple(unit.lora_B.shape) == (8, 2)
    randomise(model, "a")
    qkv = model.blocks[0].attn.qkv
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        base = x @ qkv.weight.T + qkv.bias
        with AdapterSetup("a"):
            got = qkv(x)
    torch.testing.assert_close(got[..., :16], base[..., :16])
    torch.testing.assert_close(got[..., 24:], base[..., 24:])
    assert (got[..., 16:24] - base[..., 16:24]).abs().max() > 1e-3


def test_fused_without_config_takes_the_query_width_from_the_output_projection():
    model = init(TinyGQA(heads=4, kv_heads=4, with_config=False), GQA_INTERFACE)
    model.add_adapter("a", LoRAConfig(attn_matrices=("v",)))
    assert model.get_adapter("a")["blocks.0.attn.qkv"].slices == [(32, 48)]
    fresh = init(_with_qkv_width(31), GQA_INTERFACE)
    with pytest.raises(ConfigError, match="out_features=31"):
        fresh.add_adapter("a", LoRAConfig(attn_matrices=("v",)))


def test_fused_gqa_without_config_is_not_split_into_equal_thirds():
    # q 16, k 4, v 4: 24 outputs, divisible by 3, yet not three equal parts
    model = init(TinyGQA(heads=4, kv_heads=1, with_config=False), GQA_INTERFACE)
    base = model(IDS).detach()
    model.add_adapter("a", LoRAConfig(r=4, attn_matrices=("k",)), set_active=True)
    assert model.get_adapter("a")["blocks.0.attn.qkv"].slices == [(16, 20)]
    randomise(model, "a")
    qkv = model.blocks[0].attn.qkv
    x = torch.randn(2, 3, 16)
    with AdapterSetup("a"), torch.no_grad():
        got = qkv(x)
    plain = torch.nn.functional.linear(x, qkv.weight, qkv.bias)
    torch.testing.assert_close(got[..., :16], plain[..., :16])
    torch.testing.assert_close(got[..., 20:], plain[..., 20:])
    assert (got[..., 16:20] - plain[..., 16:20]).abs().max() > 1e-3
    assert (model(IDS) - base).abs().max() > 1e-4


def test_fused_without_config_or_output_projection_uses_equal_thirds():
    interface = {k: v for k, v in GQA_INTERFACE.items() if k != "attn_o_proj"}
    model = init(TinyGQA(heads=4, kv_heads=4, with_config=False), interface)
    model.add_adapter("a", LoRAConfig(attn_matrices=("v",)))
    assert model.get_adapter("a")["blocks.0.attn.qkv"].slices == [(32, 48)]


def _with_qkv_width(width: int) -> nn.Module:
    model = TinyGQA(with_config=False)
    for block in model.blocks:
        block.attn.qkv = nn.Linear(16, width)
    return model


def test_fused_width_inconsistent_with_config_raises():
    model = TinyGQA()
    model.config.num_key_value_heads = 4  # claims 16+16+16 but the layer is 32 wide
    model = init(model, GQA_INTERFACE)
    with pytest.raises(ConfigError, match="cannot split"):
        model.add_adapter("a", "lora")


def test_bart_adapts_self_and_cross_attention_in_both_stacks():
    model = init(build_bart(), BART_INTERFACE)
    model.add_adapter("a", LoRAConfig(attn_matrices=("q",)), set_active=True)
    keys = sorted(model.get_adapter("a"))
    assert len([k for k in keys if "encoder_attn.q_proj" in k]) == 2  # decoder only
    assert len([k for k in keys if "self_attn.q_proj" in k]) == 4
    base_model = build_bart()
    randomise(model, "a")
    out = model(input_ids=IDS, decoder_input_ids=IDS).logits
    base = base_model(input_ids=IDS, decoder_input_ids=IDS).logits
    assert (out - base).abs().max() > 1e-4  # BART's weights are small (std 0.02)


def test_plain_module_without_transformers_works():
    model = init(TinyGQA(), GQA_INTERFACE)
    base = model(IDS).detach()
    model.add_adapter("a", LoRAConfig(intermediate_lora=True, output_lora=True), set_active=True)
    randomise(model, "a")
    assert (model(IDS) - base).abs().max() > 1e-3


def test_deepcopy_keeps_adapters_working(llama):
    llama.add_adapter("a", "lora", set_active=True)
    randomise(llama, "a")
    clone = copy.deepcopy(llama)
    torch.testing.assert_close(logits(clone), logits(llama))
    with torch.no_grad():
        next(iter(clone.get_adapter("a").values())).lora_B.zero_()
    assert not torch.equal(logits(clone), logits(llama))


def test_dtype_option_creates_weights_in_that_dtype(llama):
    llama.add_adapter("a", LoRAConfig(dtype="float64"), set_active=True)
    randomise(llama, "a")
    unit = llama.get_adapter("a")["model.layers.0.self_attn.q_proj"]
    assert unit.lora_A.dtype == torch.float64
    assert logits(llama).dtype == torch.float32


def test_non_linear_target_raises():
    model = TinyGQA()
    for block in model.blocks:
        block.up = nn.Sequential(nn.Linear(16, 32))
    model = init(model, GQA_INTERFACE)
    with pytest.raises(ConfigError, match="Sequential"):
        model.add_adapter("a", LoRAConfig(intermediate_lora=True))


def test_dora_on_a_fused_projection_raises():
    model = init(build_gpt2(), GPT2_INTERFACE)
    with pytest.raises(ConfigError, match="use_dora"):
        model.add_adapter("a", "dora")
    assert not model.has_adapters()


def test_gated_ia3_on_a_fused_projection_gates_each_slice():
    model = init(build_gpt2(biased=True), GPT2_INTERFACE)
    model.add_adapter("a", IA3Config(use_gating=True), set_active=True)
    randomise(model, "a", around_one=True)
    qkv = model.transformer.h[0].attn.c_attn
    unit = model.get_adapter("a")["transformer.h.0.attn.c_attn"]
    x = torch.randn(2, 3, 32)
    with AdapterSetup("a"), torch.no_grad():
        got = qkv(x)
        gate = torch.sigmoid(unit.gate(x)).mean(dim=1, keepdim=True)  # (2, 1, 2): k and v
    plain = x @ qkv.weight + qkv.bias
    factor = unit.lora_B.detach().view(-1)
    torch.testing.assert_close(got[..., :32], plain[..., :32])
    for j, (a, b) in enumerate(unit.slices):
        expected = plain[..., a:b] * factor[j * 32 : (j + 1) * 32] * gate[..., j : j + 1]
        torch.testing.assert_close(got[..., a:b], expected.detach())


def test_dropout_applies_in_train_mode_only():
    model = init(build_llama(), LLAMA_INTERFACE)
    model.add_adapter("a", LoRAConfig(dropout=0.5), set_active=True)
    randomise(model, "a")
    model.train_adapter("a")
    with torch.no_grad():
        first, second = model(input_ids=IDS).logits, model(input_ids=IDS).logits
    assert (first - second).abs().max() > 1e-3
    model.eval()
    torch.testing.assert_close(logits(model), logits(model), atol=0, rtol=0)


def test_leave_out_counts_layers_over_both_stacks_of_an_encoder_decoder():
    model = init(build_bart(), BART_INTERFACE)
    model.add_adapter("a", LoRAConfig(attn_matrices=("q",), leave_out=(0, 3)))
    assert sorted(model.get_adapter("a")) == [
        "model.decoder.layers.0.encoder_attn.q_proj",
        "model.decoder.layers.0.self_attn.q_proj",
        "model.encoder.layers.1.self_attn.q_proj",
    ]
