"""Resolve an `AdapterModelInterface` against a model into *sites*: typed handles on the modules
that adapter methods attach to. Plugins receive sites; they never parse interface strings.

Every layer of every stack is checked, not only the first, and a bad path raises an
`InterfacePathError` naming the field, the value, where it was looked up, the closest child
name and the available children.

Besides modules, sites carry what methods need to know about them without a model config:
attention geometry (heads, key/value heads, head dim, cache index, positional kind), the
model-level final norm and LM head, bare-parameter sites (3-D MoE expert weights) and
sub-block sites (a sub-block's residual input, its output before the residual add and the
place of its norm; the runtime capture lives in :mod:`adapters.subblocks`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import InterfaceError, InterfacePathError
from .interface import AdapterModelInterface

#: Positional kinds `ModelSites.positional` reports; ``None`` there means that neither the
#: config nor the modules tell (a model without positions looks the same as an unknown one).
POSITIONAL_KINDS = ("rotary", "absolute", "relative")


@dataclass(eq=False)
class ModuleSite:
    """One module of the model that adapters may attach to.

    Attributes:
        field: the interface field it came from (``"attn_q_proj"``).
        path: dotted path from the top-level model (``"model.layers.0.self_attn.q_proj"``);
            unique, so plugins use it as a stable, name-independent key.
        module: the module itself.
    """

    field: str
    path: str
    module: nn.Module

    @property
    def in_features(self) -> int | None:
        """Input width of a linear-like module (``nn.Linear``, GPT-2 ``Conv1D``), else None."""
        return projection_shape(self.module)[0]

    @property
    def out_features(self) -> int | None:
        """Output width of a linear-like module, else None."""
        return projection_shape(self.module)[1]


@dataclass(eq=False)
class ParameterSite:
    """A weight that is a bare ``nn.Parameter`` rather than a module (named by the interface's
    ``layer_parameters``), e.g. the 3-D expert tensor ``mlp.experts.gate_up_proj`` of a
    transformers 5 Mixtral / Qwen-MoE layer.

    Attributes:
        field: its name in ``layer_parameters`` (``"experts.gate_up"``).
        path: dotted path of the parameter from the top-level model; unique, a stable key.
        module: the module that owns it.
        name: its attribute name on ``module`` (``"gate_up_proj"``).

    Target it with a parametrisation (``torch.nn.utils.parametrize``) or a hook on
    ``module``; ``value`` is what the owner computes with (parametrised or not).
    """

    field: str
    path: str
    module: nn.Module
    name: str

    @property
    def value(self) -> torch.Tensor:
        """The tensor the owner's forward sees (after any parametrisation)."""
        return getattr(self.module, self.name)

    @property
    def original(self) -> nn.Parameter:
        """The stored parameter (``parametrizations[name].original`` when parametrised)."""
        parametrizations = getattr(self.module, "parametrizations", None)
        if parametrizations is not None and self.name in parametrizations:
            return parametrizations[self.name].original
        return self.module._parameters[self.name]  # type: ignore[return-value]

    @property
    def shape(self) -> torch.Size:
        """Shape of the parameter (``(experts, out, in)`` for MoE expert tensors)."""
        return self.original.shape


