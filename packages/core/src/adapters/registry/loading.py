"""Plugin loading: entry points of the group ``adapters.methods``, loaded one by one.

A plugin that fails to import, or that breaks the contract of `adapters.hookspecs` (an
incompatible or missing ``ADAPTERS_CONTRACT`` or a hook name that matches no spec: see
`adapters.registry.contract`; a method / preset / config-class / format name another plugin owns) is
recorded with its name and error, and the others still load. Registration is atomic: a refused
plugin leaves the registry as it was. ``ADAPTERS_DISABLE_PLUGINS=name,other`` skips plugins by entry-point name. Tests and
applications may register plugin objects directly with `register_plugin` (same rules).
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from .. import hookspecs
from ..configs import AdapterConfig, ConfigUnion, make_missing_error
from ..declarations import CheckpointFormat, MethodSpec
from ..errors import MethodNotInstalledError, PluginConflictError, PluginError
from . import catalog as _catalog
from .contract import check_contract, check_hook_names, check_marked_hooks
from .known import FIRST_PARTY

ENTRY_POINT_GROUP = "adapters.methods"
hookimpl = pluggy.HookimplMarker("adapters")


@dataclass
class LoadError:
    """A plugin that could not be loaded.

    Attributes:
        name: the entry point's name.
        distribution: the distribution that declares it, if known.
        error: ``"ExceptionType: message"``; the message names the fix.
        detail: the traceback.
        kind: ``"import"`` (the entry point failed to load or to declare), ``"contract"``
            (incompatible or missing contract version, unknown hook names) or ``"conflict"``
            (a name another plugin owns).
    """

    name: str
    distribution: str | None
    error: str
    detail: str
    kind: str = "import"


class Registry:
    """Everything the loaded plugins declared, with one owner per name."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("adapters")
        self.pm.add_hookspecs(hookspecs)
        self.methods: dict[str, MethodSpec] = {}
        self.presets: dict[str, AdapterConfig] = {}
        #: every registered checkpoint format, in registration order (a name may be served by
        #: several formats, for disjoint methods: see `format_for`)
        self.formats: list[CheckpointFormat] = []
        self.load_errors: list[LoadError] = []
        self.disabled: list[str] = []
        self._origin: dict[str, tuple[str | None, str | None]] = {}  # name -> (dist, version)

    # -- loading ---------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Load and register every ``adapters.methods`` entry point, one by one."""
        disabled = {
            n.strip()
            for n in os.environ.get("ADAPTERS_DISABLE_PLUGINS", "").split(",")
            if n.strip()
        }
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=_load_order):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            dist_version = dist.version if dist is not None else None
            if ep.name in disabled:
                self.disabled.append(ep.name)
                continue
            try:
                plugin = ep.load()
                self._register(plugin, ep.name, dist_name, dist_version)
            except (Exception, SystemExit) as error:  # one broken plugin must not end the rest
                kind = (
                    "conflict"
                    if isinstance(error, PluginConflictError)
                    else "contract"
                    if isinstance(error, PluginError)
                    else "import"
                )
                self.load_errors.append(
                    LoadError(
                        ep.name,
                        dist_name,
                        f"{type(error).__name__}: {error}",
                        traceback.format_exc(),
                        kind,
                    )
                )

    def call_owner(self, hook_name: str, method: str, /, **kwargs: Any) -> Any:
        """Call ``hook_name`` on the plugin that owns ``method`` only, and return its answer
        (None when it does not implement the hook).

        Method-specific hooks (adding, deleting, merging, resetting, averaging an adapter;
        adding, deleting and regularising a fusion) go to the owner since contract 1.1, so no
        plugin is asked about a config that is not its own. A contract-1.0 plugin that still
        answers None for other plugins' configs behaves exactly as before.
        """
        owner = self.pm.get_plugin(self.methods[method].plugin)
        return _call_own(self.pm, owner, hook_name, **kwargs)

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register an in-process plugin object (tests, applications). Returns its name.

        Raises:
            PluginError: the plugin breaks the contract (see `adapters.hookspecs`); nothing is
                registered.
        """
        name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin)}"
        self._register(plugin, name, None, None)
        return name

    def _register(self, plugin: object, name: str, dist: str | None, version: str | None) -> None:
        """Validate ``plugin`` fully, then record what it declares; all or nothing."""
        label = _label(name, dist, version)
        if self.pm.has_plugin(name):
            raise PluginConflictError(
                f"plugin name {name!r} is already taken by {self._owner(name)}; {label} was "
                "not loaded: "
                "uninstall one of them, or register under another name"
            )
        check_contract(plugin, label)
        check_marked_hooks(plugin, label)
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as error:
            detail = str(error).replace("\n", "; ")
            raise PluginError(f"{label} does not match the hook specs: {detail}") from None
        try:
            check_hook_names(self.pm, plugin, label)
            methods: list[MethodSpec] = []
            formats: list[CheckpointFormat] = []
            _call_own(self.pm, plugin, "adapters_register_methods", register=methods.append)
            _call_own(
                self.pm, plugin, "adapters_register_checkpoint_formats", register=formats.append
            )
            self._check_claims(label, methods, formats)
        except BaseException:
            self.pm.unregister(plugin)  # nothing else was recorded yet
            raise
        self._origin[name] = (dist, version)
        for spec in methods:
            spec.plugin, spec.distribution, spec.version = name, dist, version
            self.methods[spec.name] = spec
            self.presets.update(spec.presets)
        for fmt in formats:
            fmt.plugin = name
            self.formats.append(fmt)

    def _check_claims(
        self, label: str, methods: list[MethodSpec], formats: list[CheckpointFormat]
    ) -> None:
        """Raise `PluginConflictError` if a declared name is owned by a loaded plugin or
        declared twice; `PluginError` for a malformed declaration."""
        owners = {
            "method": {m: s.plugin for m, s in self.methods.items()},
            "config class": {
                name: s.plugin for s in self.methods.values() for name in _class_names(s)
            },
            "preset": {p: s.plugin for s in self.methods.values() for p in s.presets},
        }
        seen: set[tuple[str, str]] = set()

        def claim(kind: str, key: str) -> None:
            owner = owners[kind].get(key)
            if owner is not None or (kind, key) in seen:
                by = self._owner(owner) if owner is not None else "the same plugin (twice)"
                raise PluginConflictError(
                    f"{kind} {key!r} is already provided by {by}; {label} was not loaded. "
                    "Fix: uninstall one of the two plugins, or disable one with "
                    "ADAPTERS_DISABLE_PLUGINS=<entry point name>"
                )
            seen.add((kind, key))

        for spec in methods:
            if not isinstance(spec, MethodSpec):
                raise PluginError(f"{label} registered {spec!r}, which is not a MethodSpec")
            if spec.name == ConfigUnion.method:
                raise PluginConflictError(
                    f"method name {spec.name!r} is reserved by adapters-core (ConfigUnion); "
                    f"{label} was not loaded: rename the method"
                )
            if not spec.config_classes:
                raise PluginError(
                    f"method {spec.name!r} of {label} registers no config class; give "
                    "MethodSpec(config_classes=(MyConfig,))"
                )
            for cls in spec.config_classes:
                if getattr(cls, "method", None) != spec.name:
                    raise PluginError(
                        f"{cls.__name__}.method is {getattr(cls, 'method', None)!r} but {label} "
                        f"registers it for method {spec.name!r}; set method = {spec.name!r}"
                    )
            for alias, cls in spec.class_aliases.items():
                if not isinstance(alias, str) or cls not in spec.config_classes:
                    raise PluginError(
                        f"class alias {alias!r} of method {spec.name!r} ({label}) names "
                        f"{cls!r}, which is not one of its config_classes"
                    )
            claim("method", spec.name)
            for class_name in _class_names(spec):
                claim("config class", class_name)
            for preset in spec.presets:
                claim("preset", preset)
        claimed: list[CheckpointFormat] = []
        for fmt in formats:
            if not isinstance(fmt, CheckpointFormat):
                raise PluginError(f"{label} registered {fmt!r}, which is not a CheckpointFormat")
            if not all(isinstance(m, str) and m for m in fmt.methods) or isinstance(
                fmt.methods, str
            ):
                raise PluginError(
                    f"checkpoint format {fmt.name!r} of {label} has methods={fmt.methods!r}; "
                    "give a tuple of method names, e.g. methods=('bottleneck',)"
                )
            for other in [*self.formats, *claimed]:
                shared = sorted(set(fmt.names()) & set(other.names()))
                overlap = (
                    "every method"
                    if not fmt.methods or not other.methods
                    else ", ".join(repr(m) for m in sorted(set(fmt.methods) & set(other.methods)))
                )
                if shared and overlap:
                    by = (
                        self._owner(other.plugin)
                        if other in self.formats
                        else "the same plugin (twice)"
                    )
                    raise PluginConflictError(
                        f"checkpoint format {shared[0]!r} is already provided by {by} for "
                        f"{overlap}; {label} was not loaded. Fix: uninstall one of the two "
                        "plugins, disable one with ADAPTERS_DISABLE_PLUGINS=<entry point name>, "
                        "or give each format the methods it serves (CheckpointFormat.methods)"
                    )
            claimed.append(fmt)

    def _owner(self, plugin: str) -> str:
        """``plugin 'lora' (adapters-lora 0.1.0)`` for a registered plugin name."""
        return _label(plugin, *self._origin.get(plugin, (None, None)))

    def unregister(self, name: str) -> None:
        """Remove a plugin and everything it declared (and nothing another plugin owns)."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        for method in [m for m, s in self.methods.items() if s.plugin == name]:
            spec = self.methods.pop(method)
            for preset in spec.presets:
                self.presets.pop(preset, None)
        self.formats = [f for f in self.formats if f.plugin != name]
        self._origin.pop(name, None)

    # -- queries ---------------------------------------------------------------------------
    @property
    def hook(self) -> Any:
        return self.pm.hook

    def format_names(self) -> list[str]:
        """Every checkpoint format name and alias the loaded plugins serve, sorted."""
        return sorted({n for fmt in self.formats for n in fmt.names()})

    def format_for(self, name: str, method: str) -> CheckpointFormat | None:
        """The checkpoint format called ``name`` (or with that alias) that serves ``method``."""
        for fmt in self.formats:
            if name in fmt.names() and fmt.serves(method):
                return fmt
        return None

    def method_of(self, config: AdapterConfig) -> MethodSpec:
        """The spec of the method ``config`` belongs to."""
        spec = self.methods.get(config.method)
        if spec is None:
            raise self.missing_method_error(config.method)
        return spec

    def config_class_for_method(self, method: str) -> type[AdapterConfig]:
        """The canonical config class of ``method`` (`ConfigUnion` for ``"union"``)."""
        if method == ConfigUnion.method:
            return ConfigUnion
        spec = self.methods.get(method)
        if spec is None:
            raise self.missing_method_error(method)
        return spec.config_classes[0]

    def config_class_named(self, class_name: str) -> type[AdapterConfig] | None:
        """The installed config class called ``class_name`` (``"LoRAConfig"``, or an alias a
        method declares such as ``"PfeifferConfig"``), if any."""
        for spec in self.methods.values():
            for cls in spec.config_classes:
                if cls.__name__ == class_name:
                    return cls
            if class_name in spec.class_aliases:
                return spec.class_aliases[class_name]
        return None

    def refusal_for(
        self, method: str | None = None, preset: str | None = None, class_name: str | None = None
    ) -> LoadError | None:
        """The load error of an installed plugin that would have provided ``method`` /
        ``preset`` / ``class_name`` but was refused (matched by its distribution, or by an
        entry point named like the method), if any."""
        dist = distribution_for(method=method, preset=preset, class_name=class_name)
        for error in self.load_errors:
            if (dist is not None and error.distribution == dist) or (
                method is not None and error.name == method
            ):
                return error
        return None

    def unavailable(
        self,
        what: str,
        missing: str,
        method: str | None = None,
        preset: str | None = None,
        class_name: str | None = None,
    ) -> str:
        """Why ``what`` (``"adapter method 'x'"``, ...) cannot be used: the refusal of its
        installed plugin, with the fix, when there is one; else ``missing`` (which package to
        install)."""
        refused = self.refusal_for(method=method, preset=preset, class_name=class_name)
        if refused is None:
            return missing
        where = _label(refused.name, refused.distribution, None)
        return (
            f"{what} comes from {where}, which is installed but was refused when plugins "
            f"were loaded: {refused.error} (`adapters plugins` lists every refusal)"
        )

    def missing_method_error(self, method: str) -> Exception:
        dist = distribution_for(method=method)
        missing = (
            f"adapter method {method!r} is not installed; install its plugin: pip install {dist}"
        )
        return MethodNotInstalledError(
            self.unavailable(f"adapter method {method!r}", missing, method=method)
        )

    def missing_config_error(self, name: str) -> Exception:
        error = make_missing_error(name, distribution_for(preset=name), list(self.presets))
        if self.refusal_for(preset=name) is None:
            return error
        return MethodNotInstalledError(
            self.unavailable(f"config {name!r}", str(error), preset=name)
        )


