"""The bottleneck plugin: hook implementations adapters-core calls (entry point ``bottleneck``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from adapters.plugin import (
    AdapterConfig,
    Average,
    BatchSplit,
    CheckpointFormat,
    ConfigError,
    Fuse,
    LayerSite,
    MethodSpec,
    ModelSites,
    ModuleSite,
    Split,
    Stack,
    SubBlockSite,
    hookimpl,
    made_like,
)

from . import interop
from .config import CLASS_ALIASES, CONFIG_CLASSES, PRESETS, BnConfig
from .layer import BottleneckAdapter, BottleneckFusion, PHMShared, invertible_adapter
from .placement import (
    HOST_NAMES,
    INV_HOST,
    SHARED_HOST,
    InvertibleHost,
    SubBlockHost,
)

#: The plugin contract version this plugin implements (see adapters.hookspecs).
ADAPTERS_CONTRACT = "1.1"

#: core's sub-block kind per location.
_SUB_BLOCKS = {"mh_adapter": "self_attn", "cross_adapter": "cross_attn", "output_adapter": "ffn"}

#: interface fields per location: (output site, residual-input field).
_FIELDS = {
    "mh_adapter": ("attn_o_proj (of layer_self_attn)", "layer_pre_self_attn"),
    "cross_adapter": ("attn_o_proj (of layer_cross_attn)", "layer_pre_cross_attn"),
    "output_adapter": ("layer_output_proj", "layer_pre_ffn"),
}


@dataclass
class Placement:
    """Where one adapter module goes: a layer's sub-block, its sites and sizes."""

    layer: LayerSite
    location: str
    sub_block: SubBlockSite
    output: ModuleSite
    residual: ModuleSite | None
    norm: ModuleSite | None
    hidden: int
    bottleneck: int

    @property
    def key(self) -> str:
        """The name-independent key: ``{layer path}.bottleneck.{location}``."""
        return adapter_key(self.layer, self.location)


def adapter_key(layer: LayerSite, location: str) -> str:
    """The key core saves an adapter's module at a layer's sub-block under."""
    return f"{layer.layer.path}.bottleneck.{location}"


def invertible_key(sites: ModelSites) -> str:
    """The key of an adapter's invertible block (on the input embeddings)."""
    assert sites.embeddings is not None
    return f"{sites.embeddings.path}.bottleneck_invertible"


def shared_key(sites: ModelSites) -> str:
    """The key of an adapter's parameters shared across layers (Compacter)."""
    base = sites.base_model.path
    return f"{base}.bottleneck_shared" if base else "bottleneck_shared"


@hookimpl
def adapters_register_methods(register: Callable[[MethodSpec], None]) -> None:
    """Declare the ``bottleneck`` method, its configs and AdapterHub's preset names."""
    register(
        MethodSpec(
            name="bottleneck",
            config_classes=CONFIG_CLASSES,
            presets=dict(PRESETS),
            compositions=(Stack, BatchSplit, Average, Split, Fuse),
            can_merge=False,
            class_aliases=dict(CLASS_ALIASES),
        )
    )


@hookimpl
def adapters_register_checkpoint_formats(register: Callable[[CheckpointFormat], None]) -> None:
    """Declare the AdapterHub bottleneck reader and writer (`interop.FORMATS`)."""
    for fmt in interop.FORMATS:
        register(fmt)


