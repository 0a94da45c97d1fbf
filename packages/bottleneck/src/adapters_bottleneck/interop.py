"""AdapterHub bottleneck checkpoints: format ``"adapterhub"`` for bottleneck adapters (alias
``"adapterhub-bottleneck"``; read and write).

An AdapterHub adapter directory holds ``adapter_config.json`` (``{"config": {...}, "name": ...,
...}`` with ``"architecture"`` absent or null for bottleneck adapters) and
``pytorch_adapter.bin`` or ``adapter.safetensors``. Two key layouts are read, given the
matching interface:

- AdapterHub's plugin interface: ``{layer}.attention_adapters.adapters.<name>.<param>`` and
  ``{layer}.output_adapters.adapters.<name>.<param>`` (``model.layers.0....`` on a Llama);
- AdapterHub's built-in models (BERT, RoBERTa, XLM-R, ...): ``{layer}.attention.output.adapters.
  <name>.<param>``, ``{layer}.output.adapters.<name>.<param>`` and
  ``{layer}.crossattention.output.adapters.<name>.<param>`` (``encoder.layer.0....``, with a
  ``bert.`` / ``roberta.`` prefix when saved from a model with a head).

Both also hold ``invertible_adapters.<name>.<param>`` and ``shared_parameters.<name>.<param>``
(Compacter's shared rule). Parameter names below ``<name>`` are the same as this package's.
``.bin`` files are read with ``torch.load(weights_only=True)``: nothing is ever unpickled
beyond tensors. AdapterHub's GLOW coupling is not the GLOW of the paper (its forward ignores
its first subnetwork), so GLOW checkpoints are refused.

Writing (``save_adapter(..., format="adapterhub", layout=...)``) produces AdapterHub's
plugin-interface layout (``layout="plugin"``, the default) or that of its built-in BERT-family
models (``layout="builtin"``), as ``pytorch_adapter.bin`` and ``adapter.safetensors`` with the
same tensors, loadable by AdapterHub on a model initialised with the matching
``AdapterModelInterface`` or on its built-in model.

AdapterFusion directories (AdapterHub's ``save_adapter_fusion``) hold
``adapter_fusion_config.json`` (``{"config": {...}, "adapter_names": [...], "name": ...}``)
and ``pytorch_model_adapter_fusion.bin`` or ``model_adapter_fusion.safetensors`` with keys
``{layer}.<container>.adapter_fusion_layer.<fusion name>.{query,key,value}.{weight,bias}``
where ``<container>`` is ``attention_adapters`` / ``output_adapters`` /
``cross_attention_adapters`` (plugin interface) or ``attention.output`` / ``output`` /
``crossattention.output`` (built-in models). They are read (``load_adapter_fusion``) and
written (``save_adapter_fusion(..., format=...)``) by the same `CheckpointFormat`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from adapters.plugin import (
    AdapterConfig,
    CheckpointError,
    CheckpointFormat,
    ModelSites,
    load_tensor_file,
    read_json_object,
    recorded_name,
)

from .config import BnConfig

#: AdapterHub's format name, served by this plugin for the ``bottleneck`` method (adapters-lora
#: serves it for ``lora``); the former name stays an alias.
FORMAT_NAME = "adapterhub"
FORMAT_ALIASES = ("adapterhub-bottleneck",)
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter.safetensors", "pytorch_adapter.bin")
AH_VERSION = "adapters.1.3.0"

#: AdapterHub's container names -> our locations.
_CONTAINERS = {
    "attention_adapters.adapters": "mh_adapter",
    "output_adapters.adapters": "output_adapter",
    "cross_attention_adapters.adapters": "cross_adapter",
    "attention.output.adapters": "mh_adapter",
    "output.adapters": "output_adapter",
    "crossattention.output.adapters": "cross_adapter",
}
_LAYER_KEY = re.compile(
    r"^(?P<layer>.+?)\.(?P<container>attention_adapters\.adapters|output_adapters\.adapters|"
    r"cross_attention_adapters\.adapters|crossattention\.output\.adapters|"
    r"attention\.output\.adapters|output\.adapters)\.(?P<name>[^.]+)\.(?P<param>.+)$"
)
_MODEL_KEY = re.compile(
    r"^(?:(?P<prefix>.+)\.)?(?P<kind>invertible_adapters|shared_parameters)\.(?P<name>[^.]+)\."
    r"(?P<param>.+)$"
)
_FUSION_KEY = re.compile(
    r"^(?P<layer>.+?)\.(?P<container>attention_adapters|output_adapters|"
    r"cross_attention_adapters|crossattention\.output|attention\.output|output)\."
    r"adapter_fusion_layer\.(?P<name>.+)\.(?P<param>(?:query|key|value|dense)\.(?:weight|bias))$"
)
_FUSION_CONTAINERS = {
    "attention_adapters": "mh_adapter",
    "output_adapters": "output_adapter",
    "cross_attention_adapters": "cross_adapter",
    "attention.output": "mh_adapter",
    "output": "output_adapter",
    "crossattention.output": "cross_adapter",
}
FUSION_CONFIG_FILE = "adapter_fusion_config.json"
FUSION_WEIGHT_FILES = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
#: The layouts ``save_adapter(..., format="adapterhub", layout=...)`` writes: our location ->
#: AdapterHub's module path below a layer (the adapters sit in ``<that>.adapters.<name>``,
#: fusion layers in ``<that>.adapter_fusion_layer.<name>``).
LAYOUTS = {
    "plugin": {  # AdapterHub's plugin interface (AdapterModelInterface), also its Llama
        "mh_adapter": "attention_adapters",
        "output_adapter": "output_adapters",
        "cross_adapter": "cross_attention_adapters",
    },
    "builtin": {  # AdapterHub's built-in BERT-family models (BERT, RoBERTa, XLM-R, ...)
        "mh_adapter": "attention.output",
        "output_adapter": "output",
        "cross_adapter": "crossattention.output",
    },
}
WRITE_OPTIONS = ("layout",)


def _containers(layout: str) -> dict[str, str]:
    if layout not in LAYOUTS:
        raise CheckpointError(
            f"layout={layout!r} is not an AdapterHub key layout; use 'plugin' (AdapterHub's "
            "plugin interface, the default) or 'builtin' (its built-in BERT-family models)"
        )
    return LAYOUTS[layout]


def _saved(path: str) -> dict[str, Any] | None:
    data = read_json_object(os.path.join(path, CONFIG_FILE))
    if data is None or data.get("format") == "adapters" or "peft_type" in data:
        return None
    return data if isinstance(data.get("config"), dict) else None


def detect(path: str) -> bool:
    """True for an AdapterHub directory whose adapter is a bottleneck adapter."""
    data = _saved(path)
    if data is None or data["config"].get("architecture") is not None:
        return False
    return any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES)


def config_from_adapterhub(raw: dict[str, Any]) -> BnConfig:
    """Our `BnConfig` for an AdapterHub bottleneck config dict (every field carried over)."""
    from dataclasses import fields

    known = {f.name for f in fields(BnConfig)}
    values = {k: v for k, v in raw.items() if k != "architecture"}
    legacy = values.pop("invertible_adapter", None)  # AdapterHub v1's nested form
    if isinstance(legacy, dict):
        values.setdefault("inv_adapter", legacy.get("block_type"))
        values.setdefault("inv_adapter_reduction_factor", legacy.get("reduction_factor"))
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(
            f"AdapterHub bottleneck config has options {unknown} that adapters-bottleneck "
            "does not know; its outputs could not be reproduced"
        )
    if values.get("inv_adapter") == "glow":
        raise CheckpointError(
            "AdapterHub's GLOW invertible adapter is not the GLOW coupling of the paper (its "
            "forward does not use its first subnetwork), so its outputs cannot be reproduced; "
            "NICE ('nice') checkpoints are supported"
        )
    if isinstance(values.get("scaling"), int) and not isinstance(values.get("scaling"), bool):
        values["scaling"] = float(values["scaling"])
    missing = [k for k in ("mh_adapter", "output_adapter", "reduction_factor") if k not in values]
    if missing:
        raise CheckpointError(f"AdapterHub bottleneck config lacks {missing}")
    values.setdefault("non_linearity", "relu")
    return BnConfig(**values)


def _layer_for(path: str, candidates: dict[str, Any]) -> Any | None:
    if path in candidates:
        return candidates[path]
    found = [c for p, c in candidates.items() if p.endswith("." + path) or path.endswith("." + p)]
    return found[0] if len(found) == 1 else None


def read(
    path: str, model: nn.Module, sites: ModelSites, config: AdapterConfig | None
) -> tuple[BnConfig, dict[str, torch.Tensor]]:
    """Read an AdapterHub bottleneck directory: (config, tensors under this plugin's keys)."""
    from .plugin import adapter_key, invertible_key, plan, shared_key

    data = _saved(path)
    if data is None:
        raise CheckpointError(f"{path!r} has no AdapterHub {CONFIG_FILE}")
    saved = config_from_adapterhub(data["config"])
    if config is not None and not isinstance(config, BnConfig):
        raise CheckpointError(
            f"{path!r} holds an AdapterHub bottleneck adapter but config="
            f"{type(config).__name__} was given; pass a bottleneck config or none"
        )
    chosen = config if config is not None else saved
    raw = _load(path)
    layers = {layer.layer.path: layer for layer in sites.layers}
    tensors: dict[str, torch.Tensor] = {}
    names: set[str] = set()
    origin: dict[str, str] = {}

    def put(ours: str, key: str, value: torch.Tensor) -> None:
        if ours in tensors:
            raise CheckpointError(
                f"AdapterHub tensors {origin[ours]!r} and {key!r} in {path!r} are the same "
                f"weight {ours!r} of this model; the file mixes two adapters or layouts"
            )
        tensors[ours], origin[ours] = value, key

    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"AdapterHub entry {key!r} in {path!r} is not a tensor")
        match = _MODEL_KEY.match(key)
        if match is not None:
            names.add(match["name"])
            if match["kind"] == "invertible_adapters":
                if sites.embeddings is None:
                    raise CheckpointError(
                        f"{path!r} has an invertible adapter but the interface names no "
                        "model_embeddings"
                    )
                put(f"{invertible_key(sites)}.{match['param']}", key, value)
            else:
                put(f"{shared_key(sites)}.{match['param']}", key, value)
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            raise CheckpointError(
                f"AdapterHub tensor {key!r} in {path!r} is not a bottleneck adapter weight"
            )
        names.add(match["name"])
        layer = _layer_for(match["layer"], layers)
        if layer is None:
            raise CheckpointError(
                f"AdapterHub adapter tensor {key!r} belongs to layer {match['layer']!r}, which "
                "is not a layer of this model's AdapterModelInterface; check model_layers"
            )
        location = _CONTAINERS[match["container"]]
        put(f"{adapter_key(layer, location)}.{match['param']}", key, value)
    if len(names) > 1:
        raise CheckpointError(
            f"{path!r} holds the weights of several AdapterHub adapters {sorted(names)}; an "
            "adapter directory holds one (save each adapter into its own directory)"
        )
    _check_complete(path, chosen, sites, tensors, plan)
    return chosen, tensors


