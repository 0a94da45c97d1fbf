"""Fusion layers (AdapterFusion): add, delete, train, save and load them.

Core keeps the fusion layers' bookkeeping (names, children, config, parameters, freezing, the
save format, rollback); the method that declares `adapters.Fuse` in its
``MethodSpec.compositions`` and owns every fused adapter builds the layers
(``adapters_add_fusion``) and evaluates ``Fuse`` blocks at forward time (a handler passed to
`adapters.composition.apply_setup`).

Saved format, a directory per fusion layer:

- ``fusion_config.json``: ``{"format": "adapters-fusion", "format_version": 1, "name",
  "adapter_names", "method", "config", "interface", "versions"}``
- ``fusion_model.safetensors``: the layer's tensors under name-independent keys.
- ``adapters_manifest.json``: size and sha256 of both (format version 2; version 1 folders
  have none and still load).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint.adapter import _cpu_tensors
from ..checkpoint.atomic import read_consistently
from ..checkpoint.foreign import call_format, check_write_options, claims_of, writer_for
from ..checkpoint.format import FUSIONS_SUBDIR, MANIFEST_NAME
from ..checkpoint.format import _versions as versions_of
from ..checkpoint.manifest import (
    check_links,
    read_listed,
    read_manifest,
    write_directory_atomically,
)
from ..checkpoint.readers import (
    checked_tensors,
    copy_tensors,
    load_safetensors,
    match_tensors,
    read_json_object,
    safetensors_from_bytes,
)
from ..composition import AdapterCompositionBlock, Fuse, find_blocks, parse_composition
from ..configs import config_parts, parse_json_strict
from ..errors import AdapterNotFoundError, CheckpointError, CompositionError, ConfigError
from ..fusion_config import AdapterFusionConfig, resolve_fusion_config
from ..registry.loading import get_registry
from . import rollback
from .naming import validate_adapter_name
from .state import AdaptersState, FusionEntry, get_state
from .transaction import all_or_nothing

FUSION_CONFIG_NAME = "fusion_config.json"
FUSION_WEIGHTS_NAME = "fusion_model.safetensors"
FUSION_FORMAT = "adapters-fusion"
#: 2: the folder has a manifest (``adapters_manifest.json``); 1 (no manifest) still loads.
FUSION_FORMAT_VERSION = 2

FuseLike = Fuse | Sequence[str] | str


def fusion_name(adapter_names: FuseLike) -> str:
    """The name of the fusion layer ``adapter_names`` designates: a `Fuse` block's ``name``, a
    list's names joined by commas (AdapterHub's default), or a string as it is."""
    if isinstance(adapter_names, Fuse):
        return adapter_names.name
    if isinstance(adapter_names, str):
        return adapter_names
    if isinstance(adapter_names, Sequence) and all(isinstance(n, str) for n in adapter_names):
        return ",".join(adapter_names)
    raise CompositionError(
        f"a fusion is designated by a Fuse block, a list of adapter names or its name; got "
        f"{adapter_names!r}"
    )


def fusion_entry(model: nn.Module, adapter_names: FuseLike) -> FusionEntry:
    """The fusion layer ``adapter_names`` designates, or `AdapterNotFoundError`."""
    state = get_state(model)
    name = fusion_name(adapter_names)
    entry = state.fusions.get(name)
    if entry is None:
        known = ", ".join(state.fusions) or "(none)"
        raise AdapterNotFoundError(
            f"no adapter fusion named {name!r}; added fusions: {known}. Add it with "
            f"model.add_adapter_fusion(Fuse({', '.join(repr(c) for c in name.split(','))}))"
        )
    return entry


def fuse_children(block: Fuse) -> tuple[str, ...]:
    """The adapter names a `Fuse` block fuses (a nested block counts as its last adapter)."""
    return tuple(c if isinstance(c, str) else c.flatten()[-1] for c in block.children)


def validate_fuse_blocks(state: AdaptersState, setup: AdapterCompositionBlock) -> None:
    """Every `Fuse` in ``setup`` must name an added fusion layer over the same adapters."""
    for block in find_blocks(setup, Fuse):
        children = fuse_children(block)
        entry = state.fusions.get(block.name)
        if entry is None:
            known = ", ".join(state.fusions) or "(none)"
            raise CompositionError(
                f"{block!r} needs the fusion layer {block.name!r}, which is not added (added "
                f"fusions: {known}); add it with model.add_adapter_fusion({block!r})"
            )
        if entry.children != children:
            raise CompositionError(
                f"{block!r} fuses {list(children)} but fusion layer {block.name!r} was added for "
                f"{list(entry.children)}; use Fuse({', '.join(map(repr, entry.children))}"
                f"{', name=' + repr(block.name) if block._name else ''})"
            )


def _children_of(adapter_names: FuseLike) -> tuple[tuple[str, ...], str | None]:
    """(children, default name) of what ``add_adapter_fusion`` was given."""
    if isinstance(adapter_names, Fuse):
        bad = [c for c in adapter_names.children if not isinstance(c, str)]
        if bad:
            raise CompositionError(
                f"add_adapter_fusion fuses adapters, not blocks; got {bad[0]!r} in "
                f"{adapter_names!r}"
            )
        return tuple(adapter_names.children), adapter_names.name  # type: ignore[arg-type]
    if isinstance(adapter_names, str):
        return tuple(n.strip() for n in adapter_names.split(",")), None
    if isinstance(adapter_names, Sequence) and all(isinstance(n, str) for n in adapter_names):
        return tuple(adapter_names), None
    raise CompositionError(
        f"add_adapter_fusion takes a Fuse block, a list of adapter names or 'a,b'; got "
        f"{adapter_names!r}"
    )


def _owner(state: AdaptersState, children: tuple[str, ...]) -> str:
    """The one method that declares `Fuse` and owns every child."""
    registry = get_registry()
    owners: set[str] | None = None
    described = []
    for child in children:
        methods = [registry.method_of(part) for part in config_parts(state.adapters[child].config)]
        described.append(f"{child!r} ({', '.join(s.name for s in methods)})")
        fusing = {spec.name for spec in methods if Fuse in spec.compositions}
        owners = fusing if owners is None else owners & fusing
    if not owners or len(owners) > 1:
        reason = "no method" if not owners else f"several methods ({sorted(owners)})"
        raise CompositionError(
            f"cannot fuse {', '.join(described)}: {reason} declares Fuse and owns all of them; "
            "fuse adapters of one method that supports Fuse (e.g. bottleneck adapters)"
        )
    return next(iter(owners))


def add_adapter_fusion(
    model: nn.Module,
    adapter_names: FuseLike,
    config: Any = None,
    name: str | None = None,
    overwrite_ok: bool = False,
    set_active: bool = False,
) -> str:
    """See `ModelAdaptersMixin.add_adapter_fusion`. Atomic: on error the model is unchanged."""
    state = get_state(model)
    children, default_name = _children_of(adapter_names)
    name = name if name is not None else default_name or ",".join(children)
    validate_adapter_name(name, kind="fusion")
    if len(set(children)) != len(children) or not children:
        raise CompositionError(f"a fusion needs distinct adapters; got {list(children)}")
    for child in children:
        model._entry(child)  # type: ignore[operator]  # AdapterNotFoundError names it
    config = resolve_fusion_config(config)
    method = _owner(state, children)
    if name in state.fusions and not overwrite_ok:
        raise ConfigError(
            f"an adapter fusion named {name!r} already exists; pass overwrite_ok=True to replace "
            "it or name=... to add another"
        )
    registry = get_registry()
    old = state.fusions.get(name)
    old_active = state.active_setup
    try:
        with rollback.operation(model) as log:
            if old is not None:
                delete_adapter_fusion(model, name)
            modules = registry.call_owner(
                "adapters_add_fusion",
                method,
                model=model,
                sites=state.sites,
                name=name,
                children=list(children),
                config=config,
                method=method,
            )
            if modules is None:
                raise ConfigError(
                    f"the {method!r} plugin declares Fuse but created no fusion layer for {name!r} "
                    "(its adapters_add_fusion hook returned None)"
                )
            entry = FusionEntry(name, children, config, method, dict(modules))
            inside = {id(m) for m in model.modules()}
            for key, module in entry.modules.items():
                if id(module) not in inside:
                    raise ConfigError(
                        f"plugin returned module {key!r} for fusion {name!r} that is not a "
                        "submodule of the model; register it (e.g. in a ModuleDict on the site)"
                    )
            for module in model.modules():
                if id(module) not in log.modules_before:
                    module.training = model.training
            state.fusions[name] = entry
    except BaseException:
        state.fusions.pop(name, None)
        if old is not None:
            state.fusions[name] = old
            state.active_setup = old_active
        raise
    if set_active:
        model.set_active_adapters(  # type: ignore[operator]
            Fuse(*children, name=None if name == ",".join(children) else name)
        )
    return name


def delete_adapter_fusion(model: nn.Module, adapter_names: FuseLike) -> None:
    """See `ModelAdaptersMixin.delete_adapter_fusion`."""
    state = get_state(model)
    entry = fusion_entry(model, adapter_names)
    get_registry().call_owner(
        "adapters_delete_fusion",
        entry.method,
        model=model,
        sites=state.sites,
        name=entry.name,
        children=list(entry.children),
        method=entry.method,
    )
    del state.fusions[entry.name]
    if any(block.name == entry.name for block in find_blocks(state.active_setup, Fuse)):
        model._set_setup(None)  # type: ignore[operator]


def fusion_regularization_loss(model: nn.Module) -> Any:
    """See `ModelAdaptersMixin.get_fusion_regularization_loss`."""
    state = get_state(model)
    registry = get_registry()
    total = None
    for entry in state.fusions.values():
        if not entry.config.regularization or not any(p.requires_grad for p in entry.parameters()):
            continue
        loss = _regularization(entry)
        if loss is None:  # a contract-1.0 plugin computes it in the (retired) hook
            loss = registry.call_owner(
                "adapters_fusion_regularization_loss",
                entry.method,
                model=model,
                sites=state.sites,
                name=entry.name,
                children=list(entry.children),
                config=entry.config,
                method=entry.method,
            )
        if loss is not None:
            total = loss if total is None else total + loss
    return total


def fusion_setup(model: nn.Module, adapter_setup: Any) -> AdapterCompositionBlock:
    """What ``train_adapter_fusion`` trains: a setup with at least one `Fuse`. A list of names
    is their fusion (``["a", "b"]`` → ``Fuse("a", "b")``) and a string a fusion's name."""
    state = get_state(model)
    if isinstance(adapter_setup, str) and adapter_setup in state.fusions:
        entry = state.fusions[adapter_setup]
        default = ",".join(entry.children) == entry.name
        setup = Fuse(*entry.children, name=None if default else entry.name)
    elif isinstance(adapter_setup, list | tuple) and all(isinstance(n, str) for n in adapter_setup):
        setup = Fuse(*adapter_setup)
    else:
        setup = parse_composition(adapter_setup)
    if setup is None or not find_blocks(setup, Fuse):
        raise CompositionError(
            f"train_adapter_fusion needs a setup with a Fuse block, e.g. Fuse('a', 'b'); got "
            f"{adapter_setup!r}"
        )
    return setup


