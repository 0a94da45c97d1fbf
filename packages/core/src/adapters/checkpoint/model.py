"""Saving and loading a whole adapted model's folder: adapters, fusions, the active setup,
and the base model's own weights (`save_pretrained` / `adapters.load_model`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from safetensors.torch import save_file
from torch import nn

from .._runtime.naming import name_problem, safe_join
from ..composition import setup_from_dict, setup_to_dict
from ..errors import CheckpointError, CompositionError
from ..interface import INTERFACE_FILENAME
from .adapter import _cpu_tensors, write_adapter_files
from .format import (
    ADAPTERS_SUBDIR,
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    FUSIONS_SUBDIR,
    MANIFEST_NAME,
    SETUP_NAME,
    WEIGHTS_NAME,
    check_format_version,
)
from .manifest import check_links, read_manifest, verify_manifest, write_directory_atomically
from .readers import read_json_strict

#: The base weights ``save_pretrained`` writes for a plain ``nn.Module`` (no
#: ``save_pretrained`` of its own).
MODEL_WEIGHTS_NAME = "model.safetensors"
#: The files of a fusion folder (``adapters._runtime.fusion``) a model folder must list.
FUSION_FILES = ("fusion_config.json", "fusion_model.safetensors")

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
    """See `adapters._runtime.api.ModelAdaptersMixin.save_pretrained`; ``parent_save`` is the model
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
    for name in names:
        _cpu_tensors(model._entry(name).state_dict(), f"adapter {name!r}")  # type: ignore[operator]
    setup = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "active": setup_to_dict(model.active_adapters),  # type: ignore[attr-defined]
        "adapters": names,
        "fusions": list(model.adapter_fusions),  # type: ignore[attr-defined]
    }

    def write(tmp: str) -> None:
        if parent_save is not None:
            parent_save(tmp, *args, state_dict=state, **kwargs)
        else:
            save_file(_cpu_tensors(state), os.path.join(tmp, MODEL_WEIGHTS_NAME))
        model.adapter_interface.save(tmp)  # type: ignore[attr-defined]
        adapters_dir = os.path.join(tmp, ADAPTERS_SUBDIR)
        for name in names:
            write_adapter_files(model, safe_join(adapters_dir, name), name)
        if write_extra is not None:
            write_extra(tmp)
        with open(os.path.join(tmp, SETUP_NAME), "w", encoding="utf-8") as f:
            json.dump(setup, f, indent=2)

    write_directory_atomically(save_directory, write, manifest=True)


def _hashed(rel: str) -> bool:
    """Files of a model folder whose sha256 a load checks: all but the base weights (large;
    checked by size)."""
    return not rel.endswith((".safetensors", ".bin")) or rel.startswith(
        (ADAPTERS_SUBDIR + "/", FUSIONS_SUBDIR + "/")
    )


#: Top-level files ``from_pretrained`` reads (config, weights, shard indexes): a model folder
#: holding one that its manifest does not list is refused (it is not part of the save).
_BASE_FILE = re.compile(
    r"^(config\.json|generation_config\.json|[^/]*\.safetensors|[^/]*\.index\.json"
    r"|pytorch_model[^/]*\.bin)$"
)


@dataclass
class SavedModelFolder:
    """A folder written by ``save_pretrained``, checked: its setup, and the adapter and fusion
    folders it holds (``[(name, folder)]``), each listed by the manifest."""

    path: str
    setup: dict[str, Any]
    adapters: list[tuple[str, str]]
    fusions: list[tuple[str, str]]


