"""Foreign checkpoint formats for LoRA adapters.

- ``"peft"`` (read and write): PEFT LoRA directories (``adapter_config.json`` with
  ``"peft_type": "LORA"`` + ``adapter_model.safetensors``), including rsLoRA, DoRA and Conv1D
  (``fan_in_fan_out``).
- ``"adapterhub"`` (read): AdapterHub ``adapters`` LoRA / IA3 directories
  (``adapter_config.json`` with a ``"config"`` dict + ``pytorch_adapter.bin`` or
  ``adapter.safetensors``). ``.bin`` files are read with ``torch.load(weights_only=True)``:
  nothing is ever unpickled beyond tensors.

Both map the foreign keys to this library's name-independent keys ``{site.path}.{param}``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from adapters import CheckpointFormat
from adapters.configs import AdapterConfig
from adapters.errors import CheckpointError
from adapters.sites import ModelSites

from .config import ATTN_MATRICES, IA3Config, LoRAConfig
from .layer import is_conv1d
from .plugin import Target, targets_of

CONFIG_NAME = "adapter_config.json"


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any] | None:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _load_tensors(path: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for name in names:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            if name.endswith(".safetensors"):
                return load_file(file)
            # weights_only: tensors and plain containers only, never arbitrary objects
            return torch.load(file, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"cannot read {file!r} safely: {error}") from None
    raise CheckpointError(f"{path!r} holds none of the weight files {list(names)}")


def _site_for(path: str, candidates: dict[str, Any]) -> Any | None:
    """The candidate whose module path equals ``path`` or is its suffix / prefix-extension (a
    checkpoint saved from ``LlamaForCausalLM`` names ``model.layers.0...``, an adapter on the
    bare ``LlamaModel`` ``layers.0...``)."""
    if path in candidates:
        return candidates[path]
    found = [c for p, c in candidates.items() if p.endswith("." + path) or path.endswith("." + p)]
    return found[0] if len(found) == 1 else None


def _all_projections(sites: ModelSites) -> dict[str, Target]:
    """Every projection site of the interface, by module path, with its role."""
    result: dict[str, Target] = {}
    for layer in sites.layers:
        for attn in (layer.self_attn, layer.cross_attn):
            if attn is None:
                continue
            for role in ("q", "k", "v", "o", "qkv"):
                site = attn.projection(role)
                if site is not None:
                    result[site.path] = Target(
                        site, role, attn.kind, layer.index, [(0, int(site.out_features or 0))]
                    )
        for role, site in (("intermediate", layer.intermediate), ("output", layer.output)):
            if site is not None:
                result[site.path] = Target(
                    site, role, None, layer.index, [(0, int(site.out_features or 0))]
                )
    return result


def _config_from_targets(
    sites: ModelSites,
    targets: list[Target],
    fused: tuple[str, ...] = (),
    cls: type[LoRAConfig] = LoRAConfig,
    **options: Any,
) -> LoRAConfig:
    """The config that adapts exactly ``targets`` (``fused``: the q/k/v matrices adapted on a
    fused projection); raises if none does."""
    roles = {t.role for t in targets}
    if "qkv" in roles:
        roles |= set(fused)
    attn = tuple(m for m in ATTN_MATRICES if m in roles)
    layers = {t.layer for t in targets}
    leave_out = tuple(i for i in range(len(sites.layers)) if i not in layers)
    config = cls(
        selfattn_lora=bool(attn),
        attn_matrices=attn or ("q", "v"),
        intermediate_lora="intermediate" in roles,
        output_lora="output" in roles,
        leave_out=leave_out,
        **options,
    )
    wanted = {t.site.path for t in targets_of(sites, config)}
    given = {t.site.path for t in targets}
    if wanted != given:
        diff = sorted(wanted ^ given)
        raise CheckpointError(
            f"the checkpoint adapts {len(given)} modules in a pattern a LoRAConfig cannot "
            f"express (the closest config, {config}, differs on {diff[:4]}); LoRAConfig adapts "
            "the same matrices in every layer not in leave_out"
        )
    return config


# ---------------------------------------------------------------------------------------------
# PEFT
# ---------------------------------------------------------------------------------------------

_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<ab>lora_A|lora_B)\.weight|"
    r"(?P<mag>lora_magnitude_vector)(?:\.weight)?)$"
)
_PEFT_UNSUPPORTED = {
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
}


def peft_detect(path: str) -> bool:
    """Whether ``path`` is a PEFT adapter directory."""
    meta = _read_json(path)
    return meta is not None and "peft_type" in meta


def _peft_options(meta: dict[str, Any]) -> dict[str, Any]:
    if meta.get("peft_type") != "LORA":
        raise CheckpointError(
            f"PEFT adapter type {meta.get('peft_type')!r} is not LoRA; adapters-lora reads "
            "PEFT LoRA (peft_type 'LORA') checkpoints only"
        )
    if meta.get("bias", "none") != "none" or meta.get("lora_bias"):
        raise CheckpointError(
            f"PEFT option bias={meta.get('bias')!r} / lora_bias={meta.get('lora_bias')!r} trains "
            "biases, which a LoRA adapter here cannot hold; only bias='none' is supported"
        )
    for key, label in _PEFT_UNSUPPORTED.items():
        if meta.get(key):
            raise CheckpointError(f"PEFT option {label} ({meta[key]!r}) is not supported")
    if meta.get("use_qalora"):
        raise CheckpointError("PEFT option use_qalora=True is not supported")
    r, alpha = int(meta["r"]), meta.get("lora_alpha", 8)
    for key, value in (("rank_pattern", r), ("alpha_pattern", alpha)):
        pattern = meta.get(key) or {}
        differing = {k: v for k, v in pattern.items() if v != value}
        if differing:
            raise CheckpointError(
                f"PEFT {key}={differing} gives modules a different "
                f"{'rank' if key == 'rank_pattern' else 'alpha'}; a LoRA adapter here has one r "
                "and one alpha for all modules"
            )
    return {
        "r": r,
        "alpha": alpha,
        "dropout": float(meta.get("lora_dropout") or 0.0),
        "use_rslora": bool(meta.get("use_rslora")),
        "use_dora": bool(meta.get("use_dora")),
    }


def peft_read(
    path: str, model: nn.Module, sites: ModelSites, config: AdapterConfig | None
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read a PEFT LoRA directory: (our config, tensors under our keys)."""
    meta = _read_json(path) or {}
    options = _peft_options(meta)
    raw = _load_tensors(path, ("adapter_model.safetensors", "adapter_model.bin"))
    candidates = _all_projections(sites)
    matched: dict[str, Target] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        module_key = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        parsed = _PEFT_KEY.match(module_key)
        if parsed is None:
            raise CheckpointError(
                f"PEFT tensor {key!r} in {path!r} is not a LoRA A/B matrix or DoRA magnitude; "
                "embedding or other layer types are not supported"
            )
        target = _site_for(parsed["module"], candidates)
        if target is None:
            raise CheckpointError(
                f"PEFT adapts {parsed['module']!r}, which is not a projection named by this "
                "model's AdapterModelInterface (q/k/v/o, intermediate, output); adapt it in "
                "the interface or use a model whose paths match"
            )
        if target.role == "qkv":
            raise CheckpointError(
                f"PEFT adapts the fused projection {target.site.path} with one A shared by "
                "q, k and v; adapters-lora's fused LoRA keeps one A per q/k/v slice "
                "(AdapterHub's layout) and cannot represent it"
            )
        matched[target.site.path] = target
        param = parsed["ab"] or "magnitude"
        tensors[f"{target.site.path}.{param}"] = value
    if not matched:
        raise CheckpointError(f"{path!r} holds no LoRA tensors")
    if config is None:
        config = _config_from_targets(sites, list(matched.values()), **options)
    return config, tensors


