"""Saving and loading adapters.

This library's format is a directory per adapter:

- ``adapter_config.json``: ``{"format": "adapters", "format_version": 1, "name", "method",
  "config", "interface", "versions"}``
- ``adapter_model.safetensors``: the adapter's tensors under name-independent keys.

Writes are atomic (temporary files, then rename). Loading never unpickles. Foreign formats
(PEFT, AdapterHub) are read and written by `CheckpointFormat`s that plugins register;
``load_adapter`` picks the right one by inspecting the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .composition import setup_to_dict
from .configs import AdapterConfig, config_parts, resolve_config
from .errors import CheckpointError
from .plugins import get_registry

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "adapters"
FORMAT_VERSION = 1
SETUP_NAME = "adapter_setup.json"
ADAPTERS_SUBDIR = "adapters"


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------


def write_directory_atomically(target: str, write: Any) -> None:
    """Call ``write(tmp_dir)`` and move the files it wrote into ``target`` atomically.

    A new ``target`` appears whole or not at all. Into an existing directory each file is
    replaced atomically and files not written are left alone (nothing of the user's is lost).
    """
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        write(tmp)
        if not os.path.exists(target):
            os.rename(tmp, target)
            return
        if not os.path.isdir(target):
            raise CheckpointError(f"{target!r} exists and is not a directory")
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(target, name))
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _versions(methods: list[str]) -> dict[str, str]:
    versions = {"adapters-core": _dist_version("adapters-core"), "torch": torch.__version__}
    transformers_version = _dist_version("transformers")
    if transformers_version:
        versions["transformers"] = transformers_version
    registry = get_registry()
    for method in methods:
        spec = registry.methods.get(method)
        if spec is not None and spec.distribution:
            versions[spec.distribution] = spec.version or ""
    return {k: v for k, v in versions.items() if v}


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------


def save_adapter(
    model: nn.Module,
    save_directory: str,
    adapter_name: str,
    format: str | None = None,
    **kwargs: Any,
) -> None:
    """See `ModelAdaptersMixin.save_adapter`."""
    if kwargs:
        raise TypeError(f"save_adapter got unexpected options {sorted(kwargs)}")
    entry = model._entry(adapter_name)  # type: ignore[operator]
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in entry.state_dict().items()}
    if format not in (None, FORMAT):
        registry = get_registry()
        fmt = registry.formats.get(format)
        if fmt is None or fmt.write is None:
            writable = [*sorted(n for n, f in registry.formats.items() if f.write), FORMAT]
            raise CheckpointError(f"cannot write format {format!r}; writable formats: {writable}")

        def write_foreign(tmp: str) -> None:
            fmt.write(
                path=tmp,
                model=model,
                sites=model.adapter_sites,  # type: ignore[attr-defined]
                name=adapter_name,
                config=entry.config,
                state_dict=state_dict,
            )

        write_directory_atomically(save_directory, write_foreign)
        return

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": adapter_name,
        "method": entry.config.method,
        "config": entry.config.to_dict(),
        "interface": model.adapter_interface.to_dict(),  # type: ignore[attr-defined]
        "versions": _versions(entry.methods),
    }

    def write(tmp: str) -> None:
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        save_file(state_dict, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})

    write_directory_atomically(save_directory, write)


def save_all_adapters(model: nn.Module, save_directory: str, **kwargs: Any) -> None:
    """See `ModelAdaptersMixin.save_all_adapters`."""
    for name in model.adapters_config:  # type: ignore[attr-defined]
        save_adapter(model, os.path.join(save_directory, name), name, **kwargs)


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


def read_checkpoint(
    model: nn.Module, path: str, config: Any = None
) -> tuple[str | None, AdapterConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint directory in any known format: (saved name or None, config, tensors)."""
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path!r} is not a directory; load_adapter reads a local adapter directory "
            "(this library's, PEFT's or AdapterHub's format)"
        )
    override = resolve_config(config) if config is not None else None
    meta = read_json(os.path.join(path, CONFIG_NAME))
    if meta is not None and meta.get("format") == FORMAT:
        weights = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise CheckpointError(f"{path!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        saved = override or AdapterConfig.from_dict(meta["config"])
        return meta.get("name"), saved, load_safetensors(weights)
    registry = get_registry()
    claims = [fmt for fmt in registry.formats.values() if fmt.detect(path)]
    if len(claims) > 1:
        names = ", ".join(f"{f.name!r} ({f.plugin})" for f in claims)
        raise CheckpointError(
            f"{path!r} is claimed by several checkpoint formats: {names}; a plugin's detect() is "
            "too broad: report it, or disable one with ADAPTERS_DISABLE_PLUGINS"
        )
    if claims:
        cfg, tensors = claims[0].read(
            path=path,
            model=model,
            sites=model.adapter_sites,  # type: ignore[attr-defined]
            config=override,
        )
        return None, cfg, tensors
    known = [*sorted(registry.formats), FORMAT]
    raise CheckpointError(
        f"{path!r} is not an adapter checkpoint in a known format ({', '.join(known)}); "
        f"expected {CONFIG_NAME} + {WEIGHTS_NAME}, or install the plugin that reads it"
    )


def read_json_object(path: str) -> dict[str, Any] | None:
    """The JSON object in file ``path``, or None when the file is missing, unreadable or not an
    object. Meant for a `CheckpointFormat`'s ``detect``, which must never raise."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def load_tensor_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a PyTorch ``.bin``/``.pt`` file read with
    ``torch.load(weights_only=True)``: plain tensors and containers only, never arbitrary
    objects. Anything else (corrupt, unsafe, not a flat dict of tensors) raises
    `CheckpointError`. For plugins reading foreign checkpoints."""
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unsafe or corrupt files
        raise CheckpointError(
            f"{path!r} cannot be read as plain tensors (weights_only=True; nothing else is "
            f"unpickled): {type(error).__name__}: {error}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path!r} does not hold a dict of tensors")
    return state


def read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path!r}: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path!r} does not hold a JSON object")
    return data


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path!r} is not a readable safetensors file: {error}") from None


