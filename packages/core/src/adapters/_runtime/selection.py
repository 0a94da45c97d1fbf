"""Per-example adapter selection: ``model(**inputs, adapter_names=[...])``.

PEFT's convention: one adapter name per example, or ``None`` for the base model. Core takes the
keyword out of the call at the model input (the base model's ``forward`` never sees it: most
transformers 5 forwards would silently swallow it), checks it, and runs the call with a
`adapters.composition.PerExample` setup, which `apply_setup` serves for every method (a method
may register a faster handler). ``generate(..., adapter_names=[...])`` passes the names to
every forward call of the generation, repeated for beams and returned sequences.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..composition import AdapterCompositionBlock, PerExample
from ..context import is_compiling, remove_last
from ..errors import AdapterNotFoundError, CompositionError

KWARG = "adapter_names"

_GENERATION_NAMES: contextvars.ContextVar[tuple[str | None, ...] | None] = contextvars.ContextVar(
    "adapters_generation_adapter_names", default=None
)
# What Dynamo reads instead of the ContextVar while torch.compile traces (see adapters.context).
_OPEN_GENERATION_NAMES: list[tuple[str | None, ...] | None] = []
_CACHE_SIZE = 32  # distinct adapter_names lists whose index tensors a model keeps


class NoSelection:
    """Returned by `take_adapter_names` when the call selects nothing per example."""


NO_SELECTION = NoSelection()


def take_adapter_names(
    model: nn.Module, kwargs: dict[str, Any], batch: int | None, device: torch.device | None
) -> tuple[dict[str, Any], AdapterCompositionBlock | NoSelection | None]:
    """Remove ``adapter_names`` from a model call's keyword arguments and turn it into the
    setup of the call: `NO_SELECTION` when neither the call nor an enclosing ``generate`` gives
    names, ``None`` when every example runs the base model, else a cached `PerExample`.

    Raises `AdapterNotFoundError` for an unknown name and `CompositionError` for a list whose
    length is not the batch size, a merged adapter, or a method that cannot run per example.
    """
    names = None
    if KWARG in kwargs:
        kwargs = dict(kwargs)
        names = kwargs.pop(KWARG)
    if is_compiling():
        generating = _OPEN_GENERATION_NAMES[-1] if _OPEN_GENERATION_NAMES else None
    else:
        generating = _GENERATION_NAMES.get()
    if names is None:
        if generating is None:
            return kwargs, NO_SELECTION
        names = generating
        if batch is not None and batch != len(names) and batch % len(names) == 0:
            # generate() repeats each example for beams / num_return_sequences
            factor = batch // len(names)
            names = tuple(n for n in names for _ in range(factor))
    names = check_names(names)
    if batch is not None and len(names) != batch:
        raise CompositionError(
            f"adapter_names has {len(names)} entries but the batch has {batch} examples; give "
            "one adapter name (or None for the base model) per example"
        )
    if all(n is None for n in names):
        return kwargs, None
    return kwargs, per_example(model, names, device)


def check_names(names: Any) -> tuple[str | None, ...]:
    """``names`` as a tuple, or `CompositionError` when it is not a list of names / None."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise CompositionError(
            f"adapter_names must be a list with one adapter name (or None) per example, got "
            f"{names!r}; for one adapter on the whole batch use set_active_adapters or "
            "AdapterSetup"
        )
    for name in names:
        if name is not None and not isinstance(name, str):
            raise CompositionError(
                f"adapter_names entries must be adapter names or None, got {name!r}"
            )
    return tuple(names)


def per_example(
    model: nn.Module, names: tuple[str | None, ...], device: torch.device | None
) -> PerExample:
    """The (cached, validated) `PerExample` setup running adapter ``names[i]`` on example i."""
    from .state import get_state

    state = get_state(model)
    for name in dict.fromkeys(names):
        if name is not None and name not in state.adapters:
            known = ", ".join(state.adapters) or "(none)"
            raise AdapterNotFoundError(
                f"adapter_names names {name!r}, which is not added; added adapters: {known}"
            )
    merged = [n for n, entry in state.adapters.items() if entry.merged]
    if merged:
        raise CompositionError(
            f"adapter_names cannot select adapters per example while {merged} are merged into "
            "the base weights (every example would get them); call reset_adapter() first"
        )
    cache = state.per_example_setups
    key = (names, device)
    setup = cache.get(key)
    if setup is None:
        # First in, first out, and tolerant of other threads evicting at the same time.
        setup = cache.setdefault(key, PerExample(names, device=device))
        while len(cache) > _CACHE_SIZE:
            try:
                cache.popitem(last=False)
            except KeyError:
                break
    model.validate_setup(setup)  # type: ignore[operator]  # adapters may have changed since
    return setup


class generation_names:
    """Makes ``generate(..., adapter_names=...)``'s names known to the forward calls it makes."""

    def __init__(self, names: tuple[str | None, ...] | None) -> None:
        self.names = names
        self._token: contextvars.Token | None = None

    def __enter__(self) -> generation_names:
        self._token = _GENERATION_NAMES.set(self.names)
        _OPEN_GENERATION_NAMES.append(self.names)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _GENERATION_NAMES.reset(self._token)
        remove_last(_OPEN_GENERATION_NAMES, self.names)
