"""Sub-block hooks: a method edits a sub-block's output before the residual add, with the
residual input at hand, or replaces the residual add and the norm that follows it.

A `adapters.sites.SubBlockSite` says which modules carry what (the residual source, the output
module, the norm at the add and its placement). `register_hook` installs core's hooks there:

- a forward pre-hook on the residual source stores its first input (the residual stream ``x``);
- a forward hook on the output module calls the method with the sub-block output ``out`` and
  ``x``, and puts what it returns in place of ``out``;
- with ``replace_add=True`` (post-LN only), a forward hook on the norm after the add calls the
  method with ``out``, ``x`` and the model's own ``norm(x + out)``, and puts what it returns in
  place of the norm's output (AdapterHub's ``original_ln_after=False``).

The captured residual lives for the duration of one run of the sub-block, in a slot of the
hook object keyed by the running thread (each thread, including autograd's recomputation of a
checkpointed layer, sees its own), and is dropped when it is read. Under ``torch.compile`` the
slot key is a constant and the store/read pair is traced as plain data flow inside the graph,
so nothing here reads a ``ContextVar`` or makes an untraceable call. Nothing depends on the
forward context either, so a layer (or the whole sub-block) called on its own works; when the
output module runs without its residual source having run first, the method gets ``None`` as
the residual.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import InterfaceError

if TYPE_CHECKING:
    from .sites import SubBlockSite

#: ``fn(out, residual) -> new out or None`` (edit), or ``fn(out, residual, added) -> new
#: result of the add (and norm) or None`` (``replace_add=True``).
SubBlockFn = Callable[..., "torch.Tensor | None"]

_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def _slot() -> int:
    """Key of the running thread's capture slot (a constant while torch.compile traces)."""
    if _compiling is not None and _compiling():
        return 0
    return threading.get_ident()


def _first_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return hidden
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


class SubBlockHook:
    """Core's hooks for one registration on one sub-block (the methods are the torch hooks;
    bound methods, so a deep copy or pickle of the model carries them along)."""

    def __init__(self, fn: SubBlockFn, replace_add: bool) -> None:
        self.fn = fn
        self.replace_add = replace_add
        self._residuals: dict[int, torch.Tensor] = {}
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def reset(self, module: nn.Module, args: tuple) -> None:
        """Layer pre-hook: drop what an earlier call of this thread left (it raised midway)."""
        key = _slot()
        self._residuals.pop(key, None)
        self._pending.pop(key, None)

    def capture(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Residual source pre-hook: remember the residual stream entering the sub-block."""
        residual = _first_input(args, kwargs)
        if residual is not None:
            self._residuals[_slot()] = residual

    def edit(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Output module hook: call the method with the sub-block output and the residual."""
        key = _slot()
        residual = self._residuals.pop(key, None)
        out = output[0] if isinstance(output, tuple) else output
        if self.replace_add:
            self._pending[key] = (out, residual)
            return None
        new = self.fn(out, residual)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def replace(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Norm hook (``replace_add``): put the method's result in place of ``norm(x + out)``."""
        pending = self._pending.pop(_slot(), None)
        if pending is None:  # the norm ran without its sub-block (called on its own)
            return None
        out, residual = pending
        added = output[0] if isinstance(output, tuple) else output
        new = self.fn(out, residual, added)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new


class SubBlockHookHandle:
    """What `register_hook` returns: ``remove()`` takes core's hooks off the model again."""

    def __init__(self, hook: SubBlockHook, handles: list[RemovableHandle]) -> None:
        self.hook = hook
        self.handles = handles

    def remove(self) -> None:
        """Remove every hook of this registration (idempotent)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def register_hook(
    site: SubBlockSite, fn: SubBlockFn, *, replace_add: bool = False
) -> SubBlockHookHandle:
    """Call ``fn`` at each run of the sub-block ``site``.

    Edit mode (default): ``fn(out, residual)`` runs when the output module has run; ``out`` is
    the sub-block output before the residual add (the first element when the module returns a
    tuple), ``residual`` the residual stream entering the sub-block (``None`` when the
    interface names no residual source, or when the output module ran without it). Return the
    new ``out`` or ``None`` to leave it; the model then adds the residual (and applies its norm)
    as usual.

    Replace mode (``replace_add=True``, only where `SubBlockSite.can_replace_add`, i.e. a
    post-LN norm after the add): ``fn(out, residual, added)`` runs when the norm has run;
    ``added`` is the model's ``norm(residual + out)``; what ``fn`` returns is used instead.
    Modules between the output module and the add (BERT's dropout, identity in eval mode) are
    not applied to ``out`` in this mode.

    Write ``fn`` as a bound method of a module the method owns (not a closure made in a loop),
    keep what it needs per layer on that module (e.g. ``site.norm.module``), and read only plain
    attributes and tensors in it so that the forward stays ``torch.compile``-safe.

    Raises:
        InterfaceError: ``replace_add`` on a sub-block whose residual add is inline code of
            the layer (pre-LN, sandwich) or whose norm the interface does not name.
    """
    if replace_add and not site.can_replace_add:
        raise InterfaceError(
            f"replace_add=True on the {site.kind} sub-block of layer {site.layer_index} "
            f"({site.output.path}): its residual add is "
            + (
                "inline code of the layer (norm placement "
                f"{site.norm_placement!r}), which no hook can replace; edit the sub-block output "
                "instead (register_hook without replace_add)"
                if site.norm_placement != "post"
                else "followed by a norm the interface does not name; set "
                + {"self_attn": "layer_ln_1", "cross_attn": "layer_ln_cross_attn"}.get(
                    site.kind, "layer_ln_2"
                )
                + " to that norm"
            )
        )
    hook = SubBlockHook(fn, replace_add)
    handles: list[RemovableHandle] = []
    try:
        if site.layer is not None:
            handles.append(site.layer.module.register_forward_pre_hook(hook.reset))
        if site.residual is not None:
            handles.append(
                site.residual.module.register_forward_pre_hook(hook.capture, with_kwargs=True)
            )
        handles.append(site.output.module.register_forward_hook(hook.edit))
        if replace_add:
            assert site.norm is not None
            handles.append(site.norm.module.register_forward_hook(hook.replace))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return SubBlockHookHandle(hook, handles)
