"""The dtype of adapter weights (``add_adapter(..., adapter_dtype=...)``).

Adapters on a half-precision model (float16 / bfloat16) keep their weights in float32 by
default: an optimizer step on a float16 weight overflows easily, and small updates of a bfloat16
weight near 1.0 (IA3) are below its resolution and vanish. Every method's forward casts its
input to the adapter's dtype and its result back to the activation's dtype, so a float32
adapter works in a half-precision model (and under ``torch.autocast``).

Core applies the choice after a plugin created an adapter's modules and before the adapter is
registered, so every method gets it; plugins create their weights in whatever dtype they like.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

#: ``adapter_dtype`` values besides a floating ``torch.dtype``.
MODEL = "model"
HALF = (torch.float16, torch.bfloat16)

AdapterDtype = str | torch.dtype | None


def check_adapter_dtype(value: Any) -> str | torch.dtype | None:
    """``value`` as None, ``"model"`` or a floating ``torch.dtype`` (a name such as
    ``"bfloat16"`` is accepted); raises `ConfigError` otherwise."""
    if value is None or value == MODEL:
        return value
    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ConfigError(
        f"adapter_dtype={value!r} is not supported; use None (float32 weights on a float16 / "
        "bfloat16 model), 'model' (the adapted module's dtype) or a floating torch.dtype such "
        "as torch.float32"
    )


def apply_adapter_dtype(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    adapter_dtype: str | torch.dtype | None,
    config: Any,
    other_adapter_params: Iterable[int] = (),
) -> None:
    """Cast the floating parameters of an adapter's freshly created ``modules``:

    - ``None`` (default): float16 / bfloat16 parameters become float32, unless the method's
      config names a dtype itself (``config.dtype`` not None: the plugin honoured it);
    - ``"model"``: each module's parameters take the dtype of the model weights nearest to it
      (the adapted projection's, the layer's), as plain half-precision training wants;
    - a ``torch.dtype``: that dtype.

    Parameters keep their identity (only their data is replaced), so references the plugin
    holds stay valid; buffers are left alone. ``other_adapter_params``: ids of the parameters
    of adapters added before (not model weights when looking for the model's dtype).
    """
    if adapter_dtype is None and getattr(config, "dtype", None) is not None:
        return
    adapter_ids = {id(p) for m in modules.values() for p in m.parameters()}
    adapter_ids.update(other_adapter_params)
    names = {id(m): n for n, m in model.named_modules()} if adapter_dtype == MODEL else {}
    for module in modules.values():
        if adapter_dtype is None:
            target: torch.dtype | None = None
        elif adapter_dtype == MODEL:
            target = _model_dtype_near(model, names.get(id(module)), adapter_ids)
        else:
            target = adapter_dtype  # type: ignore[assignment]
        _cast_parameters(module.parameters(), target)


def _cast_parameters(params: Iterable[nn.Parameter], target: torch.dtype | None) -> None:
    with torch.no_grad():
        for param in params:
            if not param.is_floating_point():
                continue
            dtype = target if target is not None else _default_dtype(param.dtype)
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
                if param.grad is not None:
                    param.grad = None


def _default_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def _model_dtype_near(
    model: nn.Module, path: str | None, adapter_ids: set[int]
) -> torch.dtype | None:
    """The dtype of the first floating base-model parameter of the nearest ancestor of the
    module at ``path`` that has one (None: keep the module's own dtypes)."""
    if path is None:
        return None
    parts = path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = model.get_submodule(".".join(parts[:depth]))
        for param in ancestor.parameters():
            if id(param) not in adapter_ids and param.is_floating_point():
                return param.dtype
    return None
