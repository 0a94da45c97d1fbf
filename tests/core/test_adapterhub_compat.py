"""AdapterHub behaviours a script relies on: the ``base_model`` fallback on a bare backbone,
``active_adapters`` for lists, the ``MultiTask`` block with ``task_ids``."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaModel

import adapters
from adapters import (
    AdapterSetup,
    Average,
    CompositionError,
    Fuse,
    InterfacePathError,
    MultiTask,
    Stack,
)
from adapters.composition import parse_composition

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


# -- active_adapters for lists (AdapterHub's list form) -----------------------------------------
@pytest.fixture
def two(toy_plugins):
    model = init_toy()
    for i, name in enumerate(("a", "b", "c")):
        model.add_adapter(name, "toy_lora[r=2]")
        randomize(model, name, seed=i + 1)
    return model


def test_active_adapters_of_a_name_a_list_and_a_block_as_adapterhub(two):
    two.set_active_adapters("a")
    assert two.active_adapters == Stack("a")
    two.active_adapters = ["a", "b"]
    assert two.active_adapters == Stack("a", "b")
    assert two.active_adapters.flatten() == ["a", "b"]  # AdapterHub: {"a", "b"}
    two.set_active_adapters(Average("a", "b"))
    assert two.active_adapters == Average("a", "b")
    two.set_active_adapters(None)
    assert two.active_adapters is None


def test_a_list_inside_the_list_is_a_fuse_as_in_adapterhub():
    assert parse_composition([["a", "b"], "c"]) == Stack(Fuse("a", "b"), "c")
    assert parse_composition(["x", [["a", "b"], "c"]]) == Stack("x", Fuse(Stack("a", "b"), "c"))
    assert Stack("x", Fuse(Stack("a", "b"), "c")).flatten() == ["x", "a", "b", "c"]
    with pytest.raises(CompositionError, match="empty list"):
        parse_composition(["a", []])


# -- MultiTask with task_ids ----------------------------------------------------------------
def test_multitask_task_ids_run_one_adapter_per_example(two, ids):
    batch = torch.cat([ids, ids])  # 4 examples
    expected = two(batch, adapter_names=["a", "b", "b", "a"]).logits
    two.set_active_adapters(MultiTask("a", "b"))
    for task_ids in (
        torch.tensor([0, 1, 1, 0]),
        [0, 1, 1, 0],
        ["a", "b", "b", "a"],
    ):
        torch.testing.assert_close(two(batch, task_ids=task_ids).logits, expected)
    out_a = two(batch, task_ids=[0, 0, 0, 0]).logits
    with AdapterSetup("a"):
        torch.testing.assert_close(out_a, two(batch).logits)


def test_multitask_task_ids_are_validated(two, ids):
    two.set_active_adapters(MultiTask("a", "b"))
    with pytest.raises(CompositionError, match="needs task_ids"):
        two(ids)
    with pytest.raises(CompositionError, match="index 2"):
        two(ids, task_ids=[0, 2])
    with pytest.raises(CompositionError, match="'c', which is not a child"):
        two(ids, task_ids=["a", "c"])
    with pytest.raises(CompositionError, match="3 entries but the batch has 2"):
        two(ids, task_ids=[0, 1, 0])
    with pytest.raises(CompositionError, match="integer tensor"):
        two(ids, task_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(CompositionError, match="not both"):
        two(ids, task_ids=[0, 1], adapter_names=["a", "b"])
    two.set_active_adapters("a")
    with pytest.raises(CompositionError, match="not a MultiTask"):
        two(ids, task_ids=[0, 1])  # would be swallowed by the forward otherwise


def test_multitask_children_are_names_at_the_top(two):
    with pytest.raises(CompositionError, match="adapter names here"):
        MultiTask("a", Stack("b", "c"))
    with pytest.raises(CompositionError, match="top of a setup"):
        two.set_active_adapters(Stack("c", MultiTask("a", "b")))


def test_multitask_generate_maps_task_ids_per_prompt(two):
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10]])
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    expected = two.generate(prompts, adapter_names=["b", "a"], **kwargs)
    two.set_active_adapters(MultiTask("a", "b"))
    torch.testing.assert_close(two.generate(prompts, task_ids=[1, 0], **kwargs), expected)
    with pytest.raises(CompositionError, match="needs task_ids"):
        two.generate(prompts, **kwargs)


def test_multitask_setup_survives_save_pretrained(two, ids, tmp_path):
    two.set_active_adapters(MultiTask("a", "b"))
    expected = two(ids, task_ids=[1, 0]).logits
    two.save_pretrained(str(tmp_path))
    loaded = adapters.load_model(str(tmp_path), type(two))
    assert loaded.active_adapters == MultiTask("a", "b")
    torch.testing.assert_close(loaded(ids, task_ids=[1, 0]).logits, expected)


def test_get_layer_iter_attentions_iter_layer_ffns_as_adapterhub(toy_plugins):
    model = init_toy()
    layers = model.model.layers
    assert model.get_layer(1) is layers[1] and model.get_layer(-1) is layers[-1]
    with pytest.raises(IndexError, match="out of range"):
        model.get_layer(2)
    assert list(model.iter_attentions()) == [
        (i, "self", layer.self_attn) for i, layer in enumerate(layers)
    ]
    assert list(model.iter_layer_ffns()) == [
        (i, kind, module)
        for i, layer in enumerate(layers)
        for kind, module in (("intermediate", layer.mlp.up_proj), ("output", layer.mlp.down_proj))
    ]
