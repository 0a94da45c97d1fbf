"""An in-test prompt-tuning plugin built on `adapters.virtual.register_virtual_tokens` (the
virtual-input-token extension point), shared by the core and integration tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from adapters import AdapterConfig, BatchSplit, MethodSpec, Parallel, Stack, hookimpl
from adapters._runtime.embeddings import input_embedding
from adapters.composition import apply_setup
from adapters.virtual import VirtualTokens, register_virtual_tokens

N = 4
METHOD = "toy_prompt"


@dataclass(frozen=True)
class ToyPromptConfig(AdapterConfig):
    method: ClassVar[str] = METHOD
    n: int = N


class PromptUnit(nn.Module):
    def __init__(self, n: int, hidden: int) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.zeros(n, hidden))


class PromptHost(nn.Module):
    """Lives on the input embedding module; holds each adapter's prompt."""

    def __init__(self) -> None:
        super().__init__()
        self.units = nn.ModuleDict()
        self.handle = None

    def provide(self, ctx):
        setup = ctx.setup
        if setup is None or not any(name in self.units for name in _names(setup)):
            return None
        first = next(iter(self.units.values())).prompt
        batch, n = ctx.batch_size, first.shape[0]
        if isinstance(setup, str):
            return VirtualTokens(self.units[setup].prompt[None])

        def put(name, x, rows):
            return self.units[name].prompt.to(x.dtype).expand(x.shape[0], -1, -1)

        embeds = apply_setup(setup, first.new_zeros(batch, n, first.shape[1]), put, self._owns)
        used = apply_setup(
            setup,
            first.new_zeros(batch, n, 1),
            lambda name, x, rows: torch.ones_like(x),
            self._owns,
        )
        return VirtualTokens(embeds, used[..., 0] > 0)

    def _owns(self, name: str) -> bool:
        return name in self.units


def _names(setup):
    if isinstance(setup, str):
        yield setup
    elif setup is not None:
        for child in setup.children:
            yield from _names(child)


class ToyPromptPlugin:
    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_register_methods(self, register):
        register(
            MethodSpec(METHOD, (ToyPromptConfig,), {}, compositions=(Stack, BatchSplit, Parallel))
        )

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyPromptConfig):
            return None
        embedding = input_embedding(model)
        host = embedding._modules.get(METHOD)
        if host is None:
            host = PromptHost()
            embedding.add_module(METHOD, host)
            host.handle = register_virtual_tokens(model, host.provide)
        elif len(host.units) and next(iter(host.units.values())).prompt.shape[0] != config.n:
            raise ValueError("toy prompts of one model share their length")
        host.units[name] = PromptUnit(config.n, embedding.embedding_dim).to(embedding.weight)
        return {"prompt": host.units[name]}

    @hookimpl
    def adapters_delete_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyPromptConfig):
            return None
        embedding = input_embedding(model)
        host = embedding._modules[METHOD]
        del host.units[name]
        if not len(host.units):
            host.handle.remove()
            del embedding._modules[METHOD]
        return True


def set_prompt(model, name: str, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    """Give adapter ``name`` a random prompt; returns a copy of it."""
    unit = input_embedding(model)._modules[METHOD].units[name]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        unit.prompt.copy_(torch.randn(unit.prompt.shape, generator=gen) * scale)
    return unit.prompt.detach().clone()
