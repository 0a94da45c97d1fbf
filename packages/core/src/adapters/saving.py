"""Saving and loading adapters.

This library's format (``format_version`` 2) is a directory per adapter:

- ``adapter_config.json``: ``{"format": "adapters", "format_version": 2, "name", "method",
  "config", "interface", "versions"}``
- ``adapter_model.safetensors``: the adapter's tensors under *portable* keys: the keys the
  method's plugin gives (module paths such as ``model.layers.0.self_attn.q_proj.lora_A``) made
  relative to the base model the interface describes (``layers.0.self_attn.q_proj.lora_A``),
  so that an adapter saved on ``LlamaForCausalLM`` loads on ``LlamaModel`` and back. Keys of
  modules outside the base model (a head) keep their full path behind ``top:``.
- ``adapters_manifest.json``: the name, size and sha256 of every file of the save. A folder
  whose files do not match it (a mix of two saves, a file changed by hand) is refused.

Every save is atomic as a set: the files are written into a sibling temporary folder that then
replaces the target with ``rename`` (the old folder is removed afterwards; files in it that no
save of ours wrote, such as a README, are carried over). Concurrent saves into one folder end
with one complete save. Loading never unpickles and never runs code from a checkpoint.

Version 1 checkpoints (adapters 0.1: keys from the top-level model, no manifest) still load;
newer format versions are refused with the upgrade to install. Foreign formats (PEFT,
AdapterHub) are read and written by `CheckpointFormat`s that plugins register;
``load_adapter`` picks the right one by inspecting the directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .composition import setup_from_dict, setup_to_dict
from .configs import (
    AdapterConfig,
    check_config_values,
    config_parts,
    load_json_strict,
    resolve_config,
)
from .errors import AdaptersError, CheckpointError, CompositionError, MethodNotInstalledError
from .interface import INTERFACE_FILENAME
from .naming import name_problem, safe_join, validate_adapter_name
from .plugins import get_registry
from .precision import check_adapter_dtype

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MANIFEST_NAME = "adapters_manifest.json"
FORMAT = "adapters"
#: The checkpoint format this version writes; it reads every version up to this one.
FORMAT_VERSION = 2
SETUP_NAME = "adapter_setup.json"
ADAPTERS_SUBDIR = "adapters"
#: Marks a portable key of a module outside the base model (kept relative to the top level).
TOP_PREFIX = "top:"
# Names our saves write; an old folder's files of these names are never carried over.
_OURS = {
    CONFIG_NAME,
    WEIGHTS_NAME,
    MANIFEST_NAME,
    SETUP_NAME,
    INTERFACE_FILENAME,
    ADAPTERS_SUBDIR,
    "adapter_fusions",  # adapters.fusion.FUSIONS_SUBDIR
}


# ---------------------------------------------------------------------------------------------
# format versions
# ---------------------------------------------------------------------------------------------


def check_format_version(meta: Mapping[str, Any], source: str) -> int:
    """The major ``format_version`` of a file of ours (1 when absent); a newer major than this
    library reads raises `CheckpointError` naming the version and the upgrade."""
    raw = meta.get("format_version", 1)
    major: Any = raw
    if isinstance(raw, str):
        head = raw.split(".", 1)[0]
        major = int(head) if head.isdigit() else None
    if not isinstance(major, int) or isinstance(major, bool) or major < 1:
        raise CheckpointError(
            f"{source}: field 'format_version' is {raw!r}; expected a positive integer"
        )
    if major > FORMAT_VERSION:
        raise CheckpointError(
            f"{source} was saved in checkpoint format version {raw} by a newer adapters-core "
            f"({_saved_core_version(meta)}); this adapters-core "
            f"({_dist_version('adapters-core') or 'unknown'}) reads versions up to "
            f"{FORMAT_VERSION}. Upgrade: pip install -U adapters-core"
        )
    return major


def _saved_core_version(meta: Mapping[str, Any]) -> str:
    versions = meta.get("versions")
    if isinstance(versions, Mapping) and versions.get("adapters-core"):
        return f"version {versions['adapters-core']}"
    return "unknown version"


# ---------------------------------------------------------------------------------------------
# portable keys
# ---------------------------------------------------------------------------------------------


def base_model_prefix(model: nn.Module) -> str:
    """The path of the base model inside ``model`` followed by ``.`` (``"model."`` for
    ``LlamaForCausalLM``), or ``""`` when ``model`` is the base model (``LlamaModel``)."""
    path = model.adapter_sites.base_model.path  # type: ignore[attr-defined]
    return f"{path}." if path else ""


def _split_part(key: str) -> tuple[str, str]:
    # keys of a ConfigUnion's parts start with "<method>/"; module paths never contain "/"
    head, sep, rest = key.partition("/")
    return (head + sep, rest) if sep and not head.startswith(TOP_PREFIX) else ("", key)


def to_portable_keys(model: nn.Module, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Plugin keys (paths from the top-level model) → portable keys (relative to the base
    model; ``top:`` + the full path for anything outside it)."""
    prefix = base_model_prefix(model)
    result = {}
    for key, value in tensors.items():
        part, rest = _split_part(key)
        if prefix:
            rest = rest[len(prefix) :] if rest.startswith(prefix) else TOP_PREFIX + rest
        result[part + rest] = value
    return result


