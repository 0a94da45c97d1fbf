"""``model(**inputs, adapter_names=[...])``: one adapter (or None for the base model) per example,
served by core for every method that composes with ``apply_setup``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapters
from adapters import AdapterNotFoundError, AdapterSetup, CompositionError, Parallel

from .conftest import init_toy, randomize, toy_interface


@pytest.fixture
def model(toy_plugins):
    model = init_toy()
    for name, config in (("a", "toy_lora"), ("b", "toy_lora"), ("s", "toy_shift[prefix=2]")):
        model.add_adapter(name, config=config)
        randomize(model, name, seed=len(name) + ord(name))
    model.add_adapter("n", config="toy_bottleneck")
    return model


@pytest.fixture
def ids():
    return torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(0))


def alone(model, name, ids, **kwargs):
    with AdapterSetup(name):
        return model(ids, **kwargs).logits


def test_each_example_equals_running_it_alone_with_its_adapter(model, ids):
    names = ["b", None, "a", "s"]
    out = model(ids, adapter_names=names).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(out[i], alone(model, name, ids)[i])


def test_none_everywhere_is_the_base_model_even_with_an_active_setup(model, ids):
    model.set_active_adapters("a")
    out = model(ids, adapter_names=[None] * 4).logits
    torch.testing.assert_close(out, alone(model, None, ids))


def test_adapter_names_overrides_the_active_setup_for_one_call(model, ids):
    model.set_active_adapters(Parallel("a", "b"))
    out = model(ids, adapter_names=["a", "a", "b", "b"]).logits
    assert out.shape[0] == 4
    torch.testing.assert_close(out[2:], alone(model, "b", ids)[2:])
    assert model(ids).logits.shape[0] == 8  # the active Parallel setup is untouched


def test_per_example_positions_follow_padding(model):
    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    out = model(ids, attention_mask=mask, adapter_names=["s", "a", "s"]).logits
    for i, name in enumerate(["s", "a", "s"]):
        torch.testing.assert_close(out[i], alone(model, name, ids, attention_mask=mask)[i])


def test_unknown_adapter_name_raises(model, ids):
    with pytest.raises(AdapterNotFoundError, match="'zz', which is not added"):
        model(ids, adapter_names=["a", "zz", None, None])


def test_wrong_length_raises(model, ids):
    with pytest.raises(CompositionError, match="3 entries but the batch has 4 examples"):
        model(ids, adapter_names=["a", "b", None])


def test_a_single_string_is_refused_with_the_fix(model, ids):
    with pytest.raises(
        CompositionError, match="one adapter name .or None. per example.*AdapterSetup"
    ):
        model(ids, adapter_names="a")


def test_a_method_without_batch_split_cannot_run_per_example(model, ids):
    with pytest.raises(
        CompositionError, match=r"'n' \(toy_bottleneck\) cannot be used in PerExample"
    ):
        model(ids, adapter_names=["n", None, None, None])


def test_merged_adapters_are_refused(model, ids):
    model.merge_adapter("a")
    with pytest.raises(CompositionError, match=r"while \['a'\] are merged.*reset_adapter"):
        model(ids, adapter_names=["b", None, None, None])


def test_gradients_reach_each_example_s_adapter_only(model, ids):
    model.train()
    loss = model(ids, labels=ids, adapter_names=["a", "a", None, None]).loss
    loss.backward()
    a_grads = [p.grad for m in model.get_adapter("a").values() for p in m.parameters()]
    b_grads = [p.grad for m in model.get_adapter("b").values() for p in m.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in a_grads)
    assert all(g is None for g in b_grads)


def test_the_setup_object_is_reused_for_the_same_names(model, ids):
    seen = []

    def spy(module, args, output):
        seen.append(adapters.current_context().setup)

    handle = model.model.layers[0].register_forward_hook(spy)
    model(ids, adapter_names=["a", "b", None, "a"])
    model(ids, adapter_names=["a", "b", None, "a"])
    handle.remove()
    assert seen[0] is seen[1]
    assert [r.tolist() for r in seen[0].rows] == [[0, 3], [1]]


class Strict(nn.Module):
    """A model whose forward takes no **kwargs: it must never see adapter_names."""

    def __init__(self):
        super().__init__()
        from ..models import llama

        self.inner = llama()
        self.model = self.inner.model

    def forward(self, input_ids):
        return self.inner(input_ids=input_ids).logits


def test_the_base_forward_never_sees_adapter_names(toy_plugins, ids):
    fields = {k: v for k, v in toy_interface().to_dict().items()}
    fields["model_layers"] = "model.layers"
    fields["model_embeddings"] = "model.embed_tokens"
    model = Strict()
    adapters.init(model, interface=fields)
    model.add_adapter("a", config="toy_lora")
    randomize(model, "a", seed=3)
    out = model(ids, adapter_names=["a", None, "a", None])
    with AdapterSetup("a"):
        expected = model(ids)
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1], model(ids)[1])


def test_generate_selects_an_adapter_per_prompt(model):
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(2))
    names = ["a", None, "s"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, adapter_names=names)
    for i, name in enumerate(names):
        with AdapterSetup(name):
            single = model.generate(ids[i : i + 1], max_new_tokens=4, do_sample=False)
        torch.testing.assert_close(out[i], single[0])


def test_generate_repeats_names_for_beams_and_returned_sequences(model):
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    out = model.generate(ids, adapter_names=["b", None], **kwargs)
    with AdapterSetup("b"):
        first = model.generate(ids[:1], **kwargs)
    torch.testing.assert_close(out[:2], first)


def test_generate_checks_the_number_of_names(model):
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    with pytest.raises(CompositionError, match="1 entries but generate.. got 2 prompts"):
        model.generate(ids, max_new_tokens=2, adapter_names=["a"])


def test_threads_selecting_different_examples_get_their_own_outputs(model, ids):
    from concurrent.futures import ThreadPoolExecutor

    choices = [["a", "b", None, "s"], ["s", None, "b", "a"], [None, "a", "a", None]]
    expected = [model(ids, adapter_names=names).logits for names in choices]

    def call(i):
        return model(ids, adapter_names=choices[i % 3]).logits

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(call, range(24)))
    for i, out in enumerate(results):
        torch.testing.assert_close(out, expected[i % 3])
