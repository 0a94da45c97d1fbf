"""torch.compile helpers shared by the test packages (importable as ``tests.compiling``): the
fixture that gives every compile test an empty Dynamo cache, ``compiled``, and the check that
one compiled training step equals the eager one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adapters import context


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles new models: start from an empty Dynamo cache (the cache of a shared
    code object such as a hook method would otherwise fill up across tests). Import it into a
    test module to apply it there."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    assert not context._TRACED  # every compiled call closed its context


def compiled(model: nn.Module, backend: str = "eager") -> nn.Module:
    """``torch.compile(model, fullgraph=True)``; Dynamo's ``eager`` backend traces and guards
    like inductor without generating code; ``aot_eager`` traces the backward too."""
    return torch.compile(model, fullgraph=True, backend=backend)


def check_training_step_compiled_equals_eager(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, atol: float = 1e-5
) -> dict[str, torch.Tensor]:
    """One SGD step of ``model`` (its adapters set to train) eagerly, and of a deep copy compiled
    with ``fullgraph=True`` and ``aot_eager``: the same loss, gradients on the same parameters
    with the same values, and the same weights after the step. Returns the eager gradients
    by parameter name, for the caller's checks of which parameters train."""
    twin = copy.deepcopy(model)
    fast = compiled(twin, backend="aot_eager")

    def step(module: nn.Module, call: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
        loss = call(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        optimizer.step()
        return loss.detach(), grads

    eager_loss, eager_grads = step(model, model)
    fast_loss, fast_grads = step(twin, fast)
    torch.testing.assert_close(fast_loss, eager_loss, atol=atol, rtol=0)
    assert sorted(fast_grads) == sorted(eager_grads)
    assert eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=atol, rtol=0)
    twin_params = dict(twin.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(twin_params[name], param, atol=atol, rtol=0)
    return eager_grads
