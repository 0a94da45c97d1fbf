"""Saving and loading one adapter (and all of a model's adapters) in our format or, through
`adapters.checkpoint.foreign`, a foreign one."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .._runtime.naming import name_problem, safe_join, validate_adapter_name
from .._runtime.precision import check_adapter_dtype
from .._runtime.transaction import all_or_nothing
from ..configs import (
    AdapterConfig,
    check_config_values,
    config_parts,
    parse_json_strict,
    resolve_config,
)
from ..errors import AdaptersError, CheckpointError, MethodNotInstalledError
from ..registry.loading import get_registry
from .atomic import read_consistently
from .foreign import (
    PLUGIN_FAILURES,
    _saved_name,
    call_format,
    check_write_options,
    claims_of,
    writer_for,
)
from .format import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    _split_part,
    _versions,
    check_format_version,
    from_portable_keys,
    to_portable_keys,
)
from .manifest import (
    check_links,
    read_listed,
    read_manifest,
    verify_manifest,
    write_directory_atomically,
    write_manifest,
)
from .readers import (
    checked_tensors,
    copy_tensors,
    load_safetensors,
    match_tensors,
    read_json_object,
    read_json_strict,
    safetensors_from_bytes,
)

# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------


def _cpu_tensors(
    tensors: Mapping[str, torch.Tensor], what: str = "the model"
) -> dict[str, torch.Tensor]:
    """``tensors`` on the CPU, contiguous; `CheckpointError` for a tensor on the meta device
    (it has no values to save)."""
    meta = [k for k, v in tensors.items() if v.is_meta]
    if meta:
        raise CheckpointError(
            f"{what} has tensor {meta[0]!r} on the meta device (no values; {len(meta)} such "
            "tensors), so there is nothing to save: materialise the model's weights first "
            "(model.to_empty(device=...) and load them, or load the model with from_pretrained)"
        )
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
    tensors = to_portable_keys(model, _cpu_tensors(entry.state_dict(), f"adapter {adapter_name!r}"))
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
        state_dict = _cpu_tensors(entry.state_dict(), f"adapter {adapter_name!r}")

        def write_foreign(tmp: str) -> None:
            call_format(
                fmt,
                "write",
                tmp,
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
    for name in names:
        _cpu_tensors(model._entry(name).state_dict(), f"adapter {name!r}")  # type: ignore[operator]

    def write(tmp: str) -> None:
        for name in names:
            write_adapter_files(model, safe_join(tmp, name), name)

    write_directory_atomically(save_directory, write, manifest=True)


# ---------------------------------------------------------------------------------------------
# read (nothing in the model changes)
# ---------------------------------------------------------------------------------------------


@dataclass
class ReadAdapter:
    """An adapter checkpoint read and checked, not yet loaded: the name it records (None if
    none), its config and its tensors under the plugins' keys for the model it was read for."""

    path: str
    saved_name: str | None
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]


