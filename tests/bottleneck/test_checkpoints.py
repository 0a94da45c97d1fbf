"""Saving and loading bottleneck adapters in this library's format."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from .conftest import randomize, toy

CONFIGS = [
    "seq_bn[reduction_factor=4]",
    "double_seq_bn[reduction_factor=4, scaling='learned', use_gating=True]",
    "par_bn",
    "adapterplus[reduction_factor=4]",
    "seq_bn_inv[inv_adapter='glow']",
    "compacter[reduction_factor=2]",
    "compacter++[reduction_factor=2, shared_W_phm=True, factorized_phm_rule=True]",
    "compacter[reduction_factor=2, shared_phm_rule=False, factorized_phm_W=False]",
]


@pytest.mark.parametrize("config", CONFIGS)
def test_save_load_gives_identical_outputs_with_name_independent_keys(tmp_path, config, ids):
    model = toy(True)
    model.add_adapter("first", config=config, set_active=True)
    randomize(model, "first")
    with torch.no_grad():
        expected = model(ids)
    model.save_adapter(str(tmp_path), "first")
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert not any("first" in k for k in keys)
    other = toy(True)
    other.load_adapter(str(tmp_path), load_as="second", set_active=True)
    with torch.no_grad():
        torch.testing.assert_close(other(ids), expected, atol=0, rtol=0)


def test_compacter_saves_the_shared_phm_rule(tmp_path):
    """Pitfall 26: the rule shared across layers is part of the checkpoint."""
    model = toy(True)
    model.add_adapter("c", config="compacter[reduction_factor=2]")
    model.save_adapter(str(tmp_path), "c")
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert "bottleneck_shared.phm_rule" in keys
    assert not any(k.endswith("phm_rule") and "layers." in k for k in keys)


def test_deepcopy_keeps_outputs_and_shared_parameters(ids):
    model = toy(False)
    model.add_adapter("a", config="compacter[reduction_factor=2]", set_active=True)
    model.add_adapter("b", config="seq_bn_inv", set_active=False)
    randomize(model, "a")
    with torch.no_grad():
        expected = model(ids)
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(ids), expected, atol=0, rtol=0)
        # the copy's PHM layers use the copy's shared rule, not the original's
        twin_layer = twin.get_adapter("a")["layers.0.bottleneck.output_adapter"].adapter_up
        assert twin_layer.shared is twin.bottleneck_shared["a"]
