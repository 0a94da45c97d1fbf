"""Rollback of a failed operation: an explicit undo log, plus a structural check.

Core runs every operation that changes the model (``init``, ``add_adapter``, adding or loading
a fusion) inside `operation`. Whoever changes the model during it records how to undo the
change: `adapters.hosts.AdapterHost` does it for the hosts it attaches, their hooks, units,
parametrisations and protected tensors; a plugin that changes the model some other way calls
`record_undo`. When the operation fails, the log is undone newest first, then a structural
check with public ``torch.nn.Module`` API only removes submodules and parameters that appeared
(and puts back ones that were replaced or removed). Forward hooks cannot be found that way:
register them through a host (`AdapterHost.add_hook`) or record their handle's ``remove``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

UNDO_ATTR = "_adapters_undo"


class UndoLog:
    """What an operation changed, as undo actions run newest first on failure."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], None]] = []
        self._undoing = False
        #: ids of the model's modules when the operation began (new ones are the operation's)
        self.modules_before: set[int] = set()

    def record(self, action: Callable[[], None]) -> None:
        """Remember ``action`` (a callable without arguments) to run if the operation fails.
        Ignored while the log is being undone (undo actions are not themselves undone)."""
        if not self._undoing:
            self._actions.append(action)

    def undo(self) -> None:
        """Run every recorded action, newest first; all run even if one raises (the first error
        is raised at the end)."""
        error: BaseException | None = None
        self._undoing = True
        try:
            while self._actions:
                action = self._actions.pop()
                try:
                    action()
                except BaseException as exc:  # keep undoing: leave as little behind as possible
                    error = error or exc
        finally:
            self._undoing = False
        if error is not None:
            raise error

    def __len__(self) -> int:
        return len(self._actions)


def record_undo(model: nn.Module, action: Callable[[], None]) -> None:
    """Record ``action`` in the undo log of the operation running on ``model`` (a no-op outside
    one: ``delete_adapter`` and the like are not rolled back)."""
    log = model.__dict__.get(UNDO_ATTR)
    if log is not None:
        log.record(action)


@contextlib.contextmanager
def operation(model: nn.Module) -> Iterator[UndoLog]:
    """Run the body as one operation on ``model``: on an exception, undo what was recorded and
    what the structural check finds, then re-raise. Nested operations join the outer one (a
    later failure of the outer operation undoes the inner one too)."""
    outer = model.__dict__.get(UNDO_ATTR)
    log = UndoLog()
    structure = _Structure(model)
    log.modules_before = {id(m) for m in structure.modules}
    model.__dict__[UNDO_ATTR] = log
    try:
        yield log
    except BaseException:
        try:
            log.undo()
        finally:
            structure.restore()
        raise
    finally:
        if outer is None:
            model.__dict__.pop(UNDO_ATTR, None)
        else:
            model.__dict__[UNDO_ATTR] = outer
    if outer is not None:
        outer.record(log.undo)


class _Structure:
    """Each module's children and own parameters, read and restored with public API only."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.children = [dict(m.named_children()) for m in self.modules]
        self.params = [dict(m.named_parameters(recurse=False)) for m in self.modules]

    def restore(self) -> None:
        for module, children, params in zip(self.modules, self.children, self.params):
            for name, child in list(module.named_children()):
                if children.get(name) is not child:
                    delattr(module, name)
            for name, child in children.items():
                if getattr(module, name, None) is not child:
                    module.add_module(name, child)
            for name, param in list(module.named_parameters(recurse=False)):
                if params.get(name) is not param:
                    delattr(module, name)
            for name, param in params.items():
                if getattr(module, name, None) is not param:
                    module.register_parameter(name, param)
            # put back in their old order what was removed and added again (state_dict keys and
            # the order of parameters() stay as they were)
            _reorder(module._modules, list(children))
            _reorder(module._parameters, list(params))


def _reorder(entries: dict, order: list[str]) -> None:
    """Reorder the dict ``entries`` in place: the keys of ``order`` first, in that order, then
    the others as they are."""
    if [k for k in entries if k in order] == [k for k in order if k in entries]:
        return
    items = {k: entries[k] for k in order if k in entries}
    items.update((k, v) for k, v in entries.items() if k not in items)
    entries.clear()
    entries.update(items)
