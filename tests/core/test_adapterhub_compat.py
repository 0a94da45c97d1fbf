"""AdapterHub behaviours a script relies on: the ``base_model`` fallback on a bare backbone,
``active_adapters`` for lists, the ``MultiTask`` block with ``task_ids``."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaModel

import adapters
from adapters import InterfacePathError

from .conftest import init_toy, llama, randomize, toy_interface


def test_base_model_path_absent_on_a_bare_backbone_falls_back_to_the_model(toy_plugins):
    # written for LlamaForCausalLM: the backbone sits at ``model``
    interface = toy_interface(base_model="model")
    full = llama()
    adapters.init(full, interface=interface)
    bare = LlamaModel(full.config).eval()
    bare.load_state_dict(full.model.state_dict())
    adapters.init(bare, interface=interface)
    assert bare.adapter_sites.base_model.module is bare
    assert [m for _, m in bare.iter_layers()] == list(bare.layers)
    full.add_adapter("a", "toy_lora[r=2]", set_active=True)
    bare.add_adapter("a", "toy_lora[r=2]", set_active=True)
    randomize(full, "a")
    randomize(bare, "a")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    torch.testing.assert_close(
        bare(ids).last_hidden_state, full.model(ids).last_hidden_state, rtol=0, atol=1e-6
    )


def test_base_model_path_absent_and_layers_absent_still_names_base_model(toy_plugins):
    with pytest.raises(InterfacePathError, match="base_model"):
        adapters.init(llama(), interface=toy_interface(base_model="backbone"))
