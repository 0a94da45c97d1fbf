"""torch.compile(fullgraph=True) with ReFT: one graph (positions as masks, static shapes),
equal to eager for inference and a training step, and no stale graph after setup changes."""

from __future__ import annotations

import pytest
import torch

from adapters import AdapterSetup, BatchSplit
from tests.compiling import (  # noqa: F401  (fresh_dynamo: an autouse fixture)
    check_training_step_compiled_equals_eager,
    compiled,
    fresh_dynamo,
)
from tests.upstream import relies_on

from .reft_helpers import plain_tiny_llama, randomise, tiny_llama

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 61], [12, 1, 77, 31, 9, 50, 2]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
CONFIGS = [
    "loreft",
    "loreft[prefix_positions=2,suffix_positions=2]",  # two units per layer
    "noreft[prefix_positions=1,suffix_positions=3]",
    "direft",
]


def logits(model, **kwargs):
    return model(input_ids=IDS, attention_mask=MASK, **kwargs).logits


def two_adapters(config: str):
    model = tiny_llama()
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, config=config)
        randomise(model, name, seed=seed)
    return model


@pytest.mark.parametrize("config", CONFIGS)
def test_inference_compiles_fullgraph_and_equals_eager(config):
    model = two_adapters(config)
    model.set_active_adapters("a")
    eager = logits(model)
    with AdapterSetup(None):
        assert (eager - logits(model)).abs().max() > 1e-3
    torch.testing.assert_close(logits(compiled(model)), eager, atol=1e-5, rtol=0)


def test_explain_reports_one_graph_and_no_break():
    model = two_adapters("loreft")
    model.set_active_adapters("a")
    explanation = torch._dynamo.explain(model)(input_ids=IDS, attention_mask=MASK)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_model_follows_setup_changes_and_masks():
    model = two_adapters("loreft[prefix_positions=2,suffix_positions=1]")
    fast = compiled(model)
    for setup in ("a", "b", None, BatchSplit("a", "b", batch_sizes=[1, 1])):
        model.set_active_adapters(setup)
        torch.testing.assert_close(logits(fast), logits(model), atol=1e-5, rtol=0)
    with AdapterSetup("a"):
        torch.testing.assert_close(logits(fast), logits(model), atol=1e-5, rtol=0)
        right_padded = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
        eager = model(input_ids=IDS, attention_mask=right_padded).logits
        assert (eager - logits(model)).abs().max() > 1e-4  # other positions are edited
        torch.testing.assert_close(
            fast(input_ids=IDS, attention_mask=right_padded).logits, eager, atol=1e-5, rtol=0
        )


def test_training_step_compiled_equals_eager():
    model = two_adapters("loreft[dropout=0.0,prefix_positions=2,suffix_positions=2]")
    model.train_adapter("a")
    with relies_on("compiled_training", plain_tiny_llama):
        eager_grads = check_training_step_compiled_equals_eager(model, IDS, MASK)
    assert len(eager_grads) == 2 * 2 * 3  # layers x units x (W, b, R)
