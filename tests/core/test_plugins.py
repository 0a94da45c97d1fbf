import ast
import inspect
import pathlib
from dataclasses import dataclass
from typing import ClassVar

import pytest

import adapters
from adapters import AdapterConfig, CheckpointFormat, MethodSpec, cli, hookimpl, hookspecs, plugins
from adapters.errors import PluginConflictError, PluginContractError, PluginError

from .conftest import SEED_INTERFACE, ToyLoRAPlugin, init_toy, llama
from .toy_plugins import ToyLoRAConfig


class FakeDist:
    def __init__(self, name, version):
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    def __init__(self, name, target, dist=("adapters-fake", "9.9")):
        self.name, self._target = name, target
        self.dist = FakeDist(*dist)

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def _install(monkeypatch, entry_points):
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group=None: list(entry_points))
    registry = plugins.reload_plugins()
    return registry


@pytest.fixture
def fake_plugins(monkeypatch):
    good = ToyLoRAPlugin()
    eps = [
        FakeEntryPoint("toy_lora", good, ("adapters-toy-lora", "1.2.3")),
        FakeEntryPoint(
            "broken", ImportError("No module named 'missing_dep'"), ("adapters-broken", "0.1")
        ),
    ]
    yield lambda: _install(monkeypatch, eps)
    monkeypatch.undo()
    plugins.reload_plugins()


def test_a_plugin_that_fails_to_import_is_reported_and_the_others_load(fake_plugins):
    registry = fake_plugins()
    assert "toy_lora" in registry.methods
    assert registry.methods["toy_lora"].distribution == "adapters-toy-lora"
    assert registry.methods["toy_lora"].version == "1.2.3"
    [error] = registry.load_errors
    assert error.name == "broken" and error.distribution == "adapters-broken"
    assert "missing_dep" in error.error


def test_disable_plugins_env_skips_them(fake_plugins, monkeypatch):
    monkeypatch.setenv("ADAPTERS_DISABLE_PLUGINS", "broken, toy_lora")
    registry = fake_plugins()
    assert registry.methods == {} and registry.load_errors == []
    assert registry.disabled == ["broken", "toy_lora"]


def test_adapter_method_lists_installed_method_names(fake_plugins):
    fake_plugins()
    assert list(adapters.AdapterMethod) == ["toy_lora"]
    assert "toy_lora" in adapters.AdapterMethod
    assert adapters.AdapterMethod.toy_lora == "toy_lora"
    with pytest.raises(AttributeError, match="installed: \\['toy_lora'\\]"):
        adapters.AdapterMethod.reft  # noqa: B018


def test_config_classes_resolve_lazily_by_name(fake_plugins):
    fake_plugins()
    from .toy_plugins import ToyLoRAConfig

    assert adapters.ToyLoRAConfig is ToyLoRAConfig


