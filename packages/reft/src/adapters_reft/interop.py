"""Reading AdapterHub ``adapters`` ReFT checkpoints (format name ``"adapterhub"`` for ReFT
adapters, alias ``"adapterhub-reft"``).

An AdapterHub adapter directory holds ``adapter_config.json`` (``{"config": {"architecture":
"reft", ...}, "name": ..., ...}``) and ``pytorch_adapter.bin`` or ``adapter.safetensors`` with
keys ``{layer path}.reft_layer.refts.{name}.units.{i}.{param}``. Differences handled here:

- AdapterHub always creates two units unless tied; for a one-sided config only the used one
  is read (unit 0 for prefix-only, unit 1 for suffix-only).
- Orthogonal projections are stored as torch's orthogonal parametrisation (``original`` and
  ``0.base``); they are turned into ``R`` with torch's own parametrisation and stored as ``R``.
- ``subtract_projection`` is not saved by AdapterHub, so a DiReFT checkpoint reads as NoReFT;
  pass ``load_adapter(path, config="direft[...]")`` to say what it is.
- ``.bin`` files are read with ``torch.load(weights_only=True)`` only (nothing is unpickled).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from adapters.plugin import (
    AdapterConfig,
    CheckpointError,
    CheckpointFormat,
    LayerSite,
    ModelSites,
    load_tensor_file,
    read_json_object,
    recorded_name,
)

from .config import ReftConfig

FORMAT_NAME = "adapterhub"
FORMAT_ALIASES = ("adapterhub-reft",)
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter.safetensors", "pytorch_adapter.bin")

_KEY = re.compile(
    r"^(?P<layer>.+)\.reft_layer\.refts\.(?P<name>[^.]+)\.units\.(?P<unit>[0-9]{1,9})\."
    r"(?P<param>.+)$"
)
_ORTHOGONAL_ORIGINAL = "projection.parametrizations.weight.original"
_ORTHOGONAL_BASE = "projection.parametrizations.weight.0.base"
# Fields an explicit config may not change, because they decide which tensors exist.
_STRUCTURAL = ("layers", "r", "orthogonality", "tied_weights")
_CONFIG_FIELDS = (
    "layers",
    "prefix_positions",
    "suffix_positions",
    "r",
    "orthogonality",
    "tied_weights",
    "subtract_projection",
    "dropout",
    "non_linearity",
    "dtype",
    "init_weights_seed",
)


def _saved_config(path: str) -> dict[str, Any] | None:
    data = read_json_object(os.path.join(path, CONFIG_FILE))
    if data is None or data.get("format") == "adapters":
        return None
    config = data.get("config")
    return config if isinstance(config, dict) else None


def saved_name(path: str) -> str | None:
    """The adapter name an AdapterHub directory records (its config's ``"name"``)."""
    return recorded_name(os.path.join(path, CONFIG_FILE))


def detect_adapterhub(path: str) -> bool:
    """True for an AdapterHub directory whose adapter is a ReFT adapter (and only then)."""
    config = _saved_config(path)
    if config is None or config.get("architecture") != "reft":
        return False
    return any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES)


def config_from_adapterhub(data: dict[str, Any]) -> ReftConfig:
    """Our `ReftConfig` for an AdapterHub ReFT config dict (``subtract_projection`` is taken as
    True when absent, as AdapterHub reloads it)."""
    if data.get("output_reft", True) is not True:
        raise CheckpointError(
            f"AdapterHub ReFT config has output_reft={data.get('output_reft')!r}; only "
            "interventions on layer outputs (output_reft=True) exist in adapters-reft"
        )
    values = {k: data[k] for k in _CONFIG_FIELDS if k in data}
    values.setdefault("subtract_projection", True)
    missing = [
        k for k in ("prefix_positions", "suffix_positions", "r", "orthogonality") if k not in values
    ]
    if missing:
        raise CheckpointError(f"AdapterHub ReFT config lacks {missing}: {data!r}")
    values.setdefault("layers", "all")
    return ReftConfig(**values)


def read_adapterhub(
    path: str, model: nn.Module, sites: ModelSites, config: AdapterConfig | None
) -> tuple[ReftConfig, dict[str, torch.Tensor]]:
    """Read an AdapterHub ReFT directory: (config, tensors under this plugin's keys).

    ``config`` (the user's ``load_adapter(..., config=...)``) overrides the saved config, e.g. to
    say that a checkpoint is DiReFT; it must agree with the checkpoint on layers, r,
    orthogonality, tied_weights and the sides used.
    """
    from .plugin import unit_keys, used_layers

    data = _saved_config(path)
    if data is None:
        raise CheckpointError(f"{path!r} has no AdapterHub {CONFIG_FILE}")
    saved = config_from_adapterhub(data)
    chosen = saved
    if config is not None:
        if not isinstance(config, ReftConfig):
            raise CheckpointError(
                f"{path!r} holds an AdapterHub ReFT adapter but config={type(config).__name__} "
                "was given; pass a ReFT config (e.g. 'direft[...]') or none"
            )
        _check_override(path, saved, config)
        chosen = config
    raw = _load_weights(path)
    by_layer = _group_by_layer(path, raw)
    layers = used_layers(sites, chosen)
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        units = by_layer.get(_match_layer(path, layer, by_layer))
        if units is None:
            raise CheckpointError(f"{path!r} has no ReFT weights for layer {layer.layer.path!r}")
        keys = unit_keys(layer, chosen)
        for ours, theirs in enumerate(_unit_indices(chosen)):
            if theirs not in units:
                raise CheckpointError(
                    f"{path!r} has no unit {theirs} for layer {layer.layer.path!r}; was it saved "
                    "with another tied_weights / prefix / suffix setting?"
                )
            for param, tensor in _convert_unit(path, units[theirs], chosen).items():
                tensors[f"{keys[ours]}.{param}"] = tensor
    return chosen, tensors


