import json

import pytest

from adapters import AdapterConfig, ConfigError, ConfigUnion
from adapters.configs import parse_config_string, resolve_config

from .toy_plugins import ToyLoRAConfig, ToyShiftConfig


def test_preset_string_with_literal_overrides(toy_plugins):
    config = resolve_config("toy_lora[r=16, targets=('q', 'v', 'o')]")
    assert config == ToyLoRAConfig(r=16, targets=("q", "v", "o"))


def test_override_values_are_parsed_without_eval(toy_plugins):
    with pytest.raises(ConfigError, match="not a literal"):
        resolve_config("toy_lora[r=__import__('os').getpid()]")
    with pytest.raises(ConfigError, match="key=value"):
        parse_config_string("toy_lora[16]")


def test_unknown_option_names_the_options(toy_plugins):
    with pytest.raises(ConfigError, match=r"no option\(s\) \['rank'\]"):
        resolve_config("toy_lora[rank=4]")


def test_unknown_preset_lists_installed_ones(toy_plugins):
    with pytest.raises(ConfigError, match="installed presets: .*toy_lora"):
        resolve_config("nonexistent")


def test_union_string(toy_plugins):
    config = resolve_config("toy_lora[r=2]|toy_shift")
    assert config == ConfigUnion(ToyLoRAConfig(r=2), ToyShiftConfig())


def test_union_parts_must_differ():
    with pytest.raises(ConfigError, match="different methods"):
        ConfigUnion(ToyLoRAConfig(), ToyLoRAConfig(r=4))


def test_to_dict_from_dict_round_trip_through_the_registry(toy_plugins):
    config = ToyLoRAConfig(r=5, targets=("k",))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == "toy_lora"
    assert AdapterConfig.from_dict(data) == config
    union = ConfigUnion(config, ToyShiftConfig(prefix=3))
    assert AdapterConfig.from_dict(json.loads(json.dumps(union.to_dict()))) == union


def test_json_file(toy_plugins, tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(ToyShiftConfig(prefix=4).to_dict()))
    assert resolve_config(str(path)) == ToyShiftConfig(prefix=4)
    assert resolve_config(path) == ToyShiftConfig(prefix=4)


def test_replace_rejects_unknown_fields():
    assert ToyLoRAConfig().replace(r=3).r == 3
    with pytest.raises(ConfigError, match="options"):
        ToyLoRAConfig().replace(alpha=3)


def test_configs_are_frozen():
    with pytest.raises(AttributeError):
        ToyLoRAConfig().r = 3