@dataclass(eq=False)
class AttentionSite:
    """An attention module and its projections (``q``/``k``/``v`` or fused ``qkv``, and ``o``),
    with its geometry.

    Geometry (`resolve_sites` fills it; a value is ``None`` when it cannot be told):
        num_heads / num_kv_heads / head_dim: query heads, key/value heads (GQA), width per
            head. Read, in order, from the attention module's own attributes (``num_heads``,
            ``num_attention_heads``, ``n_heads``, ``head_dim``, ``attention_head_size``,
            ``key_value_proj_dim``, ``num_key_value_heads``, ``num_key_value_groups``, as
            transformers sets them), then from the model config (``num_attention_heads``,
            ``num_key_value_heads``, ``head_dim``, ``hidden_size``); missing values are
            completed from the projection shapes (``heads = q width / head_dim``), and a
            source whose numbers disagree with the shapes is skipped. The module comes first
            because it is what the module computes with (a BART decoder may have another head
            count than ``config.num_attention_heads``, which names the encoder's).
        geometry_source: ``"module"``, ``"config"`` or ``None`` (unknown).
        cache_index: the index of this attention's entry in a KV cache: the module's
            ``layer_idx`` when it has one, else the layer's position in its stack.
        positional: the model's positional kind (see `ModelSites.positional`).
    """

    kind: str  # "self" or "cross"
    attn: ModuleSite
    q: ModuleSite | None = None
    k: ModuleSite | None = None
    v: ModuleSite | None = None
    qkv: ModuleSite | None = None
    o: ModuleSite | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    geometry_source: str | None = None
    cache_index: int | None = None
    positional: str | None = None

    def require(self, *names: str) -> tuple[Any, ...]:
        """The geometry values ``names`` (e.g. ``"num_kv_heads", "head_dim"``), raising a clear
        `InterfaceError` when one is unknown.

        Example::

            kv_heads, head_dim = layer.self_attn.require("num_kv_heads", "head_dim")
        """
        known = ("num_heads", "num_kv_heads", "head_dim", "cache_index", "positional")
        values = []
        for name in names:
            if name not in known:
                raise ValueError(f"unknown attention geometry {name!r}; expected one of {known}")
            value = getattr(self, name)
            if value is None:
                raise InterfaceError(_unknown_geometry(self, name))
            values.append(value)
        return tuple(values)

    def projection(self, name: str) -> ModuleSite | None:
        """The projection called ``name`` (``"q"``, ``"k"``, ``"v"``, ``"o"`` or ``"qkv"``)."""
        if name not in ("q", "k", "v", "o", "qkv"):
            raise ValueError(f"unknown attention projection {name!r}; expected q, k, v, o or qkv")
        return getattr(self, name)


def _unknown_geometry(site: AttentionSite, name: str) -> str:
    if name == "positional":
        return (
            f"the positional kind of attention {site.attn.path} is unknown: the model config "
            "has no rope_* / position_embedding_type / relative_attention_* entry and no "
            "rotary or position-embedding module was found; give the model a config that says "
            "it"
        )
    return (
        f"{name} of attention {site.attn.path} is unknown: the module has no num_heads / "
        "head_dim attributes, the model config no num_attention_heads / num_key_value_heads / "
        "head_dim, and the projection shapes alone cannot split heads from head width; set "
        f"those attributes on {type(site.attn.module).__name__} or give the model a config"
    )


@dataclass(eq=False)
class SubBlockSite:
    """One attention or feed-forward sub-block of a layer, seen from its residual connection.

    With ``x`` the residual stream entering the sub-block and ``out`` the sub-block's output
    before the residual add, the layer computes (``norm_placement``):

    - ``"pre"`` (Llama, GPT-2): ``x + out``; the sub-block's own norm is its first module;
    - ``"post"`` (BERT): ``norm(x + out)``;
    - ``"sandwich"`` (Gemma 2/3): ``x + norm(out)``.

    Attributes:
        kind: ``"self_attn"``, ``"cross_attn"`` or ``"ffn"``.
        layer_index: `LayerSite.index` of its layer.
        output: the module whose output is ``out``: the attention's ``attn_o_proj`` (else the
            attention module itself) or ``layer_output_proj``.
        residual: the module whose first input is ``x`` (``layer_pre_self_attn``,
            ``layer_pre_cross_attn``, ``layer_pre_ffn``), or None when the interface names none.
        norm: the norm at the residual add (``layer_ln_1`` for self-attention,
            ``layer_ln_cross_attn`` for cross-attention, ``layer_ln_2`` for the feed-forward;
            None in ``"pre"`` placement).
        norm_placement: ``"pre"``, ``"post"`` or ``"sandwich"``.
        layer: the layer module it belongs to.

    Use `adapters.subblocks.register_hook` to edit ``out`` with ``x`` at hand (or to replace
    a post-LN residual add and its norm); core captures ``x`` for the duration of the call (per
    thread, compile-safe, also when the layer runs on its own or is recomputed by activation
    checkpointing).
    """

    kind: str
    layer_index: int
    output: ModuleSite
    residual: ModuleSite | None = None
    norm: ModuleSite | None = None
    norm_placement: str = "pre"
    layer: ModuleSite | None = None

    @property
    def can_replace_add(self) -> bool:
        """True when the residual add is done by a module core can hook (post-LN's norm)."""
        return self.norm_placement == "post" and self.norm is not None

    def require_residual(self) -> ModuleSite:
        """The residual source, or a clear `InterfaceError` naming the field to set (call it
        when an adapter is added, so a missing field fails there and not in the forward)."""
        if self.residual is None:
            field_name = {
                "self_attn": "layer_pre_self_attn",
                "cross_attn": "layer_pre_cross_attn",
                "ffn": "layer_pre_ffn",
            }[self.kind]
            raise InterfaceError(
                f"the {self.kind} sub-block of layer {self.layer_index} ({self.output.path}) has "
                f"no residual input: set {field_name} in the interface to the module whose input "
                "is the residual stream before it (usually its norm)"
            )
        return self.residual


