"""The ``hidden_scale`` method's hook implementations (the contract in ``adapters.hookspecs``),
as plain module functions; the ``adapters.methods`` entry point names this module."""

from __future__ import annotations

from adapters.plugin import Average, BatchSplit, MethodSpec, Stack, hookimpl, made_like

from .config import PRESETS, HiddenScaleConfig
from .layer import ScaleHost, ScaleUnit

#: The plugin contract version this plugin implements (see adapters.hookspecs).
ADAPTERS_CONTRACT = "1.1"


def _layers(sites, config: HiddenScaleConfig):
    """The layer sites ``config`` adapts."""
    for layer in sites.layers:
        if config.layers == "all" or layer.index in config.layers:
            yield layer


@hookimpl
def adapters_register_methods(register) -> None:
    """Declare the ``hidden_scale`` method, its config and preset."""
    register(
        MethodSpec(
            name="hidden_scale",
            config_classes=(HiddenScaleConfig,),
            presets=dict(PRESETS),
            compositions=(Stack, BatchSplit, Average),
        )
    )


@hookimpl
def adapters_add_adapter(model, sites, name, config):
    """Give each adapted layer a `ScaleUnit` for ``name`` (and a `ScaleHost` on first use)."""
    created = {}
    for layer in _layers(sites, config):
        module = layer.layer.module
        host = ScaleHost.attach(module, "hidden_scale", model)  # child module + hook
        unit = made_like(module, ScaleUnit, layer.hidden_size)  # placed like the layer
        created[layer.layer.path] = host.add_unit(name, unit)
    return created


@hookimpl
def adapters_delete_adapter(model, sites, name, config):
    """Remove ``name``'s units; a layer left with none loses its host and hook."""
    for layer in _layers(sites, config):
        module = layer.layer.module
        host = module.hidden_scale
        host.remove_unit(name)
        if host.is_empty:
            host.detach()  # removes the hook and the host
    return True
