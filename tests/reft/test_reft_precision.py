"""Half-precision models with ReFT: float32 interventions by default (the model's dtype on
request), forward close to float32, fp16 + GradScaler and bf16 training, meta device."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import AdapterModelInterface
from adapters_reft import DiReftConfig, LoReftConfig, NoReftConfig
from tests import models
from tests.models import SEED_INTERFACE
from tests.precision import HALF, adapter_dtypes, copy_adapter, llama_pair, logits, perturb, train

INTERFACE = {**SEED_INTERFACE, "adapter_methods": ["reft"]}
CONFIGS = {
    "loreft": lambda: LoReftConfig(r=2, init_weights_seed=0),
    "noreft": lambda: NoReftConfig(r=2, init_weights_seed=0),
    "direft": lambda: DiReftConfig(r=2, init_weights_seed=0),
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_float32_by_default_model_dtype_on_request(method, dtype):
    _, half = llama_pair(INTERFACE, dtype)
    half.add_adapter("a", CONFIGS[method]())
    assert adapter_dtypes(half, "a") == {torch.float32}
    half.add_adapter("b", CONFIGS[method](), adapter_dtype="model")
    assert adapter_dtypes(half, "b") == {dtype}


@pytest.mark.parametrize("adapter_dtype", [None, "model"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_forward_close_to_float32(method, dtype, adapter_dtype):
    reference, half = llama_pair(INTERFACE, dtype)
    reference.add_adapter("a", CONFIGS[method](), set_active=True)
    perturb(reference, "a", scale=0.2)
    half.add_adapter("a", CONFIGS[method](), set_active=True, adapter_dtype=adapter_dtype)
    copy_adapter(reference, half, "a")
    expected, got = logits(reference), logits(half)
    assert got.dtype == dtype and torch.isfinite(got).all()
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (got.float() - expected).abs().max() < tolerance * expected.abs().max()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_loreft_half_precision_training_converges(dtype):
    _, half = llama_pair(INTERFACE, dtype)
    half.add_adapter("a", LoReftConfig(r=2, prefix_positions=8, init_weights_seed=0))
    losses, moved = train(half, "a")
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(moved.values()), [k for k, v in moved.items() if not v]


def _build() -> torch.nn.Module:
    return adapters.init(models.llama(0), interface=AdapterModelInterface(**INTERFACE))


def test_meta_device_model_then_to_empty():
    reference = _build()
    reference.add_adapter("a", CONFIGS["loreft"](), set_active=True)
    with torch.device("meta"):
        meta = _build()
        meta.add_adapter("a", CONFIGS["loreft"](), set_active=True)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.load_state_dict(reference.state_dict(), strict=False)
    copy_adapter(reference, meta, "a")
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            meta.get_buffer(name).copy_(buffer)
    torch.testing.assert_close(logits(meta), logits(reference))


def test_seeded_init_under_another_device_context():
    plain = _build()
    plain.add_adapter("a", CONFIGS["loreft"]())
    inside = _build()
    with torch.device("meta"):
        inside.add_adapter("a", CONFIGS["loreft"]())
    for key, tensor in plain.adapter_state_dict("a").items():
        assert torch.equal(inside.adapter_state_dict("a")[key], tensor), key