@dataclass(eq=False)
class LayerSite:
    """One transformer layer and the hook points inside it.

    Attributes:
        index: position among all layers of all stacks (0-based), as used by ``leave_out`` and
            ReFT's ``layers``.
        stack: the ``model_layers`` path this layer belongs to.
        index_in_stack: position within its stack.
        layer: the layer module itself (its output is the layer's hidden state).
        self_attn / cross_attn: attention sites, or None where the layer has none.
        intermediate / output: the feed-forward up and down projections.
        pre_self_attn / pre_cross_attn / pre_ffn: modules whose input is the residual stream
            before the corresponding sub-block.
        ln_1 / ln_2: norms after the attention and feed-forward sub-blocks.
        ln_cross_attn: the norm after the cross-attention sub-block.
        parameters: parameter sites by their ``layer_parameters`` name.
        sub_blocks: ``"self_attn"`` / ``"cross_attn"`` / ``"ffn"`` sub-block sites (see
            `SubBlockSite`), for the sub-blocks whose output module the interface names.
    """

    index: int
    stack: str
    index_in_stack: int
    layer: ModuleSite
    self_attn: AttentionSite | None = None
    cross_attn: AttentionSite | None = None
    intermediate: ModuleSite | None = None
    output: ModuleSite | None = None
    pre_self_attn: ModuleSite | None = None
    pre_cross_attn: ModuleSite | None = None
    pre_ffn: ModuleSite | None = None
    ln_1: ModuleSite | None = None
    ln_2: ModuleSite | None = None
    ln_cross_attn: ModuleSite | None = None
    parameters: dict[str, ParameterSite] = field(default_factory=dict)
    sub_blocks: dict[str, SubBlockSite] = field(default_factory=dict)

    @property
    def cache_index(self) -> int:
        """This layer's index in a KV cache (its self-attention's ``layer_idx`` when known,
        else its position in its stack)."""
        if self.self_attn is not None and self.self_attn.cache_index is not None:
            return self.self_attn.cache_index
        return self.index_in_stack

    def sub_block(self, kind: str) -> SubBlockSite | None:
        """The ``"self_attn"``, ``"cross_attn"`` or ``"ffn"`` sub-block, or None."""
        if kind not in ("self_attn", "cross_attn", "ffn"):
            raise ValueError(
                f"unknown sub-block {kind!r}; expected 'self_attn', 'cross_attn' or 'ffn'"
            )
        return self.sub_blocks.get(kind)

    @property
    def hidden_size(self) -> int | None:
        """Width of the layer's hidden state, read from its modules (no config needed)."""
        candidates = []
        for attn in (self.self_attn, self.cross_attn):
            if attn is not None and attn.o is not None:
                candidates.append(attn.o.out_features)
        if self.output is not None:
            candidates.append(self.output.out_features)
        for norm in (self.pre_self_attn, self.pre_ffn, self.ln_1, self.ln_2):
            if norm is not None:
                candidates.append(_norm_width(norm.module))
        for attn in (self.self_attn, self.cross_attn):
            if attn is not None:
                for proj in (attn.q, attn.qkv):
                    if proj is not None:
                        candidates.append(proj.in_features)
        if self.intermediate is not None:
            candidates.append(self.intermediate.in_features)
        return next((c for c in candidates if c), None)

    def attention(self, kind: str) -> AttentionSite | None:
        """``"self"`` or ``"cross"`` attention site."""
        if kind == "self":
            return self.self_attn
        if kind == "cross":
            return self.cross_attn
        raise ValueError(f"unknown attention kind {kind!r}; expected 'self' or 'cross'")


