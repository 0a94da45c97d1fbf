"""Where bottleneck adapters sit in a model and the hooks that run them.

A `SubBlockHost` lives on each adapted layer (child ``bottleneck_attention``,
``bottleneck_cross_attention`` or ``bottleneck_output``) and holds that sub-block's adapters.
It uses three hook points of the layer, all taken from **that layer's own** sites (never a
getter resolved later, pitfall 13):

- a forward pre-hook on the module whose input is the sub-block's residual stream
  (``layer_pre_self_attn`` / ``layer_pre_cross_attn`` / ``layer_pre_ffn``) captures the residual
  input ``r`` for the duration of the sub-block;
- a forward hook on the sub-block's output projection (``attn_o_proj`` / ``layer_output_proj``)
  turns its output ``h`` (before the model's residual add) into the adapted one;
- on post-LN models, a forward hook on the norm after the residual add (``layer_ln_1`` /
  ``layer_ln_2``) replaces that norm's output when an adapter says ``original_ln_after=False``.

The residual is kept on the host between the two hooks of one sub-block call (core's sub-block
sites will replace this stash when they land). Invertible adapters live in an
`InvertibleHost` on the input embeddings (forward hook) and are inverted in a forward pre-hook
of the model's output embeddings (``get_output_embeddings()``), when it has them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from adapters.composition import (
    AdapterCompositionBlock,
    Average,
    BatchSplit,
    Compose,
    PerExample,
    Rows,
    Split,
    apply_setup,
)
from adapters.context import context_for
from adapters.errors import AdaptersError, CompositionError

#: sub-block location (AdapterHub's ``location_key``) -> the host's attribute name on a layer.
HOST_NAMES = {
    "mh_adapter": "bottleneck_attention",
    "cross_adapter": "bottleneck_cross_attention",
    "output_adapter": "bottleneck_output",
}
INV_HOST = "bottleneck_invertible"
SHARED_HOST = "bottleneck_shared"


class ResidualMismatchError(AdaptersError, RuntimeError):
    """The captured residual input does not line up with the sub-block's output."""


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    if isinstance(value, torch.Tensor):
        return value
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


