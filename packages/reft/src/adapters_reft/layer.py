"""ReFT modules and the forward hook that applies them.

One `ReftHost` lives on each intervened layer module (as its child ``adapters_reft``) and holds
that layer's `ReftIntervention` per adapter; its bound method `ReftHost.hook` is the layer's
forward hook. An intervention has one `ReftUnit` per used side (prefix / suffix), or one when
tied. Which positions are edited comes from the forward context (the 2-D mask at the model's
input), never from what the layer receives.

Position rule (per example, among its real tokens, i.e. mask == 1):

- prefix: the first ``prefix_positions`` real tokens; suffix: the last ``suffix_positions``;
- a token that is in both is edited once, by the suffix unit (as AdapterHub does);
- an example with fewer real tokens simply has fewer edited positions; pads are never edited;
- only the tokens of the current call are edited (those already in a KV cache were edited when
  they were processed); during ``generate()`` only prompt tokens are candidates, so generated
  tokens are never edited and cached / uncached generation agree.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.plugin import (
    ACTIVATIONS,
    AdapterHost,
    AdaptersError,
    CompositionError,
    ForwardContext,
    Rows,
    apply_setup,
    context_for,
    is_compiling,
    select_rows,
)

from .config import ReftConfig

HOST_ATTR = "adapters_reft"
_CACHE_KEY = "reft"


class ReftPositionError(AdaptersError, RuntimeError):
    """A layer's hidden state does not line up with the tokens given to the model."""


def orthonormal_rows(raw: torch.Tensor) -> torch.Tensor:
    """The ``r`` x ``d`` matrix with orthonormal rows spanning ``raw``'s rows, in float32 (float64
    for a float64 ``raw``; half precision is never used).

    Computed as the Q factor of ``raw^T`` (QR), with signs chosen so that the triangular factor
    has a positive diagonal: the map is smooth, does not depend on ``raw``'s scale (weight decay
    cannot collapse it) and sends a matrix that already has orthonormal rows to itself.
    """
    compute = torch.promote_types(raw.dtype, torch.float32)
    q, triangular = torch.linalg.qr(raw.to(compute).t())
    signs = torch.where(torch.diagonal(triangular) < 0, -1.0, 1.0)
    return (q * signs).t()