def peft_write(
    path: str,
    model: nn.Module,
    sites: ModelSites,
    name: str,
    config: AdapterConfig,
    state_dict: dict[str, torch.Tensor],
) -> None:
    """Write adapter ``name`` as a PEFT LoRA directory that ``PeftModel.from_pretrained`` loads
    onto a fresh copy of the base model with the same outputs."""
    if not isinstance(config, LoRAConfig):
        raise CheckpointError(f"format='peft' writes LoRA adapters; {name!r} is {config.method!r}")
    reasons = []
    if config.composition_mode != "add":
        reasons.append("composition_mode='scale' (IA3 is a different PEFT type)")
    if config.use_gating:
        reasons.append("use_gating=True (PEFT has no gated LoRA)")
    targets = targets_of(sites, config)
    if any(t.role == "qkv" for t in targets):
        reasons.append("a fused q/k/v projection (PEFT shares one A across q, k and v)")
    if reasons:
        raise CheckpointError(
            f"adapter {name!r} cannot be expressed as a PEFT LoRA checkpoint: "
            f"{'; '.join(reasons)}; save it in this library's format instead"
        )
    tensors: dict[str, torch.Tensor] = {}
    for target in targets:
        p = target.site.path
        tensors[f"{_PEFT_PREFIX}{p}.lora_A.weight"] = state_dict[f"{p}.lora_A"]
        tensors[f"{_PEFT_PREFIX}{p}.lora_B.weight"] = state_dict[f"{p}.lora_B"]
        if config.use_dora:
            tensors[f"{_PEFT_PREFIX}{p}.lora_magnitude_vector"] = state_dict[f"{p}.magnitude"]
    meta = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": any(is_conv1d(t.site.module) for t in targets),
        "target_modules": sorted(t.site.path for t in targets),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        os.path.join(path, "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )


# ---------------------------------------------------------------------------------------------
# AdapterHub
# ---------------------------------------------------------------------------------------------

_AH_KEY = re.compile(r"^(?P<module>.+)\.loras\.(?P<name>[^.]+)\.(?P<param>.+)$")
_AH_PARAMS = {"lora_A", "lora_B", "gate.weight", "gate.bias"}
_AH_FIELDS = (
    "selfattn_lora",
    "intermediate_lora",
    "output_lora",
    "leave_out",
    "r",
    "alpha",
    "dropout",
    "attn_matrices",
    "composition_mode",
    "init_weights",
    "init_weights_seed",
    "use_gating",
    "dtype",
)


def adapterhub_detect(path: str) -> bool:
    """Whether ``path`` is an AdapterHub ``adapters`` adapter directory."""
    meta = _read_json(path)
    return (
        meta is not None
        and isinstance(meta.get("config"), dict)
        and "peft_type" not in meta
        and meta.get("format") != "adapters"
        and any(
            os.path.isfile(os.path.join(path, n))
            for n in ("pytorch_adapter.bin", "adapter.safetensors")
        )
    )


def adapterhub_options(raw: dict[str, Any]) -> dict[str, Any]:
    """Our config options (all but the targets) for an AdapterHub LoRA/IA3 ``"config"`` dict;
    raises for what we cannot reproduce."""
    arch = raw.get("architecture")
    if arch != "lora":
        raise CheckpointError(
            f"AdapterHub adapter architecture {arch!r} is not LoRA/IA3; adapters-lora reads "
            "'lora' adapters (install the plugin for that method)"
        )
    if raw.get("vera_d") is not None or raw.get("vera_b") is not None:
        raise CheckpointError("AdapterHub VeRA adapters (vera_d / vera_b) are not supported")
    if raw.get("use_dora"):
        raise CheckpointError(
            "AdapterHub DoRA adapters are not supported: AdapterHub normalises by ||W + B A|| "
            "without the LoRA scaling and scales the bias, unlike the DoRA paper and PEFT that "
            "adapters-lora follows; its outputs could not be reproduced"
        )
    extra = sorted(set(raw) - set(_AH_FIELDS) - {"architecture", "use_dora", "vera_d", "vera_b"})
    if extra:
        raise CheckpointError(f"AdapterHub LoRA config has options {extra} adapters-lora lacks")
    defaults = LoRAConfig()
    return {
        k: raw.get(k, getattr(defaults, k))
        for k in _AH_FIELDS
        if k
        not in ("selfattn_lora", "intermediate_lora", "output_lora", "leave_out", "attn_matrices")
    }


def adapterhub_read(
    path: str, model: nn.Module, sites: ModelSites, config: AdapterConfig | None
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read an AdapterHub LoRA/IA3 directory: (our config, tensors under our keys).

    The adapted modules are read from the tensor keys, not from the config flags: AdapterHub's
    built-in Llama support calls ``down_proj`` "intermediate" and ``up_proj`` "output", and it
    silently ignores ``"o"`` in ``attn_matrices`` (pitfall 3).
    """
    raw_config = (_read_json(path) or {}).get("config", {})
    options = adapterhub_options(raw_config) if config is None else {}
    if config is not None and not isinstance(config, LoRAConfig):
        raise CheckpointError("config= for an AdapterHub LoRA checkpoint must be a LoRAConfig")
    raw = _load_tensors(path, ("adapter.safetensors", "pytorch_adapter.bin"))
    candidates = _all_projections(sites)
    matched: dict[str, Target] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        parsed = _AH_KEY.match(key)
        if parsed is None or parsed["param"] not in _AH_PARAMS:
            raise CheckpointError(
                f"AdapterHub tensor {key!r} in {path!r} is not a LoRA/IA3 weight "
                f"({', '.join(sorted(_AH_PARAMS))})"
            )
        target = _site_for(parsed["module"], candidates)
        if target is None:
            raise CheckpointError(
                f"AdapterHub adapts {parsed['module']!r}, which is not a projection named by "
                "this model's AdapterModelInterface; check the interface"
            )
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"AdapterHub entry {key!r} is not a tensor")
        matched[target.site.path] = target
        tensors[f"{target.site.path}.{parsed['param']}"] = value
    if not matched:
        raise CheckpointError(f"{path!r} holds no LoRA tensors")
    if config is None:
        fused = tuple(m for m in ("q", "k", "v") if m in raw_config.get("attn_matrices", ()))
        cls = IA3Config if options.get("composition_mode") == "scale" else LoRAConfig
        config = _config_from_targets(
            sites, list(matched.values()), fused=fused, cls=cls, **options
        )
    biased = [p for p, t in matched.items() if getattr(t.site.module, "bias", None) is not None]
    if config.composition_mode == "scale" and biased:
        warnings.warn(
            f"AdapterHub's IA3 forward also scales the bias of {biased[0]} (and "
            f"{len(biased) - 1} more); adapters-lora computes y = (W x) * s + b, which equals "
            "AdapterHub's *merged* model, so unmerged outputs differ from AdapterHub's",
            stacklevel=2,
        )
    return config, tensors


PEFT_FORMAT = CheckpointFormat(name="peft", detect=peft_detect, read=peft_read, write=peft_write)
ADAPTERHUB_FORMAT = CheckpointFormat(
    name="adapterhub", detect=adapterhub_detect, read=adapterhub_read
)
