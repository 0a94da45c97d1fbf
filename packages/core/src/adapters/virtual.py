"""Virtual tokens: a method prepends its own embeddings to the model input (prompt tuning).

A plugin registers a provider with `register_virtual_tokens`. At every call of the top-level
model core asks the providers for their tokens (`VirtualTokens`: embeddings of shape
``[batch or 1, n, hidden]`` and, optionally, which of the ``n`` slots each example uses) and,
when any are returned:

- turns ``input_ids`` into ``inputs_embeds`` with the model's input embedding module and
  prepends the virtual embeddings;
- prepends ones (or the slots' mask) to the 2-D ``attention_mask``, zeros to
  ``token_type_ids`` and ``-100`` to token-level ``labels`` (so the loss is PEFT's prompt-tuning
  loss: the virtual positions predict nothing, the last one predicts the first real token);
- shifts ``position_ids`` and ``cache_position`` so the virtual tokens take positions
  ``0 .. n-1`` and the real tokens follow (an example whose slots are masked off keeps the
  positions it has without them);
- sets the forward context (`adapters.context.ForwardContext`) in the coordinates of the
  sequence the layers see: ``input_length`` and the mask include the virtual columns,
  ``virtual_length`` says how many there are (always the first ones), and ``starts``,
  ``lengths``, `~adapters.context.ForwardContext.real_tokens` count real tokens only;
- removes the virtual positions from the outputs (``logits``, ``last_hidden_state``, every
  ``hidden_states`` entry, the query rows of ``attentions``), so they line up with the input.

With a KV cache the virtual tokens are computed once, by the call that fills an empty cache;
later calls (``generate``'s decoding steps) only extend the mask and shift the positions, so
the edit is replayed at every step. Without a cache (``use_cache=False``) every call prepends
them again. A cache that was filled without the virtual tokens cannot be continued with them.

Limits: encoder-decoder models are refused at registration (``generate`` runs their encoder
outside the model call); a 4-D attention mask and a fixed-size (static, compilable) cache,
such as ``generate(..., cache_implementation="static")`` uses, are refused at the call with
`CompositionError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._runtime.rollback import record_undo
from ._runtime.signature import forward_takes
from ._runtime.state import get_state
from .errors import CompositionError, InterfaceError

if TYPE_CHECKING:
    from .context import ForwardContext

#: Token-level label tensors get this value at the virtual positions (ignored by the loss).
IGNORE_INDEX = -100


@dataclass
class VirtualTokens:
    """What a provider returns for one call.

    Attributes:
        embeds: ``[batch or 1, n, hidden]`` embeddings to prepend (cast to the model's
            embedding dtype; a batch of 1 is expanded).
        mask: optional ``[batch, n]`` bool: which slots each example uses (``False``: the slot
            is masked off for that example, like left padding). ``None``: every example uses
            every slot. Lets one batch mix examples with and without virtual tokens
            (``adapter_names=[...]``).
    """

    embeds: torch.Tensor
    mask: torch.Tensor | None = None


#: ``provider(ctx) -> VirtualTokens or None``; ``None`` adds nothing (no adapter of yours runs).
VirtualProvider = Callable[["ForwardContext"], "VirtualTokens | None"]


class VirtualTokensHandle:
    """What `register_virtual_tokens` returns; ``remove()`` takes the provider off again."""

    def __init__(self, model: nn.Module, provider: VirtualProvider) -> None:
        self.model, self.provider = model, provider

    def remove(self) -> None:
        """Remove this provider (idempotent)."""
        providers = get_state(self.model).virtual_providers
        if self.provider in providers:  # bound methods compare equal, not identical
            providers.remove(self.provider)


def register_virtual_tokens(model: nn.Module, provider: VirtualProvider) -> VirtualTokensHandle:
    """Prepend ``provider(ctx)``'s tokens to the input of every call of ``model`` (see the
    module docstring for what core adjusts). Providers run in registration order; their tokens
    are concatenated. Give a bound method of one of your modules (so that ``deepcopy`` and
    ``pickle`` of the model carry it to the copy), and take it off with the returned handle
    when your last adapter is deleted. Registered during ``add_adapter``, it is removed again
    if the operation fails.

    Raises:
        InterfaceError: ``model`` is an encoder-decoder model, or has no input embedding
            module (``get_input_embeddings()`` or the interface's ``model_embeddings``).
    """
    state = get_state(model)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise InterfaceError(
            f"virtual input tokens are not supported on encoder-decoder models "
            f"({type(model).__name__}): generate() runs the encoder outside the model call; "
            "use a KV prefix (adapters.prefix.register_kv_prefix) instead"
        )
    from ._runtime.embeddings import input_embedding

    input_embedding(model)  # raises InterfaceError when there is none
    state.virtual_providers.append(provider)
    handle = VirtualTokensHandle(model, provider)
    record_undo(model, handle.remove)
    return handle


@dataclass
class _Prepared:
    """The virtual tokens of one call, concatenated over providers."""

    embeds: torch.Tensor  # [batch, n, hidden]
    mask: torch.Tensor | None  # [batch, n] bool, None: all used
    count: torch.Tensor | None  # [batch] long: used slots per example (None: n each)

    @property
    def n(self) -> int:
        return int(self.embeds.shape[1])


def _collect(ctx: ForwardContext, providers: list[VirtualProvider], batch: int) -> _Prepared | None:
    parts: list[VirtualTokens] = []
    for provider in providers:
        tokens = provider(ctx)
        if tokens is not None:
            if not isinstance(tokens, VirtualTokens):
                raise TypeError(
                    f"a virtual-token provider must return adapters.virtual.VirtualTokens or "
                    f"None, got {type(tokens).__name__} from {provider!r}"
                )
            parts.append(tokens)
    if not parts:
        return None
    embeds, masks, any_mask = [], [], False
    for tokens in parts:
        e = tokens.embeds
        if e.ndim != 3 or e.shape[0] not in (1, batch):
            raise CompositionError(
                f"virtual tokens must have shape [batch ({batch}) or 1, n, hidden], got "
                f"{tuple(e.shape)}"
            )
        embeds.append(e.expand(batch, -1, -1))
        if tokens.mask is None:
            masks.append(torch.ones(batch, e.shape[1], dtype=torch.bool, device=e.device))
        else:
            if tuple(tokens.mask.shape) != (batch, e.shape[1]):
                raise CompositionError(
                    f"a virtual-token mask must have shape [batch, n] = {(batch, e.shape[1])}, "
                    f"got {tuple(tokens.mask.shape)}"
                )
            masks.append(tokens.mask.to(device=e.device, dtype=torch.bool))
            any_mask = True
    all_embeds = embeds[0] if len(embeds) == 1 else torch.cat(embeds, dim=1)
    if not any_mask:
        return _Prepared(all_embeds, None, None)
    mask = masks[0] if len(masks) == 1 else torch.cat(masks, dim=1)
    return _Prepared(all_embeds, mask, mask.long().sum(dim=1))


def apply(
    model: nn.Module,
    ctx: ForwardContext,
    kwargs: dict[str, Any],
    cache_length: int,
) -> tuple[dict[str, Any], int, torch.Tensor | None] | None:
    """Edit a call's (named) inputs for the providers' virtual tokens.

    Returns ``None`` when no provider adds tokens, else ``(kwargs, n, mask)``: the new
    keyword arguments, the number of virtual columns and their ``[batch, n]`` slot mask
    (``None``: all used). Virtual embeddings are prepended only when ``cache_length`` is 0
    (an empty or no KV cache); otherwise they are in the cache already and only the mask and
    positions are extended.
    """
    providers = get_state(model).virtual_providers
    batch = ctx.batch_size
    if not providers or batch is None:
        return None
    prepared = _collect(ctx, providers, batch)
    if prepared is None:
        return None
    n = prepared.n
    kwargs = dict(kwargs)
    ids = kwargs.get("input_ids")
    embeds = kwargs.get("inputs_embeds")
    main = embeds if isinstance(embeds, torch.Tensor) else ids
    if not isinstance(main, torch.Tensor) or main.ndim < 2:
        raise CompositionError(
            "virtual tokens need the model to be called with input_ids or inputs_embeds of "
            "shape [batch, length]"
        )
    length = int(main.shape[1])
    device = main.device
    prepend = cache_length == 0
    vmask, count = prepared.mask, prepared.count

    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        if mask.ndim != 2:
            raise CompositionError(
                f"virtual tokens need a 2-D attention mask [batch, length], got shape "
                f"{tuple(mask.shape)} (a static or compilable cache in generate() builds 4-D "
                "masks: use the default dynamic cache)"
            )
        if mask.shape[0] not in (1, batch):
            raise CompositionError(
                f"the attention mask has {mask.shape[0]} rows for a batch of {batch}; give one "
                "row per example (or one for all)"
            )
        head = vmask if vmask is not None else torch.ones(batch, n, device=mask.device)
        mask = mask.expand(batch, -1)  # a mask of one row serves every example, as without
        kwargs["attention_mask"] = torch.cat([head.to(mask.dtype), mask], dim=1)
    elif vmask is not None:
        rest = cache_length - n + length if not prepend else length
        kwargs["attention_mask"] = torch.cat(
            [vmask.long(), torch.ones(batch, rest, dtype=torch.long, device=device)], dim=1
        )

    shift = count[:, None] if count is not None else n
    positions = kwargs.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.ndim == 2:
        real = (positions + shift).expand(batch, -1)
        if prepend:
            virtual = _virtual_positions(vmask, batch, n, device).to(positions.dtype)
            real = torch.cat([virtual, real], dim=1)
        kwargs["position_ids"] = real
    elif vmask is not None and forward_takes(model, "position_ids"):
        past = 0 if prepend else cache_length - n
        base = torch.arange(past, past + length, device=device)[None] + shift
        if prepend:
            base = torch.cat([_virtual_positions(vmask, batch, n, device), base], dim=1)
        kwargs["position_ids"] = base

    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.ndim == 1:
        shifted = cache_position + n
        if prepend:
            shifted = torch.cat([torch.arange(n, device=shifted.device), shifted])
        kwargs["cache_position"] = shifted

    if prepend:
        if not isinstance(embeds, torch.Tensor):
            from ._runtime.embeddings import input_embedding

            embeds = input_embedding(model)(ids)
            kwargs.pop("input_ids", None)
        kwargs["inputs_embeds"] = torch.cat([prepared.embeds.to(embeds.dtype), embeds], dim=1)
        token_types = kwargs.get("token_type_ids")
        if isinstance(token_types, torch.Tensor) and token_types.ndim == 2:
            zeros = torch.zeros(batch, n, dtype=token_types.dtype, device=token_types.device)
            kwargs["token_type_ids"] = torch.cat([zeros, token_types.expand(batch, -1)], dim=1)
        labels = kwargs.get("labels")
        if (
            isinstance(labels, torch.Tensor)
            and labels.ndim == 2
            and tuple(labels.shape) == (batch, length)
        ):
            ignore = torch.full((batch, n), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            kwargs["labels"] = torch.cat([ignore, labels], dim=1)
    return kwargs, n, vmask


def _virtual_positions(
    vmask: torch.Tensor | None, batch: int, n: int, device: torch.device
) -> torch.Tensor:
    if vmask is None:
        return torch.arange(n, device=device)[None].expand(batch, -1)
    return (vmask.long().cumsum(dim=1) - 1).clamp(min=0)


_SEQUENCE_KEYS_2D = ("start_logits", "end_logits")


def strip_outputs(output: Any, n: int, total: int) -> Any:
    """``output`` with the first ``n`` (virtual) of ``total`` positions removed from its
    token-level tensors: 3-D tensors whose dimension 1 is ``total`` (logits, hidden states),
    each entry of ``hidden_states``, the query rows of ``attentions`` (their key columns stay,
    so each row still sums to 1), and QA ``start_logits``/``end_logits``."""

    def seq(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim == 3 and value.shape[1] == total:
            return value[:, n:]
        return value

    def queries(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[2] == total:
            return value[:, :, n:]
        return value

    if isinstance(output, dict):  # transformers' ModelOutput is an OrderedDict
        for key in list(output.keys()):
            value = output[key]
            if key in ("past_key_values", "cache", "loss"):
                continue
            if key in _SEQUENCE_KEYS_2D and isinstance(value, torch.Tensor):
                new = value[:, n:] if value.ndim == 2 and value.shape[1] == total else value
            elif key.endswith("attentions") and isinstance(value, tuple):
                new = tuple(queries(v) for v in value)
            elif isinstance(value, tuple):
                new = tuple(seq(v) for v in value)
            else:
                new = seq(value)
            if new is not value:
                output[key] = new
        return output
    if isinstance(output, tuple):
        return type(output)(
            tuple(seq(v) for v in item)
            if isinstance(item, tuple) and all(isinstance(v, torch.Tensor) for v in item)
            else seq(item)
            for item in output
        )
    return seq(output)
