"""Half-precision models with ReFT: float32 interventions by default (the model's dtype on
request), forward close to float32, fp16 + GradScaler and bf16 training, meta device."""

from __future__ import annotations

import pytest

from adapters_reft import DiReftConfig, LoReftConfig, NoReftConfig
from tests.models import SEED_INTERFACE
from tests.precision import (
    HALF,
    check_dtype_policy,
    check_forward_close_to_float32,
    check_meta_device_then_to_empty,
    check_seeded_init_under_device_context,
    check_training_converges,
)

INTERFACE = {**SEED_INTERFACE, "adapter_methods": ["reft"]}
CONFIGS = {
    "loreft": lambda: LoReftConfig(r=2, init_weights_seed=0),
    "noreft": lambda: NoReftConfig(r=2, init_weights_seed=0),
    "direft": lambda: DiReftConfig(r=2, init_weights_seed=0),
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
def test_loreft_half_precision_training_converges(dtype):
    def config():
        return LoReftConfig(r=2, prefix_positions=8, init_weights_seed=0)

    check_training_converges(INTERFACE, config, dtype)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_meta_device_model_then_to_empty(method):
    check_meta_device_then_to_empty(INTERFACE, CONFIGS[method])


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_seeded_init_under_another_device_context(method):
    check_seeded_init_under_device_context(INTERFACE, CONFIGS[method])