def load_adapter(
    model: nn.Module,
    path: str,
    config: Any = None,
    load_as: str | None = None,
    set_active: bool = False,
    overwrite_ok: bool = False,
    **kwargs: Any,
) -> str:
    """See `ModelAdaptersMixin.load_adapter`. Atomic: on any error the model is unchanged."""
    if kwargs:
        raise TypeError(f"load_adapter got unexpected options {sorted(kwargs)}")
    path = os.fspath(path)
    saved_name, cfg, tensors = read_checkpoint(model, path, config)
    name = load_as or saved_name or os.path.basename(os.path.normpath(path))
    if name in model.adapters_config and not overwrite_ok:  # type: ignore[attr-defined]
        raise CheckpointError(
            f"an adapter named {name!r} already exists; pass load_as='other_name' or "
            "overwrite_ok=True"
        )
    old = None
    if name in model.adapters_config:  # type: ignore[attr-defined]
        old = model._entry(name)  # type: ignore[operator]
        old_tensors = old.state_dict()
        old_tensors = {k: v.clone() for k, v in old_tensors.items()}
    model.add_adapter(name, cfg, overwrite_ok=overwrite_ok)  # type: ignore[operator]
    try:
        load_tensors(model, name, tensors, source=path)
    except BaseException:
        model.delete_adapter(name)  # type: ignore[operator]
        if old is not None:
            model.add_adapter(name, old.config)  # type: ignore[operator]
            load_tensors(model, name, old_tensors, source="previous adapter")
        raise
    if set_active:
        model.set_active_adapters(name)  # type: ignore[operator]
    return name


def load_tensors(
    model: nn.Module, name: str, tensors: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Copy ``tensors`` (name-independent keys) into adapter ``name``; every key must match
    in name and shape, else `CheckpointError` and nothing is copied."""
    entry = model._entry(name)  # type: ignore[operator]
    expected = entry.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match adapter {name!r} ({entry.config.method}) on this model: "
            f"missing {len(missing)} tensors {missing[:3]}, unexpected {len(unexpected)} "
            f"{unexpected[:3]}. Was it saved for another model or interface?"
        )
    bad = [
        (k, tuple(tensors[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if bad:
        key, got, want = bad[0]
        raise CheckpointError(
            f"{source}: tensor {key!r} has shape {got}, adapter {name!r} expects {want} "
            f"({len(bad)} mismatched); was it saved with another config (e.g. r) or model size?"
        )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(dtype=target.dtype, device=target.device))


def load_all_adapters(model: nn.Module, directory: str, set_active: bool = False) -> list[str]:
    """See `ModelAdaptersMixin.load_all_adapters`."""
    names = []
    for entry in sorted(os.listdir(directory)):
        sub = os.path.join(directory, entry)
        if os.path.isdir(sub) and not entry.startswith("."):
            names.append(load_adapter(model, sub))
    if set_active and names:
        model.set_active_adapters(names)  # type: ignore[operator]
    return names


# ---------------------------------------------------------------------------------------------
# whole model
# ---------------------------------------------------------------------------------------------


def _adapter_key_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = []
    for name in model.adapters_config:  # type: ignore[attr-defined]
        for module in model._entry(name).modules.values():  # type: ignore[operator]
            prefixes.append(names[id(module)] + ".")
    return tuple(prefixes)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` without adapter tensors (the base model's own keys)."""
    prefixes = _adapter_key_prefixes(model)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def save_pretrained(
    model: nn.Module,
    save_directory: str,
    parent_save: Any,
    *args: Any,
    **kwargs: Any,
) -> None:
    """See `adapters.api.ModelAdaptersMixin.save_pretrained`; ``parent_save`` is the model
    class's own ``save_pretrained`` (None for a plain ``nn.Module``)."""
    merged = [n for n in model.adapters_config if model.is_merged(n)]  # type: ignore[attr-defined]
    if merged:
        raise CheckpointError(
            f"adapters {merged} are merged into the base weights; call reset_adapter() to save "
            "base and adapters separately, or merge_and_unload() to save a plain merged model"
        )
    os.makedirs(save_directory, exist_ok=True)
    state = base_state_dict(model)
    if parent_save is not None:
        kwargs.setdefault("state_dict", state)
        parent_save(save_directory, *args, **kwargs)
    else:
        if args or kwargs:
            raise TypeError("save_pretrained of a plain nn.Module takes only the directory")
        tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
        save_file(tensors, os.path.join(save_directory, "model.safetensors"))
    model.adapter_interface.save(save_directory)  # type: ignore[attr-defined]
    adapters_dir = os.path.join(save_directory, ADAPTERS_SUBDIR)
    for name in model.adapters_config:  # type: ignore[attr-defined]
        save_adapter(model, os.path.join(adapters_dir, name), name)
    with open(os.path.join(save_directory, SETUP_NAME), "w", encoding="utf-8") as f:
        json.dump(
            {
                "active": setup_to_dict(model.active_adapters),  # type: ignore[attr-defined]
                "adapters": list(model.adapters_config),
            },
            f,
            indent=2,
        )  # type: ignore


def configs_equal_for_average(configs: list[AdapterConfig]) -> bool:
    """Whether adapters with these configs have identical parameter layouts."""
    first = [c.to_dict() for c in config_parts(configs[0])]
    return all([c.to_dict() for c in config_parts(other)] == first for other in configs[1:])
