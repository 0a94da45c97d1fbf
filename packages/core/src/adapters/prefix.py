"""KV prefixes: a method prepends its own keys and values to a layer's attention (prefix
tuning), per layer, as ``k, v`` of shape ``[batch (or 1), num_kv_heads, n, head_dim]``.

transformers models dispatch attention through ``AttentionInterface`` by
``config._attn_implementation``. `register_kv_prefix` wraps the model's implementation
(``"sdpa"`` or ``"eager"``) in one of core's (``"adapters_prefix_sdpa"``, ...), registered with
transformers' documented ``AttentionInterface`` / ``AttentionMaskInterface``; the wrapper asks
the providers registered on the attention module for their prefixes, prepends them to the keys
and values *after* the rotary embedding and the KV cache (so prefixes carry no position, are
never stored in the cache and are present at every ``generate`` step), extends the attention
mask so every query sees every prefix slot, and calls the original implementation (which
repeats key/value heads for grouped-query attention). When the last provider is removed, the
model's own implementation is restored.

Coordinates: a KV prefix adds no token and no position; the forward context (input length,
mask, per-example positions) is unchanged. The code runs inside the model's forward and reads
only module attributes, so it is ``torch.compile``-safe when the providers are; providers run
inside each layer, so activation checkpointing recomputes them with the layer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._runtime.rollback import record_undo
from .errors import InterfaceError

if TYPE_CHECKING:
    from .sites import AttentionSite

#: ``provider(module) -> (k, v) or None``; ``k``/``v``: ``[batch or 1, num_kv_heads, n, head_dim]``.
PrefixProvider = Callable[[nn.Module], "tuple[torch.Tensor, torch.Tensor] | None"]

_PROVIDERS_ATTR = "_adapters_kv_prefix"
_PREFIX = "adapters_prefix_"
_SUPPORTED = ("sdpa", "eager")


#: The original attention function per (implementation, attention class), resolved when a
#: prefix is registered so that the wrapper only reads a dict while the forward runs.
_INNER_FUNCTIONS: dict[tuple[str, type], Callable[..., Any]] = {}


def _register_interfaces() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for inner in _SUPPORTED:
        name = _PREFIX + inner
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _prefix_attention)
        if name not in AttentionMaskInterface._global_mapping and inner in (
            ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
        ):
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])


def _resolve_inner_functions(model: nn.Module, inner: str) -> None:
    """Remember, for every attention class of ``model``, the function its own dispatch would
    call for ``inner``: transformers' ``sdpa``, or the ``eager_attention_forward`` of the
    class's own modelling file (Gemma's differs from Llama's)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for module in model.modules():
        cls = type(module)
        if getattr(module, "config", None) is None or (inner, cls) in _INNER_FUNCTIONS:
            continue
        if inner == "eager":
            function = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        else:
            function = ALL_ATTENTION_FUNCTIONS[inner]
        if function is not None:
            _INNER_FUNCTIONS[(inner, cls)] = function


def _extend_mask(
    mask: torch.Tensor | None,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    n: int,
    inner: str,
    is_causal: bool | None,
) -> torch.Tensor | None:
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if inner != "sdpa" or not causal or q_len == 1:
            return None if inner != "sdpa" else _all_visible(query, kv_len + n)
        past = kv_len - q_len
        rows = torch.arange(q_len, device=query.device)[:, None] + past
        allowed = torch.arange(kv_len, device=query.device)[None, :] <= rows
        mask = allowed[None, None]
    if mask.dtype == torch.bool:
        extra = torch.ones(*mask.shape[:-1], n, dtype=torch.bool, device=mask.device)
    else:
        extra = torch.zeros(*mask.shape[:-1], n, dtype=mask.dtype, device=mask.device)
    return torch.cat([extra, mask[..., -kv_len:]], dim=-1)


def _all_visible(query: torch.Tensor, total: int) -> torch.Tensor:
    return torch.ones(1, 1, query.shape[2], total, dtype=torch.bool, device=query.device)


