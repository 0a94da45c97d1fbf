"""Plugin loading: entry points of the group ``adapters.methods``, loaded one by one.

A plugin that fails to import is recorded with its name and error and the others still load.
``ADAPTERS_DISABLE_PLUGINS=name,other`` skips plugins by entry-point name. Tests and
applications may register plugin objects directly with `register_plugin`.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from ._known import FIRST_PARTY
from .configs import AdapterConfig, make_missing_error
from .errors import ConfigError, MethodNotInstalledError

ENTRY_POINT_GROUP = "adapters.methods"
hookimpl = pluggy.HookimplMarker("adapters")


@dataclass
class MethodSpec:
    """What a plugin declares about one method (see `hookspecs.adapters_register_methods`).

    Attributes:
        name: the method name users list in ``AdapterModelInterface.adapter_methods``.
        config_classes: config classes of this method; the first is the canonical one used by
            ``AdapterConfig.from_dict`` for ``{"method": name, ...}``.
        presets: preset names → config instances (``"lora"``, ``"ia3"``, ...).
        compositions: composition block classes this method supports (``Stack``,
            ``BatchSplit``, ``Average``, ...). ``Parallel`` is supported whenever ``BatchSplit``
            is, because core implements it by batch replication.
        can_merge: whether ``merge_adapter`` / ``reset_adapter`` work for this method.
        upgrade_key: ``upgrade_key(config, key, format_version) -> key``: for methods whose
            checkpoint keys changed, the current name of a key saved in an older checkpoint
            format (core calls it when loading format 1; keys come without the ``"<method>/"``
            prefix of a union). None: keys never changed.
        distribution / version / plugin: filled in by core from the entry point.
    """

    name: str
    config_classes: tuple[type[AdapterConfig], ...]
    presets: dict[str, AdapterConfig] = field(default_factory=dict)
    compositions: tuple[type, ...] = ()
    can_merge: bool = False
    upgrade_key: Callable[[AdapterConfig, str, int], str] | None = None
    distribution: str | None = None
    version: str | None = None
    plugin: str | None = None


@dataclass
class CheckpointFormat:
    """A foreign checkpoint format a plugin can read and/or write.

    Attributes:
        name: short name used in ``save_adapter(..., format=name)`` (``"peft"``).
        detect: ``detect(path) -> bool``: whether this format reads directory ``path``.
        read: ``read(path, model, sites, config) -> (config, state_dict)``: the adapter's config
            (``config`` is the user's override or None) and its tensors under this library's
            name-independent keys (as returned by `adapters_add_adapter`).
        write: ``write(path, model, sites, name, config, state_dict)``: write the adapter in this
            format into the (empty, temporary) directory ``path``; None if read-only.
    """

    name: str
    detect: Callable[[str], bool]
    read: Callable[..., tuple[AdapterConfig, dict[str, Any]]]
    write: Callable[..., None] | None = None
    plugin: str | None = None


@dataclass
class LoadError:
    """A plugin that could not be loaded."""

    name: str
    distribution: str | None
    error: str
    detail: str


class Registry:
    """Everything the loaded plugins declared."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("adapters")
        self.pm.add_hookspecs(hookspecs)
        self.methods: dict[str, MethodSpec] = {}
        self.presets: dict[str, AdapterConfig] = {}
        self.formats: dict[str, CheckpointFormat] = {}
        self.load_errors: list[LoadError] = []
        self.disabled: list[str] = []
        self._origin: dict[str, tuple[str | None, str | None]] = {}

    # -- loading ---------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        disabled = {
            n.strip()
            for n in os.environ.get("ADAPTERS_DISABLE_PLUGINS", "").split(",")
            if n.strip()
        }
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            dist_version = dist.version if dist is not None else None
            if ep.name in disabled:
                self.disabled.append(ep.name)
                continue
            if self.pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
                self._register(plugin, ep.name, dist_name, dist_version)
            except Exception as error:  # a broken plugin must not break the others
                self.load_errors.append(
                    LoadError(
                        ep.name,
                        dist_name,
                        f"{type(error).__name__}: {error}",
                        traceback.format_exc(),
                    )
                )

    def _register(self, plugin: object, name: str, dist: str | None, version: str | None) -> None:
        self.pm.register(plugin, name=name)
        self._origin[name] = (dist, version)
        try:
            methods: list[MethodSpec] = []
            formats: list[CheckpointFormat] = []
            _call_one(self.pm, plugin, "adapters_register_methods", register=methods.append)
            _call_one(
                self.pm, plugin, "adapters_register_checkpoint_formats", register=formats.append
            )
            for spec in methods:
                self._add_method(spec, name, dist, version)
            for fmt in formats:
                fmt.plugin = name
                self.formats[fmt.name] = fmt
        except Exception:
            self.unregister(name)
            raise

    def _add_method(self, spec: MethodSpec, plugin: str, dist: str | None, version: str | None):
        if spec.name in self.methods:
            raise ConfigError(
                f"method {spec.name!r} is provided twice: by {self.methods[spec.name].plugin!r} "
                f"and {plugin!r}; disable one with ADAPTERS_DISABLE_PLUGINS"
            )
        if not spec.config_classes:
            raise ConfigError(
                f"method {spec.name!r} of plugin {plugin!r} registers no config class"
            )
        for cls in spec.config_classes:
            if cls.method != spec.name:
                raise ConfigError(
                    f"{cls.__name__}.method is {cls.method!r} but it is registered for method "
                    f"{spec.name!r}"
                )
        spec.plugin, spec.distribution, spec.version = plugin, dist, version
        self.methods[spec.name] = spec
        for preset_name, preset in spec.presets.items():
            self.presets[preset_name] = preset

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register an in-process plugin object (tests, applications). Returns its name."""
        name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin)}"
        self._register(plugin, name, None, None)
        return name

    def unregister(self, name: str) -> None:
        """Remove a plugin and everything it declared."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        for method in [m for m, s in self.methods.items() if s.plugin == name]:
            spec = self.methods.pop(method)
            for preset in spec.presets:
                self.presets.pop(preset, None)
        for fmt in [f for f, s in self.formats.items() if s.plugin == name]:
            del self.formats[fmt]
        self._origin.pop(name, None)

    # -- queries ---------------------------------------------------------------------------
    @property
    def hook(self) -> Any:
        return self.pm.hook

    def method_of(self, config: AdapterConfig) -> MethodSpec:
        """The spec of the method ``config`` belongs to."""
        spec = self.methods.get(config.method)
        if spec is None:
            raise self.missing_method_error(config.method)
        return spec

    def config_class_for_method(self, method: str) -> type[AdapterConfig]:
        if method == "union":
            from .configs import ConfigUnion

            return ConfigUnion
        spec = self.methods.get(method)
        if spec is None:
            raise self.missing_method_error(method)
        return spec.config_classes[0]

    def config_class_named(self, class_name: str) -> type[AdapterConfig] | None:
        for spec in self.methods.values():
            for cls in spec.config_classes:
                if cls.__name__ == class_name:
                    return cls
        return None

    def missing_method_error(self, method: str) -> Exception:
        dist = distribution_for(method=method)
        return MethodNotInstalledError(
            f"adapter method {method!r} is not installed; install its plugin: pip install {dist}"
        )

    def missing_config_error(self, name: str) -> Exception:
        return make_missing_error(name, distribution_for(preset=name), list(self.presets))


