"""The modules LoRA attaches to a model: one `LoRAHost` per adapted projection, holding one
`LoRAUnit` per adapter and the single forward hook that applies them.

A unit covers either the whole output of its projection or, on a fused q/k/v projection, the
output slices of the selected matrices (each slice with its own rows of ``A`` and ``B``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from adapters.plugin import AdapterHost, Rows, Stack, apply_setup, context_for, select_rows

from .config import LoRAConfig

HOST_ATTR = "adapters_lora"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The projection's weight as (out_features, in_features), whatever its storage."""
    return module.weight.t() if is_conv1d(module) else module.weight


class LoRAUnit(nn.Module):
    """One adapter on one projection.

    Parameters (their names are this library's checkpoint keys):
        ``lora_A`` (n*r, in) and ``lora_B`` (sum of slice widths, r) in add mode, one block of
        ``r`` rows of ``A`` per output slice; ``lora_B`` (sum of widths, 1) in scale mode,
        ``(in, 1)`` when it scales the input (``scale_input``);
        ``gate.weight``/``gate.bias`` with ``use_gating`` (one gate per slice);
        ``magnitude`` (out,) with ``use_dora``.

    Args:
        in_features / out_features: widths of the projection.
        slices: the (start, end) output ranges this unit adapts (the whole output for a plain
            projection).
        config: the adapter's config.
        weight: the projection's (out, in) weight, to initialise DoRA's magnitude.
        generator: random generator for a seeded initialisation, or None.
        scale_input: scale mode only: scale the projection's input, ``W (x * s) + b`` (PEFT's
            IA3 on feed-forward modules), instead of its output; needs the whole output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        slices: Sequence[tuple[int, int]],
        config: LoRAConfig,
        weight: torch.Tensor,
        generator: torch.Generator | None = None,
        scale_input: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.slices = [(int(a), int(b)) for a, b in slices]
        self.full = self.slices == [(0, out_features)]
        self.r = config.r
        self.scale_mode = config.composition_mode == "scale"
        self.scale_input = scale_input
        if scale_input and (not self.scale_mode or not self.full or config.use_gating):
            raise ValueError("scale_input needs scale mode, no gating and the whole output")
        self.use_gating = config.use_gating
        self.use_dora = config.use_dora
        self.scaling = config.scaling
        self.merged = False
        widths = sum(b - a for a, b in self.slices)
        # float32 for a half-precision weight (core casts to what add_adapter asks for), on the
        # weight's device whatever torch.device context is active.
        dtype = config.torch_dtype or (
            _compute_dtype(weight) if weight.is_floating_point() else None
        )
        device = weight.device
        n = len(self.slices)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if self.scale_mode:
            self.lora_A = None
            size = in_features if scale_input else widths
            self.lora_B = nn.Parameter(torch.empty(size, 1, dtype=dtype, device=device))
        else:
            shape_a, shape_b = (n * config.r, in_features), (widths, config.r)
            self.lora_A = nn.Parameter(torch.empty(shape_a, dtype=dtype, device=device))
            self.lora_B = nn.Parameter(torch.empty(shape_b, dtype=dtype, device=device))
        self._init_weights(config.init_weights, generator)
        if self.use_gating:
            self.gate = nn.Linear(in_features, n, dtype=dtype, device=device)
            with torch.no_grad():
                _draw(self.gate.weight, generator, lambda t, g: t.normal_(0.0, 0.02, generator=g))
        if self.use_dora:
            norm = weight.detach().to(_compute_dtype(weight)).norm(dim=1)
            self.magnitude = nn.Parameter(norm.to(dtype or norm.dtype))

    def _init_weights(self, kind: str, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            for param, is_a in ((self.lora_A, True), (self.lora_B, False)):
                if param is None:
                    continue
                if kind == "lora":
                    if is_a:
                        # kaiming-uniform with a=sqrt(5), as nn.Linear initialises its weight
                        bound = math.sqrt(6.0 / ((1 + 5.0) * param.shape[1]))
                        _draw(
                            param, generator, lambda t, g, b=bound: t.uniform_(-b, b, generator=g)
                        )
                    else:
                        param.zero_()
                elif kind == "bert":
                    _draw(param, generator, lambda t, g: t.normal_(0.0, 0.02, generator=g))
                else:  # "ia3"
                    param.fill_(1.0)

    # -- forward ------------------------------------------------------------------------------
    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate(x))
        # AdapterHub: one gate value per example (mean over the sequence) and slice
        return gate.mean(dim=1, keepdim=True) if gate.ndim == 3 else gate

    def edit(self, h: torch.Tensor, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """``h`` (the projection's output, possibly edited by earlier adapters) edited by this
        adapter for input ``x``."""
        if self.scale_input:
            return self._scale_input(h, x, module)
        if self.scale_mode:
            return self._scale(h, x)
        if x.dtype != self.lora_B.dtype:
            x = x.to(self.lora_B.dtype)
        after_a = F.linear(self.dropout(x), self.lora_A)
        if self.full:
            delta = F.linear(after_a, self.lora_B)
            delta = delta * self._gate(x) if self.use_gating else delta * self.scaling
            if self.use_dora:
                return self._dora(h, delta, module)
            return h + delta.to(h.dtype)
        gate = self._gate(x) if self.use_gating else None
        parts, start, row, r = [], 0, 0, self.r
        for j, (a, b) in enumerate(self.slices):
            if a > start:
                parts.append(h[..., start:a])
            delta = F.linear(after_a[..., j * r : (j + 1) * r], self.lora_B[row : row + b - a])
            delta = delta * gate[..., j : j + 1] if gate is not None else delta * self.scaling
            parts.append(h[..., a:b] + delta.to(h.dtype))
            start, row = b, row + b - a
        if start < h.shape[-1]:
            parts.append(h[..., start:])
        return torch.cat(parts, dim=-1)

    def _scale(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """IA3: the whole projection output, bias included, times the learned vector:
        ``(W x + b) * s`` (AdapterHub's forward and PEFT agree on this; the merge scales the
        weight and the bias, so merged and unmerged outputs are the same)."""
        factor = self.lora_B.view(-1)
        if self.use_gating:
            gate = self._gate(x.to(factor.dtype))
            if not self.full:  # one gate per slice: repeat it over the slice's width
                gate = torch.cat(
                    [
                        gate[..., j : j + 1].expand(*gate.shape[:-1], b - a)
                        for j, (a, b) in enumerate(self.slices)
                    ],
                    dim=-1,
                )
            factor = factor * gate
        else:
            factor = factor * self.scaling
        factor = factor.to(h.dtype)
        if self.full:
            return h * factor
        parts, start, row = [], 0, 0
        for a, b in self.slices:
            if a > start:
                parts.append(h[..., start:a])
            parts.append(h[..., a:b] * factor[..., row : row + b - a])
            start, row = b, row + b - a
        if start < h.shape[-1]:
            parts.append(h[..., start:])
        return torch.cat(parts, dim=-1)

    def _scale_input(self, h: torch.Tensor, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """IA3 on the input: ``W (x * s) + b``, computed as ``h + W (x * (s - 1))`` so that
        edits of adapters stacked before this one are kept."""
        weight = weight_out_in(module)
        factor = self.lora_B.view(-1) * self.scaling
        scaled = (x.to(factor.dtype) * (factor - 1.0)).to(weight.dtype)
        return h + F.linear(scaled, weight).to(h.dtype)

    def _dora(self, h: torch.Tensor, delta: torch.Tensor, module: nn.Module) -> torch.Tensor:
        weight = weight_out_in(module)
        dtype = _compute_dtype(weight)
        direction = weight.to(dtype) + self.delta_weight().to(dtype)
        # The norm is treated as a constant (DoRA paper, section 4.3), as PEFT does.
        scale = (self.magnitude.to(dtype) / direction.norm(dim=1).detach()).to(h.dtype)
        bias = module.bias
        base = h if bias is None else h - bias
        out = scale * (base + delta.to(h.dtype))
        return out if bias is None else out + bias

    # -- weights ------------------------------------------------------------------------------
    def slice_deltas(self) -> list[torch.Tensor]:
        """Per slice, ``s * B_j A_j`` as (width_j, in) (add mode only)."""
        result, row, r = [], 0, self.r
        for j, (a, b) in enumerate(self.slices):
            block_b = self.lora_B[row : row + b - a]
            result.append(self.scaling * (block_b @ self.lora_A[j * r : (j + 1) * r]))
            row += b - a
        return result

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) weight change ``s * B A`` of add mode, zero outside the slices."""
        if self.full:
            return self.scaling * (self.lora_B @ self.lora_A)
        full = self.lora_A.new_zeros(self.out_features, self.in_features)
        for (a, b), block in zip(self.slices, self.slice_deltas()):
            full[a:b] = block
        return full

    def _output_factor(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Scale mode: the factor of every output row (1 outside the slices)."""
        factor = torch.ones(self.out_features, dtype=dtype, device=device)
        values = self.lora_B.detach().to(dtype).view(-1) * self.scaling
        row = 0
        for a, b in self.slices:
            factor[a:b] = values[row : row + b - a]
            row += b - a
        return factor

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (out, in) with this adapter folded in (computed and returned in float32,
        or float64 for a float64 weight)."""
        dtype = _compute_dtype(weight)
        weight = weight.to(dtype)
        if self.scale_input:
            return weight * (self.lora_B.detach().to(dtype).view(-1) * self.scaling)[None, :]
        if self.scale_mode:
            return weight * self._output_factor(dtype, weight.device)[:, None]
        merged = weight + self.delta_weight().detach().to(dtype)
        if self.use_dora:
            merged = merged * (self.magnitude.detach().to(dtype) / merged.norm(dim=1))[:, None]
        return merged

    @property
    def scales_bias(self) -> bool:
        """Whether merging changes the bias (IA3 on the output scales the whole output)."""
        return self.scale_mode and not self.scale_input

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """``bias`` (out,) with this adapter folded in: scaled where `scales_bias`, unchanged
        otherwise (LoRA, DoRA and IA3 on the input leave it as it is). Computed in float32
        (float64 kept), like `merged_weight`."""
        dtype = _compute_dtype(bias)
        bias = bias.to(dtype)
        return bias * self._output_factor(dtype, bias.device) if self.scales_bias else bias


class LoRAHost(AdapterHost):
    """Attached to one projection module (as its child ``adapters_lora``): holds the units of
    every LoRA adapter on that projection and the one forward hook applying them.

    Hooks, activity cache, merge bookkeeping and rollback come from `adapters.hosts.AdapterHost`:
    the hook returns at once (no allocation) when the effective setup names none of this host's
    unmerged adapters.
    """

    def _apply_one(
        self, x: torch.Tensor, module: nn.Module, name: str, h: torch.Tensor, rows: Rows
    ) -> torch.Tensor:
        return self.units[name].edit(h, select_rows(x, rows), module)

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on the projection: apply the active adapters to its output."""
        setup = context_for(self.model).setup
        if not self.is_active(setup):
            return None
        x = args[0]
        if (
            isinstance(setup, Stack)
            and len(setup.children) == 1
            and isinstance(setup.children[0], str)
        ):
            return self.units[setup.children[0]].edit(output, x, module)
        return apply_setup(setup, output, partial(self._apply_one, x, module), self.owns)

    # -- merging ------------------------------------------------------------------------------
    def merge(self, name: str, module: nn.Module) -> None:
        """Fold unit ``name`` into ``module``'s weight and bias (the originals are kept for
        reset)."""
        unit = self.units[name]
        self.keep_original(module)
        with torch.no_grad():
            _fold(module, unit)
        unit.merged = True
        self.mark_merged(name)

    def reset(self, name: str, module: nn.Module) -> None:
        """Undo the merge of ``name``: restore the original weight and bias (bit-exactly) and
        re-merge the others."""
        self.unmark_merged(name)
        self.units[name].merged = False
        self.restore_original(module)
        with torch.no_grad():
            for other in self.merged:
                _fold(module, self.units[other])
        if not self.merged:
            self.drop_original()

    def forget(self, name: str, module: nn.Module) -> None:
        """Unit ``name`` is deleted: merged weights stay merged, and the weight and bias a later
        reset of the other merged adapters restores now include it."""
        if name in self.merged:
            unit = self.units[name]
            with torch.no_grad():
                stored = _as_out_in(module, self.original_weight)
                folded = unit.merged_weight(stored).to(self.original_weight.dtype)
                self.original_weight = folded.t().contiguous() if is_conv1d(module) else folded
                if self.original_bias is not None:
                    bias = unit.merged_bias(self.original_bias)
                    self.original_bias = bias.to(self.original_bias.dtype)
            self.merged.remove(name)
            if not self.merged:
                self.drop_original()
        self.remove_unit(name)


def _draw(
    param: torch.Tensor,
    generator: torch.Generator | None,
    fill: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor],
) -> None:
    """Fill ``param`` in place with ``fill(tensor, generator)``; a generator on another device
    than ``param`` (a CPU generator for a CUDA or meta tensor) draws on its own device, and
    the values are copied over, so seeded weights are the same on every device."""
    if generator is None or param.device == generator.device:
        fill(param, generator)
        return
    drawn = fill(torch.empty(param.shape, dtype=param.dtype, device=generator.device), generator)
    param.copy_(drawn)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32 for half-precision weights (exact enough to merge), float64 kept as is."""
    return torch.promote_types(weight.dtype, torch.float32)


def _as_out_in(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    return weight.t() if is_conv1d(module) else weight


def _assign(module: nn.Module, weight_oi: torch.Tensor) -> None:
    target = module.weight
    value = weight_oi.t() if is_conv1d(module) else weight_oi
    target.copy_(value.to(target.dtype))


def _fold(module: nn.Module, unit: LoRAUnit) -> None:
    """Merge ``unit`` into ``module``'s current weight and (scale mode) bias."""
    _assign(module, unit.merged_weight(weight_out_in(module)))
    bias = getattr(module, "bias", None)
    if unit.scales_bias and bias is not None:
        bias.copy_(unit.merged_bias(bias).to(bias.dtype))