def _prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> Any:
    """The attention function core registers: prefixes first, then the model's own."""
    inner = module.config._attn_implementation[len(_PREFIX) :]
    function = _INNER_FUNCTIONS.get((inner, type(module)))
    if function is None:
        raise InterfaceError(
            f"no {inner!r} attention function is known for {type(module).__name__}; KV "
            "prefixes need its modelling file to define eager_attention_forward, or "
            "attn_implementation='sdpa'"
        )
    providers = module.__dict__.get(_PROVIDERS_ATTR, ())
    keys, values = [], []
    for provider in providers:
        prefix = provider(module)
        if prefix is not None:
            k, v = prefix
            keys.append(k.to(key.dtype).expand(key.shape[0], -1, -1, -1))
            values.append(v.to(value.dtype).expand(value.shape[0], -1, -1, -1))
    if keys:
        n = sum(k.shape[2] for k in keys)
        attention_mask = _extend_mask(
            attention_mask, module, query, key, n, inner, kwargs.pop("is_causal", None)
        )
        key = torch.cat([*keys, key], dim=2)
        value = torch.cat([*values, value], dim=2)
        if inner == "sdpa":
            kwargs["is_causal"] = False
    return function(module, query, key, value, attention_mask, **kwargs)


class KVPrefixHandle:
    """What `register_kv_prefix` returns; ``remove()`` takes the provider off again and, with
    the model's last provider gone, restores its attention implementation."""

    def __init__(self, model: nn.Module, module: nn.Module, provider: PrefixProvider) -> None:
        self.model, self.module, self.provider = model, module, provider

    def remove(self) -> None:
        """Remove this provider (idempotent)."""
        providers = self.module.__dict__.get(_PROVIDERS_ATTR)
        if providers is None or self.provider not in providers:
            return
        providers.remove(self.provider)
        if not providers:
            del self.module.__dict__[_PROVIDERS_ATTR]
        if not any(_PROVIDERS_ATTR in m.__dict__ for m in self.model.modules()):
            current = self.model.config._attn_implementation
            if current.startswith(_PREFIX):
                _set_implementation(self.model, current[len(_PREFIX) :])


def _set_implementation(model: nn.Module, name: str) -> None:
    config = model.config
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = name
    else:
        config._attn_implementation = name
    for sub in model.modules():  # submodels holding their own copy of the config
        sub_config = getattr(sub, "config", None)
        if sub_config is not None and sub_config is not config:
            if getattr(sub_config, "_attn_implementation", None) is not None:
                if hasattr(sub_config, "_attn_implementation_internal"):
                    sub_config._attn_implementation_internal = name
                else:
                    sub_config._attn_implementation = name


def register_kv_prefix(
    model: nn.Module, site: AttentionSite, provider: PrefixProvider
) -> KVPrefixHandle:
    """Prepend ``provider(module)``'s keys and values to the attention of ``site`` at every
    call (return ``None`` from the provider to add nothing, e.g. when no adapter of yours is
    active). Plugins call it through `adapters.hosts.AdapterHost.add_kv_prefix`; registered
    during a core operation that fails, it is removed again. Shapes: ``[batch or 1, num_kv_heads, n, head_dim]`` with ``num_kv_heads`` and
    ``head_dim`` from ``site.require("num_kv_heads", "head_dim")``.

    Raises:
        InterfaceError: the model is not a transformers model dispatching attention through
            ``config._attn_implementation``, or uses an implementation other than ``"sdpa"``
            and ``"eager"`` (load it with ``attn_implementation="sdpa"``).
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if not isinstance(current, str):
        raise InterfaceError(
            f"KV prefixes need a transformers model that dispatches attention through "
            f"config._attn_implementation; {type(model).__name__} has none"
        )
    inner = current[len(_PREFIX) :] if current.startswith(_PREFIX) else current
    if inner not in _SUPPORTED:
        raise InterfaceError(
            f"KV prefixes support the attention implementations {list(_SUPPORTED)}; this model "
            f"uses {inner!r}. Load it with attn_implementation='sdpa'"
        )
    _register_interfaces()
    _resolve_inner_functions(model, inner)
    module = site.attn.module
    if not current.startswith(_PREFIX):
        _set_implementation(model, _PREFIX + inner)
    module.__dict__.setdefault(_PROVIDERS_ATTR, []).append(provider)
    handle = KVPrefixHandle(model, module, provider)
    # a registration made during a failed add_adapter is taken off again, and the model's own
    # attention implementation comes back with its last provider
    record_undo(model, handle.remove)
    return handle