@dataclass(eq=False)
class ModelSites:
    """Everything an interface resolves to for one model.

    Attributes:
        model: the top-level model given to ``adapters.init``.
        base_model: the base model (paths ``model_*`` are relative to it).
        embeddings: the token embedding module, if the interface names one.
        final_norm: the norm feeding the LM head (``model_final_norm``), if named.
        lm_head: the output embeddings / LM head: ``model_lm_head``, else the module
            ``model.get_output_embeddings()`` returns, else None.
        layers: every layer of every stack, in order.
        positional: ``"rotary"``, ``"absolute"``, ``"relative"`` (T5-style bias), or None when
            it cannot be told. From the model config (``rope_parameters`` / ``rope_theta`` /
            ``rope_scaling``, ``position_embedding_type``, ``relative_attention_num_buckets``),
            else from the modules (a ``*Rotary*`` module; a position-embedding ``nn.Embedding``
            such as ``wpe``, ``embed_positions``, ``position_embeddings``).
        interface: the interface these sites were resolved from.
    """

    model: nn.Module
    base_model: ModuleSite
    interface: AdapterModelInterface
    embeddings: ModuleSite | None = None
    layers: list[LayerSite] = field(default_factory=list)
    final_norm: ModuleSite | None = None
    lm_head: ModuleSite | None = None
    positional: str | None = None

    @property
    def tied_embeddings(self) -> bool:
        """True when the LM head shares its weight with the input embeddings."""
        if self.lm_head is None or self.embeddings is None:
            return False
        head_weight = getattr(self.lm_head.module, "weight", None)
        return head_weight is not None and head_weight is getattr(
            self.embeddings.module, "weight", None
        )

    def __iter__(self) -> Iterator[LayerSite]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int | None:
        """Hidden width of the first layer that tells it (see `LayerSite.hidden_size`)."""
        return next((s.hidden_size for s in self.layers if s.hidden_size), None)


