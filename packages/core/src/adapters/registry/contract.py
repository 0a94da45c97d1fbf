"""What a plugin must satisfy to be loaded, beyond owning its names: a served contract version
(``ADAPTERS_CONTRACT``) and hook implementations that match the specs of `adapters.hookspecs`.
`adapters.registry.loading.Registry` runs these checks before it records anything of a plugin.
"""

from __future__ import annotations

import re
from importlib import metadata

import pluggy

from .. import hookspecs
from ..errors import PluginContractError, PluginError

#: The attribute of a plugin object that declares the contract version it implements.
CONTRACT_ATTRIBUTE = "ADAPTERS_CONTRACT"


def check_contract(plugin: object, label: str) -> None:
    """Refuse ``plugin`` unless its ``ADAPTERS_CONTRACT`` is served by this core.

    Served: the same major version as `hookspecs.CONTRACT_VERSION` and a minor version at most
    its minor. A plugin without the attribute was written for adapters 0.1 (before contract
    versions) and is refused.

    Raises:
        PluginContractError: naming both versions and the fix.
    """
    core = hookspecs.CONTRACT_VERSION
    declared = getattr(plugin, CONTRACT_ATTRIBUTE, None)
    if declared is None:
        raise PluginContractError(
            f"{label} declares no plugin contract version ({CONTRACT_ATTRIBUTE} is missing: a "
            f"plugin written for adapters 0.1); adapters-core {_core_version()} serves contract "
            f"{core}. Fix: upgrade the plugin; if you maintain it, follow the migration notes "
            f'("Plugin contract 1.0") in CHANGELOG.md and set {CONTRACT_ATTRIBUTE} = "{core}" '
            "in its plugin module"
        )
    if not isinstance(declared, str) or not re.fullmatch(r"\d+\.\d+", declared):
        raise PluginContractError(
            f"{label} declares {CONTRACT_ATTRIBUTE} = {declared!r}; expected a string "
            f'"MAJOR.MINOR" such as "{core}" (the contract version the plugin implements)'
        )
    major, minor = (int(part) for part in declared.split("."))
    core_major, core_minor = (int(part) for part in core.split("."))
    if major == core_major and minor <= core_minor:
        return
    if (major, minor) > (core_major, core_minor):
        fix = "upgrade adapters-core (pip install -U adapters-core)"
    else:
        fix = f"upgrade the plugin to a release written for contract {core_major}.x"
    raise PluginContractError(
        f"{label} implements plugin contract {declared}, but adapters-core {_core_version()} "
        f"serves contract {core} (same major, minor <= {core_minor} required). Fix: {fix}"
    )


def check_marked_hooks(plugin: object, label: str) -> None:
    """A function named like a hook but without ``@hookimpl`` would silently never run."""
    unmarked = sorted(
        attr
        for attr in dir(plugin)
        if attr.startswith("adapters_")
        and callable(getattr(plugin, attr, None))
        and not hasattr(getattr(plugin, attr), "adapters_impl")
    )
    if unmarked:
        raise PluginError(
            f"{label} defines {', '.join(unmarked)} without @adapters.hookimpl, so core would "
            "never call it; decorate it with @adapters.hookimpl (or rename it: the adapters_ "
            "prefix is reserved for hooks)"
        )


def check_hook_names(pm: pluggy.PluginManager, plugin: object, label: str) -> None:
    """Refuse hook implementations whose name matches no spec (a misspelling)."""
    unknown = sorted(
        caller.name for caller in pm.get_hookcallers(plugin) or [] if not caller.has_spec()
    )
    if unknown:
        known = sorted(n for n in dir(hookspecs) if n.startswith("adapters_"))
        raise PluginError(
            f"{label} implements {', '.join(unknown)}, which no hook spec of contract "
            f"{hookspecs.CONTRACT_VERSION} names; known hooks: {', '.join(known)}. Fix the "
            "name, or upgrade adapters-core if the hook is newer"
        )


def _core_version() -> str:
    """The installed adapters-core version, for messages."""
    try:
        return metadata.version("adapters-core")
    except metadata.PackageNotFoundError:  # running from a source checkout
        return "(source checkout)"