def read_checkpoint(
    model: nn.Module, path: str, config: Any = None
) -> tuple[str | None, AdapterConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint directory in any known format: (saved name or None, config, tensors
    under the plugins' keys for ``model``). Nothing in ``model`` changes. A save that replaces
    the folder while it is read makes it read again (`read_consistently`): the result is the
    old or the new save, never a mix."""
    read = read_adapter(model, os.fspath(path), config)
    return read.saved_name, read.config, read.tensors


def read_adapter(model: nn.Module, path: str, config: Any = None) -> ReadAdapter:
    """`read_checkpoint` as a `ReadAdapter`."""
    override = resolve_config(config) if config is not None else None

    def read() -> ReadAdapter:
        if not os.path.isdir(path):  # inside: a save's two-rename fallback may be under way
            raise CheckpointError(
                f"{path!r} is not a directory; load_adapter reads a local adapter directory "
                "(this library's, PEFT's or AdapterHub's format)"
            )
        check_links(path)
        return _read_any(model, path, override)

    return read_consistently([path], read)


def _read_any(model: nn.Module, path: str, override: AdapterConfig | None) -> ReadAdapter:
    config_file = os.path.join(path, CONFIG_NAME)
    meta = read_json_object(config_file)
    if meta is not None and meta.get("format") == FORMAT:
        return _read_own(model, path, override)
    registry = get_registry()
    claims, failures = claims_of(registry.formats, "detect", path, stacklevel=6)
    if len(claims) > 1:
        names = ", ".join(f"{f.name!r} ({f.plugin})" for f in claims)
        raise CheckpointError(
            f"{path!r} is claimed by several checkpoint formats: {names}; a plugin's detect() is "
            "too broad: report it, or disable one with ADAPTERS_DISABLE_PLUGINS"
        )
    if claims:
        fmt = claims[0]
        result = call_format(
            fmt,
            "read",
            path,
            model=model,
            sites=model.adapter_sites,  # type: ignore[attr-defined]
            config=override,
        )
        if not isinstance(result, tuple) or len(result) != 2:
            raise CheckpointError(
                f"{path!r}: read() of format {fmt.name!r} (plugin {fmt.plugin!r}) returned "
                f"{type(result).__name__}, not (config, state_dict)"
            )
        cfg, tensors = result
        if not isinstance(cfg, AdapterConfig):
            raise CheckpointError(
                f"{path!r}: read() of format {fmt.name!r} (plugin {fmt.plugin!r}) returned the "
                f"config {cfg!r}, not an AdapterConfig"
            )
        check_config_values(cfg)
        foreign = [p.method for p in config_parts(cfg) if not fmt.serves(p.method)]
        if foreign:
            raise CheckpointError(
                f"format {fmt.name!r} (plugin {fmt.plugin!r}) read {path!r} as a {foreign[0]!r} "
                f"adapter, but it declares the methods {list(fmt.methods)} only"
            )
        return ReadAdapter(path, _saved_name(fmt, path), cfg, checked_tensors(tensors, path))
    if os.path.isfile(config_file):
        read_json_strict(config_file)  # a malformed config explains itself (file and key)
    known = [*registry.format_names(), FORMAT]
    hint = f" ({'; '.join(failures)})" if failures else ""
    raise CheckpointError(
        f"{path!r} is not an adapter checkpoint in a known format ({', '.join(known)}); "
        f"expected {CONFIG_NAME} + {WEIGHTS_NAME}, or install the plugin that reads it{hint}"
    )


def _read_own(model: nn.Module, path: str, override: AdapterConfig | None) -> ReadAdapter:
    """Our format. With a manifest (every save since format 2), only the bytes it vouches for
    are parsed; without one only format 1 (written before manifests existed) is accepted."""
    config_file = os.path.join(path, CONFIG_NAME)
    weights = os.path.join(path, WEIGHTS_NAME)
    manifest = read_manifest(path)
    if manifest is not None:
        text = read_listed(path, manifest, CONFIG_NAME).decode("utf-8", errors="replace")
        meta = parse_json_strict(text, repr(config_file), CheckpointError)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{config_file!r} is not an adapter config of this library")
        version = check_format_version(meta, repr(config_file))
        raw = read_listed(path, manifest, WEIGHTS_NAME)
    else:
        meta = read_json_strict(config_file)
        version = check_format_version(meta, repr(config_file))
        if version >= 2:
            raise CheckpointError(
                f"{path!r} has no {MANIFEST_NAME}: an incomplete save (interrupted, or copied "
                "in part); save it again"
            )
        if not os.path.isfile(weights):
            raise CheckpointError(f"{path!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        raw = None
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
    except (AdaptersError, TypeError, ValueError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{config_file!r}: field 'config' is invalid: {error}") from None
    loaded = safetensors_from_bytes(raw, repr(weights)) if raw is not None else None
    tensors = checked_tensors(loaded if loaded is not None else load_safetensors(weights), weights)
    if version >= 2:
        tensors = from_portable_keys(model, tensors)
    else:
        tensors = _upgrade_v1(cfg, tensors, weights)
    return ReadAdapter(path, name, cfg, tensors)


def _upgrade_v1(
    config: AdapterConfig, tensors: dict[str, torch.Tensor], source: str = "checkpoint"
) -> dict[str, Any]:
    """Format 1 keys were the plugin's keys on the saving model (its head class); methods whose
    keys changed since map them with ``MethodSpec.upgrade_key``. Two keys that map to one
    (an old and a new spelling of the same tensor) are refused: neither may silently win."""
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
    result: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in tensors.items():
        method, rest = _split_part(key)
        found = upgrades.get(method[:-1] if union else config_parts(config)[0].method)
        if found is not None:
            try:
                rest = found[1](found[0], rest, 1)
            except AdaptersError:
                raise
            except (ValueError, TypeError, KeyError, IndexError) as error:
                raise CheckpointError(
                    f"{source}: key {key!r} cannot be read as a format-1 key of the "
                    f"{found[0].method!r} method: {type(error).__name__}: {error}"
                ) from None
            if not isinstance(rest, str):
                raise CheckpointError(
                    f"{source}: the {found[0].method!r} plugin's upgrade_key turned {key!r} "
                    f"into {rest!r}, not a key"
                )
        new = method + rest
        if new in result:
            raise CheckpointError(
                f"{source}: keys {origin[new]!r} and {key!r} are the same tensor {new!r} (an "
                "old and a new spelling): the file mixes two saves; keep one set of keys"
            )
        result[new], origin[new] = value, key
    return result


def adapter_name_for(path: str, saved_name: str | None, load_as: str | None) -> str:
    """The name an adapter read from ``path`` is loaded under: ``load_as``, else the name the
    checkpoint records, else the folder's name; each must be an allowed adapter name."""
    if load_as is not None:
        return validate_adapter_name(load_as)
    if saved_name is not None:
        problem = name_problem(saved_name)
        if problem is not None:
            raise CheckpointError(
                f"{path!r} records the adapter name {saved_name!r}, which is not an allowed "
                f"adapter name ({problem}); pass load_as='a_name'"
            )
        return saved_name
    name = os.path.basename(os.path.normpath(path))
    if name_problem(name) is not None:
        raise CheckpointError(
            f"the folder name {name!r} of {path!r} is not an allowed adapter name "
            f"({name_problem(name)}); pass load_as='a_name'"
        )
    return name


# ---------------------------------------------------------------------------------------------
# load (all or nothing)
# ---------------------------------------------------------------------------------------------


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
    """See `ModelAdaptersMixin.load_adapter`. Atomic: on any error the model is unchanged
    (an overwritten adapter, its values and the active setup included).
    ``adapter_dtype``: as in ``add_adapter`` (the saved tensors are cast to it)."""
    if kwargs:
        raise TypeError(f"load_adapter got unexpected options {sorted(kwargs)}")
    adapter_dtype = check_adapter_dtype(adapter_dtype)
    path = os.fspath(path)
    if load_as is not None:
        validate_adapter_name(load_as)
    read = read_adapter(model, path, config)
    name = adapter_name_for(path, read.saved_name, load_as)
    if name in model.adapters_config and not overwrite_ok:  # type: ignore[attr-defined]
        raise CheckpointError(
            f"an adapter named {name!r} already exists; pass load_as='other_name' or "
            "overwrite_ok=True"
        )
    with all_or_nothing(model):
        add_read_adapter(model, name, read, overwrite_ok, adapter_dtype)
        if set_active:
            model.set_active_adapters(name)  # type: ignore[operator]
    return name


def add_read_adapter(
    model: nn.Module,
    name: str,
    read: ReadAdapter,
    overwrite_ok: bool = False,
    adapter_dtype: Any = None,
) -> None:
    """Add adapter ``name`` with ``read``'s config and copy its tensors in. Call it inside
    `all_or_nothing` (a failure may leave the adapter half-loaded otherwise)."""
    try:
        model.add_adapter(  # type: ignore[operator]
            name, read.config, overwrite_ok=overwrite_ok, adapter_dtype=adapter_dtype
        )
    except AdaptersError:
        raise
    except PLUGIN_FAILURES as error:  # a config from a file the method's plugin did not expect
        raise CheckpointError(
            f"{read.path!r}: its config {read.config!r} could not be added as adapter {name!r}: "
            f"{type(error).__name__}: {error}"
        ) from error
    load_tensors(model, name, read.tensors, source=read.path)


def load_tensors(
    model: nn.Module, name: str, tensors: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Copy ``tensors`` (the plugins' name-independent keys) into adapter ``name``; every key
    must match in name, shape and kind and hold finite values, else `CheckpointError` and
    nothing is copied."""
    entry = model._entry(name)  # type: ignore[operator]
    expected = entry.state_dict()
    tensors = checked_tensors(tensors, source)
    match_tensors(expected, tensors, source, f"adapter {name!r} ({entry.config.method})")
    copy_tensors(expected, tensors)


def read_all_adapters(model: nn.Module, directory: str) -> list[tuple[str, ReadAdapter]]:
    """Read (not load) every adapter of a folder written by ``save_all_adapters``:
    ``[(name, read adapter)]``. With a manifest (every such save) exactly the adapters it
    lists are read, each checked against it; a sub-folder holding an adapter that it does not
    list is refused (added after the save). Without one, every sub-folder not starting with
    ``.`` is read (folders of format 1)."""
    directory = os.fspath(directory)

    def read() -> list[tuple[str, ReadAdapter]]:
        if not os.path.isdir(directory):
            raise CheckpointError(
                f"{directory!r} is not a directory; load_all_adapters reads a folder written by "
                "save_all_adapters"
            )
        check_links(directory)
        manifest = read_manifest(directory)
        if manifest is None:
            subdirs = sorted(
                e
                for e in os.listdir(directory)
                if not e.startswith(".") and os.path.isdir(os.path.join(directory, e))
            )
        else:
            subdirs = sorted({rel.split("/", 1)[0] for rel in manifest["files"] if "/" in rel})
            required = [f"{sub}/{file}" for sub in subdirs for file in (CONFIG_NAME, WEIGHTS_NAME)]
            # sizes of all, sha256 of each adapter's own manifest (which covers its files)
            verify_manifest(
                directory,
                hash_files=lambda rel: rel.endswith("/" + MANIFEST_NAME),
                required=required,
            )
            _refuse_unlisted_adapters(directory, subdirs)
        found = []
        for sub in subdirs:
            path = safe_join(directory, sub)
            found.append((sub, _read_any(model, path, None)))
        return found

    return read_consistently([directory], read)


def _refuse_unlisted_adapters(directory: str, listed: list[str]) -> None:
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        if (
            entry not in listed
            and not entry.startswith(".")
            and os.path.isfile(os.path.join(path, CONFIG_NAME))
        ):
            raise CheckpointError(
                f"{path!r} holds an adapter that the manifest of {directory!r} does not list: "
                "it was added after the save; remove it, or save all adapters again"
            )


def load_all_adapters(model: nn.Module, directory: str, set_active: bool = False) -> list[str]:
    """See `ModelAdaptersMixin.load_all_adapters`. Every adapter is read and checked first,
    then all are added in one step: on any error the model is unchanged."""
    found = read_all_adapters(model, directory)
    names = []
    for _, read in found:
        name = adapter_name_for(read.path, read.saved_name, None)
        if name in model.adapters_config or name in names:  # type: ignore[attr-defined]
            raise CheckpointError(
                f"an adapter named {name!r} (from {read.path!r}) already exists; delete it "
                "first or load the folders one by one with load_adapter(..., load_as=...)"
            )
        names.append(name)
    with all_or_nothing(model):
        for name, (_, read) in zip(names, found):
            add_read_adapter(model, name, read)
        if set_active and names:
            model.set_active_adapters(names)  # type: ignore[operator]
    return names
