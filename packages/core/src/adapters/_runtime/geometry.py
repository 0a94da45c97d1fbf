"""Attention geometry and positional kind read from a model's config and modules (heads,
key/value heads, head dim, cache index, rotary / absolute / relative)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..sites import AttentionSite


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
