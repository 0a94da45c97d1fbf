"""The forward context: one per forward call of an initialised model, held in a contextvar
(per thread and per asyncio task, never a global).

Core opens it in a forward pre-hook on the top-level model and closes it in a forward hook that
runs even when the forward raises. Method layers read it with `current_context()`.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

import torch

from ._runtime.state import STATE_ATTR, get_state
from .composition import AdapterCompositionBlock, SetupLike, expand_parallel, parse_composition
from .errors import CompositionError

_FORWARD: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar(
    "adapters_forward_context", default=None
)
_SETUP: contextvars.ContextVar[tuple[AdapterCompositionBlock | None, ...]] = contextvars.ContextVar(
    "adapters_setup_stack", default=()
)
_PROMPT: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "adapters_generation_prompt_length", default=None
)

# Plain, process-wide mirrors read only while torch.compile traces (Dynamo cannot trace
# ``ContextVar.get``): the open `AdapterSetup` blocks and generation scopes (innermost last), and
# the contexts opened by compiled model calls. Dynamo guards on what it reads from them, so a
# change recompiles instead of reusing a stale graph. In eager mode they are written by the
# ``with`` blocks but never read, so eager calls stay per thread / per task.
_OPEN_SETUPS: list[AdapterCompositionBlock | None] = []
_OPEN_PROMPTS: list[int | None] = []
_TRACED: list[ForwardContext] = []


def is_compiling() -> bool:
    """Whether torch.compile is tracing the running code (False on torch without compiler)."""
    return torch.compiler.is_compiling()


@dataclass
class ForwardContext:
    """What a method layer may read about the forward call it runs in.

    Attributes:
        model: the top-level model being called.
        setup: the effective adapter setup of this call (``None``: no adapter runs). A top-level
            ``Parallel`` appears here as a ``BatchSplit`` over the replicated batch.
        attention_mask: the 2-D (batch, past + current length) mask given to the model, after
            ``Parallel`` replication; ``None`` when the caller passed none.
        batch_size: examples in this call (after replication).
        input_length: tokens per example in this call (the current chunk).
        past_length: tokens already in the KV cache before this call (0 without a cache).
        starts: per-example absolute position of the first real (non-pad) token, shape (batch,).
        lengths: per-example number of real tokens, past included, shape (batch,).
        prompt_length: during ``generate()``, the absolute length of the prompt (padding
            included); ``None`` outside generation.
        parallel_branches: number of ``Parallel`` replicas (1 without Parallel).
        device: the device of the model's main input.
        virtual_length: virtual tokens a method prepended to the sequence (`adapters.virtual`):
            they are its first ``virtual_length`` columns, in the KV cache and in
            ``attention_mask``; 0 without. Every length, mask and position of this context
            counts them (the coordinates of the sequence the layers see).
        virtual_mask: ``(batch, virtual_length)`` bool, which virtual slots each example uses;
            ``None`` when every example uses all of them.
        virtual_in_input: whether the virtual tokens are part of this call's input (the first
            ``virtual_length`` positions of the chunk) rather than already in the KV cache.
        extra: free space for plugins (key by your method name).
    """

    model: Any
    setup: AdapterCompositionBlock | None
    attention_mask: torch.Tensor | None = None
    batch_size: int | None = None
    input_length: int | None = None
    past_length: int = 0
    prompt_length: int | None = None
    parallel_branches: int = 1
    device: torch.device | None = None
    virtual_length: int = 0
    virtual_mask: torch.Tensor | None = None
    virtual_in_input: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    _parent: ForwardContext | None = None
    _positions: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def _real_positions(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        # Computed on first use only: most methods never need positions.
        if self._positions is None and self.batch_size is not None and self.input_length:
            positions = positions_from_mask(
                self.real_tokens(),
                self.batch_size,
                self.past_length + self.input_length,
                self.device or torch.device("cpu"),
            )
            if is_compiling():
                # no caching while tracing: writing to the context from inside a checkpointed
                # layer is a side effect Dynamo refuses (the graph dedupes the recomputation)
                return positions
            self._positions = positions
        return self._positions

    @property
    def starts(self) -> torch.Tensor | None:
        """Per-example absolute position of the first real (not padding, not virtual) token,
        shape (batch,)."""
        positions = self._real_positions()
        return None if positions is None else positions[0]

    @property
    def lengths(self) -> torch.Tensor | None:
        """Per-example number of real (not padding, not virtual) tokens, past included, shape
        (batch,)."""
        positions = self._real_positions()
        return None if positions is None else positions[1]

    def real_tokens(self) -> torch.Tensor | None:
        """Bool (batch, past_length + input_length): True at real tokens, False at padding and
        virtual tokens; ``None`` when every position is real (no mask, no virtual tokens)."""
        if self.input_length is None or self.batch_size is None:
            return None
        if not self.virtual_length:
            return None if self.attention_mask is None else self.attention_mask.bool()
        total = self.past_length + self.input_length
        if self.attention_mask is None:
            real = torch.ones(self.batch_size, total, dtype=torch.bool, device=self.device)
        else:
            real = self.attention_mask.bool()
        v = self.virtual_length
        hidden = torch.zeros(real.shape[0], v, dtype=torch.bool, device=real.device)
        return torch.cat([hidden, real[:, v:]], dim=1)

    def real_token_mask(self) -> torch.Tensor | None:
        """Bool (batch, input_length): True at real tokens of the current chunk (not padding,
        not virtual); ``None`` when every position is real."""
        real = self.real_tokens()
        if real is None or self.input_length is None:
            return None
        return real[:, -self.input_length :]


def current_context() -> ForwardContext | None:
    """The context of the innermost forward call running in this thread/task, or None."""
    if is_compiling():
        return _TRACED[-1] if _TRACED else None
    ctx = _FORWARD.get()
    if ctx is None and _TRACED:
        # Eager code between two compiled pieces of one compiled call (a graph break).
        return _TRACED[-1]
    return ctx


def context_for(model: Any) -> ForwardContext:
    """The forward context a method layer of ``model`` should use.

    Inside the model's own forward call this is the current context. Layers re-run by
    activation checkpointing during the backward pass (training mode, gradients enabled, no call
    of the model open) get the context of the last training call, so the recomputed forward
    uses the same setup, mask and positions. When a submodule runs on its own otherwise (a
    user calling ``model.model(...)``, an encoder run by ``generate``) a context with the
    model's effective setup and no mask/positions is returned.
    """
    ctx = current_context()
    if ctx is not None and ctx.model is model:
        return ctx
    if is_compiling():
        # Activation checkpointing under compile is recomputed by the compiled graph itself.
        return ForwardContext(model=model, setup=effective_setup(model))
    if ctx is None and getattr(model, "training", False) and torch.is_grad_enabled():
        state = model.__dict__.get(STATE_ATTR)
        recomputed = getattr(state, "recompute_context", None) or getattr(
            state, "last_training_context", None
        )
        if recomputed is not None:
            return recomputed
    setup = effective_setup(model)
    if setup is not None and expand_parallel(setup) is not None:
        raise CompositionError(
            "a Parallel setup needs the model to be called as a whole (core replicates the batch "
            "at the model input); a submodule was called on its own"
        )
    return ForwardContext(model=model, setup=setup)


def effective_setup(model: Any) -> AdapterCompositionBlock | None:
    """The setup a forward call of ``model`` runs with: the innermost open `AdapterSetup`, else
    the model's active setup. Merged adapters are skipped by their plugins, not here."""
    overrides = setup_override()
    if overrides:
        return overrides[-1]
    return get_state(model).active_setup


