"""Saving and loading one adapter (and all of a model's adapters) in our format or, through
`adapters.checkpoint.foreign`, a foreign one."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .._runtime.naming import name_problem, safe_join, validate_adapter_name
from .._runtime.precision import check_adapter_dtype
from ..configs import (
    AdapterConfig,
    check_config_values,
    config_parts,
    resolve_config,
)
from ..errors import AdaptersError, CheckpointError, MethodNotInstalledError
from ..registry.loading import get_registry
from .foreign import _saved_name, check_write_options, writer_for
from .format import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    _split_part,
    _versions,
    check_format_version,
    from_portable_keys,
    to_portable_keys,
)
from .manifest import read_manifest, verify_manifest, write_directory_atomically, write_manifest
from .readers import load_safetensors, read_json, read_json_strict

# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def write_adapter_files(model: nn.Module, folder: str, adapter_name: str) -> None:
    """Write adapter ``adapter_name`` in this library's format into the (new, empty) folder
    ``folder``: config, weights under portable keys and the manifest. Not atomic by itself:
    for the temporary folder of an atomic save."""
    entry = model._entry(adapter_name)  # type: ignore[operator]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": adapter_name,
        "method": entry.config.method,
        "config": entry.config.to_dict(),
        "interface": model.adapter_interface.to_dict(),  # type: ignore[attr-defined]
        "versions": _versions(entry.methods),
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    tensors = to_portable_keys(model, _cpu_tensors(entry.state_dict()))
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    write_manifest(folder)


def save_adapter(
    model: nn.Module,
    save_directory: str,
    adapter_name: str,
    format: str | None = None,
    **kwargs: Any,
) -> None:
    """See `ModelAdaptersMixin.save_adapter`. ``kwargs``: options of a foreign ``format``
    (its `CheckpointFormat.write_options`)."""
    if kwargs and format in (None, FORMAT):
        raise TypeError(f"save_adapter got unexpected options {sorted(kwargs)}")
    entry = model._entry(adapter_name)  # type: ignore[operator]
    if format not in (None, FORMAT):
        fmt = writer_for(format, entry.config.method, "write", f"adapter {adapter_name!r}")
        check_write_options(fmt, format, kwargs)
        state_dict = _cpu_tensors(entry.state_dict())

        def write_foreign(tmp: str) -> None:
            fmt.write(
                path=tmp,
                model=model,
                sites=model.adapter_sites,  # type: ignore[attr-defined]
                name=adapter_name,
                config=entry.config,
                state_dict=state_dict,
                **kwargs,
            )

        write_directory_atomically(save_directory, write_foreign)
        return
    # write_adapter_files writes the manifest itself
    write_directory_atomically(
        save_directory, lambda tmp: write_adapter_files(model, tmp, adapter_name)
    )


def save_all_adapters(model: nn.Module, save_directory: str, **kwargs: Any) -> None:
    """See `ModelAdaptersMixin.save_all_adapters`."""
    if kwargs:
        raise TypeError(f"save_all_adapters got unexpected options {sorted(kwargs)}")
    names = list(model.adapters_config)  # type: ignore[attr-defined]

    def write(tmp: str) -> None:
        for name in names:
            write_adapter_files(model, safe_join(tmp, name), name)

    write_directory_atomically(save_directory, write, manifest=True)


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


def read_checkpoint(
    model: nn.Module, path: str, config: Any = None
) -> tuple[str | None, AdapterConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint directory in any known format: (saved name or None, config, tensors
    under the plugins' keys for ``model``)."""
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path!r} is not a directory; load_adapter reads a local adapter directory "
            "(this library's, PEFT's or AdapterHub's format)"
        )
    override = resolve_config(config) if config is not None else None
    config_file = os.path.join(path, CONFIG_NAME)
    meta = read_json(config_file)
    if meta is not None and meta.get("format") == FORMAT:
        return _read_own(model, path, meta, override)
    registry = get_registry()
    claims, failures = [], []
    for fmt in registry.formats:
        try:
            if fmt.detect(path):
                claims.append(fmt)
        except Exception as error:  # one broken plugin must not break the other formats
            failures.append(
                f"format {fmt.name!r} of plugin {fmt.plugin!r}: detect() raised "
                f"{type(error).__name__}: {error}"
            )
    for failure in failures:
        warnings.warn(f"{failure}; that format was skipped for {path!r}", stacklevel=3)
    if len(claims) > 1:
        names = ", ".join(f"{f.name!r} ({f.plugin})" for f in claims)
        raise CheckpointError(
            f"{path!r} is claimed by several checkpoint formats: {names}; a plugin's detect() is "
            "too broad: report it, or disable one with ADAPTERS_DISABLE_PLUGINS"
        )
    if claims:
        fmt = claims[0]
        try:
            cfg, tensors = fmt.read(
                path=path,
                model=model,
                sites=model.adapter_sites,  # type: ignore[attr-defined]
                config=override,
            )
        except (AdaptersError, OSError):
            raise
        except Exception as error:  # a reader's unexpected error still names file and plugin
            raise CheckpointError(
                f"{path!r} could not be read as format {fmt.name!r} (plugin {fmt.plugin!r}): "
                f"{type(error).__name__}: {error}"
            ) from error
        check_config_values(cfg)
        foreign = [p.method for p in config_parts(cfg) if not fmt.serves(p.method)]
        if foreign:
            raise CheckpointError(
                f"format {fmt.name!r} (plugin {fmt.plugin!r}) read {path!r} as a {foreign[0]!r} "
                f"adapter, but it declares the methods {list(fmt.methods)} only"
            )
        return _saved_name(fmt, path), cfg, _checked_tensors(tensors, path)
    if os.path.isfile(config_file):
        read_json_strict(config_file)  # a malformed config explains itself (file and key)
    known = [*registry.format_names(), FORMAT]
    hint = f" ({'; '.join(failures)})" if failures else ""
    raise CheckpointError(
        f"{path!r} is not an adapter checkpoint in a known format ({', '.join(known)}); "
        f"expected {CONFIG_NAME} + {WEIGHTS_NAME}, or install the plugin that reads it{hint}"
    )