def check_saved_model_folder(path: str, interface_given: bool = False) -> SavedModelFolder:
    """Check a folder written by ``save_pretrained`` before anything is loaded from it: no
    link leading out, its setup file and manifest (a half-written or mixed folder, a cut
    manifest and files added after the save are refused), the format version, and the
    adapter and fusion names (never a path leaving ``path``). With ``interface_given``
    (``load_model(..., interface=...)``) the saved interface file may be missing."""
    check_links(path)
    setup_path = os.path.join(path, SETUP_NAME)
    if not os.path.isfile(setup_path):
        raise CheckpointError(
            f"{path!r} has {INTERFACE_FILENAME} but no {SETUP_NAME}: an incomplete save "
            "(save_pretrained did not finish); save the model again"
        )
    setup = read_json_strict(setup_path)
    version = check_format_version(setup, repr(setup_path))
    manifest = read_manifest(path)
    if manifest is None and version >= 2:
        raise CheckpointError(
            f"{path!r} has no {MANIFEST_NAME}: an incomplete save (interrupted, or copied "
            "in part); save it again"
        )
    names = _names_field(setup, "adapters", setup_path, [])
    adapters_dir = os.path.join(path, ADAPTERS_SUBDIR)
    fusions_dir = os.path.join(path, FUSIONS_SUBDIR)
    adapters = [(name, safe_join(adapters_dir, name)) for name in names]
    if manifest is None:  # format 1: no fusions were saved then, nothing else to check
        return SavedModelFolder(path, setup, adapters, [])
    listed = manifest["files"]
    fusion_names = _names_field(
        setup,
        "fusions",
        setup_path,
        sorted({rel.split("/")[1] for rel in listed if rel.startswith(FUSIONS_SUBDIR + "/")}),
        kind="fusion",
    )
    fusions = [(name, safe_join(fusions_dir, name, kind="fusion")) for name in fusion_names]
    required = [SETUP_NAME, INTERFACE_FILENAME]
    for name in names:
        required += [f"{ADAPTERS_SUBDIR}/{name}/{f}" for f in (CONFIG_NAME, WEIGHTS_NAME)]
    for name in fusion_names:
        required += [f"{FUSIONS_SUBDIR}/{name}/{f}" for f in FUSION_FILES]
    optional = frozenset({INTERFACE_FILENAME}) if interface_given else frozenset()
    verify_manifest(path, hash_files=_hashed, optional=optional, required=required)
    _refuse_unlisted(path, listed, {ADAPTERS_SUBDIR: names, FUSIONS_SUBDIR: fusion_names})
    return SavedModelFolder(path, setup, adapters, fusions)


def _names_field(
    setup: Mapping[str, Any], key: str, source: str, default: list[str], kind: str = "adapter"
) -> list[str]:
    names = setup.get(key, default)
    if not isinstance(names, list):
        raise CheckpointError(f"{source!r}: field {key!r} is {names!r}, not a list of names")
    for name in names:
        problem = name_problem(name)
        if problem is not None:
            raise CheckpointError(
                f"{source!r}: field {key!r} lists {name!r}, which is not an allowed {kind} "
                f"name ({problem}); they are only read from sub-folders of the saved folder"
            )
    if len(set(names)) != len(names):
        raise CheckpointError(f"{source!r}: field {key!r} lists a name twice: {names}")
    return names


def _refuse_unlisted(path: str, listed: Mapping[str, Any], folders: Mapping[str, list]) -> None:
    """Refuse what a load would take for part of the save but the manifest does not list: a
    file ``from_pretrained`` reads at the top, an adapter or fusion folder."""
    for name in sorted(os.listdir(path)):
        if _BASE_FILE.match(name) and name not in listed:
            raise CheckpointError(
                f"{os.path.join(path, name)!r} is not listed by the manifest of {path!r}: it "
                "was added after the save and from_pretrained would read it; remove it, or "
                "save the model again"
            )
    for sub, names in folders.items():
        folder = os.path.join(path, sub)
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            if entry.startswith(".") or entry in names:
                continue
            raise CheckpointError(
                f"{os.path.join(folder, entry)!r} is not part of the save of {path!r} (its "
                f"manifest and {SETUP_NAME} do not list it): it was added afterwards; remove "
                "it, or save the model again"
            )


def read_saved_model_folder(
    path: str, interface_given: bool = False
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """`check_saved_model_folder` as ``(setup, [(adapter name, folder)])`` (contract 1.0)."""
    folder = check_saved_model_folder(path, interface_given)
    return folder.setup, folder.adapters


def active_setup_of(setup: Mapping[str, Any], source: str) -> Any:
    """The active setup recorded in ``adapter_setup.json``."""
    try:
        return setup_from_dict(setup.get("active"))
    except (CompositionError, KeyError, TypeError, AttributeError, ValueError) as error:
        raise CheckpointError(
            f"{source}: field 'active' is invalid: {type(error).__name__}: {error}"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{source}: field 'active' is nested too deeply") from None


#: Config fields that do not change an adapter's parameters: adapters differing only in these
#: can be averaged linearly (AdapterHub ignores the same two).