def test_plugins_command_lists_methods_and_failures(fake_plugins, capsys):
    fake_plugins()
    code = cli.main(["plugins"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "toy_lora" in out and "adapters-toy-lora" in out and "1.2.3" in out
    assert "Stack, BatchSplit, Average" in out
    assert "FAILED to load plugin 'broken' (adapters-broken)" in err


def test_plugins_command_exits_zero_when_all_load(monkeypatch, capsys):
    _install(monkeypatch, [FakeEntryPoint("toy_lora", ToyLoRAPlugin())])
    try:
        assert cli.main(["plugins"]) == 0
        assert "toy_lora" in capsys.readouterr().out
    finally:
        monkeypatch.undo()
        plugins.reload_plugins()


# -- contract version -------------------------------------------------------------------------
def _declaring(version):
    """A working plugin (method ``toy_lora``) that declares ``version``."""
    plugin = ToyLoRAPlugin()
    plugin.ADAPTERS_CONTRACT = version
    return plugin


@pytest.mark.parametrize(
    ("declared", "fix"),
    [("2.0", "upgrade adapters-core"), ("1.2", "upgrade adapters-core"), ("0.9", "upgrade the")],
)
def test_an_incompatible_contract_is_refused_naming_both_versions_and_the_fix(
    monkeypatch, declared, fix
):
    eps = [
        FakeEntryPoint("newer", _declaring(declared), ("adapters-newer", "3.0")),
        FakeEntryPoint("shift", ShiftPlugin(), ("adapters-shift", "1.0")),
    ]
    try:
        registry = _install(monkeypatch, eps)
        [error] = registry.load_errors
        assert error.name == "newer" and error.kind == "contract"
        assert error.error.startswith("PluginContractError: plugin 'newer' (adapters-newer 3.0)")
        assert f"implements plugin contract {declared}" in error.error
        assert "serves contract 1.1" in error.error and fix in error.error
        assert list(registry.methods) == ["toy_shift"]  # the others still load
        assert registry.pm.get_plugin("newer") is None
    finally:
        monkeypatch.undo()
        plugins.reload_plugins()


def test_an_older_minor_version_is_served(monkeypatch):
    monkeypatch.setattr(hookspecs, "CONTRACT_VERSION", "1.3")
    registry = plugins.Registry()
    registry.register(_declaring("1.0"), "toy_lora")
    registry.register(ShiftPlugin(), "toy_shift")  # declares 1.0 too
    assert sorted(registry.methods) == ["toy_lora", "toy_shift"]
    with pytest.raises(PluginContractError, match="implements plugin contract 1.4"):
        plugins.Registry().register(_declaring("1.4"), "toy_lora")


class UndeclaredPlugin:
    """A 0.1-era plugin: hooks, but no ADAPTERS_CONTRACT."""

    @hookimpl
    def adapters_register_methods(self, register):
        register(MethodSpec("old_method", (OldConfig,), {"old": OldConfig()}))


@dataclass(frozen=True)
class OldConfig(AdapterConfig):
    method: ClassVar[str] = "old_method"


def test_an_undeclared_plugin_is_refused_as_written_for_0_1():
    registry = plugins.Registry()
    with pytest.raises(PluginContractError) as caught:
        registry.register(UndeclaredPlugin(), "old")
    message = str(caught.value)
    assert "plugin 'old' (in-process) declares no plugin contract version" in message
    assert "adapters 0.1" in message and "serves contract 1.1" in message
    assert 'ADAPTERS_CONTRACT = "1.1"' in message
    assert registry.methods == {} and registry.presets == {}
    assert registry.pm.get_plugin("old") is None


@pytest.mark.parametrize("declared", [1.0, "1", "v1.0", "1.0.0"])
def test_a_malformed_contract_declaration_is_refused(declared):
    plugin = ToyLoRAPlugin()
    plugin.ADAPTERS_CONTRACT = declared
    with pytest.raises(PluginContractError, match=r'expected a string "MAJOR.MINOR"'):
        plugins.Registry().register(plugin, "toy_lora")


def test_installed_plugins_are_plugin_modules_of_plain_functions_declaring_the_contract():
    registry = plugins.get_registry()
    for spec in registry.methods.values():
        plugin = registry.pm.get_plugin(spec.plugin)
        assert plugin.ADAPTERS_CONTRACT == hookspecs.CONTRACT_VERSION, spec.plugin
        assert inspect.ismodule(plugin), plugin
        for caller in registry.pm.get_hookcallers(plugin):
            [impl] = [i for i in caller.get_hookimpls() if i.plugin is plugin]
            assert inspect.isfunction(impl.function), (plugin.__name__, caller.name)
            assert impl.function.__module__.endswith(".plugin"), (plugin.__name__, caller.name)


# -- hook names -------------------------------------------------------------------------------
class ShiftPlugin:
    """A second, independent working plugin (method ``toy_shift``)."""

    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_register_methods(self, register):
        from .toy_plugins import ToyShiftConfig

        register(MethodSpec("toy_shift", (ToyShiftConfig,), {"toy_shift": ToyShiftConfig()}))


class MisspelledPlugin(ShiftPlugin):
    @hookimpl
    def adapters_delete_adapterr(self, model, sites, name, config):
        return True


def test_a_misspelled_hook_is_refused_with_the_plugin_name():
    registry = plugins.Registry()
    with pytest.raises(
        PluginError,
        match="plugin 'typo' \\(in-process\\) implements "
        "adapters_delete_adapterr, which no hook spec",
    ) as caught:
        registry.register(MisspelledPlugin(), "typo")
    assert "adapters_delete_adapter," in str(caught.value)  # the known hooks are listed
    assert registry.methods == {} and registry.presets == {}
    assert registry.pm.get_plugin("typo") is None
    registry.register(ShiftPlugin(), "typo")  # the registry is usable as before
    assert list(registry.methods) == ["toy_shift"]


def test_a_misspelled_hook_in_an_entry_point_is_a_load_error(monkeypatch):
    eps = [
        FakeEntryPoint("typo", MisspelledPlugin(), ("adapters-typo", "0.2")),
        FakeEntryPoint("toy_lora", ToyLoRAPlugin()),
    ]
    try:
        registry = _install(monkeypatch, eps)
        [error] = registry.load_errors
        assert error.name == "typo" and error.kind == "contract"
        assert "plugin 'typo' (adapters-typo 0.2)" in error.error
        assert "adapters_delete_adapterr" in error.error
        assert list(registry.methods) == ["toy_lora"]
    finally:
        monkeypatch.undo()
        plugins.reload_plugins()


class UnmarkedPlugin(ShiftPlugin):
    def adapters_delete_adapter(self, model, sites, name, config):  # no @hookimpl
        return True


def test_a_hook_function_without_hookimpl_is_refused():
    registry = plugins.Registry()
    with pytest.raises(PluginError, match="adapters_delete_adapter without @adapters.hookimpl"):
        registry.register(UnmarkedPlugin(), "unmarked")
    assert registry.methods == {}


class WrongArgumentPlugin(ShiftPlugin):
    @hookimpl
    def adapters_delete_adapter(self, model, sites, adapter_name, config):
        return True


def test_a_hook_with_an_argument_its_spec_lacks_is_refused():
    registry = plugins.Registry()
    with pytest.raises(PluginError, match="plugin 'args' .*adapter_name"):
        registry.register(WrongArgumentPlugin(), "args")
    assert registry.methods == {} and registry.pm.get_plugin("args") is None


def test_registration_hooks_run_once_per_plugin():
    calls = []

    class Counting(ShiftPlugin):
        @hookimpl
        def adapters_register_methods(self, register):
            calls.append(self)
            super().adapters_register_methods(register)

    registry = plugins.Registry()
    registry.register(ToyLoRAPlugin(), "toy_lora")
    counting = Counting()
    registry.register(counting, "counting")
    assert calls == [counting]
    assert sorted(registry.methods) == ["toy_lora", "toy_shift"]


# -- ownership --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CopycatConfig(AdapterConfig):
    method: ClassVar[str] = "copycat"


class CopycatPlugin:
    """Claims its own method, plus whatever names it is given."""

    ADAPTERS_CONTRACT = "1.0"

    def __init__(self, method="copycat", presets=("copycat",), formats=(), classes=()):
        self.method, self.presets, self.formats = method, presets, formats
        self.classes = classes or (CopycatConfig,)

    @hookimpl
    def adapters_register_methods(self, register):
        register(
            MethodSpec(
                self.method,
                tuple(self.classes),
                {p: self.classes[0]() for p in self.presets},
            )
        )

    @hookimpl
    def adapters_register_checkpoint_formats(self, register):
        for item in self.formats:  # a name, or (name, methods, aliases)
            name, methods, aliases = (item, (), ()) if isinstance(item, str) else item
            register(
                CheckpointFormat(
                    name,
                    detect=lambda path: False,
                    read=None,
                    methods=methods,
                    aliases=aliases,
                )
            )


def formats_named(registry, name):
    return [f for f in registry.formats if name in f.names()]


def test_a_second_claimant_of_a_method_is_refused(toy_plugins):
    with pytest.raises(
        PluginConflictError,
        match="method 'toy_lora' is already provided by "
        "plugin 'toy_lora' \\(in-process\\); plugin 'another'",
    ):
        toy_plugins.register(ToyLoRAPlugin(), "another")
    assert toy_plugins.pm.get_plugin("another") is None
    assert toy_plugins.methods["toy_lora"].plugin == "toy_lora"


def test_a_second_claimant_of_a_preset_is_refused_and_the_owner_keeps_it(toy_plugins):
    # 0.1 regression: the rejected plugin's cleanup removed the owner's preset.
    before = dict(toy_plugins.presets)
    with pytest.raises(
        PluginConflictError, match="preset 'toy_lora' is already provided by plugin 'toy_lora'"
    ):
        toy_plugins.register(CopycatPlugin(presets=("copycat", "toy_lora")), "copycat")
    assert toy_plugins.presets == before
    assert toy_plugins.presets["toy_lora"] is before["toy_lora"]
    assert "copycat" not in toy_plugins.methods and "copycat" not in toy_plugins.presets
    model = init_toy(llama())
    model.add_adapter("a", config="toy_lora[r=3]")  # the owner works fully
    assert model.adapters_config["a"] == ToyLoRAConfig(r=3)


def test_a_second_claimant_of_a_checkpoint_format_is_refused(toy_plugins):
    toy_plugins.register(CopycatPlugin(formats=("toyfmt",)), "first")
    [first] = formats_named(toy_plugins, "toyfmt")
    with pytest.raises(
        PluginConflictError,
        match="checkpoint format 'toyfmt' is already provided by plugin 'first'",
    ):
        toy_plugins.register(
            CopycatPlugin(
                method="copycat2",
                presets=("copycat2",),
                formats=("toyfmt",),
                classes=(Copycat2Config,),
            ),
            "second",
        )
    assert formats_named(toy_plugins, "toyfmt") == [first] and first.plugin == "first"
    assert "copycat2" not in toy_plugins.methods  # refused as a whole
    toy_plugins.unregister("first")
    assert "toyfmt" not in toy_plugins.format_names()


def copycat2(formats):
    return CopycatPlugin(
        method="copycat2", presets=("copycat2",), formats=formats, classes=(Copycat2Config,)
    )


def test_two_plugins_may_serve_one_format_name_for_different_methods(toy_plugins):
    toy_plugins.register(CopycatPlugin(formats=(("hub", ("copycat",), ("hub-copy",)),)), "first")
    toy_plugins.register(copycat2((("hub", ("copycat2",), ()),)), "second")
    served = {(f.plugin, f.methods) for f in formats_named(toy_plugins, "hub")}
    assert served == {("first", ("copycat",)), ("second", ("copycat2",))}
    assert toy_plugins.format_for("hub", "copycat2").plugin == "second"
    assert toy_plugins.format_for("hub-copy", "copycat").plugin == "first"
    assert toy_plugins.format_for("hub-copy", "copycat2") is None
    assert toy_plugins.format_for("hub", "toy_lora") is None
    toy_plugins.unregister("second")
    assert [f.plugin for f in formats_named(toy_plugins, "hub")] == ["first"]
    toy_plugins.unregister("first")
    assert formats_named(toy_plugins, "hub") == []


@pytest.mark.parametrize(
    ("first", "second", "name", "methods"),
    [
        # the same method under the same name: a real conflict
        ((("hub", ("copycat",), ()),), (("hub", ("copycat",), ()),), "hub", "'copycat'"),
        # a format for every method owns the name whole, in both orders
        (("hub",), (("hub", ("copycat2",), ()),), "hub", "every method"),
        ((("hub", ("copycat",), ()),), ("hub",), "hub", "every method"),
        # an alias is owned like a name
        ((("hub", ("copycat",), ("old",)),), (("old", ("copycat",), ()),), "old", "'copycat'"),
    ],
)
def test_a_format_name_claimed_twice_for_one_method_is_refused(
    toy_plugins, first, second, name, methods
):
    toy_plugins.register(CopycatPlugin(formats=first), "first")
    try:
        before = list(toy_plugins.formats)
        with pytest.raises(
            PluginConflictError,
            match=f"checkpoint format '{name}' is already provided by plugin 'first' "
            f"\\(in-process\\) for {methods}; plugin 'second'",
        ):
            toy_plugins.register(copycat2(second), "second")
        assert toy_plugins.formats == before and "copycat2" not in toy_plugins.methods
    finally:
        toy_plugins.unregister("first")


def test_a_format_with_methods_as_a_string_is_refused():
    with pytest.raises(PluginError, match="methods='copycat'; give a tuple"):
        plugins.Registry().register(CopycatPlugin(formats=(("hub", "copycat", ()),)), "x")


@dataclass(frozen=True)
class Copycat2Config(AdapterConfig):
    method: ClassVar[str] = "copycat2"


def test_a_second_claimant_of_a_config_class_name_is_refused(toy_plugins):
    @dataclass(frozen=True)
    class ToyLoRAConfig(AdapterConfig):  # same class name, another method
        method: ClassVar[str] = "copycat"

    with pytest.raises(PluginConflictError, match="config class 'ToyLoRAConfig'"):
        toy_plugins.register(CopycatPlugin(classes=(ToyLoRAConfig,)), "copycat")
    assert adapters.ToyLoRAConfig.method == "toy_lora"


def test_a_plugin_claiming_one_name_twice_is_refused():
    registry = plugins.Registry()
    plugin = CopycatPlugin(formats=("fmt", "fmt"))
    with pytest.raises(PluginConflictError, match="'fmt' is already provided by the same plugin"):
        registry.register(plugin, "twice")
    assert registry.methods == {} and registry.formats == []


def test_the_union_method_name_is_reserved():
    @dataclass(frozen=True)
    class UnionConfig(AdapterConfig):
        method: ClassVar[str] = "union"

    with pytest.raises(PluginConflictError, match="reserved by adapters-core"):
        plugins.Registry().register(CopycatPlugin(method="union", classes=(UnionConfig,)), "union")


def test_a_plugin_name_is_owned_too(toy_plugins):
    with pytest.raises(PluginConflictError, match="plugin name 'toy_lora' is already taken"):
        toy_plugins.register(CopycatPlugin(), "toy_lora")
    assert "copycat" not in toy_plugins.methods


def test_plugins_command_shows_a_conflict_and_exits_1(monkeypatch, capsys):
    eps = [
        FakeEntryPoint("toy_lora", ToyLoRAPlugin(), ("adapters-toy-lora", "1.2.3")),
        FakeEntryPoint("zz_copycat", CopycatPlugin(presets=("toy_lora",)), ("adapters-cc", "1")),
    ]
    try:
        _install(monkeypatch, eps)
        code = cli.main(["plugins"])
        out, err = capsys.readouterr()
        assert code == 1
        assert "toy_lora" in out and "copycat" not in out
        assert (
            "CONFLICT: plugin 'zz_copycat' (adapters-cc) was not loaded: PluginConflictError: "
            "preset 'toy_lora' is already provided by plugin 'toy_lora' (adapters-toy-lora 1.2.3)"
        ) in err
        registry = plugins.get_registry()
        assert registry.presets["toy_lora"] == ToyLoRAConfig()
    finally:
        monkeypatch.undo()
        plugins.reload_plugins()


def test_first_party_plugins_load_first_so_a_third_party_claimant_is_the_one_refused(
    monkeypatch,
):
    eps = [  # the copycat's entry point sorts first by name
        FakeEntryPoint("aa_copycat", CopycatPlugin(presets=("toy_lora",)), ("adapters-cc", "1")),
        FakeEntryPoint("zz_lora", ToyLoRAPlugin(), ("adapters-lora", "9.9")),
    ]
    try:
        registry = _install(monkeypatch, eps)
        assert registry.presets["toy_lora"] == ToyLoRAConfig()
        assert [e.name for e in registry.load_errors] == ["aa_copycat"]
        assert registry.load_errors[0].kind == "conflict"
    finally:
        monkeypatch.undo()
        plugins.reload_plugins()


# -- the spec module --------------------------------------------------------------------------
def test_every_hook_spec_says_in_which_contract_version_it_appeared():
    specs = [n for n in dir(hookspecs) if n.startswith("adapters_")]
    assert "adapters_add_adapter" in specs
    core = tuple(int(p) for p in hookspecs.CONTRACT_VERSION.split("."))
    for name in specs:
        doc = getattr(hookspecs, name).__doc__ or ""
        versions = [
            line.split("::")[1].strip()
            for line in doc.splitlines()
            if line.strip().startswith(".. versionadded::")
        ]
        assert len(versions) == 1, name
        assert tuple(int(p) for p in versions[0].split(".")) <= core, name


# -- core structure ---------------------------------------------------------------------------
def _core_import_graph() -> dict[str, set[str]]:
    """module -> the core modules it imports (dotted names under ``adapters``; relative or
    absolute, anywhere in the file: module level, inside functions, under ``TYPE_CHECKING``),
    except inside a module-level ``__getattr__``: those lazy re-exports (contract-1.0 names,
    `adapters.registry`) run only after the module has been fully imported."""
    source = pathlib.Path(adapters.__file__).parent
    modules = {}
    for path in source.rglob("*.py"):
        parts = path.relative_to(source.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lazy = {
            id(node)
            for top in tree.body
            if isinstance(top, ast.FunctionDef) and top.name == "__getattr__"
            for node in ast.walk(top)
        }
        edges = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or id(node) in lazy:
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            for alias in node.names:
                full = f"{base_name}.{alias.name}"
                target = full if full in modules else base_name
                if target in modules and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_core_has_no_import_cycle():
    graph = _core_import_graph()
    loading = "adapters.registry.loading"
    assert {"adapters.configs", loading, "adapters.hookspecs", "adapters.declarations"} <= set(
        graph
    )
    assert loading not in graph["adapters.configs"] and loading not in graph["adapters.hookspecs"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_plugin_guide_documents_every_field_a_plugin_touches():
    import dataclasses

    from adapters.context import ForwardContext

    guide = pathlib.Path(__file__).parents[2] / "docs" / "writing-a-plugin.md"
    text = guide.read_text(encoding="utf-8")
    for cls in (ForwardContext, MethodSpec, CheckpointFormat):
        names = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
        names += [n for n, v in vars(cls).items() if isinstance(v, property)]
        missing = [n for n in names if f"`{n}`" not in text]
        assert not missing, f"{cls.__name__} fields missing from {guide.name}: {missing}"
    for hook in (n for n in dir(hookspecs) if n.startswith("adapters_")):
        assert f"`{hook}`" in text, hook
    assert "ADAPTERS_CONTRACT" in text and "get_adapter" in text


# -- a refused plugin is explained wherever its method is named ---------------------------------
class OldBottleneck:
    """An installed adapters-bottleneck written for adapters 0.1 (no ADAPTERS_CONTRACT)."""

    @hookimpl
    def adapters_register_methods(self, register):
        register(MethodSpec("bottleneck", (OldConfig,)))


@pytest.fixture
def refused_bottleneck(monkeypatch):
    eps = [FakeEntryPoint("bottleneck", OldBottleneck(), ("adapters-bottleneck", "0.1.0"))]
    yield _install(monkeypatch, eps)
    monkeypatch.undo()
    plugins.reload_plugins()


REFUSED = "installed but was refused when plugins were loaded: PluginContractError"


def test_init_names_the_refusal_not_a_missing_install(refused_bottleneck):
    model = llama()
    interface = adapters.AdapterModelInterface(
        **{**SEED_INTERFACE, "adapter_methods": ["bottleneck"]}
    )
    with pytest.warns(UserWarning) as caught:
        adapters.init(model, interface=interface)
    message = str(caught[0].message)
    assert "enables adapter method 'bottleneck', which comes from plugin 'bottleneck' " in message
    assert "(adapters-bottleneck), which is installed but was refused" in message
    assert REFUSED in message and "declares no plugin contract version" in message
    assert "pip install adapters-bottleneck" not in message


def test_add_adapter_and_config_names_give_the_refusal(refused_bottleneck):
    model = llama()
    interface = adapters.AdapterModelInterface(**{**SEED_INTERFACE, "adapter_methods": ["lora"]})
    adapters.init(model, interface=interface)
    for use in (
        lambda: model.add_adapter("x", config="seq_bn"),
        lambda: adapters.SeqBnConfig,
        lambda: adapters.PfeifferConfig,
    ):
        with pytest.raises(adapters.MethodNotInstalledError, match=REFUSED):
            use()


def test_a_method_that_is_simply_missing_still_says_what_to_install(core_alone):
    with pytest.raises(adapters.MethodNotInstalledError) as caught:
        adapters.SeqBnConfig  # noqa: B018
    assert "pip install adapters-bottleneck" in str(caught.value)
    assert "refused" not in str(caught.value)