def from_portable_keys(model: nn.Module, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `to_portable_keys` for ``model`` (which may have another head class)."""
    prefix = base_model_prefix(model)
    result = {}
    for key, value in tensors.items():
        part, rest = _split_part(key)
        rest = rest[len(TOP_PREFIX) :] if rest.startswith(TOP_PREFIX) else prefix + rest
        result[part + rest] = value
    return result


# ---------------------------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_under(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), folder)
            found.append(rel.replace(os.sep, "/"))
    return found


def write_manifest(folder: str) -> dict[str, Any]:
    """Write ``adapters_manifest.json`` listing every file under ``folder`` (relative path,
    size, sha256) and return it. Called on the temporary folder of a save, last."""
    files = {}
    for rel in _files_under(folder):
        if rel == MANIFEST_NAME:
            continue
        full = os.path.join(folder, *rel.split("/"))
        files[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "save_id": uuid.uuid4().hex,
        "files": files,
    }
    with open(os.path.join(folder, MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def read_manifest(folder: str) -> dict[str, Any] | None:
    """The manifest of ``folder`` (None if it has none); malformed ones raise."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    data = load_json_strict(path, error=CheckpointError)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) for v in files.values()
    ):
        raise CheckpointError(f"{path!r}: field 'files' is missing or malformed")
    check_format_version(data, repr(path))
    return data


