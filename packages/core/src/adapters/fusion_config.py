"""AdapterFusion configs: method-independent data describing a fusion layer.

Names, fields and defaults are AdapterHub's (``"static"`` and ``"dynamic"``, Pfeiffer et al.,
2021). Core only stores, validates and saves them; the method that owns `adapters.Fuse`
(e.g. ``adapters-bottleneck``) builds the layer from them in its ``adapters_add_fusion`` hook.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .configs import load_json_strict, parse_config_string
from .errors import ConfigError


@dataclass(frozen=True, eq=False)
class AdapterFusionConfig:
    """The architecture of a fusion layer (AdapterHub's fields; defaults of ``"dynamic"``).

    Attributes:
        key: learn a key projection of the children's outputs.
        query: learn a query projection of the layer's output.
        value: learn a value projection of the children's outputs.
        query_before_ln: take the query before the sub-block's layer norm.
        regularization: add the value matrix's distance to identity to the loss
            (``model.get_fusion_regularization_loss()`` in AdapterHub).
        residual_before: add the residual before the fusion instead of after it.
        temperature: anneal a softmax temperature during training.
        value_before_softmax: apply the value projection before the attention softmax.
        value_initialized: initialise the value projection to identity (a bool; AdapterHub
            types it as ``str`` but uses it as a truth value).
        dropout_prob: dropout on the attention scores; ``None`` for the model's default.

    Example::

        model.add_adapter_fusion(Fuse("a", "b"), config="dynamic[temperature=True]")
    """

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool | str = True
    dropout_prob: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "dropout_prob":
                ok = value is None or (
                    isinstance(value, int | float)
                    and not isinstance(value, bool)
                    and 0 <= value < 1
                )
                expected = "None or a number in [0, 1)"
            elif f.name == "value_initialized":
                ok = isinstance(value, bool | str)
                expected = "True/False"
            else:
                ok = isinstance(value, bool)
                expected = "True or False"
            if not ok:
                raise ConfigError(
                    f"{type(self).__name__}.{f.name}={value!r} is invalid; expected {expected}"
                )

    def __eq__(self, other: object) -> bool:
        # Equal values are the same layer, whichever preset class they came from.
        return isinstance(other, AdapterFusionConfig) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.to_dict().items())))

    def replace(self, **changes: Any) -> AdapterFusionConfig:
        """A copy with ``changes`` applied (unknown fields raise `ConfigError`)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(
                f"{type(self).__name__} has no option(s) {unknown}; options: {sorted(known)}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterFusionConfig:
        """Build a config from ``to_dict`` output (or AdapterHub's saved fusion config, whose
        extra ``"architecture"`` key is ignored when it says ``"fusion"``)."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"a fusion config dict is needed (e.g. {{'temperature': True}}); got "
                f"{type(data).__name__} {data!r}"
            )
        data = dict(data)
        if data.pop("architecture", "fusion") not in ("fusion", None):
            raise ConfigError(f"not a fusion config: {dict(data)!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no option(s) {unknown}; options: {sorted(known)}"
            )
        return cls(**data)


@dataclass(frozen=True, eq=False)
class StaticAdapterFusionConfig(AdapterFusionConfig):
    """``"static"``: no value projection, no regularisation."""

    value: bool = False
    regularization: bool = False
    value_initialized: bool | str = False


@dataclass(frozen=True, eq=False)
class DynamicAdapterFusionConfig(AdapterFusionConfig):
    """``"dynamic"`` (the default): a value projection initialised to identity, regularised."""


FUSION_PRESETS: dict[str, AdapterFusionConfig] = {
    "static": StaticAdapterFusionConfig(),
    "dynamic": DynamicAdapterFusionConfig(),
}
DEFAULT_FUSION_CONFIG = "dynamic"


def resolve_fusion_config(config: Any = None) -> AdapterFusionConfig:
    """Turn what a user passes as a fusion ``config=`` into a config object: ``None`` (the
    default, ``"dynamic"``), a preset name with optional overrides (``"static"``,
    ``"dynamic[temperature=True]"``), a dict, a config object, or the path of a JSON file."""
    if config is None:
        config = DEFAULT_FUSION_CONFIG
    if isinstance(config, AdapterFusionConfig):
        return config
    if isinstance(config, Mapping):
        return AdapterFusionConfig.from_dict(config)
    if isinstance(config, os.PathLike) or (isinstance(config, str) and config.endswith(".json")):
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise ConfigError(f"fusion config file {path!r} does not exist")
        data = load_json_strict(path, error=ConfigError)
        if isinstance(data, dict) and isinstance(data.get("config"), Mapping):
            data = data["config"]
        return AdapterFusionConfig.from_dict(data)
    if not isinstance(config, str):
        raise ConfigError(
            f"a fusion config must be 'static', 'dynamic', a dict, an AdapterFusionConfig or a "
            f"JSON path; got {type(config).__name__}"
        )
    name, overrides = parse_config_string(config)
    preset = FUSION_PRESETS.get(name)
    if preset is None:
        raise ConfigError(
            f"unknown fusion config {name!r}; presets: {', '.join(sorted(FUSION_PRESETS))}"
        )
    return preset.replace(**overrides) if overrides else preset


@dataclass(frozen=True)
class AdapterFusion:
    """What ``model.adapter_fusions`` tells about one fusion layer.

    Attributes:
        name: the fusion's name (what a `adapters.Fuse` block's ``name`` must be to use it).
        adapter_names: the fused adapters, in order.
        config: its `AdapterFusionConfig`.
        method: the method that owns the layer.
    """

    name: str
    adapter_names: tuple[str, ...]
    config: AdapterFusionConfig
    method: str
