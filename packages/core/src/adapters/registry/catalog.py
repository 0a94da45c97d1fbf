"""How `adapters.configs` reaches what plugins declared without importing plugin loading.

``configs`` sits below ``plugins`` (the registry imports config classes), yet resolving a preset
string or a saved config dict needs the registry. ``adapters.registry.loading`` hands its
``get_registry`` to `provide` when it is imported (``import adapters`` always imports it);
``configs`` asks `catalog` for it. So the import graph stays acyclic: configs → _catalog,
plugins → configs and _catalog.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol


class Catalog(Protocol):
    """The lookups ``configs`` needs (`adapters.registry.loading.Registry` provides them)."""

    presets: Mapping[str, Any]

    def config_class_for_method(self, method: str) -> type: ...

    def config_class_named(self, class_name: str) -> type | None: ...

    def missing_config_error(self, name: str) -> Exception: ...


_provider: Callable[[], Catalog] | None = None


def provide(provider: Callable[[], Catalog]) -> None:
    """Called once by `adapters.registry.loading` with its ``get_registry``."""
    global _provider
    _provider = provider


def catalog() -> Catalog:
    """The process-wide registry, as ``configs`` sees it."""
    if _provider is None:  # only reachable by importing adapters.configs in a broken install
        raise RuntimeError("adapters.registry.loading was not imported; import adapters first")
    return _provider()
