"""``model(**inputs, adapter_names=[...])`` with ReFT adapters: each example's positions come
from its own row of the mask (core's generic per-example path)."""

from __future__ import annotations

import pytest
import torch

from adapters import AdapterNotFoundError, AdapterSetup, CompositionError

from .reft_helpers import batch, randomise


@pytest.fixture
def two(llama):
    llama.add_adapter("a", config="loreft[prefix_positions=2, suffix_positions=1]")
    llama.add_adapter("b", config="noreft[prefix_positions=1, suffix_positions=2, layers=[1]]")
    randomise(llama, "a", seed=1)
    randomise(llama, "b", seed=2)
    return llama


def alone(model, name, inputs):
    with torch.no_grad(), AdapterSetup(name):
        return model(**inputs).logits


@pytest.mark.parametrize("names", [["b", None, "a"], ["a", "b", "a"], [None, "a", None]])
def test_each_padded_example_equals_running_it_alone(two, names):
    inputs = batch()  # right-padded, full and left-padded rows
    with torch.no_grad():
        out = two(**inputs, adapter_names=names).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(out[i], alone(two, name, inputs)[i], atol=1e-5, rtol=1e-5)


def test_unknown_and_wrong_length_raise(two):
    inputs = batch()
    with pytest.raises(AdapterNotFoundError, match="'c'"):
        two(**inputs, adapter_names=["a", "c", None])
    with pytest.raises(CompositionError, match="2 entries but the batch has 3"):
        two(**inputs, adapter_names=["a", "b"])


def test_generate_per_prompt_edits_only_each_prompt(two):
    inputs = batch()
    names = ["a", "b", None]
    out = two.generate(**inputs, max_new_tokens=3, do_sample=False, adapter_names=names)
    for i, name in enumerate(names):
        with AdapterSetup(name):
            full = two.generate(**inputs, max_new_tokens=3, do_sample=False)
        torch.testing.assert_close(out[i], full[i])