def projection_shape(module: nn.Module) -> tuple[int | None, int | None]:
    """(in_features, out_features) of a linear-like module, read from the module itself."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D
        return module.weight.shape[0], module.weight.shape[1]
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_f, int) and isinstance(out_f, int):
        return in_f, out_f
    return None, None


def _norm_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if weight is not None and getattr(weight, "ndim", 0) == 1:
        return int(weight.shape[0])
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    return None


class _Lookup:
    """Walks dotted paths, producing `InterfacePathError`s that explain themselves."""

    def __init__(self, root: nn.Module) -> None:
        self.names = {id(m): n for n, m in root.named_modules(remove_duplicate=False)}

    def path_of(self, module: nn.Module) -> str:
        return self.names.get(id(module), "")

    def find(self, start: nn.Module, start_path: str, field_name: str, value: str) -> ModuleSite:
        current, where = start, start_path
        for part in value.split("."):
            child = _child(current, part)
            if child is None:
                children = _child_names(current)
                close = difflib.get_close_matches(part, children, n=1, cutoff=0.5)
                raise InterfacePathError(
                    field_name, value, where, part, children, close[0] if close else None
                )
            current = child
            where = f"{where}.{part}" if where else part
        if not isinstance(current, nn.Module):
            raise InterfaceError(
                f"{field_name}={value!r} in {start_path or '<model>'} is a "
                f"{type(current).__name__}, not a torch.nn.Module"
            )
        return ModuleSite(field_name, self.path_of(current) or where, current)

    def find_parameter(
        self, start: nn.Module, start_path: str, field_name: str, name: str, value: str
    ) -> ParameterSite:
        owner_path, _, attr = value.rpartition(".")
        if owner_path:
            owner = self.find(start, start_path, field_name, owner_path)
            module, where = owner.module, owner.path
        else:
            module, where = start, start_path
        parametrizations = getattr(module, "parametrizations", None)
        is_param = attr in module._parameters and module._parameters[attr] is not None
        if not is_param and not (parametrizations is not None and attr in parametrizations):
            children = [n for n, p in module.named_parameters(recurse=False)]
            if parametrizations is not None:
                children += list(parametrizations.keys())
            close = difflib.get_close_matches(attr, children, n=1, cutoff=0.5)
            raise InterfacePathError(
                field_name, value, where, attr, children, close[0] if close else None
            )
        path = f"{where}.{attr}" if where else attr
        return ParameterSite(name, path, module, attr)


def _child(module: object, name: str) -> object | None:
    if isinstance(module, nn.Module) and name in module._modules:
        return module._modules[name]
    if isinstance(module, nn.ModuleList | nn.Sequential) and name.isdigit():
        index = int(name)
        return module[index] if index < len(module) else None
    value = getattr(module, name, None)
    return value if isinstance(value, nn.Module) else None


def _child_names(module: object) -> list[str]:
    if isinstance(module, nn.Module):
        return list(module._modules.keys())
    return []


_LAYER_FIELDS = {
    "intermediate": "layer_intermediate_proj",
    "output": "layer_output_proj",
    "pre_self_attn": "layer_pre_self_attn",
    "pre_cross_attn": "layer_pre_cross_attn",
    "pre_ffn": "layer_pre_ffn",
    "ln_1": "layer_ln_1",
    "ln_2": "layer_ln_2",
    "ln_cross_attn": "layer_ln_cross_attn",
}
_ATTN_FIELDS = {
    "q": "attn_q_proj",
    "k": "attn_k_proj",
    "v": "attn_v_proj",
    "qkv": "attn_qkv_proj",
    "o": "attn_o_proj",
}


def resolve_sites(model: nn.Module, interface: AdapterModelInterface) -> ModelSites:
    """Resolve ``interface`` against ``model``; validates every layer of every stack.

    With several layer stacks (encoder and decoder), a part may be absent from a whole stack
    (no cross-attention in encoder layers) but not from only some layers of a stack, and it
    must exist in at least one stack. A stack's layers are resolved with that stack's
    ``stack_paths`` overrides (`AdapterModelInterface.for_stack`); an override of ``None``
    says the part is absent there.

    Raises:
        InterfacePathError: a path does not resolve; the message names the closest match.
        InterfaceError: the layer list is not a list of modules, or layers of one stack differ.
    """
    lookup = _Lookup(model)
    base = _resolve_base(model, interface, lookup)
    base_path = lookup.path_of(base)
    sites = ModelSites(
        model=model, base_model=ModuleSite("base_model", base_path, base), interface=interface
    )
    if interface.model_embeddings is not None:
        sites.embeddings = lookup.find(
            base, base_path, "model_embeddings", interface.model_embeddings
        )
    if interface.model_final_norm is not None:
        sites.final_norm = lookup.find(
            base, base_path, "model_final_norm", interface.model_final_norm
        )
    sites.lm_head = _resolve_lm_head(model, interface, lookup)
    sites.positional = positional_kind(model, base)

    multi = len(interface.layer_stacks) > 1
    stacks_lacking: dict[str, int] = {}
    first_error: dict[str, InterfacePathError] = {}
    for stack in interface.layer_stacks:
        layer_list = lookup.find(base, base_path, "model_layers", stack).module
        if not isinstance(layer_list, nn.ModuleList | nn.Sequential) or len(layer_list) == 0:
            raise InterfaceError(
                f"model_layers={stack!r} must name a non-empty nn.ModuleList of layers; found "
                f"{type(layer_list).__name__}"
            )
        stack_interface = interface.for_stack(stack)
        stack_layers = [
            _resolve_layer(lookup, layer, len(sites.layers) + i, stack, i, stack_interface)
            for i, layer in enumerate(layer_list)
        ]
        optional_per_stack = _check_consistent(stack, stack_layers, multi)
        for name, error in optional_per_stack.items():
            stacks_lacking[name] = stacks_lacking.get(name, 0) + 1
            first_error.setdefault(name, error)
        sites.layers.extend(site for site, _ in stack_layers)
    for name, count in stacks_lacking.items():
        if count == len(interface.layer_stacks):
            raise first_error[name]
    config = _text_config(model)
    for layer in sites.layers:
        for attn in (layer.self_attn, layer.cross_attn):
            if attn is not None:
                _fill_geometry(attn, config, layer.index_in_stack, sites.positional)
    return sites


def _resolve_lm_head(
    model: nn.Module, interface: AdapterModelInterface, lookup: _Lookup
) -> ModuleSite | None:
    if interface.model_lm_head is not None:
        return lookup.find(model, "", "model_lm_head", interface.model_lm_head)
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        head = getter()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(head, nn.Module):
        return None
    return ModuleSite("model_lm_head", lookup.path_of(head), head)


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter()
        except Exception:
            return config
    return config


_POSITION_EMBEDDING_NAMES = ("wpe", "embed_positions", "position_embeddings", "pos_embed")


def positional_kind(model: nn.Module, base: nn.Module | None = None) -> str | None:
    """``"rotary"``, ``"absolute"``, ``"relative"`` or None (unknown) for ``model``: from its
    config first, else from its modules (see `ModelSites.positional`)."""
    config = _text_config(model)
    if config is not None:
        if getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None):
            return "rotary"
        if isinstance(getattr(config, "rope_theta", None), int | float):
            return "rotary"
        kind = getattr(config, "position_embedding_type", None)
        if isinstance(kind, str):
            return "absolute" if kind == "absolute" else "relative"
        if isinstance(getattr(config, "relative_attention_num_buckets", None), int):
            return "relative"
    for name, module in (base if base is not None else model).named_modules():
        if "rotary" in type(module).__name__.lower():
            return "rotary"
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) and last in _POSITION_EMBEDDING_NAMES:
            return "absolute"
    return None


_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")


def _int_attr(obj: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _geometry_from(obj: Any, attn: AttentionSite, use_hidden: bool) -> tuple[int, int, int] | None:
    """(heads, kv_heads, head_dim) from ``obj``'s attributes completed by the projection
    shapes, or None when incomplete or inconsistent with the shapes."""
    heads = _int_attr(obj, _HEAD_ATTRS)
    kv = _int_attr(obj, _KV_HEAD_ATTRS)
    head_dim = _int_attr(obj, _HEAD_DIM_ATTRS)
    groups = _int_attr(obj, ("num_key_value_groups",))
    q_width = attn.q.out_features if attn.q is not None else None
    k_width = attn.k.out_features if attn.k is not None else None
    if q_width is None and attn.o is not None and attn.qkv is None:
        q_width = attn.o.in_features
    if head_dim is None and heads and use_hidden:
        hidden = getattr(obj, "hidden_size", None)
        if isinstance(hidden, int) and hidden % heads == 0:
            head_dim = hidden // heads
    if head_dim is None and heads and q_width and q_width % heads == 0:
        head_dim = q_width // heads
    if head_dim is None:
        return None
    if heads is None and q_width and q_width % head_dim == 0:
        heads = q_width // head_dim
    if kv is None and heads and groups and heads % groups == 0:
        kv = heads // groups
    if kv is None and k_width and k_width % head_dim == 0:
        kv = k_width // head_dim
    if attn.qkv is not None and attn.qkv.out_features and heads:
        rest = attn.qkv.out_features // head_dim - heads
        if kv is None and rest > 0 and rest % 2 == 0:
            kv = rest // 2
        if attn.qkv.out_features != (heads + 2 * (kv or 0)) * head_dim:
            return None
    if kv is None and heads and k_width is None and attn.qkv is None:
        kv = heads  # no separate key projection to tell otherwise: plain multi-head attention
    if heads is None or kv is None:
        return None
    if (q_width and heads * head_dim != q_width) or (k_width and kv * head_dim != k_width):
        return None
    return heads, kv, head_dim


def _fill_geometry(
    attn: AttentionSite, config: Any, index_in_stack: int, positional: str | None
) -> None:
    for source, obj, use_hidden in (("module", attn.attn.module, False), ("config", config, True)):
        if obj is None:
            continue
        found = _geometry_from(obj, attn, use_hidden)
        if found is not None:
            attn.num_heads, attn.num_kv_heads, attn.head_dim = found
            attn.geometry_source = source
            break
    layer_idx = getattr(attn.attn.module, "layer_idx", None)
    valid = isinstance(layer_idx, int) and not isinstance(layer_idx, bool)
    attn.cache_index = layer_idx if valid else index_in_stack
    attn.positional = positional


def _resolve_base(model: nn.Module, interface: AdapterModelInterface, lookup: _Lookup) -> nn.Module:
    if interface.base_model is not None:
        try:
            return lookup.find(model, "", "base_model", interface.base_model).module
        except InterfacePathError:
            if _is_bare_backbone(model, interface):
                return model
            raise
    candidate = getattr(model, "base_model", None)
    if isinstance(candidate, nn.Module):
        return candidate
    return model


def _is_bare_backbone(model: nn.Module, interface: AdapterModelInterface) -> bool:
    """Whether ``model`` is itself the base model an interface's ``base_model`` path names:
    the path is absent but the layer stacks resolve from the model. AdapterHub resolves the
    base model as ``getattr(model, base_model, model)``, so an interface written for
    ``LlamaForCausalLM`` (``base_model="model"``) also serves a bare ``LlamaModel``; the
    layer check keeps the error about ``base_model`` for a model that has neither."""
    for stack in interface.layer_stacks:
        current: object = model
        for part in stack.split("."):
            current = _child(current, part)
            if current is None:
                return False
    return True


def _resolve_layer(
    lookup: _Lookup,
    layer: nn.Module,
    index: int,
    stack: str,
    index_in_stack: int,
    interface: AdapterModelInterface,
) -> tuple[LayerSite, dict[str, InterfacePathError]]:
    """Resolve one layer; optional parts that are missing are reported, not raised, so that the
    caller can decide whether a stack may lack them."""
    layer_path = lookup.path_of(layer)
    site = LayerSite(
        index=index,
        stack=stack,
        index_in_stack=index_in_stack,
        layer=ModuleSite("model_layers", layer_path, layer),
    )
    missing: dict[str, InterfacePathError] = {}

    def find(field_name: str, start: nn.Module, start_path: str) -> ModuleSite | None:
        value = getattr(interface, field_name)
        if value is None:
            return None
        try:
            return lookup.find(start, start_path, field_name, value)
        except InterfacePathError as error:
            missing[field_name] = error
            return None

    for kind, field_name in (("self", "layer_self_attn"), ("cross", "layer_cross_attn")):
        attn = find(field_name, layer, layer_path)
        if attn is None:
            continue
        attn_site = AttentionSite(kind=kind, attn=attn)
        for proj, proj_field in _ATTN_FIELDS.items():
            setattr(attn_site, proj, find(proj_field, attn.module, attn.path))
            if f"{proj_field}" in missing:
                # Keep the error per attention kind so both are reported distinctly.
                missing[f"{field_name}.{proj_field}"] = missing.pop(proj_field)
        setattr(site, f"{kind}_attn", attn_site)
    for attr, field_name in _LAYER_FIELDS.items():
        setattr(site, attr, find(field_name, layer, layer_path))
    for name, value in interface.layer_parameters.items():
        key = f"layer_parameters[{name!r}]"
        try:
            site.parameters[name] = lookup.find_parameter(layer, layer_path, key, name, value)
        except InterfacePathError as error:
            missing[key] = error
    site.sub_blocks = _sub_blocks(site, interface)
    return site, missing


def _sub_blocks(site: LayerSite, interface: AdapterModelInterface) -> dict[str, SubBlockSite]:
    placement = interface.layer_norm_placement or (
        "post"
        if any(
            getattr(interface, name) is not None
            for name in ("layer_ln_1", "layer_ln_2", "layer_ln_cross_attn")
        )
        else "pre"
    )
    blocks: dict[str, SubBlockSite] = {}
    for kind, attn, residual, norm in (
        ("self_attn", site.self_attn, site.pre_self_attn, site.ln_1),
        ("cross_attn", site.cross_attn, site.pre_cross_attn, site.ln_cross_attn),
    ):
        if attn is not None:
            blocks[kind] = SubBlockSite(
                kind=kind,
                layer_index=site.index,
                output=attn.o if attn.o is not None else attn.attn,
                residual=residual,
                norm=norm if placement != "pre" else None,
                norm_placement=placement,
                layer=site.layer,
            )
    if site.output is not None:
        blocks["ffn"] = SubBlockSite(
            kind="ffn",
            layer_index=site.index,
            output=site.output,
            residual=site.pre_ffn,
            norm=site.ln_2 if placement != "pre" else None,
            norm_placement=placement,
            layer=site.layer,
        )
    return blocks


def _check_consistent(
    stack: str,
    stack_layers: list[tuple[LayerSite, dict[str, InterfacePathError]]],
    multi: bool,
) -> dict[str, InterfacePathError]:
    """Every layer of a stack must have the same parts. Returns the fields this whole stack
    lacks, each with the first error seen (only allowed with several stacks)."""
    fields = set()
    for _, missing in stack_layers:
        fields.update(missing)
    result: dict[str, InterfacePathError] = {}
    for name in sorted(fields):
        failing = [site.index_in_stack for site, missing in stack_layers if name in missing]
        error = next(missing[name] for _, missing in stack_layers if name in missing)
        if len(failing) != len(stack_layers):
            # Present in some layers, missing in others: always an error, named per layer.
            raise InterfaceError(
                f"{error} (in {stack} layer {failing[0]}; layers {failing} of stack {stack!r} "
                "lack it while others have it)"
            )
        if not multi:
            raise error
        result[name] = error
    return result
