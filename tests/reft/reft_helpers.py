"""Tiny models, interfaces and helpers shared by the ReFT tests (``from .reft_helpers import
...``: tests/reft is a package, so its module names never collide with another folder's)."""

from __future__ import annotations

import warnings

import torch

import adapters
from adapters import AdapterModelInterface
from tests import models
from tests.models import BERT_INTERFACE, GPT2_INTERFACE, SEED_INTERFACE


def decoder_interface() -> AdapterModelInterface:
    """The seed Gemma-2 interface (fits Llama, Qwen2 and Gemma-2)."""
    return AdapterModelInterface(**SEED_INTERFACE)


def gpt2_interface() -> AdapterModelInterface:
    return AdapterModelInterface(**{**GPT2_INTERFACE, "adapter_methods": ["reft"]})


def bert_interface() -> AdapterModelInterface:
    return AdapterModelInterface(**{**BERT_INTERFACE, "adapter_methods": ["reft"]})


def init_quietly(model: torch.nn.Module, interface: AdapterModelInterface) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the interface enables adapter method")
        return adapters.init(model, interface=interface)


def plain_tiny_llama(seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """The Llama ``tiny_llama`` adapts, without adapters (for ``tests.upstream``)."""
    return models.llama(seed, num_hidden_layers=layers, pad_token_id=0, attn_implementation="eager")


def tiny_llama(seed: int = 0, layers: int = 2) -> torch.nn.Module:
    return init_quietly(plain_tiny_llama(seed, layers), decoder_interface())


def randomise(model: torch.nn.Module, name: str, scale: float = 0.5, seed: int = 1) -> None:
    """Give adapter ``name`` large random weights (orthogonal projections stay orthonormal)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.adapter_state_dict(name).items():
            if key.endswith("learned_source.weight") or key.endswith("learned_source.bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)
            else:  # projection.weight: orthonormal rows are fine for every variant
                q, _ = torch.linalg.qr(torch.randn(tensor.shape[::-1], generator=generator))
                tensor.copy_(q.t())


class Capture:
    """Forward hook recording a module's output hidden state (first element of a tuple)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        self.value = hidden.detach().clone()


def batch() -> dict[str, torch.Tensor]:
    """A padded batch: right-padded, full and left-padded examples."""
    generator = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    ids = torch.randint(1, 100, mask.shape, generator=generator) * mask
    return {"input_ids": ids, "attention_mask": mask}
