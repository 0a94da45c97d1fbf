"""AdapterHub's model API where it is not covered elsewhere: ``iter_layers``, ``loading_info``
of ``load_adapter``, and ``load_model(..., output_loading_info=True)`` / ``interface=``."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaForCausalLM

import adapters
from adapters import CheckpointError

from .conftest import init_toy, llama, randomize, toy_interface


@pytest.fixture
def model(toy_plugins):
    model = init_toy()
    model.add_adapter("a", config="toy_lora[r=3]", set_active=True)
    randomize(model, "a")
    return model


def test_iter_layers_yields_index_and_layer_module(model):
    layers = list(model.iter_layers())
    assert [i for i, _ in layers] == list(range(len(model.model.layers)))
    assert all(module is model.model.layers[i] for i, module in layers)


def test_load_adapter_fills_loading_info_like_adapterhub(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    info: dict = {}
    fresh = init_toy(llama())
    fresh.load_adapter(str(tmp_path / "a"), loading_info=info)
    assert info == {"missing_keys": [], "unexpected_keys": []}
    earlier = {"missing_keys": ["x"], "unexpected_keys": []}  # extended, not replaced
    fresh.load_adapter(str(tmp_path / "a"), load_as="b", loading_info=earlier)
    assert earlier == {"missing_keys": ["x"], "unexpected_keys": []}


def test_a_failed_load_raises_and_leaves_loading_info_untouched(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    other = init_toy(llama())
    info: dict = {}
    with pytest.raises(CheckpointError):
        other.load_adapter(str(tmp_path / "a"), config="toy_lora[r=2]", loading_info=info)
    assert info == {} and not other.has_adapters()


def test_load_model_with_output_loading_info_returns_model_and_info(model, tmp_path):
    ids = torch.tensor([[1, 5, 9, 2]])
    expected = model(ids).logits
    model.save_pretrained(str(tmp_path))
    loaded, info = adapters.load_model(str(tmp_path), LlamaForCausalLM, output_loading_info=True)
    assert set(info) >= {"missing_keys", "unexpected_keys"}
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.active_adapters == model.active_adapters
    torch.testing.assert_close(loaded(ids).logits, expected)


def test_load_model_takes_an_interface_instead_of_the_saved_one(model, tmp_path):
    model.save_pretrained(str(tmp_path))
    os.remove(tmp_path / "adapter_interface.json")
    with pytest.raises(CheckpointError, match="interface="):
        adapters.load_model(str(tmp_path), LlamaForCausalLM)
    loaded = adapters.load_model(str(tmp_path), LlamaForCausalLM, interface=toy_interface())
    assert "a" in loaded.adapters_config