def _call_one(pm: pluggy.PluginManager, plugin: object, hook_name: str, **kwargs: Any) -> None:
    """Call one hook on one plugin only (registration hooks are per plugin)."""
    caller = pm.subset_hook_caller(
        hook_name, remove_plugins=[p for p in pm.get_plugins() if p is not plugin]
    )
    caller(**kwargs)


def distribution_for(
    method: str | None = None, preset: str | None = None, class_name: str | None = None
) -> str | None:
    """The distribution that provides a first-party method, preset or config class; for an
    unknown method the conventional ``adapters-<method>``."""
    for dist, known in FIRST_PARTY.items():
        if (
            (method and method in known["methods"])
            or (preset and preset in known["presets"])
            or (class_name and class_name in known["classes"])
        ):
            return dist
    if method:
        return f"adapters-{method.replace('_', '-')}"
    return None


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loading entry points on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        registry = Registry()
        registry.load_entry_points()
        _REGISTRY = registry
    return _REGISTRY


def reload_plugins() -> Registry:
    """Forget loaded plugins and load entry points again (honours ADAPTERS_DISABLE_PLUGINS)."""
    global _REGISTRY
    _REGISTRY = None
    return get_registry()


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register an in-process plugin object on the process-wide registry; returns its name."""
    return get_registry().register(plugin, name)


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with `register_plugin`."""
    get_registry().unregister(name)


def installed_methods() -> list[str]:
    """Names of the methods the loaded plugins provide."""
    return sorted(get_registry().methods)
