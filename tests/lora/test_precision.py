"""Half-precision models: float32 LoRA / DoRA / IA3 weights by default, exact casts in the
forward, fp16 + GradScaler and bf16 training, merging rounded once, meta-device models."""

from __future__ import annotations

import pytest
import torch

from adapters.errors import ConfigError
from adapters_lora import DoRAConfig, IA3Config, LoRAConfig
from tests.precision import (
    HALF,
    adapter_dtypes,
    check_dtype_policy,
    check_forward_close_to_float32,
    check_invalid_adapter_dtype,
    check_meta_device_then_to_empty,
    check_seeded_init_under_device_context,
    check_training_converges,
    llama_pair,
    logits,
    perturb,
    train,
)

from .lora_helpers import LLAMA_INTERFACE

CONFIGS = {
    "lora": lambda: LoRAConfig(r=4, alpha=8, init_weights_seed=0),
    "dora": lambda: DoRAConfig(r=4, alpha=8, init_weights_seed=0),
    "ia3": lambda: IA3Config(),
    "gated": lambda: LoRAConfig(r=4, use_gating=True, init_weights_seed=0),
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_weights_are_float32_by_default_and_model_dtype_on_request(method, dtype):
    half = check_dtype_policy(LLAMA_INTERFACE, CONFIGS[method], dtype)
    half.add_adapter("c", CONFIGS[method](), adapter_dtype=torch.float64)
    assert adapter_dtypes(half, "c") == {torch.float64}
    # a float32 model keeps float32 adapters either way; the config's dtype option still wins
    reference, _ = llama_pair(LLAMA_INTERFACE, dtype)
    reference.add_adapter("a", CONFIGS[method](), adapter_dtype="model")
    assert adapter_dtypes(reference, "a") == {torch.float32}
    half.add_adapter("d", LoRAConfig(dtype="bfloat16"))
    assert adapter_dtypes(half, "d") == {torch.bfloat16}


def test_bad_adapter_dtype_raises_and_leaves_the_model_alone():
    check_invalid_adapter_dtype(LLAMA_INTERFACE, LoRAConfig)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_forward_is_close_to_float32_and_keeps_the_activation_dtype(method, dtype):
    check_forward_close_to_float32(LLAMA_INTERFACE, CONFIGS[method], dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_half_precision_training_converges_and_moves_every_tensor(method, dtype):
    lr = 0.1 if method == "ia3" else 1e-2
    half = check_training_converges(LLAMA_INTERFACE, CONFIGS[method], dtype, lr=lr)
    assert adapter_dtypes(half, "a") == {torch.float32}


def test_ia3_in_model_dtype_loses_updates_in_bf16():
    """The failure float32 weights prevent: IA3 vectors stored in bf16 near 1.0 round small
    AdamW updates away (the update is below bf16's resolution, 2**-7 at 1.0)."""
    _, half = llama_pair(LLAMA_INTERFACE, torch.bfloat16)
    half.add_adapter("a", IA3Config(), adapter_dtype="model")
    _, moved = train(half, "a", steps=3, lr=1e-3)
    assert not all(moved.values())
    half.add_adapter("b", IA3Config())
    _, moved = train(half, "b", steps=3, lr=1e-3)
    assert all(moved.values())


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merging_into_half_weights_is_computed_in_float32_and_rounded_once(method, dtype):
    _, half = llama_pair(LLAMA_INTERFACE, dtype)
    half.add_adapter("a", CONFIGS[method](), set_active=True)
    perturb(half, "a")
    unit = half.get_adapter("a")["model.layers.0.self_attn.v_proj"]
    module = half.model.layers[0].self_attn.v_proj
    original = module.weight.detach().clone()
    expected = unit.merged_weight(original).to(dtype)  # float32 math, one rounding
    unmerged = logits(half)
    half.merge_adapter("a")
    assert torch.equal(module.weight, expected)
    merged = logits(half)
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (merged.float() - unmerged.float()).abs().max() < tolerance * unmerged.abs().max()
    half.reset_adapter("a")
    assert torch.equal(module.weight, original)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_meta_device_model_then_to_empty(method):
    """A model built under ``torch.device("meta")`` takes seeded adapters (a CPU generator
    used for meta tensors) and works once materialised and loaded."""
    check_meta_device_then_to_empty(LLAMA_INTERFACE, CONFIGS[method])


@pytest.mark.parametrize("method", ["lora", "gated"])
def test_seeded_init_under_another_device_context_is_placed_like_the_model(method):
    """``add_adapter`` inside ``with torch.device(...)`` (here meta; cuda on a GPU) creates the
    adapter on the adapted weight's device, with the same seeded values as outside it."""
    check_seeded_init_under_device_context(LLAMA_INTERFACE, CONFIGS[method])


def test_load_adapter_takes_adapter_dtype(tmp_path):
    _, half = llama_pair(LLAMA_INTERFACE, torch.bfloat16)
    half.add_adapter("a", CONFIGS["lora"](), set_active=True)
    perturb(half, "a")
    expected = logits(half)
    half.save_adapter(str(tmp_path / "a"), "a")
    half.load_adapter(str(tmp_path / "a"), load_as="b", set_active=True)
    assert adapter_dtypes(half, "b") == {torch.float32}
    torch.testing.assert_close(logits(half), expected, atol=0, rtol=0)
    half.load_adapter(str(tmp_path / "a"), load_as="c", adapter_dtype="model")
    assert adapter_dtypes(half, "c") == {torch.bfloat16}
    with pytest.raises(ConfigError, match="adapter_dtype"):
        half.load_adapter(str(tmp_path / "a"), load_as="d", adapter_dtype="int8")
    assert "d" not in half.adapters_config


def test_float16_adapter_weights_cannot_be_unscaled_by_gradscaler():
    """Why float32 is the default: with ``adapter_dtype="model"`` on a float16 model the
    gradients are float16, which ``GradScaler`` refuses to unscale."""
    _, half = llama_pair(LLAMA_INTERFACE, torch.float16)
    half.add_adapter("a", CONFIGS["lora"](), adapter_dtype="model")
    with pytest.raises(ValueError, match="FP16 gradients"):
        train(half, "a", steps=1)
