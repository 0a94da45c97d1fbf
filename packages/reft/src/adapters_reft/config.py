"""ReFT configs: `ReftConfig` and its presets `LoReftConfig`, `NoReftConfig`, `DiReftConfig`.

Names and defaults follow AdapterHub ``adapters`` so that users coming from there find the
same options; unlike there, ``subtract_projection`` is a real field and is saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from adapters.plugin import ACTIVATIONS, AdapterConfig, ConfigError

#: ``non_linearity`` names accepted (lower-case), as in AdapterHub (transformers' names).
NON_LINEARITIES = tuple(ACTIVATIONS)


@dataclass(frozen=True)
class ReftConfig(AdapterConfig):
    """Representation fine-tuning: edit a layer's output hidden state at a few token positions.

    At each intervened position, with ``h`` the hidden state (width ``d``), ``W h + b`` a learned
    low-rank source (``r`` x ``d``) and ``R`` an ``r`` x ``d`` projection:

    - LoReFT (``orthogonality=True``, ``subtract_projection=True``):
      ``h + R^T (W h + b - R h)`` with orthonormal rows of ``R``;
    - NoReFT (``orthogonality=False``): the same with an unconstrained ``R``;
    - DiReFT (``subtract_projection=False``): ``h + R^T (W h + b)``.

    Args:
        layers: ``"all"`` or the indices of the layers (as in ``model.adapter_sites.layers``)
            whose output is edited.
        prefix_positions: edit the first this-many real (non-pad) tokens of each example.
        suffix_positions: edit the last this-many real tokens of each example.
        r: rank of the intervention.
        orthogonality: keep ``R``'s rows orthonormal (LoReFT).
        tied_weights: one parameter set for prefix and suffix positions (else one per side).
        subtract_projection: subtract ``R h`` from the source (False: DiReFT).
        dropout: dropout on the edited positions' new hidden states (as AdapterHub applies it).
        non_linearity: activation applied to ``W h + b`` (None: identity).
        dtype: dtype name of the parameters (``"float32"``, ``"bfloat16"``); None: float32
            (float64 in a float64 model).
        init_weights_seed: if set, every intervention unit starts from the same weights drawn
            with this seed (the global random state is not touched).

    Example::

        model.add_adapter("t", config=ReftConfig(layers=[0, 2], prefix_positions=2,
                                                 suffix_positions=2, r=4, orthogonality=True))
    """

    method: ClassVar[str] = "reft"

    layers: Literal["all"] | tuple[int, ...]
    prefix_positions: int
    suffix_positions: int
    r: int
    orthogonality: bool
    tied_weights: bool = False
    subtract_projection: bool = True
    dropout: float = 0.05
    non_linearity: str | None = None
    dtype: str | None = None
    init_weights_seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _check_layers(self.layers))
        for name in ("prefix_positions", "suffix_positions"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{type(self).__name__}.{name}={value!r} must be an integer >= 0")
        if self.prefix_positions == 0 and self.suffix_positions == 0:
            raise ConfigError(
                f"{type(self).__name__} has prefix_positions=0 and suffix_positions=0, so it "
                "would edit nothing; set at least one of them above 0"
            )
        if not _is_int(self.r) or self.r < 1:
            raise ConfigError(f"{type(self).__name__}.r={self.r!r} must be an integer >= 1")
        for name in ("orthogonality", "tied_weights", "subtract_projection"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"{type(self).__name__}.{name}={getattr(self, name)!r} must be True or False"
                )
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ConfigError(
                f"{type(self).__name__}.dropout={self.dropout!r} must be a number in [0, 1)"
            )
        if self.non_linearity is not None and (
            not isinstance(self.non_linearity, str)
            or self.non_linearity.lower() not in NON_LINEARITIES
        ):
            raise ConfigError(
                f"{type(self).__name__}.non_linearity={self.non_linearity!r} is not supported; "
                f"use None or one of {', '.join(NON_LINEARITIES)}"
            )
        if self.dtype is not None:
            torch_dtype(self.dtype)  # raises with the fix
        if self.init_weights_seed is not None and not _is_int(self.init_weights_seed):
            raise ConfigError(
                f"{type(self).__name__}.init_weights_seed={self.init_weights_seed!r} must be an "
                "integer or None"
            )

    @property
    def sides(self) -> tuple[str, ...]:
        """The sides this config edits: ``("prefix",)``, ``("suffix",)`` or both."""
        used = []
        if self.prefix_positions > 0:
            used.append("prefix")
        if self.suffix_positions > 0:
            used.append("suffix")
        return tuple(used)

    @property
    def n_units(self) -> int:
        """Parameter sets per layer: one per used side, or one when ``tied_weights``."""
        return 1 if self.tied_weights else len(self.sides)

    def uses_layer(self, index: int) -> bool:
        """Whether layer ``index`` is intervened on."""
        return self.layers == "all" or index in self.layers


@dataclass(frozen=True)
class LoReftConfig(ReftConfig):
    """LoReFT (low-rank linear subspace ReFT): orthonormal ``R``, first 3 tokens, rank 1."""

    layers: Literal["all"] | tuple[int, ...] = "all"
    prefix_positions: int = 3
    suffix_positions: int = 0
    r: int = 1
    orthogonality: bool = True


@dataclass(frozen=True)
class NoReftConfig(ReftConfig):
    """NoReFT: LoReFT without the orthogonality constraint on ``R``."""

    layers: Literal["all"] | tuple[int, ...] = "all"
    prefix_positions: int = 3
    suffix_positions: int = 0
    r: int = 1
    orthogonality: bool = False


@dataclass(frozen=True)
class DiReftConfig(ReftConfig):
    """DiReFT: no orthogonality and no subtraction of ``R h``: ``h + R^T (W h + b)``."""

    layers: Literal["all"] | tuple[int, ...] = "all"
    prefix_positions: int = 3
    suffix_positions: int = 0
    r: int = 1
    orthogonality: bool = False
    subtract_projection: bool = False


def torch_dtype(name: str) -> torch.dtype:
    """The floating torch dtype called ``name`` (``"bfloat16"``, ``"torch.float16"``)."""
    short = name.removeprefix("torch.") if isinstance(name, str) else name
    value = getattr(torch, short, None) if isinstance(short, str) else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(
            f"ReftConfig.dtype={name!r} is not a floating torch dtype name; use e.g. 'float32', "
            "'bfloat16', 'float16' or None"
        )
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_layers(layers: object) -> str | tuple[int, ...]:
    if layers == "all":
        return "all"
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise ConfigError(
            f"ReftConfig.layers={layers!r} must be 'all' or a list of layer indices, e.g. [0, 2]"
        )
    values = tuple(layers)
    if not values or not all(_is_int(i) and i >= 0 for i in values):
        raise ConfigError(
            f"ReftConfig.layers={layers!r} must be 'all' or a non-empty list of layer indices >= 0"
        )
    if len(set(values)) != len(values):
        raise ConfigError(f"ReftConfig.layers={layers!r} lists a layer twice; list each once")
    return values


PRESETS: dict[str, ReftConfig] = {
    "loreft": LoReftConfig(),
    "noreft": NoReftConfig(),
    "direft": DiReftConfig(),
}
