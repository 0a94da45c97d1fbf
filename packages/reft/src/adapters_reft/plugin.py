"""The ReFT plugin: hook implementations that adapters-core calls (entry point ``reft``)."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from adapters.plugin import (
    AdapterConfig,
    Average,
    BatchSplit,
    CheckpointFormat,
    ConfigError,
    LayerSite,
    MethodSpec,
    ModelSites,
    Stack,
    hookimpl,
    made_like,
    placement_of,
)

from . import interop
from .config import PRESETS, DiReftConfig, LoReftConfig, NoReftConfig, ReftConfig, torch_dtype
from .layer import HOST_ATTR, ReftHost, ReftIntervention

#: The plugin contract version this plugin implements (see adapters.hookspecs).
ADAPTERS_CONTRACT = "1.1"

#: The name-independent key of an adapter's intervention at a layer: ``{layer path}.reft``.
KEY_SUFFIX = "reft"


def intervention_key(layer: LayerSite) -> str:
    """The prefix of a layer's intervention keys (``model.layers.0.reft``)."""
    return f"{layer.layer.path}.{KEY_SUFFIX}"


def unit_names(config: ReftConfig) -> list[str]:
    """The stable checkpoint names of an intervention's parameter sets, in unit order:
    ``"prefix"`` and/or ``"suffix"``, or ``"both"`` for one set shared by both sides
    (``tied_weights``). Saved keys are ``{layer}.reft.{name}.{param}`` with ``param`` one of
    ``learned_source.weight``, ``learned_source.bias``, ``projection.weight``."""
    sides = list(config.sides)
    if config.n_units == 1 and len(sides) == 2:
        return ["both"]
    return sides


def unit_keys(layer: LayerSite, config: ReftConfig) -> list[str]:
    """The keys of the parameter sets of ``config`` at ``layer`` (``model.layers.0.reft.prefix``)."""
    return [f"{intervention_key(layer)}.{name}" for name in unit_names(config)]


_V1_KEY = re.compile(r"^(?P<head>.*\.reft)\.units\.(?P<unit>[0-9]{1,9})\.(?P<param>.+)$")


def upgrade_key(config: AdapterConfig, key: str, format_version: int) -> str:
    """A key saved in checkpoint format 1 (``...reft.units.0.learned_source.weight``) as it is
    named now (``...reft.prefix.learned_source.weight``)."""
    found = _V1_KEY.match(key)
    if found is None or not isinstance(config, ReftConfig):
        return key
    names = unit_names(config)
    index = int(found["unit"])
    if index >= len(names):
        return key
    return f"{found['head']}.{names[index]}.{found['param']}"


def used_layers(sites: ModelSites, config: ReftConfig) -> list[LayerSite]:
    """The layer sites ``config`` intervenes on; unknown indices raise `ConfigError`."""
    if config.layers == "all":
        return list(sites.layers)
    missing = [i for i in config.layers if i >= len(sites.layers)]
    if missing:
        raise ConfigError(
            f"ReftConfig.layers={list(config.layers)} names layers {missing}, but the model has "
            f"{len(sites.layers)} layers (0..{len(sites.layers) - 1}); use indices in that range"
        )
    return [sites.layers[i] for i in config.layers]


@hookimpl
def adapters_register_methods(register: Callable[[MethodSpec], None]) -> None:
    """Declare the ``reft`` method, its configs and presets."""
    register(
        MethodSpec(
            name="reft",
            config_classes=(ReftConfig, LoReftConfig, NoReftConfig, DiReftConfig),
            presets=dict(PRESETS),
            compositions=(Stack, BatchSplit, Average),
            can_merge=False,
            upgrade_key=upgrade_key,
        )
    )


@hookimpl
def adapters_register_checkpoint_formats(register: Callable[[CheckpointFormat], None]) -> None:
    """Declare the AdapterHub ReFT reader (`interop.FORMATS`)."""
    for fmt in interop.FORMATS:
        register(fmt)


@hookimpl
def adapters_add_adapter(
    model: nn.Module, sites: ModelSites, name: str, config: AdapterConfig
) -> dict[str, nn.Module] | None:
    """Create one `ReftIntervention` per used layer and hook it onto the layer's output."""
    if hasattr(nn.ModuleDict(), name):
        raise ConfigError(
            f"adapter name {name!r} cannot be used for a ReFT adapter: it is an attribute of "
            "torch.nn.ModuleDict, which holds the adapters of a layer; choose another name"
        )
    layers = used_layers(sites, config)
    chosen_dtype = torch_dtype(config.dtype) if config.dtype is not None else None
    plan = []
    for layer in layers:
        hidden_size = layer.hidden_size
        if not hidden_size:
            raise ConfigError(
                f"ReFT cannot tell the hidden width of layer {layer.layer.path!r}: the interface "
                "names none of its modules that show it; add attn_o_proj, layer_output_proj or "
                "a layer norm path (layer_pre_self_attn, layer_ln_1, ...) to the interface"
            )
        if config.orthogonality and config.r > hidden_size:
            raise ConfigError(
                f"ReftConfig(orthogonality=True, r={config.r}) needs r <= hidden size "
                f"{hidden_size} of layer {layer.layer.path!r}; lower r"
            )
        existing = getattr(layer.layer.module, HOST_ATTR, None)
        if existing is not None and not isinstance(existing, ReftHost):
            raise ConfigError(
                f"layer {layer.layer.path!r} already has an attribute {HOST_ATTR!r} that is not "
                "ReFT's; ReFT cannot attach to it"
            )
        plan.append((layer, hidden_size))
    created: dict[str, nn.Module] = {}
    for layer, hidden_size in plan:
        module = layer.layer.module
        host = ReftHost.attach(module, HOST_ATTR, model, layer.layer.path)
        # dtype=None: float32, or float64 in a float64 model (never half precision).
        dtype = chosen_dtype or placement_of(module)[1]
        intervention = made_like(
            module, ReftIntervention, hidden_size, config, dtype, None, dtype=dtype
        )
        host.add_unit(name, intervention)
        for key, unit in zip(unit_keys(layer, config), intervention.units):
            created[key] = unit
    return created


@hookimpl
def adapters_delete_adapter(
    model: nn.Module, sites: ModelSites, name: str, config: AdapterConfig
) -> bool | None:
    """Remove adapter ``name``'s interventions; a layer left with none loses its hook."""
    for layer in sites.layers:
        module = layer.layer.module
        host = getattr(module, HOST_ATTR, None)
        if not isinstance(host, ReftHost) or name not in host.interventions:
            continue
        host.remove_unit(name)
        if host.is_empty:
            host.detach()
    return True
