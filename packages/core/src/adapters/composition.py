"""Composition blocks: how several adapters run together.

``Stack`` applies adapters one after another, ``Parallel`` runs the whole model once per branch
on a replicated batch, ``BatchSplit`` gives each adapter a slice of the batch, ``Average`` takes
a weighted mean of the adapters' edits, ``Fuse`` and ``Split`` are for methods that declare them.
`PerExample` is what ``model(..., adapter_names=[...])`` runs: one adapter (or none) per example.

Core implements ``Parallel`` once for every method: the batch is replicated at the model input
and, inside the model, the setup a method sees is a ``BatchSplit`` with one slice per branch. A
method that supports ``BatchSplit`` therefore supports ``Parallel`` and `PerExample` with no
code of its own.

Methods evaluate a setup at their sites with `apply_setup`. Core handles ``Stack``,
``BatchSplit``, ``Average`` and `PerExample` there; a method adds (or replaces) the handling of
any block with ``handlers={Fuse: my_fuse}`` (see `CompositionHandler`), and the blocks nested
inside a handled block still go through core's handling and the method's other handlers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

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
        return self.label()

    def label(self) -> str:
        """A readable description of the block and its nesting, e.g. ``Stack[a, Fuse[b, c]]``."""
        inner = ", ".join(c if isinstance(c, str) else c.label() for c in self.children)
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
    """Fuse the children's outputs with a learned fusion layer (methods that declare it).

    The fusion layer is added with ``model.add_adapter_fusion(Fuse("a", "b"))`` and found by
    the block's `name`: ``name=`` if given, else the children's names joined by commas (as in
    AdapterHub: ``Fuse("a", "b").name == "a,b"``). A child that is a block is named by its last
    adapter.
    """

    def __init__(self, *children: str | AdapterCompositionBlock, name: str | None = None) -> None:
        super().__init__(*children)
        if name is not None and (not isinstance(name, str) or not name):
            raise CompositionError(f"Fuse name= must be a non-empty string, got {name!r}")
        self._name = name

    @property
    def name(self) -> str:
        """The name of the fusion layer this block uses (``"a,b"`` unless ``name=`` was given)."""
        if self._name is not None:
            return self._name
        return ",".join(c if isinstance(c, str) else c.flatten()[-1] for c in self.children)

    def _extra_repr(self) -> str:
        return f"name={self._name!r}" if self._name is not None else ""


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


class PerExample(AdapterCompositionBlock):
    """One adapter, or none, per example of the batch: what ``model(**inputs,
    adapter_names=[...])`` runs (core builds it at the model input; users pass names).

    Attributes:
        names: the adapter name (or ``None`` for the base model) of each example.
        children: the distinct adapter names, in order of first appearance.
        rows: for each child, the indices of its examples (a 1-D ``long`` tensor).

    `apply_setup` serves it for every method by running each child on its rows and writing the
    results back in place of those rows; examples named ``None`` keep the unedited tensor. A
    method with a faster path (one batched kernel over all examples) registers a handler for
    ``PerExample``.
    """

    def __init__(
        self, names: Sequence[str | None], device: torch.device | str | None = None
    ) -> None:
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise CompositionError(
                f"adapter_names must be a list with one adapter name (or None) per example, got "
                f"{names!r}"
            )
        bad = [n for n in names if n is not None and (not isinstance(n, str) or not n)]
        if bad:
            raise CompositionError(
                f"adapter_names entries must be adapter names or None, got {bad[0]!r}"
            )
        distinct = [n for n in dict.fromkeys(names) if n is not None]
        if not distinct:
            raise CompositionError("PerExample needs at least one example with an adapter")
        super().__init__(*distinct)
        self.names: tuple[str | None, ...] = tuple(names)
        self.rows: list[torch.Tensor] = [
            torch.tensor(
                [i for i, n in enumerate(self.names) if n == child], dtype=torch.long, device=device
            )
            for child in distinct
        ]

    def _extra_repr(self) -> str:
        return f"names={list(self.names)}"


class MultiTask(AdapterCompositionBlock):
    """One of the children per example, chosen by the ``task_ids`` the model is called with:
    ``model(**inputs, task_ids=[0, 1, 0])`` (indices into the children, a tensor or list) or
    ``task_ids=["a", "b", "a"]`` (child names), as in AdapterHub. Core turns the call into a
    `PerExample` selection, so every method that supports ``BatchSplit`` runs it; the children
    are adapter names, and the block stands at the top of the setup."""

    def __init__(self, *children: str | AdapterCompositionBlock) -> None:
        super().__init__(*children)
        for child in self.children:
            if not isinstance(child, str):
                raise CompositionError(
                    f"MultiTask children must be adapter names here, got {child!r}; a block per "
                    "task is not supported (AdapterHub allows Stack/Average/Fuse children)"
                )
        if len(set(self.children)) != len(self.children):
            raise CompositionError(f"MultiTask names an adapter twice: {self.children}")


SetupLike = str | Sequence[str] | AdapterCompositionBlock | None

BLOCK_TYPES: tuple[type[AdapterCompositionBlock], ...] = (
    Stack,
    Parallel,
    BatchSplit,
    Average,
    Fuse,
    Split,
    PerExample,
    MultiTask,
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
        # AdapterHub's list form: a list inside the list is a Fuse of its names
        return Stack(*(_parse_list_child(child) for child in setup))
    raise CompositionError(
        f"an adapter setup must be a name, a list of names, a composition block or None; "
        f"got {type(setup).__name__}"
    )


def _parse_list_child(child: Any) -> str | AdapterCompositionBlock:
    if isinstance(child, list | tuple):
        if not child:
            raise CompositionError("an empty list inside an adapter setup list names no adapter")
        return Fuse(*(Stack(*c) if isinstance(c, list | tuple) else c for c in child))
    return child


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


def find_blocks(setup: AdapterCompositionBlock | str | None, kind: type) -> list[Any]:
    """Every block of class ``kind`` in ``setup``, outermost first (e.g. the `Fuse` blocks)."""
    if setup is None or isinstance(setup, str):
        return []
    found = [setup] if isinstance(setup, kind) else []
    for child in setup.children:
        found.extend(find_blocks(child, kind))
    return found


def names_outside(setup: AdapterCompositionBlock | str | None, kind: type) -> list[str]:
    """The adapter names of ``setup`` that are not nested in a block of class ``kind``, in
    order, without repeats (``names_outside(Stack("a", Fuse("b", "c")), Fuse) == ["a"]``)."""
    if setup is None:
        return []
    if isinstance(setup, str):
        return [setup]
    if isinstance(setup, kind):
        return []
    names: list[str] = []
    for child in setup.children:
        for name in names_outside(child, kind):
            if name not in names:
                names.append(name)
    return names


Rows = slice | torch.Tensor
"""Which examples of the full batch a tensor holds: a ``slice`` (``BatchSplit``, the whole batch)
or a 1-D ``long`` tensor of example indices (`PerExample`). Index per-example tensors of the
full batch with `select_rows`."""

ApplyOne = Callable[[str, torch.Tensor, Rows], torch.Tensor]
Compose = Callable[["str | AdapterCompositionBlock", torch.Tensor, Rows], torch.Tensor]


class CompositionHandler(Protocol):
    """How a method evaluates one kind of block at one site (see `apply_setup`'s ``handlers``).

    ``handler(block, hidden, rows, compose)`` returns ``hidden`` edited by ``block``:

    - ``block``: the block instance (e.g. a `Fuse`), with its children and options;
    - ``hidden``: the tensor to edit, batch first; ``rows``: which examples of the full batch
      it holds (see `Rows`);
    - ``compose(child, hidden, rows)``: core's evaluation of a child (an adapter name or a
      nested block, with core's handling of ``Stack``/``BatchSplit``/``Average`` and this
      method's other handlers), to call for each child the block needs.

    Example, a fusion that weights each child's output with a learned softmax::

        def fuse(block, hidden, rows, compose):
            outputs = torch.stack([compose(child, hidden, rows) for child in block], dim=2)
            weights = fusion_layers[block.name](hidden).softmax(dim=-1)  # (batch, len, n)
            return (outputs * weights[..., None]).sum(dim=2)
    """

    def __call__(
        self, block: Any, hidden: torch.Tensor, rows: Rows, compose: Compose
    ) -> torch.Tensor: ...


def select_rows(tensor: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The rows ``rows`` of a per-example tensor of the full batch (``tensor`` itself, not a
    copy, when ``rows`` covers it all)."""
    if isinstance(rows, slice):
        if rows.start in (None, 0) and (rows.stop is None or rows.stop >= tensor.shape[0]):
            return tensor
        return tensor[rows]
    if rows.device != tensor.device:
        rows = rows.to(tensor.device)
    return tensor.index_select(0, rows)


def sub_rows(rows: Rows, local: Rows) -> Rows:
    """The rows of the full batch that positions ``local`` of a tensor holding ``rows`` are."""
    if isinstance(rows, slice):
        start = rows.start or 0
        if isinstance(local, slice):
            return slice(start + (local.start or 0), start + local.stop)
        return local + start if start else local
    return rows[local]


def apply_setup(
    setup: AdapterCompositionBlock | str,
    hidden: torch.Tensor,
    apply_one: ApplyOne,
    owns: Callable[[str], bool],
    rows: Rows | None = None,
    handlers: Mapping[type, CompositionHandler] | None = None,
) -> torch.Tensor:
    """Evaluate a setup for one method at one site: the helper plugins use for composition.

    Args:
        setup: the effective setup of this forward pass (`ForwardContext.setup`).
        hidden: the tensor to edit, batch first.
        apply_one: ``apply_one(name, hidden, rows)`` returns ``hidden`` edited by adapter
            ``name``; ``rows`` says which examples of the full batch ``hidden`` holds (see
            `Rows`), so the plugin can select the matching rows of other per-example tensors
            (inputs, positions) with `select_rows`.
        owns: whether an adapter name belongs to the calling method (others are skipped, they
            act at their own sites).
        rows: the examples of the full batch ``hidden`` covers; None for all of it.
        handlers: ``{block class: handler}`` for blocks the method evaluates itself (see
            `CompositionHandler`): ``Fuse``, ``Split``, a block of its own, or a faster path for
            one of core's (e.g. `PerExample`). A handler applies to subclasses of its class too.

    Semantics: a name → ``apply_one``; ``Stack`` → in order; ``BatchSplit`` → each child on its
    rows, concatenated; ``Average`` → ``hidden + sum_i w_i (child_i(hidden) - hidden)``;
    `PerExample` → each child on its examples, the others unedited. A block none of whose
    adapters the method owns leaves ``hidden`` as it is. Any other block needs a handler
    (`CompositionError` otherwise).
    """
    composer = _Composer(apply_one, owns, handlers or {})
    return composer.compose(setup, hidden, slice(0, hidden.shape[0]) if rows is None else rows)


class _Composer:
    """Evaluates a setup with core's handling of its blocks and the method's handlers."""

    __slots__ = ("apply_one", "handlers", "owns")

    def __init__(
        self,
        apply_one: ApplyOne,
        owns: Callable[[str], bool],
        handlers: Mapping[type, CompositionHandler],
    ) -> None:
        self.apply_one, self.owns, self.handlers = apply_one, owns, handlers

    def compose(
        self, setup: AdapterCompositionBlock | str, hidden: torch.Tensor, rows: Rows
    ) -> torch.Tensor:
        if isinstance(setup, str):
            return self.apply_one(setup, hidden, rows) if self.owns(setup) else hidden
        if self.handlers:
            for cls in type(setup).__mro__:
                handler = self.handlers.get(cls)
                if handler is not None:
                    return handler(setup, hidden, rows, self.compose)
        if isinstance(setup, Stack):
            for child in setup.children:
                hidden = self.compose(child, hidden, rows)
            return hidden
        if isinstance(setup, BatchSplit):
            return self._batch_split(setup, hidden, rows)
        if isinstance(setup, Average):
            return self._average(setup, hidden, rows)
        if isinstance(setup, PerExample):
            return self._per_example(setup, hidden, rows)
        if not any(self.owns(name) for name in setup.flatten()):
            return hidden  # another method's block (e.g. its Fuse); it acts at its own sites
        raise CompositionError(
            f"{type(setup).__name__} is not handled here: the method owning "
            f"{setup.flatten()} must pass a handler for it to apply_setup (handlers="
            f"{{{type(setup).__name__}: ...}}), or not declare {type(setup).__name__} in "
            "MethodSpec.compositions"
        )

    def _batch_split(self, setup: BatchSplit, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        if sum(setup.batch_sizes) != hidden.shape[0]:
            raise CompositionError(
                f"BatchSplit batch_sizes={setup.batch_sizes} sum to {sum(setup.batch_sizes)} "
                f"but the batch has {hidden.shape[0]} examples"
            )
        parts, start = [], 0
        for child, size in zip(setup.children, setup.batch_sizes):
            local = slice(start, start + size)
            parts.append(self.compose(child, hidden[local], sub_rows(rows, local)))
            start += size
        return torch.cat(parts, dim=0)

    def _average(self, setup: Average, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        total = None
        for child, weight in zip(setup.children, setup.weights):
            delta = self.compose(child, hidden, rows) - hidden
            total = weight * delta if total is None else total + weight * delta
        return hidden + total

    def _per_example(self, setup: PerExample, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        if len(setup.names) != hidden.shape[0]:
            raise CompositionError(
                f"adapter_names has {len(setup.names)} entries but the batch has "
                f"{hidden.shape[0]} examples; give one adapter name (or None) per example"
            )
        out = hidden
        for child, local in zip(setup.children, setup.rows):
            if not self.owns(child):  # type: ignore[arg-type]
                continue
            if local.device != hidden.device:
                local = local.to(hidden.device)
            part = self.compose(child, hidden.index_select(0, local), sub_rows(rows, local))
            out = out.index_copy(0, local, part.to(out.dtype))
        return out


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
    if isinstance(setup, Fuse) and setup._name is not None:
        data["name"] = setup._name
    if isinstance(setup, PerExample):
        data["names"] = list(setup.names)
        del data["children"]
    return data


def setup_from_dict(data: Any) -> AdapterCompositionBlock | str | None:
    """Inverse of `setup_to_dict`."""
    if data is None or isinstance(data, str):
        return data
    types = {cls.__name__: cls for cls in BLOCK_TYPES}
    cls = types.get(data.get("type"))
    if cls is None:
        raise CompositionError(f"unknown composition block {data.get('type')!r}")
    if cls is PerExample:
        return PerExample(data["names"])
    children = [setup_from_dict(c) for c in data["children"]]
    if cls is BatchSplit:
        return BatchSplit(*children, batch_sizes=data["batch_sizes"])
    if cls is Split:
        return Split(*children, splits=data["splits"])
    if cls is Average:
        return Average(*children, weights=data["weights"], normalize_weights=False)
    if cls is Fuse:
        return Fuse(*children, name=data.get("name"))
    return cls(*children)