def verify_manifest(
    folder: str,
    hash_files: Callable[[str], bool] = lambda rel: True,
    optional: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Check that every file the manifest of ``folder`` lists is there with its size (and
    sha256, for files ``hash_files`` selects); `CheckpointError` otherwise, naming the file.
    Files in ``optional`` may be missing (not replaced)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise CheckpointError(
            f"{folder!r} has no {MANIFEST_NAME}: an incomplete save (interrupted, or copied "
            "in part); save it again"
        )
    for rel, info in manifest["files"].items():
        if name_problem_of_path(rel):
            raise CheckpointError(f"{folder!r}: the manifest lists the unsafe path {rel!r}")
        full = os.path.join(folder, *rel.split("/"))
        if rel in optional and not os.path.lexists(full):
            continue
        if not os.path.isfile(full):
            raise CheckpointError(
                f"{folder!r} lacks {rel!r}, which its manifest lists: an incomplete save"
            )
        if os.path.getsize(full) != info["size"] or (
            hash_files(rel) and _sha256(full) != info.get("sha256")
        ):
            raise CheckpointError(
                f"{full!r} is not the file saved with the rest of {folder!r} (size or sha256 "
                "differ from the manifest): the folder mixes files of different saves; save "
                "it again"
            )
    return manifest


def name_problem_of_path(rel: str) -> bool:
    """Whether a manifest path could point outside its folder."""
    return rel.startswith("/") or "\\" in rel or ".." in rel.split("/") or ":" in rel


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------


def write_directory_atomically(
    target: str, write: Callable[[str], Any], manifest: bool = False
) -> None:
    """Call ``write(tmp_dir)``, add a manifest if asked (``manifest=True``: this library's own
    formats; `verify_manifest` checks it on load), and make ``tmp_dir`` the folder ``target``.

    The new set of files appears whole or not at all: ``tmp_dir`` is a sibling of ``target``
    and replaces it by ``rename`` (an existing ``target`` is renamed away first and removed
    afterwards). Files of an existing ``target`` that no save of ours wrote (a README, a
    trainer's state) are carried over. Concurrent calls for one ``target`` end with one
    complete save (the last). If ``write`` fails, ``target`` is left as it was.

    Fusion and other multi-file saves of plugins use this too.
    """
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    if os.path.islink(target) or os.path.isfile(target):
        raise CheckpointError(f"{target!r} exists and is not a directory; choose another path")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        write(tmp)
        if manifest:
            write_manifest(tmp)
        _carry_over(target, tmp)
        _swap(tmp, target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _carry_over(target: str, tmp: str) -> None:
    """Link (or copy) into ``tmp`` the entries of ``target`` that no save of ours wrote."""
    try:
        entries = os.listdir(target)
        old = read_manifest(target)
    except (FileNotFoundError, NotADirectoryError, CheckpointError):
        return
    ours = set(_OURS)
    if old is not None:
        ours |= {rel.split("/", 1)[0] for rel in old["files"]}
    for name in entries:
        if name in ours or os.path.lexists(os.path.join(tmp, name)) or name.startswith("."):
            continue
        source, dest = os.path.join(target, name), os.path.join(tmp, name)
        try:
            if os.path.isdir(source) and not os.path.islink(source):
                shutil.copytree(source, dest, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(source, dest)
        except FileNotFoundError:  # a concurrent save swapped the folder away
            continue


def _link_or_copy(source: str, dest: str) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), dest)
        return
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _swap(tmp: str, target: str) -> None:
    parent, base = os.path.dirname(target), os.path.basename(target)
    backups = []
    try:
        for _ in range(1000):
            if os.path.lexists(target):
                backup = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:12]}")
                try:
                    os.rename(target, backup)
                except FileNotFoundError:
                    continue  # another save moved it away first
                backups.append(backup)
            try:
                os.rename(tmp, target)
                return
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) and not os.path.lexists(
                    target
                ):
                    if backups:  # put the previous folder back
                        os.rename(backups.pop(), target)
                    raise
                # another save put its folder there in between: move it away and retry
        raise CheckpointError(f"could not replace {target!r}: too many concurrent saves")
    finally:
        for backup in backups:
            shutil.rmtree(backup, ignore_errors=True)


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


def writer_for(format: str, method: str, attr: str, what: str, own: str = FORMAT) -> Any:
    """The registered `CheckpointFormat` called ``format`` (or with that alias) that serves
    ``method`` and has a writer ``attr`` (``"write"`` or ``"write_fusion"``); otherwise
    `CheckpointError` naming the formats that can write ``what`` (``own``: this library's)."""
    registry = get_registry()
    fmt = registry.format_for(format, method)
    if fmt is not None and getattr(fmt, attr) is not None:
        return fmt
    writable = {
        n for f in registry.formats if f.serves(method) and getattr(f, attr) for n in f.names()
    }
    reason = ""
    if fmt is not None:
        reason = ": it is read-only"
    else:
        served = sorted({m for f in registry.formats if format in f.names() for m in f.methods})
        if served:
            reason = f": it serves the methods {served} and this is a {method!r} adapter"
    raise CheckpointError(
        f"cannot write format {format!r} for {what}{reason}; formats that can: "
        f"{[*sorted(writable), own]}"
    )


