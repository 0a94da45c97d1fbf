"""Core's adapter dtype policy (add_adapter(..., adapter_dtype=...)) with the example plugin,
which creates its weights in the layer's dtype: float32 on a half-precision model by default,
the model's dtype on request, exact casts in the forward, bf16 / fp16 + GradScaler training,
meta-device models."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import AdapterModelInterface
from adapters.errors import ConfigError
from tests import models
from tests.models import SEED_INTERFACE
from tests.precision import HALF, adapter_dtypes, copy_adapter, llama_pair, logits, perturb, train

pytest.importorskip("adapters_hidden_scale")

INTERFACE = {**SEED_INTERFACE, "adapter_methods": ["hidden_scale"]}
CONFIG = "hidden_scale"


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float32_by_default_model_dtype_or_a_dtype_on_request(dtype):
    reference, half = llama_pair(INTERFACE, dtype)
    half.add_adapter("a", CONFIG)
    assert adapter_dtypes(half, "a") == {torch.float32}
    half.add_adapter("b", CONFIG, adapter_dtype="model")
    assert adapter_dtypes(half, "b") == {dtype}
    half.add_adapter("c", CONFIG, adapter_dtype="float64")
    assert adapter_dtypes(half, "c") == {torch.float64}
    reference.add_adapter("a", CONFIG)
    assert adapter_dtypes(reference, "a") == {torch.float32}
    double = adapters.init(models.llama(0).double(), interface=AdapterModelInterface(**INTERFACE))
    double.add_adapter("a", CONFIG)
    assert adapter_dtypes(double, "a") == {torch.float64}


def test_invalid_adapter_dtype_raises_before_touching_the_model():
    _, half = llama_pair(INTERFACE, torch.bfloat16)
    names = [n for n, _ in half.named_modules()]
    with pytest.raises(ConfigError, match=r"adapter_dtype='int8'.*torch.float32"):
        half.add_adapter("a", CONFIG, adapter_dtype="int8")
    assert not half.has_adapters()
    assert [n for n, _ in half.named_modules()] == names


@pytest.mark.parametrize("adapter_dtype", [None, "model"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_forward_close_to_float32(dtype, adapter_dtype):
    reference, half = llama_pair(INTERFACE, dtype)
    reference.add_adapter("a", CONFIG, set_active=True)
    perturb(reference, "a", scale=0.3)
    half.add_adapter("a", CONFIG, set_active=True, adapter_dtype=adapter_dtype)
    copy_adapter(reference, half, "a")
    expected, got = logits(reference), logits(half)
    assert got.dtype == dtype and torch.isfinite(got).all()
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (got.float() - expected).abs().max() < tolerance * expected.abs().max()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_training_converges(dtype):
    _, half = llama_pair(INTERFACE, dtype)
    half.add_adapter("a", CONFIG)
    losses, moved = train(half, "a", lr=0.05)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(moved.values()), [k for k, v in moved.items() if not v]


def test_meta_device_model_then_to_empty():
    def build():
        return adapters.init(models.llama(0), interface=AdapterModelInterface(**INTERFACE))

    reference = build()
    reference.add_adapter("a", CONFIG, set_active=True)
    perturb(reference, "a")
    with torch.device("meta"):
        meta = build()
        meta.add_adapter("a", CONFIG, set_active=True)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.load_state_dict(reference.state_dict(), strict=False)
    copy_adapter(reference, meta, "a")
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            meta.get_buffer(name).copy_(buffer)
    torch.testing.assert_close(logits(meta), logits(reference))
