"""Contract 1.1: one plugin namespace (`adapters.plugin`), and method hooks called only on the
plugin that owns the method."""

from __future__ import annotations

import ast
import os
import pathlib
from dataclasses import dataclass
from typing import ClassVar

import pytest

import adapters
import adapters.plugin
from adapters.plugin import AdapterConfig, MethodSpec, Stack, hookimpl

from ..models import SEED_INTERFACE, llama

ROOT = pathlib.Path(__file__).parents[2]
FIRST_PARTY_SOURCES = [
    *sorted((ROOT / "packages").glob("*/src/adapters_*/**/*.py")),
    *sorted((ROOT / "examples").glob("*/src/**/*.py")),
]


def _core_imports(path: pathlib.Path) -> list[str]:
    """Every ``adapters...`` module ``path`` imports (``import adapters.x``, ``from adapters.x
    import y``, ``from adapters import y``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "adapters":
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "adapters"]
    return found


def test_first_party_plugins_import_only_the_plugin_namespace():
    assert len(FIRST_PARTY_SOURCES) >= 15  # lora, reft, bottleneck and the example
    outside = {
        str(path.relative_to(ROOT)): modules
        for path in FIRST_PARTY_SOURCES
        if (modules := [m for m in _core_imports(path) if m != "adapters.plugin"])
    }
    assert outside == {}


def test_the_namespace_check_sees_an_import_from_elsewhere(tmp_path):
    source = tmp_path / "plugin.py"
    source.write_text("from adapters.plugin import Stack\nfrom adapters.sites import ModelSites\n")
    assert _core_imports(source) == ["adapters.plugin", "adapters.sites"]


def test_every_exported_name_exists_and_is_documented_in_the_plugin_guide():
    guide = (ROOT / "docs" / "writing-a-plugin.md").read_text(encoding="utf-8")
    missing = [name for name in adapters.plugin.__all__ if f"`{name}`" not in guide]
    assert missing == []
    assert all(hasattr(adapters.plugin, name) for name in adapters.plugin.__all__)
    assert "from adapters.plugin import" in guide


def test_the_namespace_exports_core_objects_themselves():
    from adapters.composition import apply_setup
    from adapters.hosts import AdapterHost

    assert adapters.plugin.AdapterHost is AdapterHost
    assert adapters.plugin.apply_setup is apply_setup
    assert adapters.plugin.CONTRACT_VERSION == adapters.hookspecs.CONTRACT_VERSION == "1.1"


# -- hooks go to the owner --------------------------------------------------------------------
@dataclass(frozen=True)
class RecAConfig(AdapterConfig):
    method: ClassVar[str] = "rec_a"


@dataclass(frozen=True)
class RecBConfig(AdapterConfig):
    method: ClassVar[str] = "rec_b"


class RecordingPlugin:
    """A contract-1.1 plugin without any "is this config mine" check: it records every call
    and answers for whatever config it gets."""

    ADAPTERS_CONTRACT = "1.1"

    def __init__(self, method: str, config_class: type) -> None:
        self.method, self.config_class, self.calls = method, config_class, []

    @hookimpl
    def adapters_register_methods(self, register):
        register(
            MethodSpec(self.method, (self.config_class,), compositions=(Stack,), can_merge=True)
        )

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        self.calls.append(("add", name, config.method))
        return {}

    @hookimpl
    def adapters_delete_adapter(self, model, sites, name, config):
        self.calls.append(("delete", name, config.method))
        return True

    @hookimpl
    def adapters_merge_adapter(self, model, sites, name, config):
        self.calls.append(("merge", name, config.method))
        return True

    @hookimpl
    def adapters_reset_adapter(self, model, sites, name, config):
        self.calls.append(("reset", name, config.method))
        return True


@pytest.fixture
def recording():
    registry = adapters.registry.get_registry()
    plugins = {"rec_a": RecordingPlugin("rec_a", RecAConfig)}
    plugins["rec_b"] = RecordingPlugin("rec_b", RecBConfig)
    for name, plugin in plugins.items():
        registry.register(plugin, name)
    yield plugins
    for name in plugins:
        registry.unregister(name)


def test_method_hooks_are_called_only_on_the_owner(recording):
    model = llama()
    interface = adapters.AdapterModelInterface(
        **{**SEED_INTERFACE, "adapter_methods": ["rec_a", "rec_b"]}
    )
    adapters.init(model, interface=interface)
    model.add_adapter("a", RecAConfig())
    model.add_adapter("b", RecBConfig())
    model.merge_adapter("a")
    model.reset_adapter("a")
    model.delete_adapter("a")
    model.delete_adapter("b")
    assert recording["rec_a"].calls == [
        ("add", "a", "rec_a"),
        ("merge", "a", "rec_a"),
        ("reset", "a", "rec_a"),
        ("delete", "a", "rec_a"),
    ]
    assert recording["rec_b"].calls == [("add", "b", "rec_b"), ("delete", "b", "rec_b")]


class SetupWatcher(RecordingPlugin):
    """A contract-1.0 plugin that still implements the retired ``adapters_setup_changed``."""

    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_setup_changed(self, model, sites, setup):
        self.calls.append(("setup", str(setup)))


def test_a_contract_1_0_plugin_still_gets_the_retired_setup_changed_hook():
    registry = adapters.registry.get_registry()
    plugin = SetupWatcher("rec_a", RecAConfig)
    registry.register(plugin, "rec_a")
    try:
        model = llama()
        interface = adapters.AdapterModelInterface(
            **{**SEED_INTERFACE, "adapter_methods": ["rec_a"]}
        )
        adapters.init(model, interface=interface)
        model.add_adapter("a", RecAConfig(), set_active=True)
    finally:
        registry.unregister("rec_a")
    assert ("setup", "Stack('a')") in plugin.calls


# -- one source for each fact -----------------------------------------------------------------
def test_cores_first_party_table_matches_what_the_installed_plugins_declare():
    from adapters.registry.known import FIRST_PARTY

    registry = adapters.registry.get_registry()
    checked = 0
    for dist, known in FIRST_PARTY.items():
        specs = [s for s in registry.methods.values() if s.distribution == dist]
        if not specs:
            continue  # not installed in this environment
        checked += 1
        declared = {
            "methods": sorted(s.name for s in specs),
            "presets": sorted(p for s in specs for p in s.presets),
            "classes": sorted(
                [c.__name__ for s in specs for c in s.config_classes]
                + [a for s in specs for a in s.class_aliases]
            ),
        }
        assert declared == {k: sorted(v) for k, v in known.items()}, dist
    if os.environ.get("ADAPTERS_REQUIRE_ALL_PLUGINS") == "1":
        assert checked == len(FIRST_PARTY)


@pytest.mark.parametrize("alias", ["PfeifferConfig", "HoulsbyConfig", "ParallelConfig"])
def test_adapterhub_class_aliases_resolve_to_the_plugins_classes(alias):
    bottleneck = pytest.importorskip("adapters_bottleneck")
    assert getattr(adapters, alias) is getattr(bottleneck, alias)


# -- every plugin the same shape ----------------------------------------------------------------
PLUGIN_PACKAGES = [
    path.parent
    for path in sorted((ROOT / "packages").glob("*/src/adapters_*/plugin.py"))
    + sorted((ROOT / "examples").glob("*/src/adapters_*/plugin.py"))
]


def _hookimpl_files(package: pathlib.Path) -> set[str]:
    found = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and any(
                getattr(d, "id", None) == "hookimpl" for d in node.decorator_list
            ):
                found.add(path.name)
    return found


@pytest.mark.parametrize("package", PLUGIN_PACKAGES, ids=lambda p: p.name)
def test_every_plugin_has_the_same_file_roles(package):
    import importlib

    assert {"__init__.py", "config.py", "layer.py", "plugin.py"} <= {
        p.name for p in package.glob("*.py")
    }
    assert _hookimpl_files(package) == {"plugin.py"}  # every hook in plugin.py
    name = package.name
    try:
        plugin = importlib.import_module(f"{name}.plugin")
    except ImportError:
        pytest.skip(f"{name} is not installed here")
    config = importlib.import_module(f"{name}.config")
    assert plugin.ADAPTERS_CONTRACT == "1.1"
    registry = adapters.registry.get_registry()
    specs = [s for s in registry.methods.values() if registry.pm.get_plugin(s.plugin) is plugin]
    assert specs, f"{name} is not loaded from its entry point"
    assert {p: c for s in specs for p, c in s.presets.items()} == config.PRESETS
    formats = [f for f in registry.formats if registry.pm.get_plugin(f.plugin) is plugin]
    if formats or (package / "interop.py").exists():
        interop = importlib.import_module(f"{name}.interop")
        assert list(interop.FORMATS) == formats