def fusion_parameters(state: AdaptersState, setup: AdapterCompositionBlock | None) -> list:
    """The parameters of the fusion layers the `Fuse` blocks of ``setup`` use."""
    params = []
    for block in find_blocks(setup, Fuse):
        entry = state.fusions.get(block.name)
        if entry is not None:
            params.extend(entry.parameters())
    return params


def save_adapter_fusion(
    model: nn.Module,
    save_directory: str,
    adapter_names: FuseLike,
    format: str | None = None,
    **options: Any,
) -> None:
    """See `ModelAdaptersMixin.save_adapter_fusion`."""
    if options and format in (None, FUSION_FORMAT):
        raise TypeError(f"save_adapter_fusion got unexpected options {sorted(options)}")
    entry = fusion_entry(model, adapter_names)
    tensors = _cpu_tensors(entry.state_dict(), f"fusion {entry.name!r}")
    if format not in (None, FUSION_FORMAT):
        fmt = writer_for(
            format, entry.method, "write_fusion", f"fusion {entry.name!r}", own=FUSION_FORMAT
        )
        check_write_options(fmt, format, options)

        def write_foreign(tmp: str) -> None:
            call_format(
                fmt,
                "write_fusion",
                tmp,
                model=model,
                sites=model.adapter_sites,  # type: ignore[attr-defined]
                name=entry.name,
                children=list(entry.children),
                config=entry.config,
                state_dict=tensors,
                **options,
            )

        write_directory_atomically(save_directory, write_foreign)
        return
    meta = {
        "format": FUSION_FORMAT,
        "format_version": FUSION_FORMAT_VERSION,
        "name": entry.name,
        "adapter_names": list(entry.children),
        "method": entry.method,
        "config": entry.config.to_dict(),
        "interface": model.adapter_interface.to_dict(),  # type: ignore[attr-defined]
        "versions": versions_of([entry.method]),
    }

    def write(tmp: str) -> None:
        with open(os.path.join(tmp, FUSION_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        save_file(tensors, os.path.join(tmp, FUSION_WEIGHTS_NAME), metadata={"format": "pt"})

    write_directory_atomically(save_directory, write, manifest=True)


@dataclass
class ReadFusion:
    """A fusion checkpoint read and checked, not yet loaded."""

    path: str
    saved_name: str | None
    children: list[str]
    config: AdapterFusionConfig
    tensors: dict[str, torch.Tensor]


def read_fusion_checkpoint(
    model: nn.Module, path: str
) -> tuple[str | None, list[str], AdapterFusionConfig, dict[str, Any]]:
    """(saved name or None, fused adapter names, config, tensors under name-independent keys)
    of a fusion directory in this library's format, or in a foreign one whose
    `CheckpointFormat` reads fusion layers (``detect_fusion`` / ``read_fusion``). Nothing in
    ``model`` changes; a save replacing the folder meanwhile makes it read again."""
    read = read_fusion(model, os.fspath(path))
    return read.saved_name, read.children, read.config, read.tensors


def read_fusion(model: nn.Module, path: str) -> ReadFusion:
    """`read_fusion_checkpoint` as a `ReadFusion`."""

    def read() -> ReadFusion:
        if not os.path.isdir(path):
            raise CheckpointError(f"{path!r} is not a directory; load_adapter_fusion reads one")
        check_links(path)
        return read_fusion_once(model, path)

    return read_consistently([path], read)


def read_fusion_once(model: nn.Module, path: str) -> ReadFusion:
    """One read of fusion folder ``path`` (see `read_fusion`; the caller handles links and
    concurrent saves)."""
    meta = read_json_object(os.path.join(path, FUSION_CONFIG_NAME))
    if meta is None or meta.get("format") != FUSION_FORMAT:
        return _read_foreign_fusion(model, path)
    config_file = os.path.join(path, FUSION_CONFIG_NAME)
    weights = os.path.join(path, FUSION_WEIGHTS_NAME)
    manifest = read_manifest(path)
    raw = None
    if manifest is not None:
        text = read_listed(path, manifest, FUSION_CONFIG_NAME).decode("utf-8", errors="replace")
        meta = parse_json_strict(text, repr(config_file), CheckpointError)
        if not isinstance(meta, dict) or meta.get("format") != FUSION_FORMAT:
            raise CheckpointError(f"{config_file!r} is not a fusion config of this library")
        raw = read_listed(path, manifest, FUSION_WEIGHTS_NAME)
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{config_file!r}: field 'format_version' is {version!r}; expected a positive integer"
        )
    if version > FUSION_FORMAT_VERSION:
        raise CheckpointError(
            f"{path!r} has fusion format version {version!r}; this adapters-core reads up to "
            f"{FUSION_FORMAT_VERSION}: upgrade adapters-core (pip install -U adapters-core)"
        )
    if manifest is None and version >= 2:
        raise CheckpointError(
            f"{path!r} has no {MANIFEST_NAME}: an incomplete save (interrupted, or copied in "
            "part); save the fusion again"
        )
    children = meta.get("adapter_names")
    if not isinstance(children, list) or not all(isinstance(c, str) for c in children):
        raise CheckpointError(f"{path!r}: 'adapter_names' must be a list of adapter names")
    name = meta.get("name")
    if name is not None and not isinstance(name, str):
        raise CheckpointError(f"{config_file!r}: field 'name' is {name!r}, not a string")
    config = _fusion_config(meta.get("config") or {}, config_file)
    if raw is None and not os.path.isfile(weights):
        raise CheckpointError(f"{path!r} has {FUSION_CONFIG_NAME} but no {FUSION_WEIGHTS_NAME}")
    loaded = safetensors_from_bytes(raw, repr(weights)) if raw is not None else None
    tensors = checked_tensors(loaded if loaded is not None else load_safetensors(weights), weights)
    return ReadFusion(path, name, children, config, tensors)


def _fusion_config(data: Any, source: str, names: bool = False) -> AdapterFusionConfig:
    """The fusion config a checkpoint holds (a dict; from a plugin's reader also a config
    object or a preset name when ``names``); anything else is `CheckpointError`."""
    if isinstance(data, AdapterFusionConfig):
        return data
    if not isinstance(data, Mapping) and not (names and isinstance(data, str)):
        raise CheckpointError(f"{source}: field 'config' is {data!r}, not an object")
    try:
        return resolve_fusion_config(data if isinstance(data, str) else dict(data))
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{source}: field 'config' is invalid: {error}") from None


def _read_foreign_fusion(model: nn.Module, path: str) -> ReadFusion:
    registry = get_registry()
    readers = [f for f in registry.formats if f.read_fusion is not None]
    claims, _ = claims_of(readers, "detect_fusion", path, stacklevel=6)
    if len(claims) > 1:
        names = ", ".join(f"{f.name!r} ({f.plugin})" for f in claims)
        raise CheckpointError(f"{path!r} is claimed by several fusion formats: {names}")
    if not claims:
        raise CheckpointError(
            f"{path!r} is not an adapter fusion saved by save_adapter_fusion (expected "
            f"{FUSION_CONFIG_NAME} with format {FUSION_FORMAT!r} and {FUSION_WEIGHTS_NAME}) "
            "nor one an installed plugin's checkpoint format reads"
        )
    fmt = claims[0]
    result = call_format(
        fmt,
        "read_fusion",
        path,
        model=model,
        sites=model.adapter_sites,  # type: ignore[attr-defined]
    )
    if not isinstance(result, tuple) or len(result) != 4:
        raise CheckpointError(
            f"{path!r}: read_fusion() of format {fmt.name!r} (plugin {fmt.plugin!r}) returned "
            f"{type(result).__name__}, not (name, adapter names, config, state_dict)"
        )
    name, children, config, tensors = result
    if name is not None and not isinstance(name, str):
        raise CheckpointError(f"{path!r}: the fusion name {name!r} is not a string")
    if isinstance(children, str) or not all(isinstance(c, str) for c in children):
        raise CheckpointError(f"{path!r}: the fused adapters {children!r} are not a list of names")
    return ReadFusion(
        path,
        name,
        list(children),
        _fusion_config(config, path, names=True),
        checked_tensors(tensors, path),
    )


def load_adapter_fusion(
    model: nn.Module,
    path: str,
    load_as: str | None = None,
    set_active: bool = False,
    overwrite_ok: bool = False,
) -> str:
    """See `ModelAdaptersMixin.load_adapter_fusion`. Atomic: on error the model is unchanged."""
    read = read_fusion(model, os.fspath(path))
    with all_or_nothing(model):
        name = add_read_fusion(model, read, load_as, overwrite_ok)
        if set_active:
            default = ",".join(read.children) == name
            model.set_active_adapters(  # type: ignore[operator]
                Fuse(*read.children, name=None if default else name)
            )
    return name


def add_read_fusion(
    model: nn.Module, read: ReadFusion, load_as: str | None = None, overwrite_ok: bool = False
) -> str:
    """Add the fusion layer ``read`` describes (its adapters must be added) and copy its
    tensors in; returns its name. Call it inside `all_or_nothing`."""
    state = get_state(model)
    missing = [c for c in read.children if c not in state.adapters]
    if missing:
        raise CheckpointError(
            f"fusion {read.saved_name!r} in {read.path!r} fuses {read.children}, but "
            f"{missing} are not added; load those adapters first (model.load_adapter(...))"
        )
    name = load_as or read.saved_name or ",".join(read.children)
    validate_adapter_name(name, kind="fusion")  # a saved name that is a path is refused
    add_adapter_fusion(model, read.children, read.config, name=name, overwrite_ok=overwrite_ok)
    copy_fusion_tensors(state.fusions[name], read.tensors, source=read.path)
    return name


def copy_fusion_tensors(entry: FusionEntry, tensors: dict, source: str) -> None:
    """Copy checkpoint ``tensors`` into fusion ``entry``'s parameters in place (the same
    tensors stay in use); raises `CheckpointError` naming ``source`` on any mismatch (keys,
    shapes, kinds, non-finite values), before anything is copied."""
    expected = entry.state_dict()
    tensors = checked_tensors(tensors, source)
    match_tensors(expected, tensors, source, f"fusion {entry.name!r} ({entry.method})")
    copy_tensors(expected, tensors)


def save_all_adapter_fusions(model: nn.Module, save_directory: str) -> None:
    """See `ModelAdaptersMixin.save_all_adapter_fusions`."""
    for name in get_state(model).fusions:
        save_adapter_fusion(model, os.path.join(save_directory, name), name)


def save_pretrained_fusions(model: nn.Module, save_directory: str) -> None:
    """``save_pretrained``'s part: every fusion layer into ``adapter_fusions/<name>`` of the
    (new) folder ``save_directory``."""
    fusions = get_state(model).fusions
    if fusions:
        save_all_adapter_fusions(model, os.path.join(save_directory, FUSIONS_SUBDIR))


def _regularization(entry: FusionEntry) -> Any:
    """The sum of ``regularization()`` over the fusion layer's modules that define it (contract
    1.1: a fusion module may define ``regularization() -> Tensor | None``); None when none
    does."""
    total = None
    for module in entry.modules.values():
        term = (
            module.regularization() if callable(getattr(module, "regularization", None)) else None
        )
        if term is not None:
            total = term if total is None else total + term
    return total