def _check_override(path: str, saved: ReftConfig, given: ReftConfig) -> None:
    different = [f for f in _STRUCTURAL if getattr(saved, f) != getattr(given, f)]
    if saved.sides != given.sides:
        different.append("prefix/suffix sides")
    if different:
        raise CheckpointError(
            f"config given for {path!r} differs from the checkpoint in {different} "
            f"(checkpoint: {saved!r}); an explicit config may only change subtract_projection, "
            "dropout, non_linearity, dtype and the number of positions"
        )


def _unit_indices(config: ReftConfig) -> list[int]:
    """AdapterHub's unit index for each of our units."""
    if config.tied_weights:
        return [0]
    if config.sides == ("prefix", "suffix"):
        return [0, 1]
    return [0] if config.sides == ("prefix",) else [1]


def _load_weights(path: str) -> dict[str, torch.Tensor]:
    safe = os.path.join(path, WEIGHT_FILES[0])
    return load_tensor_file(safe if os.path.isfile(safe) else os.path.join(path, WEIGHT_FILES[1]))


def _group_by_layer(
    path: str, raw: dict[str, torch.Tensor]
) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    grouped: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    names = set()
    for key, tensor in raw.items():
        found = _KEY.match(key)
        if found is None:
            raise CheckpointError(
                f"AdapterHub tensor {key!r} in {path!r} is not a ReFT weight "
                "(<layer>.reft_layer.refts.<name>.units.<i>.<param>)"
            )
        names.add(found["name"])
        unit = grouped.setdefault(found["layer"], {}).setdefault(int(found["unit"]), {})
        if found["param"] in unit:
            raise CheckpointError(
                f"{path!r} holds unit {found['unit']} of layer {found['layer']!r} twice"
            )
        unit[found["param"]] = tensor
    if not grouped:
        raise CheckpointError(f"{path!r} holds no AdapterHub ReFT tensors (*.reft_layer.refts.*)")
    if len(names) > 1:
        raise CheckpointError(f"{path!r} holds several adapters {sorted(names)}; expected one")
    return grouped


def _match_layer(path: str, layer: LayerSite, by_layer: dict[str, Any]) -> str | None:
    """The AdapterHub layer prefix that is ``layer``: same path, or one path a suffix of the
    other (AdapterHub may save relative to the base model)."""
    ours = layer.layer.path
    matches = [p for p in by_layer if p == ours or ours.endswith("." + p) or p.endswith("." + ours)]
    if len(matches) > 1:
        exact = [p for p in matches if p == ours]
        matches = exact or matches
    if len(matches) > 1:
        raise CheckpointError(f"{path!r}: layer {ours!r} matches several saved layers {matches}")
    return matches[0] if matches else None


def _convert_unit(
    path: str, unit: dict[str, torch.Tensor], config: ReftConfig
) -> dict[str, torch.Tensor]:
    for needed in ("learned_source.weight", "learned_source.bias"):
        if needed not in unit:
            raise CheckpointError(f"{path!r}: a ReFT unit lacks {needed!r}")
    result = {
        "learned_source.weight": unit["learned_source.weight"],
        "learned_source.bias": unit["learned_source.bias"],
    }
    stored_orthogonal = _ORTHOGONAL_ORIGINAL in unit
    if stored_orthogonal != config.orthogonality:
        raise CheckpointError(
            f"{path!r} stores {'an orthogonal' if stored_orthogonal else 'a plain'} projection "
            f"but the config says orthogonality={config.orthogonality}"
        )
    if stored_orthogonal:
        result["projection.weight"] = _orthogonal_weight(path, unit)
    elif "projection.weight" in unit:
        result["projection.weight"] = unit["projection.weight"]
    else:
        raise CheckpointError(f"{path!r}: a ReFT unit lacks 'projection.weight'")
    return result


def _orthogonal_weight(path: str, unit: dict[str, torch.Tensor]) -> torch.Tensor:
    """``R`` from torch's orthogonal parametrisation as AdapterHub saved it (defaults, as
    AdapterHub registers it), evaluated by torch itself."""
    original = unit[_ORTHOGONAL_ORIGINAL].float()
    r, d = original.shape
    holder = nn.Linear(d, r, bias=False)
    nn.utils.parametrizations.orthogonal(holder)
    state = {"parametrizations.weight.original": original}
    if _ORTHOGONAL_BASE in unit:
        state["parametrizations.weight.0.base"] = unit[_ORTHOGONAL_BASE].float()
    try:
        holder.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{path!r}: cannot read an orthogonal ReFT projection: {error}"
        ) from None
    with torch.no_grad():
        return holder.weight.detach().clone()


#: The checkpoint formats this plugin registers (``adapters_register_checkpoint_formats``).
FORMATS = (
    CheckpointFormat(
        name=FORMAT_NAME,
        methods=("reft",),
        aliases=FORMAT_ALIASES,
        detect=detect_adapterhub,
        read=read_adapterhub,
        saved_name=saved_name,
    ),
)
