"""Saving and loading a whole adapted model's folder: adapters, fusions, the active setup,
and the base model's own weights (`save_pretrained` / `adapters.load_model`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from safetensors.torch import save_file
from torch import nn

from .._runtime.naming import name_problem, safe_join
from ..composition import setup_from_dict, setup_to_dict
from ..errors import CheckpointError, CompositionError
from ..interface import INTERFACE_FILENAME
from .adapter import _cpu_tensors, write_adapter_files
from .format import ADAPTERS_SUBDIR, FORMAT, FORMAT_VERSION, SETUP_NAME, check_format_version
from .manifest import verify_manifest, write_directory_atomically
from .readers import read_json_strict

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