def _check_complete(path: str, config: BnConfig, sites: ModelSites, tensors, plan) -> None:
    """Refuse a checkpoint that lacks what the adapter needs (a missing shared PHM rule:
    AdapterHub drops it from built-in models, pitfall 26) or that adapts other sub-blocks."""
    from .plugin import shared_key

    wanted = {p.key for p in plan(sites, config)}
    given = set()
    for key in tensors:
        layer, found, rest = key.partition(".bottleneck.")
        if found:
            given.add(f"{layer}.bottleneck.{rest.split('.')[0]}")
    if wanted != given:
        raise CheckpointError(
            f"the AdapterHub checkpoint {path!r} adapts {sorted(given)[:4]}..., but its config "
            f"({config}) adapts {sorted(wanted)[:4]}... on this model; check the interface"
        )
    if config.phm_layer and (config.shared_phm_rule or config.shared_W_phm):
        prefix = shared_key(sites) + "."
        if not any(k.startswith(prefix) for k in tensors):
            raise CheckpointError(
                f"the AdapterHub Compacter checkpoint {path!r} lacks its shared PHM parameters "
                "(shared_parameters.<name>.phm_rule): AdapterHub's save drops them on its "
                "built-in models, so the adapter cannot be restored from this directory; save "
                "it again from AdapterHub with the shared parameters, or from this library"
            )


