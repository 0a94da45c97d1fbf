"""Several ReFT adapters at once: Stack, Average, BatchSplit, Parallel; unsupported blocks."""

from __future__ import annotations

import pytest
import torch

from adapters import AdapterSetup, Average, BatchSplit, CompositionError, Fuse, Parallel, Stack
from adapters_reft.layer import select_positions

from .reft_helpers import Capture, batch, randomise


def _two_adapters(model, layers="[0]"):
    model.add_adapter(
        "a", config=f"loreft[prefix_positions=2, suffix_positions=1, layers={layers}]"
    )
    model.add_adapter(
        "b", config=f"noreft[prefix_positions=1, suffix_positions=2, layers={layers}]"
    )
    randomise(model, "a", seed=1)
    randomise(model, "b", seed=2)


def _layer_io(model, setup):
    """Layer 0's output before and after ReFT under ``setup``, plus per-adapter edit fns."""
    module = model.adapter_sites.layers[0].layer.module
    host = module.adapters_reft
    hooks = dict(module._forward_hooks)
    module._forward_hooks.clear()
    before, after = Capture(), Capture()
    module.register_forward_hook(before)
    module._forward_hooks.update(hooks)
    module.register_forward_hook(after)
    inputs = batch()
    with torch.no_grad(), AdapterSetup(setup):
        model(**inputs)

    def edit(name, hidden):
        intervention = host.interventions[name]
        positions = select_positions(
            inputs["attention_mask"],
            3,
            0,
            7,
            None,
            intervention.prefix_positions,
            intervention.suffix_positions,
            hidden.device,
        )
        with torch.no_grad():
            return intervention.edit(hidden, positions)

    return before.value, after.value, edit


def test_stack_applies_the_adapters_in_order(llama):
    _two_adapters(llama)
    h, out, edit = _layer_io(llama, Stack("a", "b"))
    torch.testing.assert_close(out, edit("b", edit("a", h)), atol=1e-6, rtol=1e-6)
    assert (out - edit("a", h)).abs().max() > 1e-2  # b did something on top of a


def test_every_active_reft_adapter_is_applied(llama):
    _two_adapters(llama, layers='"all"')
    inputs = batch()
    with torch.no_grad():
        logits = {}
        for setup in ("a", "b", Stack("a", "b")):
            with AdapterSetup(setup):
                logits[str(setup)] = llama(**inputs).logits
    both = logits[str(Stack("a", "b"))]
    assert (both - logits["a"]).abs().max() > 1e-2 and (both - logits["b"]).abs().max() > 1e-2


def test_average_is_the_weighted_sum_of_the_edits(llama):
    _two_adapters(llama)
    h, out, edit = _layer_io(llama, Average("a", "b", weights=[0.25, 0.75]))
    expected = h + 0.25 * (edit("a", h) - h) + 0.75 * (edit("b", h) - h)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_batch_split_gives_each_adapter_its_rows(llama):
    _two_adapters(llama, layers='"all"')
    inputs = batch()
    with torch.no_grad():
        with AdapterSetup(BatchSplit("a", "b", batch_sizes=[1, 2])):
            split = llama(**inputs).logits
        with AdapterSetup("a"):
            only_a = llama(**inputs).logits
        with AdapterSetup("b"):
            only_b = llama(**inputs).logits
    torch.testing.assert_close(split[:1], only_a[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split[1:], only_b[1:], atol=1e-5, rtol=1e-5)


def test_parallel_runs_each_adapter_on_the_whole_batch(llama):
    _two_adapters(llama, layers='"all"')
    inputs = batch()
    llama.set_active_adapters(Parallel("a", "b"))
    with torch.no_grad():
        both = llama(**inputs).logits
        with AdapterSetup("a"):
            only_a = llama(**inputs).logits
        with AdapterSetup("b"):
            only_b = llama(**inputs).logits
    torch.testing.assert_close(both[:3], only_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[3:], only_b, atol=1e-5, rtol=1e-5)


def test_unsupported_block_raises_at_set_active_adapters(llama):
    _two_adapters(llama)
    with pytest.raises(CompositionError, match="Fuse"):
        llama.set_active_adapters(Fuse("a", "b"))


def test_parallel_with_generate_is_refused_with_the_fix(llama):
    _two_adapters(llama, layers='"all"')
    llama.set_active_adapters(Parallel("a", "b"))
    ids = torch.tensor([[0, 31, 32, 33], [41, 42, 43, 44]])
    with pytest.raises(CompositionError, match=r"Parallel.*generate.*AdapterSetup"):
        with torch.no_grad():
            llama.generate(
                input_ids=ids,
                attention_mask=(ids != 0).long(),
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=0,
            )
