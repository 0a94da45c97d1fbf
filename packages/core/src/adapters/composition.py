"""Composition blocks: how several adapters run together.

``Stack`` applies adapters one after another, ``Parallel`` runs the whole model once per branch
on a replicated batch, ``BatchSplit`` gives each adapter a slice of the batch, ``Average`` takes
a weighted mean of the adapters' edits, ``Fuse`` and ``Split`` are for methods that declare them.

Core implements ``Parallel`` once for every method: the batch is replicated at the model input
and, inside the model, the setup a method sees is a ``BatchSplit`` with one slice per branch. A
method that supports ``BatchSplit`` therefore supports ``Parallel`` with no code of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .errors import CompositionError


class AdapterCompositionBlock:
    """Base of the composition blocks; children are adapter names or nested blocks."""

    def __init__(self, *children: str | AdapterCompositionBlock) -> None:
        if not children:
            raise CompositionError(f"{type(self).__name__}() needs at least one adapter")
        flat: list[str | AdapterCompositionBlock] = []
        for child in children:
            if isinstance(child, list | tuple):
                raise CompositionError(
                    f"{type(self).__name__} takes adapters as separate arguments, got a "
                    f"{type(child).__name__}: write {type(self).__name__}(*{list(child)!r})"
                )
            if not isinstance(child, str | AdapterCompositionBlock):
                raise CompositionError(
                    f"{type(self).__name__} children must be adapter names or blocks, got {child!r}"
                )
            flat.append(child)
        self.children: list[str | AdapterCompositionBlock] = flat

    @property
    def name(self) -> str:
        """A readable name, e.g. ``Stack[a, b]``."""
        inner = ", ".join(c if isinstance(c, str) else c.name for c in self.children)
        return f"{type(self).__name__}[{inner}]"

    def __repr__(self) -> str:
        args = ", ".join(repr(c) for c in self.children)
        extra = self._extra_repr()
        return f"{type(self).__name__}({args}{', ' + extra if extra else ''})"

    def _extra_repr(self) -> str:
        return ""

    def __eq__(self, other: object) -> bool:
        return (
            type(self) is type(other)
            and self.children == other.children  # type: ignore[attr-defined]
            and self._extra_repr() == other._extra_repr()  # type: ignore[attr-defined]
        )

    def __hash__(self) -> int:
        return hash(repr(self))

    def __iter__(self) -> Iterator[str | AdapterCompositionBlock]:
        return iter(self.children)

    def __len__(self) -> int:
        return len(self.children)

    def __getitem__(self, index: int) -> str | AdapterCompositionBlock:
        return self.children[index]

    def __contains__(self, name: object) -> bool:
        return name in self.flatten()

    def flatten(self) -> list[str]:
        """Every adapter name in this block and its nested blocks, in order, without repeats."""
        names: list[str] = []
        for child in self.children:
            for n in [child] if isinstance(child, str) else child.flatten():
                if n not in names:
                    names.append(n)
        return names


class Stack(AdapterCompositionBlock):
    """Apply the adapters one after another (the output of one is the input of the next)."""


class Parallel(AdapterCompositionBlock):
    """Run the model once per child on a replicated batch; outputs are concatenated on dim 0,
    branch by branch."""


class Fuse(AdapterCompositionBlock):
    """Fuse the children's outputs with a learned fusion layer (methods that declare it)."""


class BatchSplit(AdapterCompositionBlock):
    """Give child ``i`` the next ``batch_sizes[i]`` examples of the batch."""

    def __init__(self, *children: str | AdapterCompositionBlock, batch_sizes: int | Sequence[int]):
        super().__init__(*children)
        sizes = [batch_sizes] * len(children) if isinstance(batch_sizes, int) else list(batch_sizes)
        if len(sizes) != len(children) or any(not isinstance(s, int) or s < 0 for s in sizes):
            raise CompositionError(
                f"BatchSplit needs one non-negative batch size per child; got {batch_sizes!r} "
                f"for {len(children)} children"
            )
        self.batch_sizes = sizes

    def _extra_repr(self) -> str:
        return f"batch_sizes={self.batch_sizes}"


