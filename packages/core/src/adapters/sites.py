"""Sites: what an `AdapterModelInterface` resolves to on a model, typed handles on the modules
that adapter methods attach to. Plugins receive sites; they never parse interface strings.
(The resolution itself lives in `adapters._runtime.resolution`, the attention geometry in
`adapters._runtime.geometry`.)

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

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import InterfaceError
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


def __getattr__(name: str) -> object:
    """Contract-1.0 import paths: path resolution and geometry moved to ``adapters._runtime``
    (``from adapters.sites import resolve_sites`` keeps working)."""
    if name.startswith("__"):  # import machinery probes such as __path__
        raise AttributeError(name)
    from adapters._runtime import geometry, resolution

    for module in (resolution, geometry):
        if name in vars(module):
            return vars(module)[name]
    raise AttributeError(f"module 'adapters.sites' has no attribute {name!r}")