class SubBlockHost(nn.Module):
    """The adapters of one sub-block (attention, cross-attention or feed-forward) of one layer.

    Attributes:
        adapters: adapter name -> `BottleneckAdapter`.
        location: ``"mh_adapter"``, ``"cross_adapter"`` or ``"output_adapter"``.
        path: the layer's path (for messages).
    """

    def __init__(self, model: nn.Module, location: str, path: str, norm: nn.Module | None) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.location = location
        self.path = path
        # References, not submodules: the norm is the model's own (its keys stay the model's).
        self.__dict__["model"] = model
        self.__dict__["norm"] = norm
        self._residual: torch.Tensor | None = None
        self._norm_output: tuple[torch.Tensor, torch.Tensor] | None = None
        self._activity: tuple[Any, bool] = (None, False)

    def forget_setup(self) -> None:
        """Drop the cached "is one of my adapters active" answer (adapters changed)."""
        self._activity = (None, False)

    # -- hooks ---------------------------------------------------------------------------
    def capture_residual(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the residual-input module: remember the sub-block's input."""
        self._residual = _first_tensor(args, kwargs)

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook on the sub-block's output projection: apply the active adapters."""
        residual, self._residual = self._residual, None
        self._norm_output = None
        ctx = context_for(self.model)
        setup = ctx.setup
        if setup is None:
            return None
        seen, relevant = self._activity
        if setup is not seen:
            relevant = any(name in self.adapters for name in setup.flatten())
            self._activity = (setup, relevant)
        if not relevant:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if residual is not None and residual.shape != hidden.shape:
            raise ResidualMismatchError(
                f"bottleneck adapter at {self.path} ({self.location}): the residual input has "
                f"shape {tuple(residual.shape)} but the sub-block output {tuple(hidden.shape)}; "
                "the interface's layer_pre_* path must name the module whose input is this "
                "sub-block's residual stream"
            )
        new = self.run(setup, hidden, residual)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    # -- composition ---------------------------------------------------------------------
    def run(
        self, setup: AdapterCompositionBlock, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor:
        """The sub-block output the model should continue with, for ``setup``.

        Examples whose last adapter here has ``original_ln_after=False`` skip the model's
        residual add and norm: on a post-LN sub-block the norm's output is replaced for them,
        on a pre-LN one the residual is subtracted (the model adds it back)."""
        out, replaced = self._evaluate(setup, hidden, residual)
        if replaced is None:
            return out  # the model's own residual add (and norm) follow
        if self.norm is not None:
            self._norm_output = (out, replaced)
            return out
        return torch.where(replaced, out - residual, out)

    def replace_norm(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook on the layer's norm after the residual add: with
        ``original_ln_after=False`` the adapter's output replaces the norm's."""
        pending, self._norm_output = self._norm_output, None
        if pending is None:
            return None
        out, replaced = pending
        return torch.where(replaced, out.to(output.dtype), output)

    def compose(
        self,
        setup: AdapterCompositionBlock | str,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> torch.Tensor:
        """``hidden`` after the adapters of ``setup`` (before the model's residual add)."""
        return self._evaluate(setup, hidden, residual)[0]

    def _evaluate(
        self,
        setup: AdapterCompositionBlock | str,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Evaluate ``setup`` with core's `apply_setup` (``Stack``, ``BatchSplit``,
        ``Average``, ``PerExample``) and this method's ``Split`` handler.

        ``hidden``, the residual and a flag "the last adapter applied here replaces the
        model's residual add" travel together as one tensor ``[hidden | residual | flag]``
        (last dimension), so that every block slices them alike. Returns the new hidden state
        and the boolean flag (None when no adapter here replaces the residual add).
        """
        width = hidden.shape[-1]
        parts = [hidden] if residual is None else [hidden, residual.to(hidden.dtype)]
        flagged = any(not a.original_ln_after for a in self.adapters.values())
        if flagged:
            parts.append(hidden.new_zeros((*hidden.shape[:-1], 1)))
        state = torch.cat(parts, dim=-1) if len(parts) > 1 else hidden
        has_residual = residual is not None

        def apply_one(name: str, packed: torch.Tensor, rows: Rows) -> torch.Tensor:
            adapter = self.adapters[name]
            h = packed[..., :width]
            r = packed[..., width : 2 * width] if has_residual else None
            pieces = [adapter.step(h, r, self.norm)]
            if r is not None:
                pieces.append(r)
            if flagged:
                flag = 0.0 if adapter.original_ln_after else 1.0
                pieces.append(torch.full_like(packed[..., -1:], flag))
            return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

        handlers = {Split: functools.partial(_split_positions, self.path)}
        out = apply_setup(setup, state, apply_one, self.adapters.__contains__, handlers=handlers)
        replaced = out[..., -1:] > 0.5 if flagged else None
        return out[..., :width], replaced


def _split_positions(
    path: str, block: Split, hidden: torch.Tensor, rows: Rows, compose: Compose
) -> torch.Tensor:
    """``Split``: positions ``splits[0]`` go through child 0, the next ``splits[1]`` through
    child 1, ..."""
    if sum(block.splits) != hidden.shape[1]:
        raise CompositionError(
            f"Split splits={block.splits} sum to {sum(block.splits)} but the sequence has "
            f"{hidden.shape[1]} positions at {path}; give splits that sum to the input length"
        )
    parts = hidden.split(block.splits, dim=1)
    return torch.cat([compose(c, p, rows) for c, p in zip(block.children, parts)], dim=1)


class InvertibleHost(nn.Module):
    """Invertible adapters on the input embeddings; inverted before the output embeddings."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.__dict__["model"] = model
        self._activity: tuple[Any, bool] = (None, False)

    def forget_setup(self) -> None:
        """Drop the cached activity answer (adapters changed)."""
        self._activity = (None, False)

    def _setup(self) -> AdapterCompositionBlock | None:
        setup = context_for(self.model).setup
        if setup is None:
            return None
        seen, relevant = self._activity
        if setup is not seen:
            relevant = any(name in self.adapters for name in setup.flatten())
            self._activity = (setup, relevant)
        return setup if relevant else None

    def apply(
        self, setup: AdapterCompositionBlock | str, hidden: torch.Tensor, rev: bool
    ) -> torch.Tensor:
        """Apply (``rev=False``) or invert the invertible adapter of ``setup``: per slice of a
        `BatchSplit`; for `Average` the weighted mean of the children's transforms (in both
        directions: exact for one-hot weights, an approximation of the inverse otherwise);
        else the first adapter of the setup that has one."""
        if isinstance(setup, Average):
            total = None
            for child, weight in zip(setup.children, setup.weights):
                change = weight * (self.apply(child, hidden, rev) - hidden)
                total = change if total is None else total + change
            return hidden + total
        if isinstance(setup, PerExample):
            out = hidden
            for child, rows in zip(setup.children, setup.rows):
                rows = rows.to(hidden.device)
                part = self.apply(child, hidden.index_select(0, rows), rev)
                out = out.index_copy(0, rows, part)
            return out
        if isinstance(setup, BatchSplit):
            return torch.cat(
                [
                    self.apply(child, h, rev)
                    for child, h in zip(setup.children, hidden.split(setup.batch_sizes, dim=0))
                ],
                dim=0,
            )
        names = [setup] if isinstance(setup, str) else setup.flatten()
        name = next((n for n in names if n in self.adapters), None)
        if name is None:
            return hidden
        block = self.adapters[name]
        dtype = hidden.dtype
        param = next(block.parameters())
        return block(hidden.to(torch.promote_types(param.dtype, dtype)), rev=rev).to(dtype)

    def embed_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook on the input embeddings."""
        setup = self._setup()
        if setup is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        new = self.apply(setup, hidden, rev=False)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def unembed_hook(self, module: nn.Module, args: tuple) -> Any:
        """Forward pre-hook on the output embeddings: the inverse transform."""
        setup = self._setup()
        if setup is None or not args:
            return None
        return (self.apply(setup, args[0], rev=True), *args[1:])


def remove_hooks_of(module: nn.Module, owner: nn.Module) -> None:
    """Remove every hook of ``module`` bound to ``owner`` (found by identity, so that it also
    works on a deep copy of the model)."""
    for attr in ("_forward_hooks", "_forward_pre_hooks"):
        hooks = getattr(module, attr)
        for key, hook in list(hooks.items()):
            if getattr(hook, "__self__", None) is owner:
                del hooks[key]
                for extra in (
                    "_forward_hooks_with_kwargs",
                    "_forward_pre_hooks_with_kwargs",
                    "_forward_hooks_always_called",
                ):
                    getattr(module, extra, {}).pop(key, None)
