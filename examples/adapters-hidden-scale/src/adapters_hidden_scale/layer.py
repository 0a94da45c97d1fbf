"""The modules of a hidden-scale adapter: one `ScaleUnit` per adapter and layer, held by the
layer's `ScaleHost`, whose forward hook applies the active ones."""

from __future__ import annotations

import torch
from torch import nn

from adapters.composition import Rows, apply_setup
from adapters.context import context_for


class ScaleUnit(nn.Module):
    """The parameters of one adapter at one layer."""

    def __init__(
        self, width: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        # Created like the layer's weights; core makes half-precision ones float32 (adapter_dtype).
        self.scale = nn.Parameter(torch.zeros(width, device=device, dtype=dtype))


class ScaleHost(nn.Module):
    """Lives on a layer; holds every hidden-scale adapter of that layer and its forward hook."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.units = nn.ModuleDict()
        self.__dict__["model"] = model  # a plain reference, not a submodule
        self.handle = None

    def hook(self, module: nn.Module, args: tuple, output: object) -> object:
        setup = context_for(self.model).setup
        if setup is None:
            return None  # nothing active: leave the output alone
        hidden = output[0] if isinstance(output, tuple) else output

        def scale(name: str, h: torch.Tensor, rows: Rows) -> torch.Tensor:
            return h * (1 + self.units[name].scale.to(h.dtype))

        new = apply_setup(setup, hidden, scale, owns=lambda name: name in self.units)
        return (new, *output[1:]) if isinstance(output, tuple) else new
