"""ReFT configs: AdapterHub names and defaults, validation, saving every field."""

from __future__ import annotations

import pytest

import adapters
from adapters import AdapterConfig, ConfigError
from adapters.configs import resolve_config
from adapters_reft import DiReftConfig, LoReftConfig, NoReftConfig, ReftConfig


def test_presets_have_adapterhub_defaults():
    loreft, noreft, direft = (resolve_config(n) for n in ("loreft", "noreft", "direft"))
    assert (loreft.r, loreft.prefix_positions, loreft.suffix_positions) == (1, 3, 0)
    assert (loreft.orthogonality, loreft.subtract_projection) == (True, True)
    assert (noreft.orthogonality, noreft.subtract_projection) == (False, True)
    assert (direft.orthogonality, direft.subtract_projection) == (False, False)
    assert {c.dropout for c in (loreft, noreft, direft)} == {0.05}
    assert {c.layers for c in (loreft, noreft, direft)} == {"all"}
    assert not any(c.tied_weights for c in (loreft, noreft, direft))


def test_config_classes_resolve_from_the_adapters_namespace():
    assert adapters.LoReftConfig is LoReftConfig
    assert adapters.DiReftConfig is DiReftConfig


def test_preset_string_with_overrides():
    config = resolve_config("loreft[r=4, suffix_positions=2, layers=[0, 1]]")
    assert isinstance(config, LoReftConfig)
    assert (config.r, config.suffix_positions, config.layers) == (4, 2, (0, 1))


def test_subtract_projection_is_a_saved_field():
    data = DiReftConfig().to_dict()
    assert data["method"] == "reft" and data["subtract_projection"] is False
    restored = AdapterConfig.from_dict(data)
    assert restored.subtract_projection is False
    assert restored.to_dict() == data


def test_layers_list_round_trips_through_json_as_tuple():
    config = NoReftConfig(layers=[2, 0])
    restored = AdapterConfig.from_dict(config.to_dict())
    assert restored.layers == (2, 0)


def test_base_config_requires_the_core_options():
    with pytest.raises(TypeError):
        ReftConfig()  # type: ignore[call-arg]
    config = ReftConfig(
        layers="all", prefix_positions=1, suffix_positions=1, r=2, orthogonality=True
    )
    assert config.n_units == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"r": 0}, "r=0"),
        ({"layers": "some"}, "layers='some'"),
        ({"layers": [0, 0]}, "twice"),
        ({"prefix_positions": 0, "suffix_positions": 0}, "edit nothing"),
        ({"prefix_positions": -1}, "prefix_positions=-1"),
        ({"non_linearity": "softplusish"}, "softplusish"),
        ({"dtype": "int8"}, "int8"),
        ({"dropout": 1.5}, "dropout=1.5"),
        ({"orthogonality": "yes"}, "orthogonality='yes'"),
    ],
)
def test_invalid_options_raise_naming_the_value(options, message):
    with pytest.raises(ConfigError, match=message):
        LoReftConfig(**options)


@pytest.mark.parametrize(
    ("options", "units"),
    [
        ({"prefix_positions": 3, "suffix_positions": 0}, 1),
        ({"prefix_positions": 0, "suffix_positions": 3}, 1),
        ({"prefix_positions": 2, "suffix_positions": 2}, 2),
        ({"prefix_positions": 2, "suffix_positions": 2, "tied_weights": True}, 1),
    ],
)
def test_one_unit_per_used_side(options, units):
    assert LoReftConfig(**options).n_units == units
