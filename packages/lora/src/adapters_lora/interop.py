"""Foreign checkpoint formats for LoRA adapters.

- ``"peft"`` (read and write): PEFT LoRA directories (``adapter_config.json`` with
  ``"peft_type": "LORA"`` + ``adapter_model.safetensors``), including rsLoRA, DoRA, Conv1D
  (``fan_in_fan_out``), ``rank_pattern`` / ``alpha_pattern`` and LoRA on a fused q/k/v
  projection (GPT-2 ``c_attn``, PEFT's default target there). PEFT IA3 directories
  (``"peft_type": "IA3"``, ``feedforward_modules`` included) are read too.
- ``"adapterhub"`` (read): AdapterHub ``adapters`` LoRA / IA3 directories
  (``adapter_config.json`` with a ``"config"`` dict + ``pytorch_adapter.bin`` or
  ``adapter.safetensors``). ``.bin`` files are read with ``torch.load(weights_only=True)``:
  nothing is ever unpickled beyond tensors.

Both map the foreign keys to this library's name-independent keys ``{site.path}.{param}``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
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

from .config import ATTN_MATRICES, IA3Config, LoRAConfig
from .layer import is_conv1d
from .plugin import Target, fused_slices, targets_of

CONFIG_NAME = "adapter_config.json"


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any] | None:
    return read_json_object(os.path.join(path, CONFIG_NAME))


def _load_tensors(path: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for name in names:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return load_tensor_file(file)
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


#: The PEFT adapter types this reader understands. A PEFT folder of another type (VeRA,
#: prefix tuning, ...) is left to the plugin that registers ``"peft"`` for its own method.
PEFT_TYPES = ("LORA", "IA3")


def peft_detect(path: str) -> bool:
    """Whether ``path`` is a PEFT LoRA or IA³ adapter directory (PEFT's other adapter types are
    not claimed: another plugin may read them under the same format name)."""
    meta = _read_json(path)
    return meta is not None and meta.get("peft_type") in PEFT_TYPES


def _peft_options(meta: dict[str, Any]) -> dict[str, Any]:
    if meta.get("peft_type") != "LORA":
        raise CheckpointError(
            f"PEFT adapter type {meta.get('peft_type')!r} is not LoRA or IA3; adapters-lora "
            "reads PEFT LoRA and IA3 (peft_type 'LORA', 'IA3') checkpoints only"
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
    return {
        "r": int(meta.get("r", 8)),
        "alpha": meta.get("lora_alpha", 8),
        "dropout": float(meta.get("lora_dropout") or 0.0),
        "use_rslora": bool(meta.get("use_rslora")),
        "use_dora": bool(meta.get("use_dora")),
    }


_PATTERN_META = set("()[]{}*+?|^$\\")


def _pattern_value(pattern: dict[str, Any] | None, module: str, default: Any, label: str) -> Any:
    """PEFT's per-module override: the value of the first key of ``pattern`` that is ``module``
    or a suffix of it at a ``.`` boundary (``"q_proj"``, ``"layers.0.self_attn.q_proj"``),
    else ``default``.

    PEFT runs these keys as regular expressions; a checkpoint is untrusted input, and a crafted
    expression such as ``(a+)+$`` can make matching take exponential time, so keys are matched
    as literal module-path suffixes, and keys using regular-expression syntax are refused."""
    if pattern is None:
        return default
    if not isinstance(pattern, dict):
        raise CheckpointError(f"PEFT field {label!r} must be an object, got {pattern!r}")
    for key, value in pattern.items():
        if not isinstance(key, str) or len(key) > 1000 or _PATTERN_META & set(key):
            raise CheckpointError(
                f"PEFT field {label!r} has the key {key!r}; adapters-lora matches these keys "
                "as module paths or their suffixes (e.g. 'q_proj', 'layers.0.self_attn.q_proj'), "
                "not as regular expressions: list the modules by path"
            )
        if module == key or module.endswith("." + key):
            return value
    return default


def _scaling(alpha: float, rank: int, rslora: bool) -> float:
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


@dataclass
class _Blocks:
    """One module of a PEFT checkpoint in our layout: per adapted output slice, ``(A_j, B_j)``
    of a common rank, the scaling ``s`` of ``s * B_j A_j``, and for a fused projection the
    adapted q/k/v matrices."""

    target: Target
    blocks: list[tuple[torch.Tensor, torch.Tensor]]
    rank: int
    scaling: float
    matrices: tuple[str, ...] = ()
    magnitude: torch.Tensor | None = None


def _fused_general(sites: ModelSites, target: Target, a: torch.Tensor, b: torch.Tensor):
    """PEFT's one shared ``A`` on a fused projection, exactly: every q/k/v slice gets ``A``
    and its rows of ``B``."""
    slices = fused_slices(sites, target.site, ("q", "k", "v"))
    return ("q", "k", "v"), [(a, b[start:end]) for start, end in slices], a.shape[0]


def _fused_compact(sites: ModelSites, target: Target, a: torch.Tensor, b: torch.Tensor):
    """The compact form of a block-structured ``B`` (as `peft_write` produces it): when the
    adapted slices use disjoint sets of equally many columns of ``B``, each slice keeps only
    its own rows of ``A``; slices whose rows of ``B`` are all zero are left out. None if ``B``
    has no such structure (then `_fused_general` applies)."""
    matrices, blocks, used_total = [], [], torch.zeros(b.shape[1], dtype=torch.bool)
    for name, (start, end) in zip(
        ("q", "k", "v"), fused_slices(sites, target.site, ("q", "k", "v"))
    ):
        used = (b[start:end] != 0).any(dim=0)
        if not used.any():
            continue
        if (used & used_total).any():
            return None
        used_total |= used
        matrices.append(name)
        blocks.append((a[used], b[start:end][:, used]))
    ranks = {blk[0].shape[0] for blk in blocks}
    if len(ranks) != 1:
        return None
    return tuple(matrices), blocks, ranks.pop()


def _pad(blocks: _Blocks, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` of ``blocks`` at rank ``rank`` (extra rows / columns are zero,
    and stay zero in training) with the scaling difference folded into ``B``."""
    a_parts, b_parts = [], []
    for a, b in blocks.blocks:
        if not math.isclose(blocks.scaling, scaling, rel_tol=1e-12):
            b = b * (blocks.scaling / scaling)
        if blocks.rank < rank:
            a = torch.cat([a, a.new_zeros(rank - blocks.rank, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - blocks.rank)], dim=1)
        a_parts.append(a)
        b_parts.append(b)
    return torch.cat(a_parts), torch.cat(b_parts)