class Split(AdapterCompositionBlock):
    """Give child ``i`` the next ``splits[i]`` positions of the sequence (methods that declare it)."""

    def __init__(self, *children: str | AdapterCompositionBlock, splits: int | Sequence[int]):
        super().__init__(*children)
        self.splits = [splits] * len(children) if isinstance(splits, int) else list(splits)
        if len(self.splits) != len(children):
            raise CompositionError(f"Split needs one split size per child; got {splits!r}")

    def _extra_repr(self) -> str:
        return f"splits={self.splits}"


class Average(AdapterCompositionBlock):
    """Weighted mean of the children's edits: ``h + sum_i w_i * delta_i``.

    Weights default to equal; with ``normalize_weights=True`` (default) they are divided by their
    sum. There is no further ``1/n``: equal weights already sum to one.
    """

    def __init__(
        self,
        *children: str | AdapterCompositionBlock,
        weights: Sequence[float] | None = None,
        normalize_weights: bool = True,
    ):
        super().__init__(*children)
        values = [1.0] * len(children) if weights is None else [float(w) for w in weights]
        if len(values) != len(children):
            raise CompositionError(
                f"Average got {len(values)} weights for {len(children)} children"
            )
        if normalize_weights:
            total = sum(values)
            if total == 0:
                raise CompositionError("Average weights sum to 0 and cannot be normalised")
            values = [w / total for w in values]
        self.weights = values

    def _extra_repr(self) -> str:
        return f"weights={self.weights}"


SetupLike = str | Sequence[str] | AdapterCompositionBlock | None

BLOCK_TYPES: tuple[type[AdapterCompositionBlock], ...] = (
    Stack,
    Parallel,
    BatchSplit,
    Average,
    Fuse,
    Split,
)


def parse_composition(setup: SetupLike) -> AdapterCompositionBlock | None:
    """Normalise what users pass to ``set_active_adapters``: a name becomes ``Stack(name)``, a
    list becomes ``Stack(*names)``, a block stays, ``None`` stays ``None``."""
    if setup is None:
        return None
    if isinstance(setup, AdapterCompositionBlock):
        return setup
    if isinstance(setup, str):
        return Stack(setup)
    if isinstance(setup, list | tuple):
        if not setup:
            return None
        return Stack(*setup)
    raise CompositionError(
        f"an adapter setup must be a name, a list of names, a composition block or None; "
        f"got {type(setup).__name__}"
    )


def expand_parallel(setup: AdapterCompositionBlock) -> AdapterCompositionBlock | None:
    """Rewrite a ``Parallel`` at the top, or at the end of a top-level ``Stack``, into the
    branches core replicates the batch for: ``Stack(a, Parallel(b, c))`` runs as
    ``Parallel(Stack(a, b), Stack(a, c))``. Returns that top-level Parallel, or None when the
    setup has no Parallel. Parallel anywhere else raises `CompositionError`."""
    if isinstance(setup, Parallel):
        _forbid_parallel(setup.children)
        return setup
    if isinstance(setup, Stack):
        *head, last = setup.children
        _forbid_parallel(head)
        if isinstance(last, Parallel):
            _forbid_parallel(last.children)
            return Parallel(*[Stack(*head, branch) for branch in last.children])
        return None
    _forbid_parallel(setup.children)
    return None


def _forbid_parallel(children: Sequence[str | AdapterCompositionBlock]) -> None:
    for child in children:
        if isinstance(child, Parallel):
            raise CompositionError(
                "Parallel is supported at the top of a setup or as the last child of a top-level "
                f"Stack; found it nested in {children!r}"
            )
        if isinstance(child, AdapterCompositionBlock):
            _forbid_parallel(child.children)


def blocks_used_by(setup: AdapterCompositionBlock) -> dict[str, set[type]]:
    """For each adapter, the block types it is nested in (excluding a top-level single-child
    Stack, which is just "this adapter")."""
    result: dict[str, set[type]] = {}

    def walk(block: AdapterCompositionBlock, enclosing: set[type]) -> None:
        here = set(enclosing)
        if not (isinstance(block, Stack) and len(block) == 1 and not enclosing):
            here.add(type(block))
        for child in block.children:
            if isinstance(child, str):
                result.setdefault(child, set()).update(here)
            else:
                walk(child, here)

    walk(setup, set())
    return result