def _read_own(
    model: nn.Module, path: str, meta: dict[str, Any], override: AdapterConfig | None
) -> tuple[str | None, AdapterConfig, dict[str, torch.Tensor]]:
    config_file = os.path.join(path, CONFIG_NAME)
    version = check_format_version(meta, repr(config_file))
    if version >= 2:
        verify_manifest(path)
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{path!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    name = meta.get("name")
    if name is not None and not isinstance(name, str):
        raise CheckpointError(f"{config_file!r}: field 'name' is {name!r}, not a string")
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{config_file!r}: field 'config' is missing or not an object")
    try:
        cfg = override or check_config_values(AdapterConfig.from_dict(saved))
    except MethodNotInstalledError:
        raise
    except (AdaptersError, TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{config_file!r}: field 'config' is invalid: {error}") from None
    tensors = _checked_tensors(load_safetensors(weights), weights)
    if version >= 2:
        tensors = from_portable_keys(model, tensors)
    else:
        tensors = _upgrade_v1(cfg, tensors)
    return name, cfg, tensors


def _upgrade_v1(config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Format 1 keys were the plugin's keys on the saving model (its head class); methods whose
    keys changed since map them with ``MethodSpec.upgrade_key``."""
    registry = get_registry()
    upgrades = {}
    for part in config_parts(config):
        spec = registry.methods.get(part.method)
        upgrade = getattr(spec, "upgrade_key", None)
        if upgrade is not None:
            upgrades[part.method] = (part, upgrade)
    if not upgrades:
        return tensors
    union = len(config_parts(config)) > 1
    result = {}
    for key, value in tensors.items():
        method, rest = _split_part(key)
        found = upgrades.get(method[:-1] if union else config_parts(config)[0].method)
        if found is not None:
            rest = found[1](found[0], rest, 1)
        result[method + rest] = value
    return result


def _checked_tensors(tensors: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, refusing non-tensors and non-finite values (they would give
    NaN outputs) with `CheckpointError` naming the file and key."""
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{source}: tensor {key!r} holds NaN or infinite values; the checkpoint is "
                "corrupt or was saved after training diverged"
            )
    return dict(tensors)


def load_adapter(
    model: nn.Module,
    path: str,
    config: Any = None,
    load_as: str | None = None,
    set_active: bool = False,
    overwrite_ok: bool = False,
    adapter_dtype: Any = None,
    **kwargs: Any,
) -> str:
    """See `ModelAdaptersMixin.load_adapter`. Atomic: on any error the model is unchanged.
    ``adapter_dtype``: as in ``add_adapter`` (the saved tensors are cast to it)."""
    if kwargs:
        raise TypeError(f"load_adapter got unexpected options {sorted(kwargs)}")
    adapter_dtype = check_adapter_dtype(adapter_dtype)
    path = os.fspath(path)
    if load_as is not None:
        validate_adapter_name(load_as)
    saved_name, cfg, tensors = read_checkpoint(model, path, config)
    if load_as is not None:
        name = load_as
    elif saved_name is not None:
        problem = name_problem(saved_name)
        if problem is not None:
            raise CheckpointError(
                f"{path!r} records the adapter name {saved_name!r}, which is not an allowed "
                f"adapter name ({problem}); pass load_as='a_name'"
            )
        name = saved_name
    else:
        name = os.path.basename(os.path.normpath(path))
        if name_problem(name) is not None:
            raise CheckpointError(
                f"the folder name {name!r} of {path!r} is not an allowed adapter name "
                f"({name_problem(name)}); pass load_as='a_name'"
            )
    if name in model.adapters_config and not overwrite_ok:  # type: ignore[attr-defined]
        raise CheckpointError(
            f"an adapter named {name!r} already exists; pass load_as='other_name' or "
            "overwrite_ok=True"
        )
    old = None
    if name in model.adapters_config:  # type: ignore[attr-defined]
        old = model._entry(name)  # type: ignore[operator]
        old_merged = old.merged
        old_tensors = old.state_dict()
        old_tensors = {k: v.clone() for k, v in old_tensors.items()}
    model.add_adapter(  # type: ignore[operator]
        name, cfg, overwrite_ok=overwrite_ok, adapter_dtype=adapter_dtype
    )
    try:
        load_tensors(model, name, tensors, source=path)
    except BaseException:
        model.delete_adapter(name)  # type: ignore[operator]
        if old is not None:
            model.add_adapter(name, old.config)  # type: ignore[operator]
            load_tensors(model, name, old_tensors, source="previous adapter")
            if old_merged:
                model.merge_adapter(name)  # type: ignore[operator]
        raise
    if set_active:
        model.set_active_adapters(name)  # type: ignore[operator]
    return name


def load_tensors(
    model: nn.Module, name: str, tensors: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Copy ``tensors`` (the plugins' name-independent keys) into adapter ``name``; every key
    must match in name and shape, else `CheckpointError` and nothing is copied."""
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
    kinds = [
        k
        for k, v in expected.items()
        if v.is_floating_point() and not tensors[k].is_floating_point()
    ]
    if kinds:
        raise CheckpointError(
            f"{source}: tensor {kinds[0]!r} has dtype {tensors[kinds[0]].dtype}, adapter "
            f"{name!r} expects floating-point values"
        )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(dtype=target.dtype, device=target.device))


def load_all_adapters(model: nn.Module, directory: str, set_active: bool = False) -> list[str]:
    """See `ModelAdaptersMixin.load_all_adapters`. A folder written by ``save_all_adapters``
    is checked against its manifest first; only the adapters it lists are loaded."""
    manifest = read_manifest(directory)
    if manifest is not None:
        verify_manifest(directory, hash_files=lambda rel: False)  # each adapter checks its own
        subdirs = sorted({rel.split("/", 1)[0] for rel in manifest["files"] if "/" in rel})
    else:
        subdirs = sorted(
            e
            for e in os.listdir(directory)
            if not e.startswith(".") and os.path.isdir(os.path.join(directory, e))
        )
    names = []
    for entry in subdirs:
        names.append(load_adapter(model, safe_join(directory, entry)))
    if set_active and names:
        model.set_active_adapters(names)  # type: ignore[operator]
    return names
