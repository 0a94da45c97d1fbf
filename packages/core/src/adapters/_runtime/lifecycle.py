"""Leaving the adapted state: ``merge_and_unload`` / ``unload`` give back a plain model of the
original class (``init`` gave the instance a subclass that records it, see
`adapters._runtime.initialization.adapted_class`)."""

from __future__ import annotations

from torch import nn

from .state import STATE_ATTR, get_state

#: Class attribute of the subclass ``init`` creates: the model's original class.
ORIGINAL_CLASS_ATTR = "_adapters_original_class"


def original_class_of(cls: type) -> type | None:
    """The class ``init`` adapted into ``cls``, or None when ``cls`` was not created by init."""
    return cls.__dict__.get(ORIGINAL_CLASS_ATTR)


def strip_adapters(model: nn.Module) -> nn.Module:
    """Remove what ``init`` added once the adapters are gone: the model-level hooks, the
    per-layer training hooks, the state attribute, and the subclass (the instance gets its
    original class back). Returns ``model``."""
    state = get_state(model)
    if state.adapters:
        raise RuntimeError(f"adapters {list(state.adapters)} are still added")
    # through their handles (copies and pickles of the model carry handles bound to their own
    # hook dicts), never by searching torch's hook dicts
    for handle in (*state.hook_handles, *state.layer_hook_handles):
        handle.remove()
    state.hook_handles, state.layer_hook_handles = [], []
    model.__dict__.pop(STATE_ATTR, None)
    original = original_class_of(type(model))
    if original is not None:
        model.__class__ = original
    return model
