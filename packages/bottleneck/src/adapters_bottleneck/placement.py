"""Where bottleneck adapters sit in a model and the hooks that run them.

A `SubBlockHost` (an `adapters.hosts.AdapterHost`) lives on each adapted layer (child
``bottleneck_attention``, ``bottleneck_cross_attention`` or ``bottleneck_output``) and holds
that sub-block's adapters. It runs through core's sub-block sites
(`adapters.sites.SubBlockSite`, `adapters.subblocks.register_hook`), taken from **that layer's
own** modules (never a getter resolved later, pitfall 13): core captures the sub-block's
residual input ``r`` (per thread, also under activation checkpointing) and calls the host with
the sub-block output ``h`` before the residual add:

- edit mode: the host returns the new ``h``; the model then adds ``r`` (and applies its
  post-LN norm) as usual;
- replace mode, on post-LN sub-blocks while one of the adapters there has
  ``original_ln_after=False`` (AdapterPlus): the host returns the result of the residual add
  and norm itself.

Invertible adapters live in an `InvertibleHost` on the input embeddings (forward hook) and are
inverted in a forward pre-hook of the model's output embeddings (``get_output_embeddings()``),
when it has them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from adapters.plugin import (
    AdapterCompositionBlock,
    AdapterHost,
    AdaptersError,
    Average,
    BatchSplit,
    Compose,
    CompositionError,
    Fuse,
    PerExample,
    Rows,
    Split,
    Stack,
    SubBlockSite,
    apply_setup,
    context_for,
    record_undo,
)

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


class SubBlockHost(AdapterHost):
    """The adapters of one sub-block (attention, cross-attention or feed-forward) of one layer.

    An `adapters.hosts.AdapterHost` (hook handles, activity cache, rollback come from core);
    its hooks are core's sub-block hooks, registered while it holds at least one adapter.

    Attributes:
        adapters: adapter name -> `BottleneckAdapter` (the host's units).
        fusions: fusion name -> `BottleneckFusion`.
        location: ``"mh_adapter"``, ``"cross_adapter"`` or ``"output_adapter"``.
        path: the layer's path (for messages).
    """

    units_attr = "adapters"

    def __init__(self, model: nn.Module, location: str, path: str, site: SubBlockSite) -> None:
        super().__init__(model)
        self.fusions = nn.ModuleDict()
        self.location = location
        self.path = path
        # A reference, not a submodule: the site's modules are the model's own.
        self.__dict__["site"] = site
        self.__dict__["norm"] = (
            site.norm.module if site.norm_placement == "post" and (site.norm is not None) else None
        )
        self.replacing = False  # registered in core's replace-the-add mode

    # -- hooks (core's sub-block sites call these) -----------------------------------------
    def on_attach(self, module: nn.Module) -> None:
        """Register core's sub-block hooks (none while the host holds no adapter)."""
        if not self.is_empty:
            self._register(self._wants_replace())

    def _wants_replace(self) -> bool:
        """Replace-the-add mode: a post-LN sub-block where one of the adapters has
        ``original_ln_after=False``."""
        return self.norm is not None and any(
            not a.original_ln_after for a in self.adapters.values()
        )

    def _register(self, replacing: bool) -> None:
        if replacing:
            self.add_sub_block_hook(self.site, self.replace, replace_add=True)
        else:
            self.add_sub_block_hook(self.site, self.edit)
        self.replacing = replacing

    def sync_hooks(self) -> None:
        """After adapters were added or removed: register the hooks in the mode they need
        (edit, or replace-the-add while one has ``original_ln_after=False`` on a post-LN
        sub-block). Inside a core operation a rollback restores the previous registration."""
        replacing = self._wants_replace()
        registered = bool(self._handles)
        if registered and replacing == self.replacing:
            return
        previous = self.replacing if registered else None
        self.remove_hooks()
        record_undo(self.model, functools.partial(self._restore_hooks, previous))
        self._register(replacing)

    def _restore_hooks(self, replacing: bool | None) -> None:
        self.remove_hooks()
        self.replacing = False
        if replacing is not None:
            self._register(replacing)

    def add_fusion(self, name: str, fusion: nn.Module) -> None:
        """Hold fusion layer ``name`` here (recorded: a rollback removes it again)."""
        previous = self.fusions[name] if name in self.fusions else None
        self.fusions[name] = fusion
        self.invalidate()

        def undo() -> None:
            if previous is None:
                if name in self.fusions:
                    del self.fusions[name]
            else:
                self.fusions[name] = previous
            self.invalidate()

        record_undo(self.model, undo)

    def _active_setup(self) -> AdapterCompositionBlock | None:
        setup = context_for(self.model).setup
        return setup if self.is_active(setup) else None

    def _check(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        if residual is not None and residual.shape != hidden.shape:
            raise ResidualMismatchError(
                f"bottleneck adapter at {self.path} ({self.location}): the residual input has "
                f"shape {tuple(residual.shape)} but the sub-block output {tuple(hidden.shape)}; "
                "the interface's layer_pre_* path must name the module whose input is this "
                "sub-block's residual stream"
            )

    def edit(self, out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor | None:
        """Edit mode: the new sub-block output (before the model's residual add)."""
        setup = self._active_setup()
        if setup is None:
            return None
        self._check(out, residual)
        new, replaced = self._evaluate(setup, out, residual)
        if replaced is None:
            return new
        # pre-LN (or sandwich): the model adds the residual back after this
        return torch.where(replaced, new - residual, new)

    def replace(
        self, out: torch.Tensor, residual: torch.Tensor | None, added: torch.Tensor
    ) -> torch.Tensor | None:
        """Replace mode (post-LN): the result of the residual add and norm."""
        setup = self._active_setup()
        if setup is None:
            return None
        self._check(out, residual)
        new, replaced = self._evaluate(setup, out, residual)
        normed = self.norm(new + residual).to(added.dtype)
        if replaced is None:
            return normed
        return torch.where(replaced, new.to(added.dtype), normed)

    # -- composition ---------------------------------------------------------------------
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
        flagged = any(not a.original_ln_after for a in self.adapters.values())
        if not flagged:
            direct = self._direct(setup, hidden, residual)
            if direct is not None:
                return direct, None
        width = hidden.shape[-1]
        parts = [hidden] if residual is None else [hidden, residual.to(hidden.dtype)]
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

        handlers = {
            Split: functools.partial(_split_positions, self.path),
            Fuse: functools.partial(self._fuse, width, has_residual, flagged),
        }
        out = apply_setup(setup, state, apply_one, self.adapters.__contains__, handlers=handlers)
        replaced = out[..., -1:] > 0.5 if flagged else None
        return out[..., :width], replaced

    def _direct(
        self,
        setup: AdapterCompositionBlock | str,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The common setups without packing ``[hidden | residual]`` into one tensor: one
        adapter, a `Stack` of adapters, or a `Fuse` of adapters (alone or as a Stack's only
        child). The same computation as `apply_setup` on the packed tensor, without its
        concatenations and slices; None for any other setup (evaluated packed)."""
        if residual is not None:
            residual = residual.to(hidden.dtype)  # as packed
        if isinstance(setup, Stack) and len(setup.children) == 1:
            setup = setup.children[0]
        if isinstance(setup, Fuse):
            if not all(isinstance(c, str) for c in setup.children):
                return None  # nested blocks: the packed path raises the error
            return self._fused(setup, hidden, residual)
        names = setup.children if isinstance(setup, Stack) else (setup,)
        if not all(isinstance(n, str) for n in names):
            return None
        for name in names:
            if name in self.adapters:
                hidden = self.adapters[name].step(hidden, residual, self.norm)
        return hidden

    def _fused(self, block: Fuse, h: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        """``Fuse`` of adapter names on unpacked tensors: the new hidden state."""
        names = list(block.children)
        if not any(n in self.adapters for n in names):
            return h
        fusion = self.fusions[block.name] if block.name in self.fusions else None
        if fusion is None:
            # Not every fused adapter sits at this sub-block (e.g. seq_bn with double_seq_bn):
            # the ones that do run in order, as a Stack.
            for name in names:
                if name in self.adapters:
                    h = self.adapters[name].step(h, r, self.norm)
            return h
        last = self.adapters[names[-1]]
        if last.is_parallel:
            # parallel adapters read the residual input; the fused output is added beside h
            x = r.to(last._compute_dtype(r.dtype))
            ups = torch.stack([self.adapters[n].up(x) for n in names], dim=2)
            return (h + fusion(x, ups, torch.zeros_like(x)).to(h.dtype)).to(h.dtype)
        x, adapter_residual = last.prepare(h, r, self.norm)
        query = h.to(x.dtype) if fusion.config.query_before_ln else x
        ups = torch.stack([self.adapters[n].up(x) for n in names], dim=2)
        return fusion(query, ups, adapter_residual).to(h.dtype)

    def _fuse(
        self,
        width: int,
        has_residual: bool,
        flagged: bool,
        block: Fuse,
        packed: torch.Tensor,
        rows: Rows,
        compose: Compose,
    ) -> torch.Tensor:
        """``Fuse``: the last child prepares the input (and the query) as it would alone; each
        child's scaled up-projection of that input is attended over by the fusion layer."""
        names = [c for c in block.children if isinstance(c, str)]
        if len(names) != len(block.children):
            raise CompositionError(
                f"{block!r}: bottleneck fusion fuses adapters, not nested blocks; fuse names"
            )
        if not any(n in self.adapters for n in names):
            return packed
        fusion = self.fusions[block.name] if block.name in self.fusions else None
        if fusion is None:
            # Not every fused adapter sits at this sub-block (e.g. seq_bn with double_seq_bn):
            # the ones that do run in order, as a Stack.
            for name in names:
                packed = compose(name, packed, rows)
            return packed
        h = packed[..., :width]
        r = packed[..., width : 2 * width] if has_residual else None
        new = self._fused(block, h, r)
        last = self.adapters[names[-1]]
        pieces = [new] + ([r] if r is not None else [])
        if flagged:
            flag = 0.0 if last.original_ln_after else 1.0
            pieces.append(torch.full_like(packed[..., -1:], flag))
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else new


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


class InvertibleHost(AdapterHost):
    """Invertible adapters on the input embeddings (a forward hook there); inverted in a
    forward pre-hook of the model's output embeddings, when it has them. An
    `adapters.hosts.AdapterHost`."""

    units_attr = "adapters"

    def on_attach(self, module: nn.Module) -> None:
        """Hook the input embeddings ``module`` and the model's output embeddings."""
        self.add_hook(module, self.embed_hook)
        output_embeddings = output_embeddings_of(self.model)
        if output_embeddings is not None:
            self.add_hook(output_embeddings, self.unembed_hook, pre=True)

    def _setup(self) -> AdapterCompositionBlock | None:
        setup = context_for(self.model).setup
        return setup if self.is_active(setup) else None

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


def output_embeddings_of(model: nn.Module) -> nn.Module | None:
    """``model.get_output_embeddings()``, or None when the model has none."""
    getter = getattr(model, "get_output_embeddings", None)
    if getter is None:
        return None
    try:
        found = getter()
    except (AttributeError, NotImplementedError):
        return None
    return found if isinstance(found, nn.Module) else None
