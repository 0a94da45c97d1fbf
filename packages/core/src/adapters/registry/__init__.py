"""Plugin loading and the registry of what plugins declared.

- `adapters.registry.loading`: entry points of the group ``adapters.methods`` loaded one by one,
  the `Registry` of methods, presets, config classes and checkpoint formats, and in-process
  registration (`register_plugin`, `unregister_plugin`, `reload_plugins`) for tests and apps;
- `adapters.registry.contract`: the contract version a plugin must declare and the hook checks;
- `adapters.registry.known`: the first-party distributions and what they provide (for "pip
  install ..." advice when a method is missing);
- `adapters.registry.catalog`: how `adapters.configs` reaches the registry without importing it.
"""

from __future__ import annotations

from typing import Any

# Loaded on first use: `adapters.configs` imports `catalog` from here, and `loading` imports
# `adapters.configs`.
__all__ = [
    "LoadError",
    "Registry",
    "distribution_for",
    "get_registry",
    "installed_methods",
    "register_plugin",
    "reload_plugins",
    "unregister_plugin",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'adapters.registry' has no attribute {name!r}")
