"""Leaving the adapted state: ``merge_and_unload`` / ``unload`` give back a plain model of the
original class (``init`` gave the instance a subclass that records it, see
`adapters.initialization.adapted_class`)."""

from __future__ import annotations

from typing import Any

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
    from .forward import ForwardHooks
    from .recompute import LayerHooks

    state = get_state(model)
    if state.adapters:
        raise RuntimeError(f"adapters {list(state.adapters)} are still added")
    for module in model.modules():
        for attr in (
            "_forward_pre_hooks",
            "_forward_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_pre_hooks_with_kwargs",
            "_forward_hooks_always_called",
        ):
            hooks = getattr(module, attr, None)
            if not hooks:
                continue
            for key, hook in list(hooks.items()):
                owner = getattr(hook, "__self__", None)
                if isinstance(owner, ForwardHooks | LayerHooks):
                    _drop_hook(module, key)
    model.__dict__.pop(STATE_ATTR, None)
    original = original_class_of(type(model))
    if original is not None:
        model.__class__ = original
    return model


def _drop_hook(module: nn.Module, key: int) -> None:
    for attr in (
        "_forward_pre_hooks",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
    ):
        hooks: Any = getattr(module, attr, None)
        if hooks is not None:
            hooks.pop(key, None)
