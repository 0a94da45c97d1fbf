"""AdapterHub's ``MultiTask`` block: ``model(**inputs, task_ids=...)`` picks one of the block's
adapters per example. Core maps it onto per-example selection (`adapters._runtime.selection`):
the task ids become one adapter name per example and the call runs a `PerExample` setup.

``task_ids`` is taken out of the call at the model input (transformers 5 forwards would
silently swallow an unknown keyword) and checked: one id per example, each an index into the
block's children or one of their names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..composition import AdapterCompositionBlock, MultiTask
from ..errors import CompositionError
from .signature import forward_takes

KWARG = "task_ids"


def forward_takes_task_ids(model: nn.Module) -> bool:
    """Whether the model's own ``forward`` has a ``task_ids`` parameter (then a call without
    an active `MultiTask` passes it through untouched)."""
    return forward_takes(model, KWARG)


def task_names(block: MultiTask, task_ids: Any, batch: int | None) -> tuple[str, ...]:
    """The adapter name of each example: ``task_ids`` (a 1-D integer tensor, a list of
    indices into ``block``'s children, or a list of child names) mapped onto the children.

    Raises `CompositionError` for another type, an unknown name, an index out of range or a
    length that is not the batch size."""
    children = [str(c) for c in block.children]
    if isinstance(task_ids, torch.Tensor):
        if task_ids.ndim != 1 or task_ids.dtype.is_floating_point or task_ids.is_complex():
            raise CompositionError(
                f"task_ids must be a 1-D integer tensor with one task index per example, got "
                f"shape {tuple(task_ids.shape)} and dtype {task_ids.dtype}"
            )
        ids: list[Any] = task_ids.tolist()
    elif isinstance(task_ids, Sequence) and not isinstance(task_ids, str):
        ids = list(task_ids)
    else:
        raise CompositionError(
            f"task_ids must be a tensor or list with one task per example (an index into "
            f"{block.name} or one of its names), got {task_ids!r}"
        )
    if batch is not None and len(ids) != batch:
        raise CompositionError(
            f"task_ids has {len(ids)} entries but the batch has {batch} examples; give one task "
            f"(an index into {block.name} or one of its names) per example"
        )
    names = []
    for task in ids:
        if isinstance(task, str):
            if task not in children:
                raise CompositionError(
                    f"task_ids names {task!r}, which is not a child of {block.name}; use one of "
                    f"{children} or its index"
                )
            names.append(task)
        elif isinstance(task, int) and not isinstance(task, bool):
            if not 0 <= task < len(children):
                raise CompositionError(
                    f"task_ids has index {task}, but {block.name} has {len(children)} children "
                    f"(indices 0..{len(children) - 1})"
                )
            names.append(children[task])
        else:
            raise CompositionError(
                f"task_ids entries must be child indices or names of {block.name}, got {task!r}"
            )
    return tuple(names)


def take_task_ids(
    model: nn.Module,
    kwargs: dict[str, Any],
    setup: AdapterCompositionBlock | None,
    per_example_given: bool,
    batch: int | None,
) -> tuple[dict[str, Any], tuple[str, ...] | None]:
    """Remove ``task_ids`` from a model call's keyword arguments and, when ``setup`` is a
    `MultiTask` block, return the adapter name of each example (None otherwise).

    Raises `CompositionError` when a `MultiTask` setup gets no ``task_ids``, when ``task_ids``
    comes with ``adapter_names``, or when ``task_ids`` is given without a `MultiTask` setup to a
    model whose ``forward`` does not take it (it would be ignored)."""
    given = KWARG in kwargs
    if per_example_given:
        if given:
            raise CompositionError(
                "pass either adapter_names= or task_ids=, not both: adapter_names already "
                "selects one adapter per example"
            )
        return kwargs, None
    if not isinstance(setup, MultiTask):
        if given and not forward_takes_task_ids(model):
            shown = setup.name if setup is not None else "None"
            raise CompositionError(
                f"task_ids= was given but the active setup is {shown}, not a MultiTask block; "
                "activate e.g. MultiTask('a', 'b') or drop task_ids"
            )
        return kwargs, None
    if not given:
        raise CompositionError(
            f"the active setup {setup.name} needs task_ids=... in the model call: one task (an "
            "index into the block or one of its names) per example"
        )
    kwargs = dict(kwargs)
    task_ids = kwargs.pop(KWARG)
    return kwargs, task_names(setup, task_ids, batch)
