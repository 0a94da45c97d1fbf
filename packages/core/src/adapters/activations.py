"""Activation functions by name, as AdapterHub configs and transformers spell them
(``"relu"``, ``"swish"``, ``"gelu_new"``, ...): the one table every method plugin uses for a
``non_linearity`` option (exported by `adapters.plugin`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_TANH_GELU = functools.partial(F.gelu, approximate="tanh")

#: Lower-case name -> the function, or None for the identity (``"linear"``, ``"identity"``).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "linear": None,
    "identity": None,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _TANH_GELU,
    "gelu_pytorch_tanh": _TANH_GELU,
    "gelu_fast": _TANH_GELU,
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": F.leaky_relu,
    "mish": F.mish,
    "elu": F.elu,
}
