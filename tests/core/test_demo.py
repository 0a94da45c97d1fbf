"""``adapters demo`` lives in core and uses whichever method is installed (here: the in-test
plugins, so it runs with adapters-core alone)."""

import os
from dataclasses import dataclass
from typing import ClassVar

import pytest

from adapters import AdapterConfig, MethodSpec, cli, hookimpl, plugins
from adapters.errors import ConfigError, MethodNotInstalledError
from adapters.tools.demo import demo_config, demo_method

from .toy_plugins import ToyLoRAConfig, ToyLoRAPlugin, ToyShiftPlugin

pytest.importorskip("transformers")


def test_demo_trains_saves_and_reloads_an_adapter_of_the_chosen_method(
    toy_plugins, tmp_path, capsys
):
    code = cli.main(
        ["demo", "--method", "toy_lora", "--steps", "8", "--output-dir", str(tmp_path), "--quick"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "method: toy_lora; adapter config: ToyLoRAConfig(r=2" in out
    assert "outputs agree (max |difference| 0.00e+00)" in out
    saved = set(os.listdir(tmp_path / "demo"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved


def test_demo_takes_any_config_string(toy_plugins, tmp_path, capsys):
    code = cli.main(
        [
            "demo",
            "--config",
            "toy_wide_lora[r=3]",
            "--steps",
            "4",
            "--output-dir",
            str(tmp_path),
            "--quick",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "method: toy_lora; adapter config: ToyWideLoRAConfig(r=3" in out


def test_the_default_method_is_the_first_installed_and_its_first_preset(toy_plugins):
    registry = plugins.Registry()
    registry.register(ToyShiftPlugin(), "toy_shift")
    registry.register(ToyLoRAPlugin(), "toy_lora")
    assert demo_method(registry) == "toy_lora"  # the first by name among third parties
    assert demo_config(toy_plugins, "toy_lora") == ToyLoRAConfig()  # its first preset
    assert demo_config(toy_plugins, "toy_lora", "toy_lora[r=5]") == ToyLoRAConfig(r=5)
    with pytest.raises(ConfigError, match="not for --method 'toy_lora'"):
        demo_config(toy_plugins, "toy_lora", "toy_shift")


@dataclass(frozen=True)
class FakeReftConfig(AdapterConfig):
    method: ClassVar[str] = "reft"


class FakeFirstParty:
    """Stands in for an installed first-party method (by name only)."""

    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_register_methods(self, register):
        register(MethodSpec("reft", (FakeReftConfig,), {"fake_reft": FakeReftConfig()}))


def test_a_first_party_method_is_preferred_as_the_default():
    registry = plugins.Registry()
    registry.register(FakeFirstParty(), "reft")
    registry.register(ToyLoRAPlugin(), "toy_lora")
    assert demo_method(registry) == "reft"


def test_demo_without_any_method_says_what_to_install(core_alone, capsys):
    assert cli.main(["demo"]) == 2
    assert "none is installed; install one, e.g. pip install adapters-lora" in (
        capsys.readouterr().err
    )
    with pytest.raises(MethodNotInstalledError):
        demo_method(core_alone)


def test_demo_with_an_unknown_method_exits_2(toy_plugins, capsys):
    assert cli.main(["demo", "--method", "nope"]) == 2
    assert "adapter method 'nope' is not installed" in capsys.readouterr().err


class _CommandEntryPoint:
    name = "demo"
    dist = None

    def load(self):
        raise AssertionError("a command named like a built-in one must not even be loaded")


def test_a_plugin_command_cannot_replace_a_builtin_one(monkeypatch, capsys):
    real = cli.metadata.entry_points
    monkeypatch.setattr(
        cli.metadata,
        "entry_points",
        lambda group=None: [_CommandEntryPoint()] if group == cli.COMMANDS_GROUP else real(),
    )
    parser = cli.build_parser()
    assert parser.parse_args(["demo", "--quick"]).func.__module__ == "adapters.tools.demo"
    assert "command plugin 'demo' (unknown distribution) ignored" in capsys.readouterr().err