def _load(path: str) -> dict[str, torch.Tensor]:
    return _load_any(path, WEIGHT_FILES)


def write(
    path: str,
    model: nn.Module,
    sites: ModelSites,
    name: str,
    config: AdapterConfig,
    state_dict: dict[str, torch.Tensor],
    layout: str = "plugin",
) -> None:
    """Write adapter ``name`` in AdapterHub's format into ``path``: with the key layout of
    its plugin interface (``layout="plugin"``: ``{layer}.output_adapters.adapters.<name>...``)
    or of its built-in BERT-family models (``layout="builtin"``:
    ``{layer}.output.adapters.<name>...``, ``{layer}.attention.output.adapters.<name>...``)."""
    from .plugin import invertible_key, shared_key

    containers = _containers(layout)

    if not isinstance(config, BnConfig):
        raise CheckpointError(
            f"format {FORMAT_NAME!r} writes bottleneck adapters; {name!r} is a "
            f"{type(config).__name__}"
        )
    if config.inv_adapter == "glow":
        raise CheckpointError(
            "AdapterHub's GLOW coupling computes something else than this package's (see "
            "adapters_bottleneck.interop); a GLOW adapter cannot be written for AdapterHub"
        )
    if "." in name:
        raise CheckpointError(f"AdapterHub adapter names cannot contain '.': {name!r}")
    layer_paths = {layer.layer.path for layer in sites.layers}
    out: dict[str, torch.Tensor] = {}
    inv_prefix = invertible_key(sites) + "." if sites.embeddings is not None else None
    shared_prefix = shared_key(sites) + "."
    base = sites.base_model.path
    base_dot = f"{base}." if base else ""
    for key, value in state_dict.items():
        if inv_prefix and key.startswith(inv_prefix):
            out[f"{base_dot}invertible_adapters.{name}.{key[len(inv_prefix) :]}"] = value
            continue
        if key.startswith(shared_prefix):
            if not base:
                raise CheckpointError(
                    f"adapter {name!r} has parameters shared across layers (Compacter's "
                    "phm_rule), which AdapterHub reads only below a base-model prefix (its "
                    "loader keeps '.shared_parameters.<name>.' keys): save it from a model "
                    "with a head (e.g. BertForSequenceClassification) or in this library's format"
                )
            out[f"{base_dot}shared_parameters.{name}.{key[len(shared_prefix) :]}"] = value
            continue
        layer, _, rest = key.partition(".bottleneck.")
        location, _, param = rest.partition(".")
        if layer not in layer_paths or location not in containers:
            raise CheckpointError(f"cannot place tensor {key!r} in AdapterHub's layout")
        out[f"{layer}.{containers[location]}.adapters.{name}.{param}"] = value
    out = {k: v.detach().contiguous().cpu() for k, v in out.items()}
    raw_config = {k: _plain(v) for k, v in config.to_dict().items()}
    raw_config.pop("method", None)
    raw_config.pop("config_class", None)
    meta = {
        "config": {**raw_config, "architecture": None},
        "hidden_size": sites.hidden_size,
        "model_class": type(model).__name__.removesuffix("WithAdapters"),
        "model_name": "",
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "name": name,
        "version": AH_VERSION,
    }
    with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    torch.save(out, os.path.join(path, "pytorch_adapter.bin"))
    save_file(out, os.path.join(path, "adapter.safetensors"), metadata={"format": "pt"})