def push_context(ctx: ForwardContext) -> None:
    """Open ``ctx`` (core calls this from the model's forward pre-hook)."""
    if is_compiling():
        _TRACED.append(ctx)
        return
    ctx._parent = _FORWARD.get()
    _FORWARD.set(ctx)


def pop_context(ctx: ForwardContext | None = None) -> None:
    """Close the innermost context (core calls this from the model's forward hook)."""
    if is_compiling():
        if _TRACED:
            _TRACED.pop()
        return
    current = _FORWARD.get()
    if current is not None:
        _FORWARD.set(current._parent)
    elif _TRACED:
        _TRACED.pop()


def setup_override() -> tuple[AdapterCompositionBlock | None, ...]:
    """The `AdapterSetup` blocks open in this thread/task, innermost last (under torch.compile:
    those open in the whole process)."""
    if is_compiling():
        return tuple(_OPEN_SETUPS)
    return _SETUP.get()


def generation_prompt_length() -> int | None:
    """The prompt length while ``generate()`` of an initialised model runs, else None."""
    if is_compiling():
        return _OPEN_PROMPTS[-1] if _OPEN_PROMPTS else None
    return _PROMPT.get()


class generation_scope:
    """Marks a ``generate()`` call so that methods can tell prompt tokens from generated ones."""

    def __init__(self, prompt_length: int | None) -> None:
        self.prompt_length = prompt_length
        self._token: contextvars.Token | None = None

    def __enter__(self) -> generation_scope:
        self._token = _PROMPT.set(self.prompt_length)
        _OPEN_PROMPTS.append(self.prompt_length)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _PROMPT.reset(self._token)
        remove_last(_OPEN_PROMPTS, self.prompt_length)


class AdapterSetup:
    """Run forward calls inside a ``with`` block with another adapter setup, for this thread or
    task only; the model's own active setup is untouched.

    Example::

        with AdapterSetup(Stack("a", "b")):
            model(**batch)

    ``AdapterSetup(None)`` runs without adapters. Nested blocks: the innermost wins.
    """

    def __init__(self, adapter_setup: SetupLike, ignore_empty: bool = False) -> None:
        self.adapter_setup = parse_composition(adapter_setup)
        self.ignore_empty = ignore_empty
        self._token: contextvars.Token | None = None

    def __enter__(self) -> AdapterSetup:
        stack = _SETUP.get()
        self._pushed = not (self.ignore_empty and self.adapter_setup is None)
        if self._pushed:
            self._token = _SETUP.set((*stack, self.adapter_setup))
            _OPEN_SETUPS.append(self.adapter_setup)
        else:
            self._token = _SETUP.set(stack)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _SETUP.reset(self._token)
        if self._pushed:
            remove_last(_OPEN_SETUPS, self.adapter_setup)


def remove_last(stack: list[Any], item: Any) -> None:
    """Remove the last occurrence of ``item`` (by identity) from ``stack``."""
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is item:
            del stack[i]
            return


def positions_from_mask(
    attention_mask: torch.Tensor | None, batch_size: int, total_length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example first real position and real-token count from a 2-D mask (left or right
    padding); without a mask every position is real."""
    if attention_mask is None:
        starts = torch.zeros(batch_size, dtype=torch.long, device=device)
        lengths = torch.full((batch_size,), total_length, dtype=torch.long, device=device)
        return starts, lengths
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    first = mask.int().argmax(dim=1)
    starts = torch.where(lengths > 0, first, torch.zeros_like(first))
    return starts.long(), lengths.long()
