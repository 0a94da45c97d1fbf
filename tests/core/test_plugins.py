import types

import pytest

import adapters
from adapters import cli, plugins

from .conftest import ToyLoRAPlugin


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
    good = types.SimpleNamespace()
    plugin = ToyLoRAPlugin()
    good = plugin
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


def test_two_plugins_providing_one_method_is_an_error(toy_plugins):
    with pytest.raises(adapters.ConfigError, match="provided twice"):
        toy_plugins.register(ToyLoRAPlugin(), "another")
    assert toy_plugins.pm.get_plugin("another") is None