def plan(sites: ModelSites, config: BnConfig) -> list[Placement]:
    """Every sub-block ``config`` adapts, checked against the interface; raises `ConfigError`
    naming the missing interface field (pitfall 15) before anything is created."""
    placements = []
    crossed = False
    for layer in sites.layers:
        if not config.uses_layer(layer.index):
            continue
        hidden = layer.hidden_size
        for location in config.locations():
            field, residual_field = _FIELDS[location]
            attn = {"mh_adapter": layer.self_attn, "cross_adapter": layer.cross_attn}.get(location)
            if location == "cross_adapter" and attn is None:
                continue  # encoder layers of an encoder-decoder model
            crossed = crossed or location == "cross_adapter"
            sub = layer.sub_block(_SUB_BLOCKS[location])
            output = layer.output if location == "output_adapter" else attn and attn.o
            if output is None or sub is None:
                raise ConfigError(
                    f"{type(config).__name__} with {location}=True needs the interface field "
                    f"{field} in layer {layer.layer.path!r}; add it to the AdapterModelInterface "
                    f"or set {location}=False"
                )
            residual = sub.residual
            norm = sub.norm if sub.norm_placement == "post" else None
            if sub.norm_placement == "sandwich" and not config.original_ln_after:
                raise ConfigError(
                    f"{type(config).__name__}.original_ln_after=False replaces the residual add, "
                    f"but layer {layer.layer.path!r} adds its residual after a sandwich norm, in "
                    "the layer's own code; use original_ln_after=True on this model"
                )
            _check_residual(config, layer, location, residual, norm, residual_field)
            if not hidden:
                raise ConfigError(
                    f"cannot tell the hidden width of layer {layer.layer.path!r}: name "
                    "attn_o_proj, layer_output_proj or a layer norm in the interface"
                )
            size = int(hidden // config.factor_for(layer.index))
            size = max(size, 1)
            if config.phm_layer and (hidden % config.phm_dim or size % config.phm_dim):
                raise ConfigError(
                    f"{type(config).__name__}.phm_dim={config.phm_dim} must divide the hidden "
                    f"size {hidden} and the bottleneck size {size} (hidden / reduction_factor) "
                    f"at layer {layer.layer.path!r}; change phm_dim or reduction_factor"
                )
            placements.append(
                Placement(layer, location, sub, output, residual, norm, int(hidden), size)
            )
    if config.cross_adapter and not crossed:
        raise ConfigError(
            f"{type(config).__name__}.cross_adapter=True but no layer of this model has a "
            "cross-attention named by the interface (layer_cross_attn); set cross_adapter=False"
        )
    if config.inv_adapter and sites.embeddings is None:
        raise ConfigError(
            f"{type(config).__name__}.inv_adapter={config.inv_adapter!r} needs the input "
            "embeddings: set model_embeddings in the AdapterModelInterface, or inv_adapter=None"
        )
    if config.shared_W_phm and len({p.bottleneck for p in placements}) > 1:
        raise ConfigError("shared_W_phm=True needs the same hidden size in every layer")
    return placements


def _check_residual(
    config: BnConfig,
    layer: LayerSite,
    location: str,
    residual: ModuleSite | None,
    norm: ModuleSite | None,
    residual_field: str,
) -> None:
    reasons = []
    if config.is_parallel:
        reasons.append("a parallel adapter reads the sub-block's input")
    if config.original_ln_before:
        reasons.append("original_ln_before=True adds the residual before the adapter")
    if not config.original_ln_after and norm is None:
        reasons.append("original_ln_after=False on a pre-LN sub-block removes the residual add")
    if reasons and residual is None:
        raise ConfigError(
            f"{type(config).__name__} at {location} of layer {layer.layer.path!r} needs the "
            f"sub-block's residual input ({'; '.join(reasons)}), but the interface has no "
            f"{residual_field}; name the module whose input is the residual stream before this "
            "sub-block (e.g. the layer norm before it on a pre-LN model)"
        )


@hookimpl
def adapters_add_adapter(
    model: nn.Module, sites: ModelSites, name: str, config: AdapterConfig
) -> dict[str, nn.Module] | None:
    """Create the adapter's modules at every planned sub-block (and its invertible and shared
    parts), hooking each layer's own sites."""
    if hasattr(nn.ModuleDict(), name) or "." in name:
        raise ConfigError(
            f"adapter name {name!r} cannot be used for a bottleneck adapter: it is an "
            "attribute of torch.nn.ModuleDict or contains '.'; choose another name"
        )
    placements = plan(sites, config)
    for placement in placements:
        host_name = HOST_NAMES[placement.location]
        existing = getattr(placement.layer.layer.module, host_name, None)
        if existing is not None and not isinstance(existing, SubBlockHost):
            raise ConfigError(
                f"layer {placement.layer.layer.path!r} already has an attribute {host_name!r}"
            )
    created: dict[str, nn.Module] = {}
    shared = None
    if config.phm_layer and (config.shared_phm_rule or config.shared_W_phm) and placements:
        shared = made_like(
            sites.base_model.module,
            PHMShared,
            config,
            placements[0].hidden,
            placements[0].bottleneck,
        )
        holder = _holder(sites.base_model.module, SHARED_HOST)
        holder[name] = shared
        created[shared_key(sites)] = shared
    for placement in placements:
        host = SubBlockHost.attach(
            placement.layer.layer.module,
            HOST_NAMES[placement.location],
            model,
            placement.location,
            placement.layer.layer.path,
            placement.sub_block,
        )
        adapter = made_like(
            placement.layer.layer.module,
            BottleneckAdapter,
            placement.hidden,
            placement.bottleneck,
            config,
            shared,
        )
        host.add_unit(name, adapter)
        host.sync_hooks()
        created[placement.key] = adapter
    if config.inv_adapter:
        embeddings = sites.embeddings
        assert embeddings is not None
        width = _embedding_width(embeddings.module)
        block = made_like(embeddings.module, invertible_adapter, width, config)
        inv = InvertibleHost.attach(embeddings.module, INV_HOST, model)
        inv.add_unit(name, block)
        created[invertible_key(sites)] = block
    return created


@hookimpl
def adapters_delete_adapter(
    model: nn.Module, sites: ModelSites, name: str, config: AdapterConfig
) -> bool | None:
    """Remove adapter ``name``'s modules; hosts left empty lose their hooks."""
    for layer in sites.layers:
        for host_name in HOST_NAMES.values():
            host = getattr(layer.layer.module, host_name, None)
            if not isinstance(host, SubBlockHost) or name not in host.adapters:
                continue
            host.remove_unit(name)
            if host.is_empty:
                host.detach()
            else:
                host.sync_hooks()
    if sites.embeddings is not None:
        inv = getattr(sites.embeddings.module, INV_HOST, None)
        if isinstance(inv, InvertibleHost) and name in inv.adapters:
            inv.remove_unit(name)
            if inv.is_empty:
                inv.detach()
    holder = getattr(sites.base_model.module, SHARED_HOST, None)
    if isinstance(holder, nn.ModuleDict) and name in holder:
        del holder[name]
        if not len(holder):
            delattr(sites.base_model.module, SHARED_HOST)
    return True


def _fusion_hosts(sites: ModelSites, children: list[str]) -> list[tuple[str, SubBlockHost]]:
    """(key prefix, host) of every sub-block where all ``children`` have an adapter."""
    found = []
    for layer in sites.layers:
        for location, host_name in HOST_NAMES.items():
            host = getattr(layer.layer.module, host_name, None)
            if isinstance(host, SubBlockHost) and all(c in host.adapters for c in children):
                found.append((adapter_key(layer, location), host))
    return found


@hookimpl
def adapters_add_fusion(
    model: nn.Module,
    sites: ModelSites,
    name: str,
    children: list[str],
    config: object,
    method: str,
) -> dict[str, nn.Module] | None:
    """Create an AdapterFusion layer at every sub-block where all ``children`` sit."""
    hosts = _fusion_hosts(sites, children)
    if not hosts:
        raise ConfigError(
            f"adapters {children} share no sub-block (each needs an adapter at the same "
            "attention or feed-forward sub-block of some layer); nothing to fuse"
        )
    created: dict[str, nn.Module] = {}
    for key, host in hosts:
        like = host.adapters[children[-1]]
        fusion = made_like(like, BottleneckFusion, like.hidden, config)
        host.add_fusion(name, fusion)
        created[f"{key}.fusion"] = fusion
    return created


@hookimpl
def adapters_delete_fusion(
    model: nn.Module, sites: ModelSites, name: str, children: list[str], method: str
) -> bool | None:
    """Remove fusion layer ``name`` from every sub-block."""
    for layer in sites.layers:
        for host_name in HOST_NAMES.values():
            host = getattr(layer.layer.module, host_name, None)
            if isinstance(host, SubBlockHost) and name in host.fusions:
                del host.fusions[name]
    return True


def _holder(module: nn.Module, attr: str) -> nn.ModuleDict:
    holder = getattr(module, attr, None)
    if holder is None:
        holder = nn.ModuleDict()
        module.add_module(attr, holder)
    return holder


def _embedding_width(module: nn.Module) -> int:
    width = getattr(module, "embedding_dim", None)
    if isinstance(width, int):
        return width
    weight = getattr(module, "weight", None)
    if weight is not None and weight.ndim == 2:
        return int(weight.shape[1])
    # An embedding block (BERT's word + position embeddings and norm): its token embeddings.
    inner = next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)
    if inner is not None:
        return inner.embedding_dim
    raise ConfigError(
        f"cannot tell the width of the embeddings module {type(module).__name__}; "
        "model_embeddings must name an nn.Embedding (or a module with embedding_dim)"
    )