class ReftUnit(nn.Module):
    """One parameter set: ``learned_source`` (``W``, ``b``: d -> r) and ``projection`` (R).

    For orthogonal units ``projection.weight`` is an unconstrained matrix and ``R`` is
    `orthonormal_rows` of it (computed in float32, then cast), so R R^T = I holds under any
    optimizer; it is created orthonormal, so a freshly created or loaded R is stored as itself.
    """

    def __init__(
        self,
        hidden_size: int,
        r: int,
        orthogonal: bool,
        subtract_projection: bool,
        non_linearity: str | None,
        dropout: float,
        dtype: torch.dtype,
        device: torch.device | None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.orthogonal = orthogonal
        self.subtract_projection = subtract_projection
        self.non_linearity = None if non_linearity is None else non_linearity.lower()
        self.activation = ACTIVATIONS[self.non_linearity] if self.non_linearity else None
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        bound = 1.0 / math.sqrt(hidden_size)  # nn.Linear's default initialisation range
        # Drawn on the CPU (where the generator lives) whatever torch.device context is active,
        # then moved to the layer's device: seeded values are the same on every device.
        cpu = torch.device("cpu")
        weight = torch.empty(r, hidden_size, device=cpu).uniform_(
            -bound, bound, generator=generator
        )
        bias = torch.empty(r, device=cpu).uniform_(-bound, bound, generator=generator)
        projection = torch.empty(r, hidden_size, device=cpu).uniform_(
            -bound, bound, generator=generator
        )
        if orthogonal:
            if r > hidden_size:
                raise ValueError(f"r={r} cannot exceed hidden size {hidden_size} for LoReFT")
            # Orthonormalised in the parameter's precision (float64 stays exact to float64).
            projection = orthonormal_rows(projection.to(torch.promote_types(dtype, torch.float32)))
        self.learned_source = nn.Linear(hidden_size, r, bias=True, device="meta")
        self.projection = nn.Linear(hidden_size, r, bias=False, device="meta")
        self.learned_source.weight = nn.Parameter(weight.to(device=device, dtype=dtype))
        self.learned_source.bias = nn.Parameter(bias.to(device=device, dtype=dtype))
        self.projection.weight = nn.Parameter(projection.to(device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout)
        self._rotation_cache: tuple[Any, torch.Tensor] | None = None

    def rotation(self) -> torch.Tensor:
        """``R`` in float32 (float64 for float64 weights): orthonormalised for orthogonal units.
        Cached while no gradient is recorded and the weight is unchanged."""
        weight = self.projection.weight
        if not self.orthogonal:
            return weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
        if (torch.is_grad_enabled() and weight.requires_grad) or is_compiling():
            # Under torch.compile the graph recomputes it (no identity cache in a traced region).
            return orthonormal_rows(weight)
        key = (weight._version, weight.data_ptr(), weight.device, weight.dtype)
        cached = self._rotation_cache
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, orthonormal_rows(weight))
            self._rotation_cache = cached
        return cached[1]

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """New hidden states for ``states`` (positions x d, float32 or wider)."""
        dtype = states.dtype
        rotation = self.rotation().to(dtype)
        source = F.linear(
            states, self.learned_source.weight.to(dtype), self.learned_source.bias.to(dtype)
        )
        if self.activation is not None:
            source = self.activation(source)
        if self.subtract_projection:
            source = torch.addmm(source, states, rotation.t(), alpha=-1)  # W h + b - R h
        output = torch.addmm(states, source, rotation)  # h + R^T (...)
        if self.training and self.dropout.p > 0:
            output = self.dropout(output)
        return output

    def extra_repr(self) -> str:
        return (
            f"orthogonal={self.orthogonal}, subtract_projection={self.subtract_projection}, "
            f"non_linearity={self.non_linearity}"
        )


class ReftIntervention(nn.Module):
    """One adapter's intervention at one layer: its units and which positions it edits.

    ``units[0]`` serves the prefix (or the only used side, or both sides when tied);
    ``units[1]``, present only for an untied prefix + suffix config, serves the suffix.
    """

    def __init__(
        self, hidden_size: int, config: ReftConfig, dtype: torch.dtype, device: torch.device | None
    ) -> None:
        super().__init__()
        self.prefix_positions = config.prefix_positions
        self.suffix_positions = config.suffix_positions
        self.units = nn.ModuleList(
            ReftUnit(
                hidden_size,
                config.r,
                config.orthogonality,
                config.subtract_projection,
                config.non_linearity,
                config.dropout,
                dtype,
                device,
                config.init_weights_seed,
            )
            for _ in range(config.n_units)
        )

    def edit(self, hidden: torch.Tensor, positions: Positions) -> torch.Tensor:
        """``hidden`` (batch x length x d) with the chosen positions replaced (out of place)."""
        compute = torch.promote_types(hidden.dtype, torch.float32)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if len(self.units) == 2:
            prefix = self.units[0](flat.index_select(0, positions.prefix).to(compute))
            suffix = self.units[1](flat.index_select(0, positions.suffix).to(compute))
            new = torch.cat([prefix, suffix], dim=0)
        else:
            new = self.units[0](flat.index_select(0, positions.both).to(compute))
        return flat.index_copy(0, positions.both, new.to(hidden.dtype)).view_as(hidden)

    def edit_masked(
        self, hidden: torch.Tensor, prefix: torch.Tensor, suffix: torch.Tensor
    ) -> torch.Tensor:
        """Like `edit`, for positions given as (batch, length) bool masks: every position is
        computed and the chosen ones kept. Shapes stay static, so torch.compile traces it into
        one graph (`edit` selects a data-dependent number of rows)."""
        compute = torch.promote_types(hidden.dtype, torch.float32)
        flat = hidden.reshape(-1, hidden.shape[-1]).to(compute)
        prefix, suffix = prefix.reshape(-1, 1), suffix.reshape(-1, 1)
        if len(self.units) == 2:
            new = torch.where(prefix, self.units[0](flat), flat)
            new = torch.where(suffix, self.units[1](flat), new)
        else:
            new = torch.where(prefix | suffix, self.units[0](flat), flat)
        return new.to(hidden.dtype).view_as(hidden)

    def extra_repr(self) -> str:
        return f"prefix_positions={self.prefix_positions}, suffix_positions={self.suffix_positions}"


class Positions:
    """Edited positions of one call as flat indices into the (batch * length) rows of a hidden
    state: ``prefix``, ``suffix`` and ``both`` (prefix then suffix)."""

    __slots__ = ("both", "count", "length", "prefix", "suffix")

    def __init__(self, prefix: torch.Tensor, suffix: torch.Tensor, length: int) -> None:
        self.prefix, self.suffix, self.length = prefix, suffix, length
        self.both = torch.cat([prefix, suffix])
        self.count = int(self.both.numel())

    def pairs(self, which: str = "both") -> tuple[torch.Tensor, torch.Tensor]:
        """(example, position) index tensors of ``which`` (for inspection and tests)."""
        flat = getattr(self, which)
        return flat // self.length, flat % self.length

    def rows(self, rows: Rows, batch: int) -> Positions:
        """The positions of examples ``rows`` of a batch of ``batch``, renumbered from 0 in the
        order of ``rows`` (a `BatchSplit` slice or the example indices of `PerExample`)."""
        if isinstance(rows, slice):
            low, high = rows.start * self.length, rows.stop * self.length

            def keep(flat: torch.Tensor) -> torch.Tensor:
                return flat[(flat >= low) & (flat < high)] - low

            return Positions(keep(self.prefix), keep(self.suffix), self.length)
        rows = rows.to(self.both.device)
        local = torch.full((batch,), -1, dtype=torch.long, device=rows.device)
        local[rows] = torch.arange(rows.numel(), device=rows.device)

        def renumber(flat: torch.Tensor) -> torch.Tensor:
            new_row = local[flat // self.length]
            kept = new_row >= 0
            return (new_row * self.length + flat % self.length)[kept]

        return Positions(renumber(self.prefix), renumber(self.suffix), self.length)


def select_positions(
    attention_mask: torch.Tensor | None,
    batch: int,
    past_length: int,
    input_length: int,
    prompt_length: int | None,
    prefix_positions: int,
    suffix_positions: int,
    device: torch.device,
) -> Positions:
    """Which positions of the current chunk to edit (see the module docstring for the rule).

    ``attention_mask`` is the 2-D (batch, past + current) mask given to the model, or None
    (every token real). Positions are relative to the current chunk.
    """
    masks = select_position_masks(
        attention_mask,
        batch,
        past_length,
        input_length,
        prompt_length,
        prefix_positions,
        suffix_positions,
        device,
    )
    if masks is None:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Positions(empty, empty, input_length)
    prefix, suffix = masks

    def flat(chosen: torch.Tensor) -> torch.Tensor:
        rows, columns = chosen.nonzero(as_tuple=True)
        return rows * input_length + columns

    return Positions(flat(prefix), flat(suffix), input_length)


def select_position_masks(
    attention_mask: torch.Tensor | None,
    batch: int,
    past_length: int,
    input_length: int,
    prompt_length: int | None,
    prefix_positions: int,
    suffix_positions: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`select_positions` as two bool (batch, input_length) masks (prefix, suffix), or None
    when no position of the current chunk can be edited."""
    total = past_length + input_length
    if attention_mask is None:
        real = torch.ones(batch, total, dtype=torch.bool, device=device)
    else:
        real = attention_mask.to(device=device).bool()
    end = total if prompt_length is None else min(prompt_length, total)
    region = real[:, :end]
    rank = region.long().cumsum(dim=1) - 1  # index of each real token among its example's
    count = region.sum(dim=1, keepdim=True)
    suffix = region & (rank >= count - suffix_positions)
    prefix = region & (rank < prefix_positions) & ~suffix
    width = end - past_length  # prompt tokens inside this chunk (may be <= 0)
    if width <= 0:
        return None
    prefix, suffix = prefix[:, past_length:], suffix[:, past_length:]
    if width < input_length:  # generated tokens of this chunk are never edited
        pad = torch.zeros(batch, input_length - width, dtype=torch.bool, device=device)
        prefix, suffix = torch.cat([prefix, pad], dim=1), torch.cat([suffix, pad], dim=1)
    return prefix, suffix


class ReftHost(AdapterHost):
    """Lives on one layer module; holds each adapter's `ReftIntervention` for that layer (in
    ``interventions``) and edits the layer's output in its forward hook. Hooks, activity cache
    and rollback come from `adapters.hosts.AdapterHost`."""

    units_attr = "interventions"

    def __init__(self, model: nn.Module, layer_path: str) -> None:
        super().__init__(model)
        self.layer_path = layer_path

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook of the layer: apply the active ReFT adapters to its output."""
        # A layer re-run by activation checkpointing gets the last training call's context from
        # core, so the recomputed edit is the forward's (same setup and positions).
        ctx = context_for(self.model)
        hidden = output[0] if isinstance(output, tuple) else output
        setup = ctx.setup
        if not self.is_active(setup):
            return None
        if ctx.parallel_branches > 1 and ctx.prompt_length is not None:
            raise CompositionError(
                f"setup {setup!r} runs Parallel inside generate(): core replicates the batch "
                f"{ctx.parallel_branches} times at the model input, so generate() would get more "
                "sequences than it was given; generate once per adapter instead, e.g. "
                "`with AdapterSetup('a'): model.generate(...)`"
            )
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
            raise ReftPositionError(
                f"ReFT at {self.layer_path} expects the layer to output a (batch, length, hidden) "
                f"tensor (or a tuple starting with one); got "
                f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden)}; "
                "model_layers must name the transformer layers"
            )
        apply_one = functools.partial(self._apply_one, ctx, hidden.shape[0])
        new = apply_setup(setup, hidden, apply_one, owns=self.owns)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def _apply_one(
        self, ctx: ForwardContext, full_batch: int, name: str, hidden: torch.Tensor, rows: Rows
    ) -> torch.Tensor:
        intervention = self.interventions[name]
        whole = isinstance(rows, slice) and rows.start == 0 and rows.stop == full_batch
        compiling = is_compiling()
        selected = self._positions(
            ctx,
            full_batch,
            hidden.shape[1],
            hidden.device,
            intervention.prefix_positions,
            intervention.suffix_positions,
            as_masks=compiling,
        )
        if compiling:
            # Static shapes under torch.compile: every position computed, the chosen ones kept.
            if selected is None:
                return hidden
            prefix, suffix = selected
            if not whole:
                prefix, suffix = select_rows(prefix, rows), select_rows(suffix, rows)
            return intervention.edit_masked(hidden, prefix, suffix)
        positions = selected if whole else selected.rows(rows, full_batch)
        if positions.count == 0:
            return hidden
        return intervention.edit(hidden, positions)

    def _positions(
        self,
        ctx: ForwardContext,
        batch: int,
        length: int,
        device: torch.device,
        prefix: int,
        suffix: int,
        as_masks: bool = False,
    ) -> Any:
        cache = ctx.extra.setdefault(_CACHE_KEY, {})
        key = (prefix, suffix, batch, length, device, as_masks)
        if key in cache:
            return cache[key]
        if ctx.input_length is None:
            # The layer runs outside a forward call of the whole model (no mask known): every
            # token of the chunk counts as real.
            mask, past, current = None, 0, length
        else:
            # real tokens only: padding and virtual tokens (prompt tuning) are never edited
            mask, past, current = ctx.real_tokens(), ctx.past_length, ctx.input_length
            if current != length or (ctx.batch_size is not None and ctx.batch_size != batch):
                raise ReftPositionError(
                    f"ReFT at {self.layer_path} got a hidden state of batch {batch} x length "
                    f"{length}, but the model was called with batch {ctx.batch_size} x length "
                    f"{current}; ReFT needs layers whose outputs line up with the input tokens"
                )
        select = select_position_masks if as_masks else select_positions
        found = select(mask, batch, past, current, ctx.prompt_length, prefix, suffix, device)
        cache[key] = found
        return found
