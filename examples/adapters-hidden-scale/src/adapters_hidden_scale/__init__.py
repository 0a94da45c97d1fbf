"""A complete, minimal adapters plugin: ``hidden_scale`` multiplies each layer's output hidden
state by ``1 + s``, with ``s`` a learned vector per layer (zero at start, so a new adapter
changes nothing until trained). It is the worked example of docs/writing-a-plugin.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from adapters import AdapterConfig, Average, BatchSplit, ConfigError, MethodSpec, Stack, hookimpl
from adapters.composition import Rows, apply_setup
from adapters.context import context_for

#: The plugin contract version this plugin implements (see adapters.hookspecs).
ADAPTERS_CONTRACT = "1.0"


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


class ScaleUnit(nn.Module):
    """The parameters of one adapter at one layer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(width))


class ScaleHost(nn.Module):
    """Lives on a layer; holds every hidden-scale adapter of that layer and its forward hook."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.units = nn.ModuleDict()
        self.__dict__["model"] = model  # a plain reference, not a submodule
        self.handle = None

    def hook(self, module: nn.Module, args: tuple, output: object) -> object:
        setup = context_for(self.model).setup
        if setup is None:
            return None  # nothing active: leave the output alone
        hidden = output[0] if isinstance(output, tuple) else output

        def scale(name: str, h: torch.Tensor, rows: Rows) -> torch.Tensor:
            return h * (1 + self.units[name].scale.to(h.dtype))

        new = apply_setup(setup, hidden, scale, owns=lambda name: name in self.units)
        return (new, *output[1:]) if isinstance(output, tuple) else new


def _layers(sites, config: HiddenScaleConfig):
    for layer in sites.layers:
        if config.layers == "all" or layer.index in config.layers:
            yield layer


@hookimpl
def adapters_register_methods(register) -> None:
    register(
        MethodSpec(
            name="hidden_scale",
            config_classes=(HiddenScaleConfig,),
            presets={"hidden_scale": HiddenScaleConfig()},
            compositions=(Stack, BatchSplit, Average),
        )
    )


@hookimpl
def adapters_add_adapter(model, sites, name, config):
    if not isinstance(config, HiddenScaleConfig):
        return None
    created = {}
    for layer in _layers(sites, config):
        module = layer.layer.module
        host = getattr(module, "hidden_scale", None)
        if host is None:
            host = ScaleHost(model)
            module.hidden_scale = host  # registered as a submodule of the layer
            host.handle = module.register_forward_hook(host.hook)
        host.units[name] = ScaleUnit(layer.hidden_size)
        created[layer.layer.path] = host.units[name]
    return created


@hookimpl
def adapters_delete_adapter(model, sites, name, config):
    if not isinstance(config, HiddenScaleConfig):
        return None
    for layer in _layers(sites, config):
        module = layer.layer.module
        host = module.hidden_scale
        del host.units[name]
        if not len(host.units):
            host.handle.remove()
            del module.hidden_scale
    return True