ApplyOne = Callable[[str, torch.Tensor, slice], torch.Tensor]


def apply_setup(
    setup: AdapterCompositionBlock | str,
    hidden: torch.Tensor,
    apply_one: ApplyOne,
    owns: Callable[[str], bool],
    rows: slice | None = None,
) -> torch.Tensor:
    """Evaluate a setup for one method at one site: the helper plugins use for composition.

    Args:
        setup: the effective setup of this forward pass (`ForwardContext.setup`).
        hidden: the tensor to edit, batch first.
        apply_one: ``apply_one(name, hidden, rows)`` returns ``hidden`` edited by adapter
            ``name``; ``rows`` is the slice of the full batch that ``hidden`` holds, so the
            plugin can slice other per-example tensors (inputs, positions) to match.
        owns: whether an adapter name belongs to the calling method (others are skipped, they
            act at their own sites).
        rows: the slice of the full batch ``hidden`` covers; None for all of it.

    Semantics: a name → ``apply_one``; ``Stack`` → in order; ``BatchSplit`` → each child on its
    rows, concatenated; ``Average`` → ``hidden + sum_i w_i (child_i(hidden) - hidden)``.
    ``Fuse`` and ``Split`` raise `CompositionError` here: methods that support them implement
    them themselves.
    """
    if rows is None:
        rows = slice(0, hidden.shape[0])
    if isinstance(setup, str):
        return apply_one(setup, hidden, rows) if owns(setup) else hidden
    if isinstance(setup, Stack):
        for child in setup.children:
            hidden = apply_setup(child, hidden, apply_one, owns, rows)
        return hidden
    if isinstance(setup, BatchSplit):
        if sum(setup.batch_sizes) != hidden.shape[0]:
            raise CompositionError(
                f"BatchSplit batch_sizes={setup.batch_sizes} sum to {sum(setup.batch_sizes)} "
                f"but the batch has {hidden.shape[0]} examples"
            )
        parts, start = [], 0
        for child, size in zip(setup.children, setup.batch_sizes):
            sub_rows = slice(rows.start + start, rows.start + start + size)
            parts.append(
                apply_setup(child, hidden[start : start + size], apply_one, owns, sub_rows)
            )
            start += size
        return torch.cat(parts, dim=0)
    if isinstance(setup, Average):
        total = None
        for child, weight in zip(setup.children, setup.weights):
            delta = apply_setup(child, hidden, apply_one, owns, rows) - hidden
            total = weight * delta if total is None else total + weight * delta
        return hidden + total
    raise CompositionError(
        f"{type(setup).__name__} is not implemented by the generic composition helper; the "
        "method must handle it itself or not declare support for it"
    )


def setup_to_dict(setup: AdapterCompositionBlock | str | None) -> Any:
    """A JSON-serialisable form of a setup (``setup_from_dict`` restores it)."""
    if setup is None or isinstance(setup, str):
        return setup
    data: dict[str, Any] = {
        "type": type(setup).__name__,
        "children": [setup_to_dict(c) for c in setup.children],
    }
    if isinstance(setup, BatchSplit):
        data["batch_sizes"] = list(setup.batch_sizes)
    if isinstance(setup, Split):
        data["splits"] = list(setup.splits)
    if isinstance(setup, Average):
        data["weights"] = list(setup.weights)
    return data


def setup_from_dict(data: Any) -> AdapterCompositionBlock | str | None:
    """Inverse of `setup_to_dict`."""
    if data is None or isinstance(data, str):
        return data
    types = {cls.__name__: cls for cls in BLOCK_TYPES}
    cls = types.get(data.get("type"))
    if cls is None:
        raise CompositionError(f"unknown composition block {data.get('type')!r}")
    children = [setup_from_dict(c) for c in data["children"]]
    if cls is BatchSplit:
        return BatchSplit(*children, batch_sizes=data["batch_sizes"])
    if cls is Split:
        return Split(*children, splits=data["splits"])
    if cls is Average:
        return Average(*children, weights=data["weights"], normalize_weights=False)
    return cls(*children)