def _tidy(value: float) -> float:
    """``value`` rounded to 9 decimals when that is within float error (so that ``8 *
    sqrt(2) / sqrt(2)`` reads back as 8.0)."""
    rounded = round(value, 9)
    return rounded if math.isclose(rounded, value, rel_tol=1e-12) else value


def peft_read(
    path: str, model: nn.Module, sites: ModelSites, config: AdapterConfig | None
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read a PEFT LoRA directory: (our config, tensors under our keys).

    Every module is represented exactly (same ``delta W``):

    - a fused q/k/v projection (GPT-2 ``c_attn``) with PEFT's one shared ``A`` (r x in) and
      ``B`` (out x r) becomes our fused layout with q, k and v adapted, each slice with ``A``
      and its rows of ``B``; a block-structured ``B`` (as `peft_write` writes one) is read back
      in its compact form;
    - ``rank_pattern`` / ``alpha_pattern``: modules of a lower rank are zero-padded to the
      highest one and a different scaling is folded into ``B``.
    """
    meta = _read_json(path) or {}
    if meta.get("peft_type") == "IA3":
        return peft_ia3_read(path, sites, config, meta)
    options = _peft_options(meta)
    raw = _load_tensors(path, ("adapter_model.safetensors", "adapter_model.bin"))
    candidates = _all_projections(sites)
    found: dict[str, dict[str, torch.Tensor]] = {}
    targets: dict[str, tuple[Target, str]] = {}
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
        if target.role == "qkv" and options["use_dora"]:
            raise CheckpointError(
                f"PEFT DoRA on the fused projection {target.site.path} is not supported: "
                "adapters-lora has no DoRA on fused q/k/v projections; use plain LoRA there"
            )
        targets[target.site.path] = (target, parsed["module"])
        found.setdefault(target.site.path, {})[parsed["ab"] or "magnitude"] = value
    if not found:
        raise CheckpointError(f"{path!r} holds no LoRA tensors")
    modules = [_peft_module(sites, *targets[p], found[p], meta, options) for p in sorted(found)]
    fused = {m.matrices for m in modules if m.target.role == "qkv"}
    if len(fused) > 1:  # compact forms that differ between layers: use the general one
        for m in modules:
            if m.target.role == "qkv" and m.matrices != ("q", "k", "v"):
                a, b = found[m.target.site.path]["lora_A"], found[m.target.site.path]["lora_B"]
                m.matrices, m.blocks, m.rank = _fused_general(sites, m.target, a, b)
        fused = {("q", "k", "v")}
    # one rank and scaling for the config: the highest rank, and the (most common) scaling of
    # the modules that have it; _pad adapts the others exactly
    rank = max(m.rank for m in modules)
    if config is not None:
        return config, _tensors_for_given_config(path, config, modules, rank)
    scalings = [m.scaling for m in modules if m.rank == rank]
    scaling = max(sorted(set(scalings)), key=scalings.count)
    rslora = options["use_rslora"]
    if rank == options["r"] and math.isclose(
        scaling, _scaling(options["alpha"], rank, rslora), rel_tol=1e-9
    ):
        alpha = options["alpha"]
    else:
        alpha = _tidy(scaling * (math.sqrt(rank) if rslora else rank))
    scaling = _scaling(alpha, rank, rslora)
    config = _config_from_targets(
        sites,
        [m.target for m in modules],
        fused=next(iter(fused), ()),
        **{**options, "r": rank, "alpha": alpha},
    )
    return config, _padded_tensors(modules, rank, scaling)


def _padded_tensors(modules: list[_Blocks], rank: int, scaling: float) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        p = m.target.site.path
        tensors[f"{p}.lora_A"], tensors[f"{p}.lora_B"] = _pad(m, rank, scaling)
        if m.magnitude is not None:
            tensors[f"{p}.magnitude"] = m.magnitude
    return tensors


def _tensors_for_given_config(
    path: str, config: AdapterConfig, modules: list[_Blocks], rank: int
) -> dict[str, torch.Tensor]:
    """The PEFT tensors for a ``config=`` given to ``load_adapter``: padded to its ``r`` and
    with its scaling (``alpha``, ``use_rslora``) folded into ``B``, so that the outputs stay
    those of the checkpoint; targets the config adapts differently fail in core's shape check."""
    if not isinstance(config, LoRAConfig) or config.composition_mode != "add" or config.use_gating:
        raise CheckpointError(
            f"config={config!r} cannot hold the PEFT LoRA checkpoint {path!r}: it needs a "
            "LoRAConfig with composition_mode='add' and use_gating=False; omit config= to use "
            "the checkpoint's own"
        )
    if config.r < rank:
        raise CheckpointError(
            f"config r={config.r} is smaller than the rank {rank} of the PEFT checkpoint "
            f"{path!r}; pass r>={rank} or omit config="
        )
    has_magnitude = any(m.magnitude is not None for m in modules)
    if config.use_dora != has_magnitude:
        raise CheckpointError(
            f"config use_dora={config.use_dora} but the PEFT checkpoint {path!r} is "
            f"{'a DoRA' if has_magnitude else 'a plain LoRA'} adapter; set "
            f"use_dora={has_magnitude} or omit config="
        )
    return _padded_tensors(modules, config.r, config.scaling)


def _peft_module(
    sites: ModelSites,
    target: Target,
    module_key: str,
    parts: dict[str, torch.Tensor],
    meta: dict[str, Any],
    options: dict[str, Any],
) -> _Blocks:
    """One PEFT module's tensors in our layout, checked against ``r`` / ``rank_pattern``."""
    path = target.site.path
    a, b = parts.get("lora_A"), parts.get("lora_B")
    if a is None or b is None or (options["use_dora"] and "magnitude" not in parts):
        raise CheckpointError(
            f"PEFT module {module_key!r} lacks tensors: has {sorted(parts)}, expected lora_A, "
            f"lora_B{' and lora_magnitude_vector' if options['use_dora'] else ''}"
        )
    rank = a.shape[0]
    expected = _pattern_value(meta.get("rank_pattern"), module_key, options["r"], "rank_pattern")
    if rank != expected or b.shape[1] != rank:
        raise CheckpointError(
            f"PEFT module {module_key!r} has lora_A {tuple(a.shape)} and lora_B "
            f"{tuple(b.shape)}, but r / rank_pattern give it rank {expected}"
        )
    alpha = _pattern_value(meta.get("alpha_pattern"), module_key, options["alpha"], "alpha_pattern")
    scaling = _scaling(alpha, rank, options["use_rslora"])
    if target.role != "qkv":
        return _Blocks(target, [(a, b)], rank, scaling, magnitude=parts.get("magnitude"))
    if b.shape[0] != int(target.site.out_features or 0):
        raise CheckpointError(
            f"PEFT lora_B of {module_key!r} has {b.shape[0]} rows, the projection {path} has "
            f"{target.site.out_features} outputs"
        )
    matrices, blocks, rank = _fused_compact(sites, target, a, b) or _fused_general(
        sites, target, a, b
    )
    return _Blocks(target, blocks, rank, scaling, matrices)


def _peft_fused_tensors(
    target: Target, config: LoRAConfig, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """A fused unit as PEFT's one ``A`` and ``B``: rank ``n * r`` for ``n`` adapted slices, our
    stacked ``A`` as is, ``B`` block-diagonal (slice ``j`` uses columns ``j*r..(j+1)*r``; rows of
    slices not adapted are zero); ``lora_alpha`` such that PEFT's scaling equals ours."""
    n, r = len(target.slices), config.r
    full = b.new_zeros(int(target.site.out_features or 0), n * r)
    row = 0
    for j, (start, end) in enumerate(target.slices):
        full[start:end, j * r : (j + 1) * r] = b[row : row + end - start]
        row += end - start
    alpha = float(config.alpha) * (math.sqrt(n) if config.use_rslora else n)
    return a, full, n * r, alpha if n > 1 else config.alpha


def peft_write(
    path: str,
    model: nn.Module,
    sites: ModelSites,
    name: str,
    config: AdapterConfig,
    state_dict: dict[str, torch.Tensor],
) -> None:
    """Write adapter ``name`` as a PEFT LoRA directory that ``PeftModel.from_pretrained`` loads
    onto a fresh copy of the base model with the same outputs.

    A fused q/k/v projection is written as one PEFT LoRA of rank ``r`` times the number of
    adapted slices (see `_peft_fused_tensors`); where that rank differs from the other modules'
    ``r``, ``rank_pattern`` and ``alpha_pattern`` give it to the fused modules."""
    if not isinstance(config, LoRAConfig):
        raise CheckpointError(f"format='peft' writes LoRA adapters; {name!r} is {config.method!r}")
    reasons = []
    if config.composition_mode != "add":
        reasons.append("composition_mode='scale' (IA3 is a different PEFT type)")
    if config.use_gating:
        reasons.append("use_gating=True (PEFT has no gated LoRA)")
    if reasons:
        raise CheckpointError(
            f"adapter {name!r} cannot be expressed as a PEFT LoRA checkpoint: "
            f"{'; '.join(reasons)}; save it in this library's format instead"
        )
    targets = targets_of(sites, config)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for target in targets:
        p = target.site.path
        a, b = state_dict[f"{p}.lora_A"], state_dict[f"{p}.lora_B"]
        if target.role == "qkv":
            a, b, rank, alpha = _peft_fused_tensors(target, config, a, b)
            ranks[p] = (rank, alpha)
        else:
            ranks[p] = (config.r, config.alpha)
        tensors[f"{_PEFT_PREFIX}{p}.lora_A.weight"] = a
        tensors[f"{_PEFT_PREFIX}{p}.lora_B.weight"] = b
        if config.use_dora:
            tensors[f"{_PEFT_PREFIX}{p}.lora_magnitude_vector"] = state_dict[f"{p}.magnitude"]
    if len(set(ranks.values())) == 1:
        (r, alpha), patterns = next(iter(ranks.values())), {}
    else:
        r, alpha = config.r, config.alpha
        patterns = {p: v for p, v in ranks.items() if v != (r, alpha)}
    meta = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": any(is_conv1d(t.site.module) for t in targets),
        "target_modules": sorted(t.site.path for t in targets),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {p: v[0] for p, v in patterns.items()},
        "alpha_pattern": {p: v[1] for p, v in patterns.items()},
    }
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        os.path.join(path, "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )


# ---------------------------------------------------------------------------------------------
# PEFT IA3
# ---------------------------------------------------------------------------------------------

_PEFT_IA3_KEY = re.compile(r"^(?P<module>.+)\.ia3_l(?:\.weight)?$")
_PEFT_IA3_UNSUPPORTED = {
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable_token_indices",
}


def peft_ia3_read(
    path: str, sites: ModelSites, config: AdapterConfig | None, meta: dict[str, Any]
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read a PEFT IA3 directory: (an `IA3Config`, tensors under our keys).

    PEFT stores one vector ``ia3_l`` per module: ``(out, 1)`` scales the module's output, bias
    included; ``(1, in)`` scales its input (``feedforward_modules``). Both are read exactly:
    output vectors as our ``lora_B``, input vectors as ``lora_B`` of a role in
    ``scale_inputs``. A role must be scaled the same way in every layer.
    """
    for key, label in _PEFT_IA3_UNSUPPORTED.items():
        if meta.get(key):
            raise CheckpointError(f"PEFT IA3 option {label} ({meta[key]!r}) is not supported")
    raw = _load_tensors(path, ("adapter_model.safetensors", "adapter_model.bin"))
    candidates = _all_projections(sites)
    targets: dict[str, Target] = {}
    on_input: dict[str, bool] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        module_key = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        parsed = _PEFT_IA3_KEY.match(module_key)
        if parsed is None:
            raise CheckpointError(f"PEFT tensor {key!r} in {path!r} is not an IA3 vector (ia3_l)")
        target = _site_for(parsed["module"], candidates)
        if target is None:
            raise CheckpointError(
                f"PEFT IA3 adapts {parsed['module']!r}, which is not a projection named by this "
                "model's AdapterModelInterface (q/k/v/o, intermediate, output)"
            )
        p = target.site.path
        in_f, out_f = int(target.site.in_features or 0), int(target.site.out_features or 0)
        if value.ndim == 2 and value.shape[1] == 1 and value.shape[0] == out_f:
            on_input[p] = False
        elif value.ndim == 2 and value.shape[0] == 1 and value.shape[1] == in_f:
            on_input[p] = True
        else:
            raise CheckpointError(
                f"PEFT IA3 vector {key!r} has shape {tuple(value.shape)}; {p} needs "
                f"({out_f}, 1) (output scaling) or (1, {in_f}) (feed-forward, input scaling)"
            )
        if target.role == "qkv" and on_input[p]:
            raise CheckpointError(
                f"PEFT IA3 scales the input of the fused q/k/v projection {p} "
                "(feedforward_modules); adapters-lora scales q/k/v outputs only there"
            )
        targets[p] = target
        tensors[f"{p}.lora_B"] = value.reshape(-1, 1)
    if not targets:
        raise CheckpointError(f"{path!r} holds no IA3 tensors")
    scale_inputs = _ia3_input_roles(path, targets, on_input)
    fused = ("q", "k", "v") if any(t.role == "qkv" for t in targets.values()) else ()
    derived = _config_from_targets(
        sites, list(targets.values()), fused=fused, cls=IA3Config, scale_inputs=scale_inputs
    )
    if config is None:
        return derived, tensors
    return config, _ia3_tensors_for_given_config(path, config, derived, tensors)


def _ia3_input_roles(
    path: str, targets: dict[str, Target], on_input: dict[str, bool]
) -> tuple[str, ...]:
    """The roles whose input PEFT scales; raises where a role is scaled both ways."""
    by_role: dict[str, set[bool]] = {}
    for p, target in targets.items():
        by_role.setdefault(target.role, set()).add(on_input[p])
    mixed = sorted(role for role, ways in by_role.items() if len(ways) > 1)
    if mixed:
        raise CheckpointError(
            f"PEFT IA3 checkpoint {path!r} scales the input of {mixed[0]!r} projections in some "
            "layers and the output in others; an IA3Config scales a role the same way in "
            "every layer"
        )
    return tuple(role for role, ways in by_role.items() if ways == {True})


def _ia3_tensors_for_given_config(
    path: str, config: AdapterConfig, derived: IA3Config, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The PEFT IA3 vectors for a ``config=`` given to ``load_adapter``: its ``alpha`` folded
    in, so that the outputs stay those of the checkpoint."""
    if (
        not isinstance(config, LoRAConfig)
        or config.composition_mode != "scale"
        or config.use_gating
        or set(config.scale_inputs) != set(derived.scale_inputs)
    ):
        raise CheckpointError(
            f"config={config!r} cannot hold the PEFT IA3 checkpoint {path!r}: it needs "
            "composition_mode='scale', use_gating=False and "
            f"scale_inputs={list(derived.scale_inputs)}; omit config= to use the checkpoint's own"
        )
    if float(config.alpha) == 1.0:
        return tensors
    return {k: v / float(config.alpha) for k, v in tensors.items()}


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
        and meta["config"].get("architecture") == "lora"  # ReFT etc. belong to other plugins
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
    options = adapterhub_options(raw_config)
    if config is not None and not isinstance(config, LoRAConfig):
        raise CheckpointError(
            f"config= for the AdapterHub LoRA checkpoint {path!r} must be a LoRAConfig, got "
            f"{type(config).__name__}; omit config= to use the checkpoint's own"
        )
    raw = _load_tensors(path, ("adapter.safetensors", "pytorch_adapter.bin"))
    candidates = _all_projections(sites)
    matched: dict[str, Target] = {}
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    names: set[str] = set()
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
        names.add(parsed["name"])
        ours = f"{target.site.path}.{parsed['param']}"
        if ours in tensors:
            raise CheckpointError(
                f"AdapterHub tensors {origin[ours]!r} and {key!r} in {path!r} are the same "
                f"weight {ours!r} of this model; the file mixes two adapters or layouts"
            )
        tensors[ours], origin[ours] = value, key
    if not matched:
        raise CheckpointError(f"{path!r} holds no LoRA tensors")
    if len(names) > 1:
        raise CheckpointError(
            f"{path!r} holds the weights of several AdapterHub adapters {sorted(names)}; an "
            "adapter directory holds one (save each adapter into its own directory)"
        )
    if config is not None:
        _rescale_for_given_config(path, config, LoRAConfig(**options), tensors)
    else:
        fused = tuple(m for m in ("q", "k", "v") if m in raw_config.get("attn_matrices", ()))
        cls = IA3Config if options.get("composition_mode") == "scale" else LoRAConfig
        config = _config_from_targets(
            sites, list(matched.values()), fused=fused, cls=cls, **options
        )
    return config, tensors


def _rescale_for_given_config(
    path: str, config: LoRAConfig, saved: LoRAConfig, tensors: dict[str, torch.Tensor]
) -> None:
    """Fold the difference between the saved scaling and that of a ``config=`` given to
    ``load_adapter`` into ``lora_B``, so that the outputs stay those of the checkpoint."""
    if (config.composition_mode, config.use_gating) != (saved.composition_mode, saved.use_gating):
        raise CheckpointError(
            f"config= has composition_mode={config.composition_mode!r}, "
            f"use_gating={config.use_gating}, but the AdapterHub checkpoint {path!r} was saved "
            f"with composition_mode={saved.composition_mode!r}, use_gating={saved.use_gating}; "
            "match them or omit config="
        )
    if config.use_gating or math.isclose(config.scaling, saved.scaling, rel_tol=1e-12):
        return  # a gate replaces the scaling
    for key in [k for k in tensors if k.endswith(".lora_B")]:
        tensors[key] = tensors[key] * (saved.scaling / config.scaling)


#: PEFT's format for LoRA, IA³ and DoRA adapters; owned for ``lora`` only, so a third party can
#: serve ``"peft"`` for its own method (a PEFT VeRA reader for a VeRA plugin).
PEFT_FORMAT = CheckpointFormat(
    name="peft", detect=peft_detect, read=peft_read, write=peft_write, methods=("lora",)
)
#: AdapterHub's format for LoRA, IA³ and DoRA adapters; the name is shared with other plugins'
#: readers of AdapterHub's other methods (bottleneck, ...), each for its own method.
ADAPTERHUB_FORMAT = CheckpointFormat(
    name="adapterhub",
    detect=adapterhub_detect,
    read=adapterhub_read,
    methods=("lora",),
    saved_name=lambda path: recorded_name(os.path.join(path, "adapter_config.json")),
)

#: The checkpoint formats this plugin registers (``adapters_register_checkpoint_formats``).
FORMATS = (PEFT_FORMAT, ADAPTERHUB_FORMAT)
