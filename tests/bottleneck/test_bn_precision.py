"""Half-precision models with bottleneck adapters: float32 weights by default (the model's
dtype on request), forward close to float32, fp16 + GradScaler and bf16 training (seq_bn),
meta-device models."""

from __future__ import annotations

import pytest

from adapters_bottleneck import CompacterConfig, ParBnConfig, SeqBnConfig
from tests.models import SEED_INTERFACE
from tests.precision import (
    HALF,
    check_dtype_policy,
    check_forward_close_to_float32,
    check_meta_device_then_to_empty,
    check_seeded_init_under_device_context,
    check_training_converges,
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


@pytest.mark.xfail(
    strict=True,
    raises=NotImplementedError,
    reason="known gap: the plugin builds its modules under the ambient device (meta here) and "
    "then moves them with .to(), which cannot copy meta tensors (_place_like in plugin.py)",
)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_seeded_init_under_another_device_context(method):
    check_seeded_init_under_device_context(INTERFACE, CONFIGS[method])
