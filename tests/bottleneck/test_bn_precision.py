"""Half-precision models with bottleneck adapters: float32 weights by default (the model's
dtype on request), forward close to float32, fp16 + GradScaler and bf16 training (seq_bn),
meta-device models; fusion layers follow ``adapter_dtype`` too."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import Fuse
from adapters_bottleneck import CompacterConfig, ParBnConfig, SeqBnConfig
from tests.models import SEED_INTERFACE
from tests.precision import (
    HALF,
    IDS,
    adapter_dtypes,
    check_dtype_policy,
    check_forward_close_to_float32,
    check_meta_device_then_to_empty,
    check_seeded_init_under_device_context,
    check_training_converges,
    llama_pair,
    logits,
    perturb,
)

INTERFACE = dict(
    SEED_INTERFACE,
    adapter_methods=["bottleneck"],
    layer_pre_self_attn="input_layernorm",
    layer_pre_ffn="post_attention_layernorm",
)
CONFIGS = {
    "seq_bn": lambda: SeqBnConfig(reduction_factor=4, init_weights_seed=0),
    "par_bn": lambda: ParBnConfig(reduction_factor=4, init_weights_seed=0),
    "compacter": lambda: CompacterConfig(reduction_factor=4, phm_dim=4, init_weights_seed=0),
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_float32_by_default_model_dtype_on_request(method, dtype):
    check_dtype_policy(INTERFACE, CONFIGS[method], dtype)


@pytest.mark.parametrize("adapter_dtype", [None, "model"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_forward_close_to_float32(method, dtype, adapter_dtype):
    check_forward_close_to_float32(INTERFACE, CONFIGS[method], dtype, adapter_dtype, scale=0.2)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_seq_bn_half_precision_training_converges(dtype):
    def config():
        return SeqBnConfig(reduction_factor=4, init_weights="bert")

    check_training_converges(INTERFACE, config, dtype)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_meta_device_model_then_to_empty(method):
    check_meta_device_then_to_empty(INTERFACE, CONFIGS[method])


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_seeded_init_under_another_device_context(method):
    check_seeded_init_under_device_context(INTERFACE, CONFIGS[method])


def fusion_dtypes(model, name):
    return {p.dtype for m in model.get_adapter_fusion(name).values() for p in m.parameters()}


def fused_pair(dtype, adapter_dtype=None, fusion_dtype=None):
    """(float32 reference, half model) with the same two seq_bn adapters and fusion layer."""
    reference, half = llama_pair(INTERFACE, dtype)
    for model, kwargs in ((reference, {}), (half, {"adapter_dtype": adapter_dtype})):
        for seed, name in enumerate(("a", "b"), start=1):
            config = SeqBnConfig(reduction_factor=4, init_weights_seed=seed)
            model.add_adapter(name, config, **kwargs)
            perturb(model, name, seed=seed, scale=0.2)
    reference.add_adapter_fusion(Fuse("a", "b"), set_active=True)
    half.add_adapter_fusion(Fuse("a", "b"), set_active=True, adapter_dtype=fusion_dtype)
    with torch.no_grad():  # a fusion that prefers adapter b at some positions, a at others
        for key, module in reference.get_adapter_fusion("a,b").items():
            for pname, p in module.named_parameters():
                gen = torch.Generator().manual_seed(len(key) + len(pname))
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        targets = half.get_adapter_fusion("a,b")
        for key, module in reference.get_adapter_fusion("a,b").items():
            for pname, p in module.named_parameters():
                targets[key].get_parameter(pname).copy_(p)
    return reference, half


@pytest.mark.parametrize("fusion_dtype", [None, "model"])
@pytest.mark.parametrize("adapter_dtype", [None, "model"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_fusion_layers_follow_adapter_dtype(dtype, adapter_dtype, fusion_dtype):
    """Fusion weights are float32 on a half model by default (the model's dtype with
    ``adapter_dtype="model"``), in any mix with the adapters' dtype; the forward casts, stays
    finite and close to float32."""
    reference, half = fused_pair(dtype, adapter_dtype, fusion_dtype)
    assert fusion_dtypes(half, "a,b") == {torch.float32 if fusion_dtype is None else dtype}
    assert adapter_dtypes(half, "a") == {torch.float32 if adapter_dtype is None else dtype}
    expected, got = logits(reference), logits(half)
    assert got.dtype == dtype and torch.isfinite(got).all()
    with adapters.AdapterSetup("a"):
        only_a = logits(reference)
    assert (expected - only_a).abs().max() > 1e-2  # the fusion matters
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (got.float() - expected).abs().max() < tolerance * expected.abs().max()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_one_fusion_training_step_moves_every_fusion_weight(dtype):
    _, half = fused_pair(dtype)
    half.train_adapter_fusion(Fuse("a", "b"))
    params = {
        f"{key}.{pname}": p
        for key, module in half.get_adapter_fusion("a,b").items()
        for pname, p in module.named_parameters()
    }
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params.values())
    before = {k: p.detach().clone() for k, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    loss = half(input_ids=IDS, labels=IDS).loss
    assert torch.isfinite(loss)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    half.eval()
    for key, p in params.items():
        assert torch.isfinite(p).all(), key
        assert not torch.equal(before[key], p.detach()), f"{key} did not move"
    assert torch.isfinite(logits(half)).all()
