"""Core's adapter dtype policy (add_adapter(..., adapter_dtype=...)) with the example plugin,
which creates its weights in the layer's dtype: float32 on a half-precision model by default,
the model's dtype on request, exact casts in the forward, bf16 / fp16 + GradScaler training,
meta-device models."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import AdapterModelInterface
from tests import models
from tests.models import SEED_INTERFACE
from tests.precision import (
    HALF,
    adapter_dtypes,
    check_dtype_policy,
    check_forward_close_to_float32,
    check_invalid_adapter_dtype,
    check_meta_device_then_to_empty,
    check_seeded_init_under_device_context,
    check_training_converges,
)

pytest.importorskip("adapters_hidden_scale")

INTERFACE = {**SEED_INTERFACE, "adapter_methods": ["hidden_scale"]}
CONFIG = "hidden_scale"


def make_config() -> str:
    return CONFIG


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float32_by_default_model_dtype_or_a_dtype_on_request(dtype):
    half = check_dtype_policy(INTERFACE, make_config, dtype)
    half.add_adapter("c", CONFIG, adapter_dtype="float64")
    assert adapter_dtypes(half, "c") == {torch.float64}
    reference = adapters.init(models.llama(0), interface=AdapterModelInterface(**INTERFACE))
    reference.add_adapter("a", CONFIG)
    assert adapter_dtypes(reference, "a") == {torch.float32}
    double = adapters.init(models.llama(0).double(), interface=AdapterModelInterface(**INTERFACE))
    double.add_adapter("a", CONFIG)
    assert adapter_dtypes(double, "a") == {torch.float64}


def test_invalid_adapter_dtype_raises_before_touching_the_model():
    check_invalid_adapter_dtype(
        INTERFACE, make_config, bad=("int8",), match=r"adapter_dtype='int8'.*torch.float32"
    )


@pytest.mark.parametrize("adapter_dtype", [None, "model"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_forward_close_to_float32(dtype, adapter_dtype):
    check_forward_close_to_float32(INTERFACE, make_config, dtype, adapter_dtype, scale=0.3)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_training_converges(dtype):
    check_training_converges(INTERFACE, make_config, dtype, lr=0.05)


def test_meta_device_model_then_to_empty():
    check_meta_device_then_to_empty(INTERFACE, make_config)


def test_seeded_init_under_another_device_context():
    check_seeded_init_under_device_context(INTERFACE, make_config)