def _saved_fusion(path: str) -> dict[str, Any] | None:
    data = read_json_object(os.path.join(path, FUSION_CONFIG_FILE))
    if data is None or not isinstance(data.get("config"), dict):
        return None
    names = data.get("adapter_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return data


def detect_fusion(path: str) -> bool:
    """True for an AdapterFusion directory written by AdapterHub's ``save_adapter_fusion``."""
    if _saved_fusion(path) is None:
        return False
    return any(os.path.isfile(os.path.join(path, f)) for f in FUSION_WEIGHT_FILES)


def _fusion_sites(model: nn.Module, sites: ModelSites, children: list[str]) -> dict[str, int]:
    """``{adapter key: how many of children sit there}`` for the children this model has."""
    from .plugin import plan

    configs = getattr(model, "adapters_config", {})
    counts: dict[str, int] = {}
    for child in children:
        config = configs.get(child)
        if isinstance(config, BnConfig):
            for placement in plan(sites, config):
                counts[placement.key] = counts.get(placement.key, 0) + 1
    return counts


def read_fusion(
    path: str, model: nn.Module, sites: ModelSites
) -> tuple[str | None, list[str], dict[str, Any], dict[str, torch.Tensor]]:
    """Read an AdapterHub fusion directory: (name, fused adapter names, config dict, tensors
    under this plugin's fusion keys ``{layer}.bottleneck.{location}.fusion.{param}``).

    AdapterHub creates a fusion layer at every sub-block of the adapters' location, also where
    ``leave_out`` placed none of them; those are never used and are dropped here. A sub-block
    where only some of the fused adapters sit is refused: AdapterHub fuses the present ones
    there with its fusion layer, this package runs them as a `Stack`."""
    from .plugin import adapter_key

    data = _saved_fusion(path)
    if data is None:
        raise CheckpointError(f"{path!r} has no AdapterHub {FUSION_CONFIG_FILE}")
    children = list(data["adapter_names"])
    config = {k: v for k, v in data["config"].items() if k != "architecture"}
    raw = _load_any(path, FUSION_WEIGHT_FILES)
    layers = {layer.layer.path: layer for layer in sites.layers}
    present = _fusion_sites(model, sites, children)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        match = _FUSION_KEY.match(key)
        if match is None or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"entry {key!r} in {path!r} is not an AdapterHub fusion layer tensor"
            )
        layer = _layer_for(match["layer"], layers)
        if layer is None:
            raise CheckpointError(
                f"AdapterHub fusion tensor {key!r} belongs to layer {match['layer']!r}, which "
                "is not a layer of this model's AdapterModelInterface; check model_layers"
            )
        site = adapter_key(layer, _FUSION_CONTAINERS[match["container"]])
        if present and site not in present:
            continue  # none of the fused adapters sits here: AdapterHub never uses this layer
        if present and present[site] < len(children):
            raise CheckpointError(
                f"AdapterHub fusion {path!r} has a fusion layer at {site!r}, where only some of "
                f"{children} sit: AdapterHub fuses those alone there, this package runs them "
                "as a Stack, so the outputs would differ; use adapters placed at the same "
                "sub-blocks (the same leave_out)"
            )
        tensors[f"{site}.fusion.{match['param']}"] = value
    name = data.get("name")
    return (name if isinstance(name, str) else None), children, config, tensors


