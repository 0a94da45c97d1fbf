"""Activation checkpointing support: layers re-run during the backward pass get the forward
context of the very call they recompute.

In train mode core puts a forward pre-hook on every layer (`sync_layer_hooks`); in eval mode the
hooks are removed, so inference pays nothing for them.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import context as ctx_mod
from .state import STATE_ATTR


class LayerHooks:
    """A forward pre-hook on every layer, active only in training mode.

    During a model call it remembers the call's context under the layer's input tensor; when
    activation checkpointing re-runs the layer during backward (no model call open), the same
    saved input identifies the call being recomputed and its context is made current for the
    layer's methods (`adapters.context.context_for`). This keeps gradients right even when
    several training calls run before one ``backward()``. (Reentrant checkpointing runs the
    first pass without gradients, so calls are remembered whether or not gradients are on.)
    """

    MAX_CALLS = 16  # training calls remembered per layer before the oldest are forgotten

    def __init__(self, model: nn.Module) -> None:
        self.__dict__["model"] = model

    def pre_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        model = self.__dict__["model"]
        if not model.training or ctx_mod.is_compiling():
            # Under torch.compile the checkpointed region is recomputed by the compiled graph,
            # with the values it traced: nothing to remember (and data_ptr() is not traceable).
            return
        state = model.__dict__.get(STATE_ATTR)
        hidden = args[0] if args else kwargs.get("hidden_states")
        if state is None or not isinstance(hidden, torch.Tensor):
            return
        key = (id(module), hidden.data_ptr(), tuple(hidden.shape))
        ctx = ctx_mod.current_context()
        if ctx is not None and ctx.model is model:
            state.layer_contexts[key] = ctx
            state.layer_contexts.move_to_end(key)
            while len(state.layer_contexts) > self.MAX_CALLS * len(state.sites.layers):
                state.layer_contexts.popitem(last=False)
        elif ctx is None and torch.is_grad_enabled():
            state.recompute_context = state.layer_contexts.get(key)


def sync_layer_hooks(model: nn.Module, training: bool) -> None:
    """Attach the `LayerHooks` pre-hooks in train mode and remove them in eval mode, so that
    inference pays nothing for them."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        return
    if training and not state.layer_hook_handles:
        hooks = LayerHooks(model)
        state.layer_hook_handles = [
            layer.layer.module.register_forward_pre_hook(
                hooks.pre_layer, with_kwargs=True, prepend=True
            )
            for layer in state.sites.layers
        ]
    elif not training and state.layer_hook_handles:
        for handle in state.layer_hook_handles:
            handle.remove()
        state.layer_hook_handles = []
        state.layer_contexts.clear()
        state.recompute_context = state.last_training_context = None
