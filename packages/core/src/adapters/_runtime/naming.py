"""The one rule for adapter and fusion names, checked everywhere a name enters: ``add_adapter``,
``load_adapter`` (``load_as`` and a checkpoint's ``name`` field), ``adapter_setup.json``,
fusion names and the paths ``save_all_adapters`` / ``save_pretrained`` write.

A name becomes a folder name on disk and a key of the ``nn.ModuleDict`` in which methods keep
their adapters, so it must be safe as both. `safe_join` builds a path for a name and refuses
anything that would leave the folder the user gave.
"""

from __future__ import annotations

import os
import unicodedata
from typing import Any

from torch import nn

from ..errors import ConfigError

#: The longest name accepted (a folder name stays well below every file system's limit).
MAX_NAME_LENGTH = 128

_FORBIDDEN = {"/": "a path separator", "\\": "a path separator", ":": "a drive separator"}


def _module_attributes() -> frozenset[str]:
    # ModuleDict refuses keys that are attributes of the container (``train``, ``to``,
    # ``forward``, ``keys``, ...): ``units["train"] = unit`` raises KeyError.
    return frozenset(dir(nn.ModuleDict()))


_RESERVED = _module_attributes()


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be an adapter name, or None if it can."""
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a string"
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"it is {len(name)} characters long (at most {MAX_NAME_LENGTH})"
    if name in (".", "..") or ".." in name:
        return "it contains '..'"
    for char, what in _FORBIDDEN.items():
        if char in name:
            return f"it contains {char!r} ({what})"
    if "." in name:
        return "it contains '.' (module paths and checkpoint keys use '.' as separator)"
    bad = [c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    if bad:
        return f"it contains the control character {bad[0]!r}"
    if name != name.strip():
        return "it starts or ends with white space"
    if name in _RESERVED:
        return f"{name!r} is an attribute of torch.nn.ModuleDict, where methods keep adapters"
    return None


def validate_adapter_name(name: object, kind: str = "adapter") -> str:
    """Return ``name`` if it is a valid adapter (or fusion, ``kind="fusion"``) name, else raise
    `ConfigError` saying which rule it breaks and how to fix it.

    The rule: a non-empty string of at most 128 characters, without ``/``, ``\\``, ``:``,
    ``.``, control characters or surrounding white space, and not an attribute name of ``torch.nn.ModuleDict`` (such as ``train``, ``forward`` or ``to``).
    Letters of any script, digits, ``-``, ``_``, ``@``, ``+``, spaces inside and so on are fine.

    Example::

        validate_adapter_name("sst-2")        # -> "sst-2"
        validate_adapter_name("../evil")      # ConfigError
    """
    problem = name_problem(name)
    if problem is not None:
        raise ConfigError(
            f"{kind} name {name!r} is not allowed: {problem}. A {kind} name is also a folder "
            "name and a module key: use letters, digits, '-' and '_' (e.g. 'sst-2', "
            "'my_adapter'), at most 128 characters, not an nn.Module attribute such as 'train'"
        )
    return name  # type: ignore[return-value]


def safe_join(folder: str, name: str, kind: str = "adapter") -> str:
    """``folder/name`` for a validated ``name``; raises `ConfigError` for a bad name and
    `adapters.errors.CheckpointError` when the path (following symbolic links) leaves
    ``folder``."""
    from ..errors import CheckpointError

    validate_adapter_name(name, kind)
    path = os.path.join(folder, name)
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise CheckpointError(
            f"{path!r} leads outside {folder!r} (a symbolic link?); adapters are only read "
            "from and written to the folder given"
        )
    return path


def validate_setup_names(state: Any, setup: Any) -> None:
    """Raise `CompositionError` if ``setup`` (the effective setup of a forward call: the active
    one, an ``AdapterSetup`` or ``adapter_names=``) names an adapter that is not added, instead
    of silently running without it. The answer is cached per setup object and set of added
    adapters, so a forward call (and each decoded token) pays one identity check."""
    if setup is None:
        return
    names = tuple(state.adapters)
    cached = state.__dict__.get("_checked_setup")
    if cached is not None and cached[0] is setup and cached[1] == names:
        return
    used = [setup] if isinstance(setup, str) else setup.flatten()
    missing = [n for n in used if n not in state.adapters]
    if missing:
        from ..errors import CompositionError

        raise CompositionError(
            f"the setup {getattr(setup, 'name', setup)!r} of this forward call uses adapter "
            f"{missing[0]!r}, which is not added (added: {', '.join(names) or 'none'}); check "
            "the name passed to AdapterSetup / set_active_adapters / adapter_names="
        )
    state.__dict__["_checked_setup"] = (setup, names)
