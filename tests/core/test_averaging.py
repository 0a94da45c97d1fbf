"""average_adapter in core: which configs average linearly, default weights, svd_rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from adapters import AdapterConfig
from adapters._runtime.averaging import configs_equal_for_average
from adapters.errors import ConfigError

from .conftest import init_toy, randomize


@dataclass(frozen=True)
class _Cfg(AdapterConfig):
    method: ClassVar[str] = "toy_lora"
    r: int = 2
    dropout: float = 0.0
    init_weights: str = "lora"


def test_configs_differing_only_in_dropout_or_init_weights_average_linearly():
    assert configs_equal_for_average([_Cfg(), _Cfg(dropout=0.1, init_weights="bert")])
    assert not configs_equal_for_average([_Cfg(), _Cfg(r=3)])
    assert not configs_equal_for_average([_Cfg(), _Cfg(r=3, dropout=0.1)])


@pytest.fixture
def two(toy_plugins):
    model = init_toy()
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, config="toy_lora[r=3]")
        randomize(model, name, seed=seed)
    return model


def test_default_weights_are_equal_even_without_normalising(two):
    # AdapterHub: weights=None means 1/n each, whatever normalize_weights says
    two.average_adapter("avg", ["a", "b"], normalize_weights=False)
    a, b, avg = (two.adapter_state_dict(n) for n in ("a", "b", "avg"))
    for key, value in avg.items():
        torch.testing.assert_close(value, 0.5 * a[key] + 0.5 * b[key])


def test_svd_rank_none_is_accepted_and_means_absent(two):
    two.average_adapter("avg", ["a", "b"], svd_rank=None)  # linear takes no options
    assert "avg" in two.adapters_config
    with pytest.raises(ConfigError, match="svd_rank"):
        two.average_adapter("bad", ["a", "b"], svd_rank=2)
    assert "bad" not in two.adapters_config
