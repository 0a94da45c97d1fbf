"""torch.compile(fullgraph=True) with LoRA, IA³ and DoRA: one graph, equal to eager for
inference and for a training step, and no stale graph after setup changes or a merge.

Inference uses Dynamo's ``eager`` backend (same tracing and guards as inductor, no code
generation); training uses ``aot_eager`` so the backward is traced too.
"""

from __future__ import annotations

import pytest
import torch

from adapters import AdapterSetup
from tests.compiling import (  # noqa: F401  (fresh_dynamo: an autouse fixture)
    check_training_step_compiled_equals_eager,
    compiled,
    fresh_dynamo,
)

from .lora_helpers import GPT2_INTERFACE, LLAMA_INTERFACE, build_gpt2, build_llama, init, randomise

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 61], [12, 0, 77, 31, 9, 50, 2]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
CONFIGS = ["lora[dropout=0.0]", "ia3", "dora[dropout=0.0]"]


def logits(model, **kwargs):
    return model(input_ids=IDS, attention_mask=MASK, **kwargs).logits


def two_adapters(config: str, interface=LLAMA_INTERFACE, build=build_llama):
    model = init(build(), interface)
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, config=config)
        randomise(model, name, seed=seed, around_one=config.startswith("ia3"))
    return model


@pytest.mark.parametrize("config", CONFIGS)
def test_inference_compiles_fullgraph_and_equals_eager(config):
    model = two_adapters(config)
    model.set_active_adapters("a")
    eager = logits(model)
    with AdapterSetup(None):
        assert (eager - logits(model)).abs().max() > 1e-3
    torch.testing.assert_close(logits(compiled(model)), eager, atol=1e-5, rtol=0)


def test_fused_qkv_slices_compile_fullgraph():
    model = init(build_gpt2(), GPT2_INTERFACE)
    model.add_adapter("a", config="lora[attn_matrices=['q','v']]", set_active=True)
    randomise(model, "a")
    eager = logits(model)
    torch.testing.assert_close(logits(compiled(model)), eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", CONFIGS)
def test_explain_reports_one_graph_and_no_break(config):
    model = two_adapters(config)
    model.set_active_adapters("a")
    explanation = torch._dynamo.explain(model)(input_ids=IDS, attention_mask=MASK)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("config", CONFIGS)
def test_compiled_model_follows_setup_changes(config):
    model = two_adapters(config)
    fast = compiled(model)
    seen = []
    for setup in ("a", "b", None, ["a", "b"]):
        model.set_active_adapters(setup)
        eager = logits(model)
        torch.testing.assert_close(logits(fast), eager, atol=1e-5, rtol=0)
        seen.append(eager)
        with AdapterSetup("b" if setup == "a" else "a"):
            torch.testing.assert_close(logits(fast), logits(model), atol=1e-5, rtol=0)
    assert min((x - y).abs().max() for i, x in enumerate(seen) for y in seen[i + 1 :]) > 1e-4


def test_compiled_model_follows_merge_and_reset():
    model = two_adapters("lora")
    model.set_active_adapters("a")
    fast = compiled(model)
    unmerged = logits(fast)
    with AdapterSetup(None):
        base = logits(fast)
    assert (unmerged - base).abs().max() > 1e-3
    model.merge_adapter("a")  # the unit must not be applied a second time
    torch.testing.assert_close(logits(fast), logits(model), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(fast), unmerged, atol=1e-4, rtol=0)
    with AdapterSetup(None):  # merged: the weights themselves carry the adapter now
        torch.testing.assert_close(logits(fast), unmerged, atol=1e-4, rtol=0)
    model.reset_adapter("a")
    torch.testing.assert_close(logits(fast), unmerged, atol=1e-5, rtol=0)
    with AdapterSetup(None):
        torch.testing.assert_close(logits(fast), base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", CONFIGS)
def test_training_step_compiled_equals_eager(config):
    model = two_adapters(config)
    model.train_adapter("a")
    eager_grads = check_training_step_compiled_equals_eager(model, IDS, MASK)
    assert all(".units.a." in n for n in eager_grads)


def test_compiled_model_follows_task_ids_of_a_multitask_setup():
    from adapters import MultiTask

    model = two_adapters("lora")
    model.set_active_adapters(MultiTask("a", "b"))
    fast = compiled(model)
    for tasks in (["a", "b"], ["b", "b"], ["b", "a"]):
        eager = logits(model, task_ids=tasks)
        torch.testing.assert_close(logits(fast, task_ids=tasks), eager, atol=1e-5, rtol=0)
    assert (
        logits(model, task_ids=["a", "a"]) - logits(model, task_ids=["b", "b"])
    ).abs().max() > 1e-4
