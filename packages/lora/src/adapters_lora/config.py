"""Configs of the LoRA family: `LoRAConfig`, `IA3Config` and `DoRAConfig` (AdapterHub names
and defaults, plus ``use_rslora``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from adapters.plugin import AdapterConfig, ConfigError

ATTN_MATRICES = ("q", "k", "v", "o")
COMPOSITION_MODES = ("add", "scale")
ROLES = (*ATTN_MATRICES, "intermediate", "output")
INIT_WEIGHTS = ("lora", "bert", "ia3")


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """Low-Rank Adaptation (Hu et al., 2021): ``y = W x + b + s * B A dropout(x)``.

    Args:
        selfattn_lora: adapt the attention projections named in ``attn_matrices`` (self- and,
            where the interface names one, cross-attention).
        intermediate_lora: adapt the feed-forward up projection (``layer_intermediate_proj``).
        output_lora: adapt the feed-forward down projection (``layer_output_proj``).
        leave_out: layer indices (over all layer stacks, 0-based) that get no adapter.
        r: rank of ``B A``.
        alpha: scaling numerator: ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout on the adapter's input.
        attn_matrices: which of ``"q"``, ``"k"``, ``"v"``, ``"o"`` to adapt.
        composition_mode: ``"add"`` (LoRA) or ``"scale"`` (IA3: ``y = (W x + b) * s`` with a
            learned vector ``s``, the bias scaled too; needs ``r=1``).
        init_weights: ``"lora"`` (A kaiming-uniform, B zero), ``"bert"`` (both normal(0, 0.02))
            or ``"ia3"`` (all ones).
        init_weights_seed: seed for a deterministic initialisation of this adapter.
        use_gating: a learned sigmoid gate (mean over the sequence) replaces the scaling, as in
            AdapterHub / UniPELT; gated adapters cannot be merged.
        dtype: torch dtype name of the adapter weights (``"float32"``); default: the weight's.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        use_dora: DoRA (Liu et al., 2024): a learned magnitude per output row,
            ``y = m * (W + s B A) x / ||W + s B A|| + b`` with the norm detached.
        scale_inputs: IA3 only: the adapted projections, by role (``"q"``, ``"k"``, ``"v"``,
            ``"o"``, ``"intermediate"``, ``"output"``), whose *input* is scaled instead of their
            output, ``y = W (x * s) + b`` (PEFT's ``feedforward_modules``; ``("output",)``
            scales the feed-forward activations, as in the IA3 paper).

    Example::

        LoRAConfig(r=16, alpha=32, attn_matrices=("q", "k", "v", "o"), intermediate_lora=True)
    """

    method: ClassVar[str] = "lora"

    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    leave_out: tuple[int, ...] = ()
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    attn_matrices: tuple[str, ...] = ("q", "v")
    composition_mode: str = "add"
    init_weights: str = "lora"
    init_weights_seed: int | None = None
    use_gating: bool = False
    dtype: str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    scale_inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Lists (from JSON or config strings) become tuples so configs stay hashable.
        for name in ("leave_out", "attn_matrices", "scale_inputs"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ConfigError(
                    f"{name}={value!r} must be a list, e.g. {name}=['q', 'v'], not a string"
                )
            object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        name = type(self).__name__
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"{name}: r={self.r!r} must be an integer >= 1")
        if not isinstance(self.alpha, int | float) or isinstance(self.alpha, bool):
            raise ConfigError(f"{name}: alpha={self.alpha!r} must be a number")
        if (
            not isinstance(self.dropout, int | float)
            or isinstance(self.dropout, bool)
            or not 0.0 <= float(self.dropout) < 1.0
        ):
            raise ConfigError(f"{name}: dropout={self.dropout!r} must be in [0, 1)")
        bad = [m for m in self.attn_matrices if m not in ATTN_MATRICES]
        if bad or len(set(self.attn_matrices)) != len(self.attn_matrices):
            raise ConfigError(
                f"{name}: attn_matrices={list(self.attn_matrices)!r} must be distinct values "
                f"from {list(ATTN_MATRICES)}"
            )
        if self.composition_mode not in COMPOSITION_MODES:
            raise ConfigError(
                f"{name}: composition_mode={self.composition_mode!r}; expected one of "
                f"{list(COMPOSITION_MODES)} ('add' for LoRA, 'scale' for IA3)"
            )
        if self.init_weights not in INIT_WEIGHTS:
            raise ConfigError(
                f"{name}: init_weights={self.init_weights!r}; expected one of {list(INIT_WEIGHTS)}"
            )
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.leave_out):
            raise ConfigError(
                f"{name}: leave_out={list(self.leave_out)!r} must be layer indices (integers "
                ">= 0; True/False are not indices)"
            )
        if self.composition_mode == "scale":
            if self.r != 1:
                raise ConfigError(
                    f"{name}: composition_mode='scale' (IA3) needs r=1, got r={self.r}"
                )
            if self.use_dora:
                raise ConfigError(f"{name}: use_dora=True needs composition_mode='add'")
            if self.dropout:
                raise ConfigError(
                    f"{name}: composition_mode='scale' (IA3) has no dropout; got "
                    f"dropout={self.dropout}; set dropout=0.0"
                )
            if self.use_rslora:
                raise ConfigError(f"{name}: use_rslora=True needs composition_mode='add'")
        self._validate_scale_inputs(name)
        if self.use_dora and self.use_gating:
            raise ConfigError(f"{name}: use_dora=True cannot be combined with use_gating=True")
        if self.init_weights_seed is not None and (
            not isinstance(self.init_weights_seed, int) or isinstance(self.init_weights_seed, bool)
        ):
            raise ConfigError(
                f"{name}: init_weights_seed={self.init_weights_seed!r} must be an integer or None"
            )
        dtype = getattr(torch, str(self.dtype), None) if self.dtype is not None else None
        if self.dtype is not None and not (
            isinstance(dtype, torch.dtype) and dtype.is_floating_point
        ):
            raise ConfigError(
                f"{name}: dtype={self.dtype!r} is not a floating-point torch dtype name; use "
                "e.g. 'float32', 'bfloat16' or None (the adapted weight's dtype)"
            )
        if (
            not (self.selfattn_lora and self.attn_matrices)
            and not self.intermediate_lora
            and not self.output_lora
        ):
            raise ConfigError(
                f"{name} adapts nothing: enable selfattn_lora with attn_matrices, "
                "intermediate_lora or output_lora"
            )

    def _validate_scale_inputs(self, name: str) -> None:
        if not self.scale_inputs:
            return
        roles = list(self.scale_inputs)
        if any(r not in ROLES for r in roles) or len(set(roles)) != len(roles):
            raise ConfigError(
                f"{name}: scale_inputs={roles!r} must be distinct values from {list(ROLES)}"
            )
        if self.composition_mode != "scale":
            raise ConfigError(
                f"{name}: scale_inputs={roles!r} needs composition_mode='scale' (IA3); "
                "LoRA adds to the output"
            )
        if self.use_gating:
            raise ConfigError(
                f"{name}: scale_inputs={roles!r} cannot be combined with use_gating=True"
            )
        adapted = set(self.attn_matrices if self.selfattn_lora else ())
        adapted |= {"intermediate"} if self.intermediate_lora else set()
        adapted |= {"output"} if self.output_lora else set()
        idle = [r for r in roles if r not in adapted]
        if idle:
            raise ConfigError(
                f"{name}: scale_inputs names {idle}, which this config does not adapt; add "
                "them to attn_matrices / intermediate_lora / output_lora or remove them"
            )

    @property
    def scaling(self) -> float:
        """The factor ``s`` of ``s * B A`` (``alpha`` itself in scale mode, as in AdapterHub)."""
        if self.composition_mode == "scale":
            return float(self.alpha)
        return float(self.alpha) / (self.r**0.5 if self.use_rslora else self.r)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """``dtype`` as a ``torch.dtype`` (None: follow the adapted weight)."""
        return getattr(torch, self.dtype) if self.dtype is not None else None


@dataclass(frozen=True)
class IA3Config(LoRAConfig):
    """(IA)^3 (Liu et al., 2022): scales the whole output of a projection, bias included, by a
    learned vector, ``y = (W x + b) * s``, on keys, values and the feed-forward up projection
    (as AdapterHub's forward and PEFT do)."""

    r: int = 1
    alpha: float = 1
    attn_matrices: tuple[str, ...] = ("k", "v")
    intermediate_lora: bool = True
    composition_mode: str = "scale"
    init_weights: str = "ia3"


@dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """DoRA (Liu et al., 2024): LoRA with a learned magnitude per output row."""

    use_dora: bool = True


#: The presets this plugin declares (``"lora"``, the method's default, first).
PRESETS: dict[str, LoRAConfig] = {"lora": LoRAConfig(), "ia3": IA3Config(), "dora": DoRAConfig()}
