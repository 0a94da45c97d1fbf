from __future__ import annotations

import warnings

import pytest
import torch

import adapters
from adapters import plugins

from ..models import SEED_INTERFACE, SEED_INTERFACE_2, gemma2, llama
from .toy_plugins import ToyBottleneckPlugin, ToyLoRAPlugin, ToyShiftPlugin

__all__ = ["SEED_INTERFACE", "SEED_INTERFACE_2", "gemma2", "llama"]

TOY_METHODS = ["toy_lora", "toy_shift", "toy_bottleneck"]


def toy_interface(methods=TOY_METHODS, **overrides) -> adapters.AdapterModelInterface:
    fields = dict(
        SEED_INTERFACE, adapter_methods=list(methods), layer_pre_ffn="post_attention_layernorm"
    )
    fields.update(overrides)
    return adapters.AdapterModelInterface(**fields)


@pytest.fixture
def toy_plugins():
    """Register the three in-test plugins on the process registry for one test."""
    registry = plugins.get_registry()
    names = []
    for plugin, name in (
        (ToyLoRAPlugin(), "toy_lora"),
        (ToyShiftPlugin(), "toy_shift"),
        (ToyBottleneckPlugin(), "toy_bottleneck"),
    ):
        registry.register(plugin, name)
        names.append(name)
    yield registry
    for name in names:
        registry.unregister(name)


@pytest.fixture
def core_alone(monkeypatch):
    """The registry as it is with adapters-core and no method plugin installed."""
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group=None: [])
    registry = plugins.reload_plugins()
    yield registry
    monkeypatch.undo()
    plugins.reload_plugins()


def init_toy(model=None, **overrides):
    model = model if model is not None else llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapters.init(model, interface=toy_interface(**overrides))
    return model


def randomize(model, name: str, seed: int = 1, scale: float = 0.5) -> None:
    """Give adapter ``name`` non-zero weights so it changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for m in model.get_adapter(name).values() for p in m.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture
def ids():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
