"""All or nothing for operations made of several steps (loading several adapters, a trainer
checkpoint, an overwriting load): on any failure the model is exactly as before.

`rollback.operation` undoes what the steps did to the module tree (hosts, units, hooks,
parametrisations); `all_or_nothing` adds what lives outside it: which adapters and fusion
layers are added (the same entry objects), which are merged, the active setup, and the values
of tensors a step overwrites in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from . import rollback
from .state import get_state


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, overwritten: Iterable[torch.Tensor] = ()) -> Iterator[None]:
    """Run the body so that, if it raises, ``model`` is left as it was: the adapters and fusion
    layers added (the same objects, with the values they had), the merged ones merged again,
    the active setup, and the values of the ``overwritten`` tensors (those the body writes in
    place). The exception is re-raised."""
    state = get_state(model)
    adapters, fusions = dict(state.adapters), dict(state.fusions)
    merged = [name for name, entry in adapters.items() if entry.merged]
    active = state.active_setup
    kept = []
    seen: set[int] = set()
    with torch.no_grad():
        for tensor in overwritten:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                kept.append((tensor, tensor.detach().clone()))
    try:
        with rollback.operation(model):
            yield
    except BaseException:
        state.adapters.clear()
        state.adapters.update(adapters)
        state.fusions.clear()
        state.fusions.update(fusions)
        with torch.no_grad():
            for tensor, value in kept:
                tensor.copy_(value)
        for name in merged:
            if not adapters[name].merged:  # an overwrite reset it: merge it again
                model.merge_adapter(name)  # type: ignore[operator]
        if state.active_setup is not active:
            model._set_setup(active)  # type: ignore[operator]
        raise