def check_write_options(fmt: Any, format: str, options: Mapping[str, Any]) -> None:
    """Refuse options ``fmt`` (a `CheckpointFormat`) does not declare in ``write_options``."""
    unknown = sorted(set(options) - set(fmt.write_options))
    if unknown:
        accepted = list(fmt.write_options) or "none"
        raise CheckpointError(
            f"format {format!r} (plugin {fmt.plugin!r}) does not take the option(s) {unknown}; "
            f"its options: {accepted}"
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


def read_json_object(path: str) -> dict[str, Any] | None:
    """The JSON object in file ``path``, or None when the file is missing, unreadable, not an
    object, or holds duplicate keys or non-finite numbers. Meant for a `CheckpointFormat`'s
    ``detect``, which must never raise (a reader then calls `read_json_strict` for the
    error)."""
    if not os.path.isfile(path):
        return None
    try:
        data = load_json_strict(path, error=CheckpointError)
    except CheckpointError:
        return None
    return data if isinstance(data, dict) else None


def recorded_name(path: str, key: str = "name") -> str | None:
    """The string field ``key`` of the JSON object in file ``path``, or None (missing file or
    field, not a string, unreadable): for a `CheckpointFormat`'s ``saved_name``."""
    data = read_json_object(path)
    value = data.get(key) if data is not None else None
    return value if isinstance(value, str) else None


def _saved_name(fmt: Any, path: str) -> str | None:
    """The name ``fmt`` says the directory records, or None (a failing plugin is ignored)."""
    if fmt.saved_name is None:
        return None
    try:
        name = fmt.saved_name(path)
    except Exception:  # optional information: a broken plugin must not break loading
        return None
    return name if isinstance(name, str) else None


def read_json_strict(path: str) -> dict[str, Any]:
    """The JSON object in file ``path``; a missing or malformed file, duplicate keys or
    non-finite numbers raise `CheckpointError` naming the file and key."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r} does not exist")
    data = load_json_strict(path, error=CheckpointError)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path!r} does not hold a JSON object")
    return data


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
    """The JSON object in file ``path`` or None if there is no such file; malformed JSON,
    duplicate keys and non-finite numbers raise `CheckpointError` naming the file."""
    if not os.path.isfile(path):
        return None
    return read_json_strict(path)


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


# ---------------------------------------------------------------------------------------------
# whole model
# ---------------------------------------------------------------------------------------------


def _adapter_key_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = []
    for name in model.adapters_config:  # type: ignore[attr-defined]
        for module in model._entry(name).modules.values():  # type: ignore[operator]
            prefixes.append(names[id(module)] + ".")
    for name in model.adapter_fusions:  # type: ignore[attr-defined]
        for module in model.get_adapter_fusion(name).values():  # type: ignore[operator]
            prefixes.append(names[id(module)] + ".")
    return tuple(prefixes)


def base_state_dict(model: nn.Module, state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model's ``state_dict`` (or ``state``, a state dict given by a caller such as
    transformers' ``Trainer``) without adapter tensors: the base model's own keys."""
    prefixes = _adapter_key_prefixes(model)
    state = model.state_dict() if state is None else state
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def save_pretrained(
    model: nn.Module,
    save_directory: str,
    parent_save: Any,
    *args: Any,
    write_extra: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> None:
    """See `adapters.api.ModelAdaptersMixin.save_pretrained`; ``parent_save`` is the model
    class's own ``save_pretrained`` (None for a plain ``nn.Module``); ``write_extra(folder)``
    adds more files (fusion layers) to the same atomic save."""
    merged = [n for n in model.adapters_config if model.is_merged(n)]  # type: ignore[attr-defined]
    if merged:
        raise CheckpointError(
            f"adapters {merged} are merged into the base weights; call reset_adapter() to save "
            "base and adapters separately, or merge_and_unload() to save a plain merged model"
        )
    # transformers' Trainer passes state_dict=None: None means "not given" (pitfall 33), and a
    # state dict that is given (FSDP, DeepSpeed) loses its adapter tensors too.
    state = base_state_dict(model, kwargs.pop("state_dict", None))
    if parent_save is None and (args or kwargs):
        raise TypeError("save_pretrained of a plain nn.Module takes only the directory")
    names = list(model.adapters_config)  # type: ignore[attr-defined]
    setup = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "active": setup_to_dict(model.active_adapters),  # type: ignore[attr-defined]
        "adapters": names,
    }

    def write(tmp: str) -> None:
        if parent_save is not None:
            parent_save(tmp, *args, state_dict=state, **kwargs)
        else:
            save_file(_cpu_tensors(state), os.path.join(tmp, "model.safetensors"))
        model.adapter_interface.save(tmp)  # type: ignore[attr-defined]
        adapters_dir = os.path.join(tmp, ADAPTERS_SUBDIR)
        for name in names:
            write_adapter_files(model, safe_join(adapters_dir, name), name)
        if write_extra is not None:
            write_extra(tmp)
        with open(os.path.join(tmp, SETUP_NAME), "w", encoding="utf-8") as f:
            json.dump(setup, f, indent=2)

    write_directory_atomically(save_directory, write, manifest=True)


def _our_file(rel: str) -> bool:
    return rel in (INTERFACE_FILENAME, SETUP_NAME) or rel.startswith(
        (ADAPTERS_SUBDIR + "/", "adapter_fusions/")
    )


def read_saved_model_folder(
    path: str, interface_given: bool = False
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Check a folder written by ``save_pretrained`` before anything is loaded from it: its
    setup file and manifest (a half-written or mixed folder is refused), the format version,
    and the adapter names (never a path leaving ``path``). Returns the setup and
    ``[(name, adapter folder)]``. With ``interface_given`` (``load_model(...,
    interface=...)``) the saved interface file may be missing."""
    setup_path = os.path.join(path, SETUP_NAME)
    if not os.path.isfile(setup_path):
        raise CheckpointError(
            f"{path!r} has {INTERFACE_FILENAME} but no {SETUP_NAME}: an incomplete save "
            "(save_pretrained did not finish); save the model again"
        )
    setup = read_json_strict(setup_path)
    version = check_format_version(setup, repr(setup_path))
    if version >= 2:
        # base weights are checked by size (they can be large), our files by sha256
        optional = frozenset({INTERFACE_FILENAME}) if interface_given else frozenset()
        verify_manifest(path, hash_files=_our_file, optional=optional)
    names = setup.get("adapters", [])
    if not isinstance(names, list):
        raise CheckpointError(f"{setup_path!r}: field 'adapters' is not a list")
    adapters_dir = os.path.join(path, ADAPTERS_SUBDIR)
    folders = []
    for name in names:
        problem = name_problem(name)
        if problem is not None:
            raise CheckpointError(
                f"{setup_path!r}: field 'adapters' lists {name!r}, which is not an allowed "
                f"adapter name ({problem}); adapters are only read from {adapters_dir!r}"
            )
        folders.append((name, safe_join(adapters_dir, name)))
    return setup, folders


def active_setup_of(setup: Mapping[str, Any], source: str) -> Any:
    """The active setup recorded in ``adapter_setup.json``."""
    try:
        return setup_from_dict(setup.get("active"))
    except (CompositionError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{source}: field 'active' is invalid: {error}") from None


#: Config fields that do not change an adapter's parameters: adapters differing only in these
#: can be averaged linearly (AdapterHub ignores the same two).
AVERAGE_IGNORED_FIELDS = ("dropout", "init_weights")


def configs_equal_for_average(configs: list[AdapterConfig]) -> bool:
    """Whether adapters with these configs have identical parameter layouts: equal configs
    except for `AVERAGE_IGNORED_FIELDS` (dropout and initialisation)."""

    def key(config: AdapterConfig) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in part.to_dict().items() if k not in AVERAGE_IGNORED_FIELDS}
            for part in config_parts(config)
        ]

    first = key(configs[0])
    return all(key(other) == first for other in configs[1:])
