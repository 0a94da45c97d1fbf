"""The modules of a hidden-scale adapter: one `ScaleUnit` per adapter and layer, held by the
layer's `ScaleHost`, whose forward hook applies the active ones."""

from __future__ import annotations

import torch
from torch import nn

from adapters.plugin import AdapterHost, Rows, apply_setup, context_for


class ScaleUnit(nn.Module):
    """The parameters of one adapter at one layer."""

    def __init__(
        self, width: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        # Created like the layer's weights; core makes half-precision ones float32 (adapter_dtype).
        self.scale = nn.Parameter(torch.zeros(width, device=device, dtype=dtype))


class ScaleHost(AdapterHost):
    """Lives on a layer; holds every hidden-scale adapter of that layer (``units``) and its
    forward hook. `AdapterHost` registers the hook, caches whether the setup concerns this
    layer, and undoes everything if adding an adapter fails."""

    def hook(self, module: nn.Module, args: tuple, output: object) -> object:
        setup = context_for(self.model).setup
        if not self.is_active(setup):
            return None  # none of this layer's adapters runs: leave the output alone
        hidden = output[0] if isinstance(output, tuple) else output

        def scale(name: str, h: torch.Tensor, rows: Rows) -> torch.Tensor:
            return h * (1 + self.units[name].scale.to(h.dtype))

        new = apply_setup(setup, hidden, scale, owns=self.owns)
        return (new, *output[1:]) if isinstance(output, tuple) else new
