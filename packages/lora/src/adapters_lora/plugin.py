"""The ``lora`` method's hook implementations (the contract in ``adapters.hookspecs``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapters.plugin import (
    AdapterConfig,
    Average,
    BatchSplit,
    ConfigError,
    MethodSpec,
    ModelSites,
    ModuleSite,
    Stack,
    hookimpl,
    made_like,
)

from .config import PRESETS, DoRAConfig, IA3Config, LoRAConfig
from .layer import HOST_ATTR, LoRAHost, LoRAUnit, is_conv1d, weight_out_in

#: The plugin contract version this plugin implements (see adapters.hookspecs).
ADAPTERS_CONTRACT = "1.1"


@dataclass
class Target:
    """One projection an adapter adapts.

    Attributes:
        site: the projection's site.
        role: ``"q"``, ``"k"``, ``"v"``, ``"o"``, ``"qkv"``, ``"intermediate"`` or ``"output"``.
        attention: ``"self"`` / ``"cross"`` for attention projections, else None.
        layer: the layer's index over all stacks.
        slices: the adapted output ranges (the whole output unless fused).
        matrices: for a fused projection, the adapted matrices (``("q", "v")``).
    """

    site: ModuleSite
    role: str
    attention: str | None
    layer: int
    slices: list[tuple[int, int]]
    matrices: tuple[str, ...] = ()


def targets_of(sites: ModelSites, config: LoRAConfig) -> list[Target]:
    """Every projection ``config`` adapts on ``sites``, in model order.

    Raises:
        ConfigError: a requested projection is missing from the interface, is not linear, a
            fused q/k/v projection cannot be split, or ``leave_out`` names no layer.
    """
    n_layers = len(sites.layers)
    bad = [i for i in config.leave_out if i >= n_layers]
    if bad:
        raise ConfigError(
            f"leave_out={list(config.leave_out)} names layers {bad}, but the model has "
            f"{n_layers} layers (0..{n_layers - 1})"
        )
    result: list[Target] = []
    for layer in sites.layers:
        if layer.index in config.leave_out:
            continue
        if config.selfattn_lora:
            for attn in (layer.self_attn, layer.cross_attn):
                if attn is None:
                    continue
                qkv = tuple(m for m in ("q", "k", "v") if m in config.attn_matrices)
                if qkv and attn.qkv is not None:
                    slices = fused_slices(sites, attn.qkv, qkv)
                    result.append(Target(attn.qkv, "qkv", attn.kind, layer.index, slices, qkv))
                else:
                    for m in qkv:
                        site = _required(attn.projection(m), f"attn_{m}_proj", m, layer.index)
                        result.append(_plain(site, m, attn.kind, layer.index))
                if "o" in config.attn_matrices:
                    site = _required(attn.o, "attn_o_proj", "o", layer.index)
                    result.append(_plain(site, "o", attn.kind, layer.index))
        if config.intermediate_lora:
            site = _required(
                layer.intermediate, "layer_intermediate_proj", "intermediate_lora", layer.index
            )
            result.append(_plain(site, "intermediate", None, layer.index))
        if config.output_lora:
            site = _required(layer.output, "layer_output_proj", "output_lora", layer.index)
            result.append(_plain(site, "output", None, layer.index))
    if not result:
        raise ConfigError(
            f"{type(config).__name__} adapts no module of this model: the interface has no "
            "attention (layer_self_attn) for attn_matrices and leave_out covers every other "
            "layer; check the interface and the config"
        )
    for target in result:
        _check_linear(target.site)
    return result


def _required(site: ModuleSite | None, field: str, option: str, layer: int) -> ModuleSite:
    if site is None:
        raise ConfigError(
            f"LoRA option {option!r} needs {field} in the AdapterModelInterface, but layer {layer} "
            f"has none; set {field}=... or remove {option!r} from the config"
        )
    return site


def _plain(site: ModuleSite, role: str, attention: str | None, layer: int) -> Target:
    return Target(site, role, attention, layer, [(0, int(site.out_features or 0))])


def _check_linear(site: ModuleSite) -> None:
    module = site.module
    weight = getattr(module, "weight", None)
    if (
        not (isinstance(module, nn.Linear) or is_conv1d(module))
        or weight is None
        or weight.ndim != 2
    ):
        raise ConfigError(
            f"LoRA adapts nn.Linear or transformers' Conv1D modules; {site.path} "
            f"({site.field}) is a {type(module).__name__}"
        )


def fused_slices(
    sites: ModelSites, site: ModuleSite, matrices: tuple[str, ...]
) -> list[tuple[int, int]]:
    """Output ranges of ``matrices`` in a fused q/k/v projection (widths from `qkv_widths`)."""
    widths = qkv_widths(sites, site)
    starts = {"q": 0, "k": widths[0], "v": widths[0] + widths[1]}
    sizes = dict(zip(("q", "k", "v"), widths))
    return [(starts[m], starts[m] + sizes[m]) for m in ("q", "k", "v") if m in matrices]


def qkv_widths(sites: ModelSites, site: ModuleSite) -> tuple[int, int, int]:
    """(q, k, v) output widths of the fused projection ``site``.

    In order: the model config (``num_attention_heads``, ``num_key_value_heads``,
    ``head_dim``); else the module shapes (the output projection's input width is the query
    width, keys and values share the rest equally); else, with no output projection in the
    interface, three equal thirds.

    Raises:
        ConfigError: the widths found do not add up to the projection's ``out_features``.
    """
    out = int(site.out_features or 0)
    config = getattr(sites.model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(heads, int) and heads > 0:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None)
        if not isinstance(head_dim, int):
            hidden = getattr(config, "hidden_size", None)
            head_dim = hidden // heads if isinstance(hidden, int) else None
        if isinstance(head_dim, int):
            widths = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
            if sum(widths) == out:
                return widths
            raise ConfigError(
                f"cannot split the fused projection {site.path} (out_features={out}) into "
                f"q/k/v: the model config gives {heads} heads, {kv_heads} key/value heads and "
                f"head_dim {head_dim}, i.e. widths {widths} summing to {sum(widths)}"
            )
    o_site = _output_projection_of(sites, site)
    if o_site is not None and o_site.in_features:
        q = int(o_site.in_features)
        if q >= out or (out - q) % 2:
            raise ConfigError(
                f"cannot split the fused projection {site.path} (out_features={out}) into "
                f"q/k/v: its output projection {o_site.path} takes {q} inputs (the query "
                f"width), leaving {out - q} that do not split into equal key and value parts; "
                "give the model a config with num_attention_heads / num_key_value_heads / "
                "head_dim, or adapt separate projections"
            )
        return (q, (out - q) // 2, (out - q) // 2)
    if out % 3:
        raise ConfigError(
            f"cannot split the fused projection {site.path} (out_features={out}) into three "
            "equal q/k/v parts, and the model has no config with num_attention_heads / "
            "num_key_value_heads / head_dim and the interface no attn_o_proj; adapt separate "
            "projections instead"
        )
    return (out // 3, out // 3, out // 3)


def _output_projection_of(sites: ModelSites, qkv: ModuleSite) -> ModuleSite | None:
    """The output projection (``attn_o_proj``) of the attention whose fused projection is
    ``qkv``, if the interface names one."""
    for layer in sites.layers:
        for attn in (layer.self_attn, layer.cross_attn):
            if attn is not None and attn.qkv is not None and attn.qkv.path == qkv.path:
                return attn.o
    return None


def host_of(module: nn.Module) -> LoRAHost | None:
    """The LoRA host attached to ``module``, if any."""
    host = getattr(module, HOST_ATTR, None)
    return host if isinstance(host, LoRAHost) else None


def _check_rank(config: LoRAConfig, targets: list[Target]) -> None:
    """A rank above ``min(in, out)`` of an adapted matrix adds parameters but no expressive
    power (and usually means a typo, e.g. r=512 on a 256-wide model): refuse it."""
    if config.composition_mode == "scale":
        return
    for target in targets:
        widths = [end - start for start, end in target.slices]
        limit = min(int(target.site.in_features or 0), *widths)
        if config.r > limit:
            raise ConfigError(
                f"LoRA r={config.r} exceeds min(in, out) = {limit} of {target.site.path} "
                f"({target.role}); a rank above the matrix's own cannot help: use r <= {limit}"
            )


@hookimpl
def adapters_register_methods(register: Callable[[MethodSpec], None]) -> None:
    """Declare the ``lora`` method (LoRA, IA3, DoRA configs and presets)."""
    register(
        MethodSpec(
            name="lora",
            config_classes=(LoRAConfig, IA3Config, DoRAConfig),
            presets=dict(PRESETS),
            compositions=(Stack, BatchSplit, Average),
            can_merge=True,
        )
    )


@hookimpl
def adapters_register_checkpoint_formats(register: Callable[[Any], None]) -> None:
    """Declare the PEFT (read/write) and AdapterHub (read) LoRA formats (`interop.FORMATS`)."""
    from .interop import FORMATS

    for fmt in FORMATS:
        register(fmt)


@hookimpl
def adapters_add_adapter(
    model: nn.Module, sites: ModelSites, name: str, config: AdapterConfig
) -> dict[str, nn.Module] | None:
    """Create a `LoRAUnit` per adapted projection, on the projection's `LoRAHost`."""
    targets = targets_of(sites, config)  # validates everything before touching the model
    _check_rank(config, targets)
    if config.use_dora and any(t.role == "qkv" for t in targets):
        raise ConfigError(
            "use_dora=True is not supported on a fused q/k/v projection "
            f"({targets[0].site.path}); use separate projections or plain LoRA"
        )
    fused_inputs = [
        t for t in targets if t.role == "qkv" and set(t.matrices) & set(config.scale_inputs)
    ]
    if fused_inputs:
        raise ConfigError(
            f"scale_inputs={list(config.scale_inputs)} names q/k/v, but "
            f"{fused_inputs[0].site.path} is a fused q/k/v projection whose input the three "
            "share; scale the outputs of q/k/v (drop them from scale_inputs)"
        )
    generator = None
    if config.init_weights_seed is not None:
        generator = torch.Generator().manual_seed(int(config.init_weights_seed))
    created: dict[str, nn.Module] = {}
    for target in targets:
        module = target.site.module
        weight = weight_out_in(module)
        unit = made_like(
            module,
            LoRAUnit,
            int(target.site.in_features),
            int(target.site.out_features),
            target.slices,
            config,
            weight.detach(),  # only DoRA reads it (a norm per row, on its device)
            generator,
            scale_input=target.role in config.scale_inputs,
        )
        host = LoRAHost.attach(module, HOST_ATTR, model)
        host.add_unit(name, unit)
        created[target.site.path] = unit
    return created