def _load_order(ep: metadata.EntryPoint) -> tuple[bool, str]:
    """First-party distributions first (so a third party claiming one of their names is the
    one refused, whatever its entry point is called), then by entry-point name."""
    dist = getattr(ep, "dist", None)
    name = dist.metadata["Name"] if dist is not None else None
    return (name not in FIRST_PARTY, ep.name)


def _call_own(pm: pluggy.PluginManager, plugin: object, hook_name: str, **kwargs: Any) -> Any:
    """Call ``plugin``'s own implementation of ``hook_name`` and return its answer (None when
    it has none). Registration hooks are per plugin (each registration must see only what this
    plugin declares), and so are method-specific hooks (`Registry.call_owner`)."""
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        if impl.plugin is plugin:
            return impl.function(*(kwargs[arg] for arg in impl.argnames))
    return None


def _class_names(spec: MethodSpec) -> list[str]:
    """The config-class names ``spec`` owns: its classes' names and its aliases."""
    return [cls.__name__ for cls in spec.config_classes] + list(spec.class_aliases)


def _label(name: str | None, dist: str | None, version: str | None) -> str:
    """``plugin 'lora' (adapters-lora 0.1.0)``, or ``plugin 'x' (in-process)``."""
    where = f"{dist} {version}" if dist and version else dist or "in-process"
    return f"plugin {name!r} ({where})"


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


_catalog.provide(get_registry)  # configs resolve presets through the registry
