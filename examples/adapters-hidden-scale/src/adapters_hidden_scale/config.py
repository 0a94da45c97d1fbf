"""The config of the ``hidden_scale`` method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adapters.plugin import AdapterConfig, ConfigError


@dataclass(frozen=True)
class HiddenScaleConfig(AdapterConfig):
    """Config of a hidden-scale adapter.

    Args:
        layers: indices of the layers to adapt, or "all".
    """

    method: ClassVar[str] = "hidden_scale"
    layers: str | tuple[int, ...] = "all"

    def __post_init__(self) -> None:
        if self.layers == "all":
            return
        if not isinstance(self.layers, list | tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.layers
        ):
            raise ConfigError(f"layers must be 'all' or a tuple of ints, got {self.layers!r}")
        # A list (from JSON or a config string) becomes a tuple: configs compare equal after a
        # save/load round trip and stay hashable.
        object.__setattr__(self, "layers", tuple(self.layers))


#: The presets this plugin declares (the method's default first).
PRESETS = {"hidden_scale": HiddenScaleConfig()}