@hookimpl
def adapters_delete_adapter(
    model: nn.Module, sites: ModelSites, name: str, config: AdapterConfig
) -> bool | None:
    """Remove adapter ``name``'s units; a projection left with none loses its host."""
    for target in targets_of(sites, config):
        module = target.site.module
        host = host_of(module)
        if host is None or name not in host.units:
            continue
        host.forget(name, module)
        if host.is_empty:
            host.detach()
    return True


@hookimpl
def adapters_merge_adapter(
    model: nn.Module, sites: ModelSites, name: str, config: AdapterConfig
) -> bool | None:
    """Fold adapter ``name`` into the adapted projections' weights."""
    if config.use_gating:
        raise ConfigError(
            f"adapter {name!r} uses use_gating=True: its gate depends on the input, so it "
            "cannot be merged into the weights"
        )
    for target in _units(sites, config, name):
        host_of(target.site.module).merge(name, target.site.module)
    return True


@hookimpl
def adapters_reset_adapter(
    model: nn.Module, sites: ModelSites, name: str, config: AdapterConfig
) -> bool | None:
    """Restore the base weights of the projections adapter ``name`` was merged into."""
    for target in _units(sites, config, name):
        host_of(target.site.module).reset(name, target.site.module)
    return True


@hookimpl
def adapters_average_adapter(
    model: nn.Module,
    sites: ModelSites,
    sources: list[tuple[str, AdapterConfig, float]],
    combine_strategy: str,
    options: dict[str, Any],
) -> tuple[AdapterConfig, dict[str, torch.Tensor]] | None:
    """The ``lora_delta_w_svd`` and ``lora_linear_only_negate_b`` strategies (see
    `average_delta_w_svd` and `average_negate_b`)."""
    if combine_strategy == "lora_delta_w_svd":
        return average_delta_w_svd(sites, sources, options)
    if combine_strategy == "lora_linear_only_negate_b":
        return average_negate_b(sites, sources, options)
    return None


