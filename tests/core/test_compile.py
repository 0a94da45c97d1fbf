"""torch.compile(fullgraph=True) of an initialised model: core's forward plumbing, the in-test
plugins and the example plugin trace into one graph, equal eager, and follow setup changes.

Most tests use Dynamo's ``eager`` backend (the same tracing, guards and graph breaks as
inductor, without code generation); training uses ``aot_eager`` so the backward is traced too.
"""

from __future__ import annotations

import threading

import pytest
import torch

from adapters import AdapterSetup
from tests.compiling import (  # noqa: F401  (fresh_dynamo: an autouse fixture)
    check_training_step_compiled_equals_eager,
    compiled,
    fresh_dynamo,
)
from tests.upstream import relies_on

from .conftest import init_toy, llama, randomize

MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])


def logits(model, ids, **kwargs):
    return model(ids, attention_mask=MASK, **kwargs).logits


def test_an_initialised_model_without_adapters_compiles_fullgraph(toy_plugins, ids):
    model = init_toy()
    eager = logits(model, ids)
    torch.testing.assert_close(logits(compiled(model), ids), eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", ["toy_lora", "toy_shift[prefix=2]", "toy_bottleneck"])
def test_an_active_adapter_compiles_fullgraph_and_equals_eager(toy_plugins, ids, config):
    model = init_toy()
    model.add_adapter("a", config=config, set_active=True)
    randomize(model, "a")
    eager = logits(model, ids)
    with AdapterSetup(None):
        base = logits(model, ids)
    assert (eager - base).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(logits(compiled(model), ids), eager, atol=1e-5, rtol=0)


def test_explain_reports_one_graph_and_no_break(toy_plugins, ids):
    model = init_toy()
    for name, config in (("a", "toy_lora"), ("s", "toy_shift"), ("b", "toy_bottleneck")):
        model.add_adapter(name, config=config)
    model.set_active_adapters(["a", "s", "b"])
    explanation = torch._dynamo.explain(model)(ids, attention_mask=MASK)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_model_follows_set_active_adapters(toy_plugins, ids):
    model = init_toy()
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, config="toy_lora")
        randomize(model, name, seed=seed)
    fast = compiled(model)
    outputs = {}
    for setup in ("a", "b", None, ["a", "b"], "a"):
        model.set_active_adapters(setup)
        eager = logits(model, ids)
        torch.testing.assert_close(logits(fast, ids), eager, atol=1e-5, rtol=0)
        outputs[str(setup)] = eager
    assert (outputs["a"] - outputs["b"]).abs().max() > 1e-3
    assert (outputs["a"] - outputs["None"]).abs().max() > 1e-3


def test_compiled_model_follows_adapter_setup_blocks(toy_plugins, ids):
    model = init_toy()
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, config="toy_lora")
        randomize(model, name, seed=seed)
    model.set_active_adapters("a")
    fast = compiled(model)
    active_a = logits(model, ids)
    torch.testing.assert_close(logits(fast, ids), active_a, atol=1e-5, rtol=0)
    for setup in ("b", None, "a"):
        with AdapterSetup(setup):
            eager = logits(model, ids)
            torch.testing.assert_close(logits(fast, ids), eager, atol=1e-5, rtol=0)
        if setup == "b":
            assert (eager - active_a).abs().max() > 1e-3
    with AdapterSetup("b"), AdapterSetup(None):  # the innermost block wins
        with AdapterSetup(None):
            base = logits(model, ids)
        torch.testing.assert_close(logits(fast, ids), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(fast, ids), active_a, atol=1e-5, rtol=0)


def test_a_new_setup_object_with_the_same_adapters_does_not_recompile(toy_plugins, ids):
    """Dynamo guards on what the setup says (names, block types), not on the object."""
    from torch._dynamo.utils import counters

    model = init_toy()
    model.add_adapter("a", config="toy_lora")
    model.add_adapter("b", config="toy_lora")
    fast = compiled(model)
    counters.clear()
    for _ in range(4):
        model.set_active_adapters("a")  # a new Stack("a") each time
        fast(ids)
        with AdapterSetup("b"):
            fast(ids)
    assert counters["stats"]["unique_graphs"] == 2