def write_fusion(
    path: str,
    model: nn.Module,
    sites: ModelSites,
    name: str,
    children: list[str],
    config: Any,
    state_dict: dict[str, torch.Tensor],
    layout: str = "plugin",
) -> None:
    """Write fusion layer ``name`` in AdapterHub's ``save_adapter_fusion`` layout into
    ``path``, with the keys of its plugin interface or built-in models (``layout``, as
    `write`)."""
    containers = _containers(layout)
    if "." in name or any("." in c for c in children):
        raise CheckpointError(
            f"AdapterHub fusion and adapter names cannot contain '.': {name!r} {children}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        layer, _, rest = key.partition(".bottleneck.")
        location, _, param = rest.partition(".fusion.")
        if not param or location not in containers:
            raise CheckpointError(f"cannot place fusion tensor {key!r} in AdapterHub's layout")
        out[f"{layer}.{containers[location]}.adapter_fusion_layer.{name}.{param}"] = value
    out = {k: v.detach().contiguous().cpu() for k, v in out.items()}
    meta = {
        "adapter_names": list(children),
        "config": {k: _plain(v) for k, v in config.to_dict().items()},
        "hidden_size": sites.hidden_size,
        "model_class": type(model).__name__.removesuffix("WithAdapters"),
        "model_name": "",
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "name": name,
        "version": AH_VERSION,
    }
    with open(os.path.join(path, FUSION_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    torch.save(out, os.path.join(path, FUSION_WEIGHT_FILES[1]))


def _load_any(path: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for name in names:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return load_tensor_file(file)
    raise CheckpointError(f"{path!r} holds none of the weight files {list(names)}")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


ADAPTERHUB_FORMAT = CheckpointFormat(
    name=FORMAT_NAME,
    methods=("bottleneck",),
    aliases=FORMAT_ALIASES,
    detect=detect,
    read=read,
    write=write,
    saved_name=lambda path: recorded_name(os.path.join(path, CONFIG_FILE)),
    detect_fusion=detect_fusion,
    read_fusion=read_fusion,
    write_fusion=write_fusion,
    write_options=WRITE_OPTIONS,
)


#: The checkpoint formats this plugin registers (``adapters_register_checkpoint_formats``).
FORMATS = (ADAPTERHUB_FORMAT,)