def _units(sites: ModelSites, config: LoRAConfig, name: str) -> Iterator[Target]:
    for target in targets_of(sites, config):
        host = host_of(target.site.module)
        if host is not None and name in host.units:
            yield target


def average_delta_w_svd(
    sites: ModelSites,
    sources: list[tuple[str, AdapterConfig, float]],
    options: dict[str, Any],
) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The ``"lora_delta_w_svd"`` average: per adapted projection (per q/k/v slice on a fused
    one), the truncated SVD ``U S V^T`` of the weighted sum of the sources' ``s_i B_i A_i``.

    The new adapter's config is the first source's with ``r=svd_rank`` and ``alpha`` chosen so
    that its scaling ``s`` equals the first source's (``alpha * svd_rank / r``, or
    ``alpha * sqrt(svd_rank / r)`` with ``use_rslora``); its weights are ``A = V^T`` and
    ``B = U S / s``. ``svd_rank`` (default: the first source's ``r``) may be smaller or larger
    than the sources' ranks; rank directions the weighted sum lacks stay zero.

    Sources may differ in ``r`` and ``alpha`` but must adapt the same projections (and q/k/v
    slices) with plain additive LoRA.

    Returns:
        ``(config, tensors)``: tensors under the keys ``adapters_add_adapter`` gives that config.

    Raises:
        ConfigError: unknown options, a bad ``svd_rank``, sources that are not plain LoRA or
            adapt other projections.
    """
    unknown = sorted(set(options) - {"svd_rank"})
    if unknown:
        raise ConfigError(
            f"combine_strategy='lora_delta_w_svd' takes only the option svd_rank; got {unknown}"
        )
    first_name, first, _ = sources[0]
    for source, config_i, _ in sources:
        if (
            not isinstance(config_i, LoRAConfig)
            or config_i.composition_mode != "add"
            or config_i.use_dora
            or config_i.use_gating
        ):
            raise ConfigError(
                "combine_strategy='lora_delta_w_svd' needs plain LoRA adapters "
                f"(composition_mode='add', no DoRA, no gating); adapter {source!r} is "
                f"{type(config_i).__name__}: {config_i}"
            )
    rank = options.get("svd_rank", first.r)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"svd_rank={rank!r} must be an integer >= 1 (the new adapter's r)")
    config = _with_rank(first, rank)
    targets = targets_of(sites, config)
    paths = [t.site.path for t in targets]
    for source, config_i, _ in sources[1:]:
        other = [t.site.path for t in targets_of(sites, config_i)]
        if other != paths:
            raise ConfigError(
                f"adapter {source!r} adapts other modules than {first_name!r} (they differ on "
                f"{sorted(set(other) ^ set(paths))[:3]}); lora_delta_w_svd needs the same "
                "targets: give the sources the same attn_matrices, *_lora flags and leave_out"
            )
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for target in targets:
            host = host_of(target.site.module)
            blocks: list[torch.Tensor] | None = None
            for source, _, weight in sources:
                unit = host.units[source]
                if unit.slices != target.slices:
                    raise ConfigError(
                        f"adapter {source!r} adapts other q/k/v slices of {target.site.path} "
                        f"({unit.slices}) than {first_name!r} ({target.slices})"
                    )
                parts = [weight * d.float() for d in unit.slice_deltas()]
                blocks = parts if blocks is None else [b + p for b, p in zip(blocks, parts)]
            a_blocks, b_blocks = zip(*(_low_rank(delta, rank, config.scaling) for delta in blocks))
            tensors[f"{target.site.path}.lora_A"] = torch.cat(a_blocks).cpu()
            tensors[f"{target.site.path}.lora_B"] = torch.cat(b_blocks).cpu()
    return config, tensors


def average_negate_b(
    sites: ModelSites,
    sources: list[tuple[str, AdapterConfig, float]],
    options: dict[str, Any],
) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The ``"lora_linear_only_negate_b"`` average (Zhang et al., 2023, as AdapterHub does it):
    linear averaging in which a negative weight negates only ``B``: ``A = Σ |w_i| A_i``,
    ``B = Σ w_i B_i`` (IA3: ``lora_B = Σ w_i lora_B_i``). The config is the first source's;
    sources must have equal configs except for ``dropout`` and ``init_weights``.

    Raises:
        ConfigError: options given, sources with other configs, DoRA or gated sources (they
            have parameters besides A and B, which AdapterHub refuses too).
    """
    from adapters.plugin import configs_equal_for_average

    if options:
        raise ConfigError(
            f"combine_strategy='lora_linear_only_negate_b' takes no options; got {sorted(options)}"
        )
    first_name, first, _ = sources[0]
    if not all(isinstance(c, LoRAConfig) for _, c, _ in sources) or not configs_equal_for_average(
        [c for _, c, _ in sources]
    ):
        raise ConfigError(
            "combine_strategy='lora_linear_only_negate_b' needs LoRA adapters with equal "
            "configs (dropout and init_weights may differ); got "
            f"{[(n, c.to_dict()) for n, c, _ in sources]}"
        )
    if first.use_dora or first.use_gating:
        raise ConfigError(
            f"combine_strategy='lora_linear_only_negate_b' averages only A and B; adapter "
            f"{first_name!r} has use_dora={first.use_dora}, use_gating={first.use_gating}; use "
            "combine_strategy='linear'"
        )
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for target in targets_of(sites, first):
            units = host_of(target.site.module).units
            for param in ("lora_A", "lora_B"):
                if getattr(units[first_name], param) is None:
                    continue  # IA3 has no A
                total = sum(
                    (abs(w) if param == "lora_A" else w) * getattr(units[n], param).float()
                    for n, _, w in sources
                )
                tensors[f"{target.site.path}.{param}"] = total.cpu()
    return first, tensors


def _with_rank(config: LoRAConfig, rank: int) -> LoRAConfig:
    """``config`` with rank ``rank`` and the same scaling ``s``."""
    if rank == config.r:
        return config
    ratio = (rank / config.r) ** 0.5 if config.use_rslora else rank / config.r
    return config.replace(r=rank, alpha=float(config.alpha) * ratio)


def _low_rank(delta: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scaling * B A`` the best rank-``rank`` approximation of ``delta``;
    A is (rank, in), B is (out, rank), zero beyond ``delta``'s own rank bound."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    a = delta.new_zeros(rank, delta.shape[1])
    b = delta.new_zeros(delta.shape[0], rank)
    a[:k] = vh[:k]
    b[:, :k] = u[:, :k] * (s[:k] / scaling)
    return a, b
