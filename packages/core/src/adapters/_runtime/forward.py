"""The model-level forward hooks: open the forward context at the model input (and replicate
the batch for ``Parallel``), close it at the output.

``init`` registers `ForwardHooks.pre_forward` as a forward pre-hook and `ForwardHooks.post_forward`
as an always-called forward hook on the top-level model.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .. import context as ctx_mod
from .. import virtual
from ..composition import AdapterCompositionBlock, BatchSplit, expand_parallel
from ..context import effective_setup
from ..errors import CompositionError
from . import multitask
from .naming import validate_setup_names
from .selection import NO_SELECTION, NoSelection, per_example, take_adapter_names
from .state import STATE_ATTR


class ForwardHooks:
    """The pre-hook and hook core registers on the top-level model (bound methods, so that
    ``copy.deepcopy`` of the model keeps them working)."""

    def pre_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        state = model.__dict__.get(STATE_ATTR)
        if state is None:
            return None
        given = kwargs
        kwargs, setup = _per_example_selection(model, args, kwargs)
        validate_setup_names(state, setup)  # an unknown name raises instead of running without it
        branches = 1
        if setup is not None:
            parallel = expand_parallel(setup)
            if parallel is not None:
                args, kwargs, batch = _replicate_inputs(args, kwargs, len(parallel))
                branches = len(parallel)
                setup = BatchSplit(*parallel.children, batch_sizes=[batch] * branches)
        named = _with_positional_names(model, args, kwargs)
        ctx = _build_context(model, setup, args, named, branches)
        if state.virtual_providers:
            edited = _with_virtual_tokens(model, ctx, named, branches)
            if edited is not None:
                args, kwargs, ctx = (), *edited
        ctx_mod.push_context(ctx)
        return (args, kwargs) if branches > 1 or kwargs is not given else None

    def post_forward(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state = model.__dict__.get(STATE_ATTR)
        if state is None:
            return None
        ctx = ctx_mod.current_context()
        ours = ctx is not None and ctx.model is model
        if not ctx_mod.is_compiling():  # compiled graphs recompute checkpointed layers themselves
            if ours and model.training and torch.is_grad_enabled():
                state.last_training_context = ctx
        ctx_mod.pop_context()
        if ours and ctx.virtual_in_input and ctx.virtual_length and ctx.input_length:
            return virtual.strip_outputs(output, ctx.virtual_length, ctx.input_length)
        return None


def _with_virtual_tokens(
    model: nn.Module, ctx: ctx_mod.ForwardContext, named: dict, branches: int
) -> tuple[dict, ctx_mod.ForwardContext] | None:
    """The call's keyword arguments with the providers' virtual tokens (`adapters.virtual`)
    and the context rebuilt in the coordinates of the extended sequence; None if none."""
    cache = _cache_of(named)
    cache_length = _cache_len(cache) if cache is not None else 0
    result = virtual.apply(model, ctx, named, cache_length)
    if result is None:
        return None
    if getattr(cache, "is_compileable", False) is True:
        raise CompositionError(
            f"virtual tokens cannot use the fixed-size cache {type(cache).__name__} (a static "
            "or compilable cache, e.g. generate(cache_implementation='static')): it has no room "
            "for the virtual positions; use the default dynamic cache"
        )
    kwargs, n, vmask = result
    new = _build_context(model, ctx.setup, (), kwargs, branches)
    new.virtual_length = n
    new.virtual_mask = vmask
    new.virtual_in_input = cache_length == 0
    if new.prompt_length is not None:
        new.prompt_length += n
    return kwargs, new


def _per_example_selection(
    model: nn.Module, args: tuple, kwargs: dict
) -> tuple[dict, AdapterCompositionBlock | None]:
    """The call's keyword arguments without ``adapter_names`` (a new dict when it was given) and
    the setup the call runs: the per-example selection if any, else the effective setup."""
    main = _main_input(args, kwargs)
    batch = int(main.shape[0]) if main is not None and main.ndim >= 1 else None
    device = main.device if main is not None else None
    kwargs, selected = take_adapter_names(model, kwargs, batch, device)
    if selected is NO_SELECTION:
        kwargs, selected = _multitask_selection(model, kwargs, batch, device)
    else:
        multitask.take_task_ids(model, kwargs, None, True, batch)  # refuses both at once
    return kwargs, effective_setup(model) if selected is NO_SELECTION else selected


def _multitask_selection(
    model: nn.Module, kwargs: dict, batch: int | None, device: torch.device | None
) -> tuple[dict, AdapterCompositionBlock | NoSelection | None]:
    """``task_ids=`` of an active `MultiTask` setup as a per-example selection."""
    kwargs, names = multitask.take_task_ids(model, kwargs, effective_setup(model), False, batch)
    if names is None:
        return kwargs, NO_SELECTION
    return kwargs, per_example(model, names, device)


_POSITIONAL_NAMES: dict[type, list[str]] = {}


def _with_positional_names(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """``kwargs`` plus positional arguments under their parameter names (e.g. a mask passed
    as ``model(ids, mask)``), for reading inputs; the call itself is not changed."""
    if not args:
        return kwargs
    cls = type(model)
    names = _POSITIONAL_NAMES.get(cls)
    if names is None:
        try:
            params = inspect.signature(cls.forward).parameters.values()
        except (TypeError, ValueError):
            params = []
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [p.name for p in params if p.kind in kinds][1:]  # drop self
        _POSITIONAL_NAMES[cls] = names
    named = dict(zip(names, args))
    named.update(kwargs)
    return named


_NOT_BATCHED = {
    "cache_position",
    "past_key_values",
    "cache",
    "use_cache",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "logits_to_keep",
}


def _replicate_inputs(args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict, int]:
    batch = _batch_size(args, kwargs)
    if batch is None:
        raise CompositionError("Parallel needs tensor inputs with a batch dimension")
    cache = _cache_of(kwargs)
    if cache is not None and _cache_len(cache) > 0:
        raise CompositionError(
            "Parallel with a filled KV cache is not supported; run generate() per adapter with "
            "AdapterSetup(name), or pass use_cache=False"
        )

    def rep(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            return value.repeat(n, *([1] * (value.ndim - 1)))
        return value

    new_args = tuple(rep(a) for a in args)
    new_kwargs = {k: (v if k in _NOT_BATCHED else rep(v)) for k, v in kwargs.items()}
    return new_args, new_kwargs, batch


def _cache_of(kwargs: dict) -> Any:
    # transformers 4.x calls it past_key_values; 5.x generate passes it as cache
    for key in ("past_key_values", "cache"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


def _cache_len(cache: Any) -> int:
    getter = getattr(cache, "get_seq_length", None)
    if callable(getter):
        try:
            return int(getter())
        except Exception:
            return 0
    if isinstance(cache, tuple | list) and cache and isinstance(cache[0], tuple | list):
        return int(cache[0][0].shape[-2])
    return 0


def _main_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for key in ("input_ids", "inputs_embeds", "input_values", "pixel_values", "input_features"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return None


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    main = _main_input(args, kwargs)
    return int(main.shape[0]) if main is not None and main.ndim >= 1 else None


def _build_context(
    model: nn.Module,
    setup: AdapterCompositionBlock | None,
    args: tuple,
    kwargs: dict,
    branches: int,
) -> ctx_mod.ForwardContext:
    main = _main_input(args, kwargs)
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        mask = None
    batch = int(main.shape[0]) if main is not None else None
    length = int(main.shape[1]) if main is not None and main.ndim >= 2 else None
    past = 0
    if mask is not None and length is not None:
        past = max(int(mask.shape[1]) - length, 0)
    else:
        cache = _cache_of(kwargs)
        if cache is not None:
            past = _cache_len(cache)
        elif isinstance(kwargs.get("cache_position"), torch.Tensor):
            past = int(kwargs["cache_position"][0])
    prompt = ctx_mod.generation_prompt_length()
    return ctx_mod.ForwardContext(
        model=model,
        setup=setup,
        attention_mask=mask,
        batch_size=batch,
        input_length=length,
        past_length=past,
        prompt_length=prompt,
        device=main.device if main is not None else None,
        parallel_branches=branches,
    )