def test_adapter_setup_in_another_thread_is_not_seen_in_eager_mode(toy_plugins, ids):
    model = init_toy()
    model.add_adapter("a", config="toy_lora")
    randomize(model, "a")
    base = model(ids).logits
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def other():
        with AdapterSetup("a"):
            entered.set()
            release.wait(timeout=30)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        entered.wait(timeout=30)
        seen["main"] = model(ids).logits  # another thread's open block is not this call's
    finally:
        release.set()
        thread.join()
    assert torch.equal(seen["main"], base)


def test_compiled_training_step_equals_eager(toy_plugins, ids):
    model = init_toy()
    model.add_adapter("a", config="toy_lora")
    model.add_adapter("s", config="toy_shift[prefix=2]")
    randomize(model, "a")
    randomize(model, "s", seed=3)
    model.train_adapter(["a", "s"])
    with relies_on("compiled_training", llama):
        eager_grads = check_training_step_compiled_equals_eager(model, ids, MASK)
    assert len(eager_grads) == 10


def test_compiled_training_with_activation_checkpointing_equals_eager(toy_plugins, ids):
    import copy

    model = init_toy()
    model.add_adapter("s", config="toy_shift[prefix=2]")
    randomize(model, "s")
    model.train_adapter("s")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "_require_grads_hook"):  # transformers 5 installs it, 4.57 does not
        model.disable_input_require_grads()  # its hook calls requires_grad_ inside the graph
    model.train()
    twin = copy.deepcopy(model)
    fast = compiled(twin, backend="aot_eager")

    def grads(call, module):
        loss = call(ids, attention_mask=MASK, use_cache=False).logits.pow(2).mean()
        loss.backward()
        return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}

    # transformers 5.25.0 cannot do this for the plain Llama either (docs/compatibility.md)
    with relies_on("compiled_checkpointed_training", llama):
        eager, fast_grads = grads(model, model), grads(fast, twin)
        assert sorted(eager) == sorted(fast_grads) and eager
        for name, grad in eager.items():
            torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=0)


def test_example_plugin_compiles_fullgraph(ids):
    pytest.importorskip("adapters_hidden_scale")
    from adapters_hidden_scale import plugin as hidden_scale_plugin

    from adapters import AdapterModelInterface, init, plugins

    from ..models import SEED_INTERFACE, llama

    registry = plugins.get_registry()
    registered = "hidden_scale" not in registry.methods
    if registered:
        registry.register(hidden_scale_plugin, "hidden_scale")
    try:
        model = init(
            llama(),
            interface=AdapterModelInterface(
                **{**SEED_INTERFACE, "adapter_methods": ["hidden_scale"]}
            ),
        )
        model.add_adapter("h", config="hidden_scale", set_active=True)
        randomize(model, "h")
        eager = logits(model, ids)
        torch.testing.assert_close(logits(compiled(model), ids), eager, atol=1e-5, rtol=0)
        explanation = torch._dynamo.explain(model)(ids, attention_mask=MASK)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    finally:
        if registered:
            registry.unregister("hidden_scale")


def test_compiled_model_follows_adapter_names(toy_plugins, ids):
    from adapters import AdapterNotFoundError

    model = init_toy()
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, config="toy_lora")
        randomize(model, name, seed=seed)
    fast = compiled(model)
    for names in (["a", "b"], ["b", None], [None, None], ["a", "b"]):
        eager = logits(model, ids, adapter_names=names)
        torch.testing.assert_close(logits(fast, ids, adapter_names=names), eager, atol=1e-5, rtol=0)
    with AdapterSetup("a"):
        assert (
            logits(model, ids) - logits(model, ids, adapter_names=["b", "b"])
        ).abs().max() > 1e-3
    # consumed and checked under compile too (fullgraph reports the library's error inside
    # Dynamo's Unsupported; without fullgraph the frame falls back and raises it as is)
    with pytest.raises(
        (AdapterNotFoundError, torch._dynamo.exc.Unsupported), match="names 'c', which is not"
    ):
        logits(fast, ids, adapter_names=["a", "c"])
    with pytest.raises(AdapterNotFoundError, match="names 'c', which is not"):
        logits(torch.compile(model, backend="eager"), ids, adapter_names=["a", "c"])
