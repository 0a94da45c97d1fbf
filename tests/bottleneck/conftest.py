"""Tiny models for the bottleneck tests: toy post-LN (BERT-like) and pre-LN (Llama-like) models
written here, so that expected outputs can be computed by hand from the formulas."""

from __future__ import annotations

import os
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapters

WIDTH = 16

# The entry point must be installed (pip install -e packages/bottleneck); environments without
# it skip these tests unless they promise every plugin (tox all, all-tf457, bottleneck).
_INSTALLED = any(ep.name == "bottleneck" for ep in entry_points(group="adapters.methods"))
if not _INSTALLED and os.environ.get("ADAPTERS_REQUIRE_ALL_PLUGINS") != "1":
    collect_ignore_glob = ["test_*.py"]


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(WIDTH, WIDTH)
        self.k = nn.Linear(WIDTH, WIDTH)
        self.v = nn.Linear(WIDTH, WIDTH)
        self.o = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.q(x)) * self.v(x) + self.k(x))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """post_ln: x = ln1(x + attn(x)); x = ln2(x + ffn(x)). pre-LN: x = x + attn(ln1(x)); ..."""

    def __init__(self, post_ln: bool) -> None:
        super().__init__()
        self.post_ln = post_ln
        self.attn = Attention()
        self.ffn = FeedForward()
        self.ln1 = nn.LayerNorm(WIDTH)
        self.ln2 = nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_ln:
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.ffn(x))
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class ToyModel(nn.Module):
    """Embeddings, two blocks and an LM head; no ``config`` attribute (pitfall 19)."""

    def __init__(self, post_ln: bool, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, WIDTH)
        self.layers = nn.ModuleList(Block(post_ln) for _ in range(layers))
        self.head = nn.Linear(WIDTH, 50)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return self.head(self.hidden(input_ids))


def interface(post_ln: bool, **overrides) -> adapters.AdapterModelInterface:
    fields = dict(
        adapter_methods=["bottleneck"],
        model_embeddings="embed",
        model_layers="layers",
        layer_self_attn="attn",
        attn_q_proj="q",
        attn_k_proj="k",
        attn_v_proj="v",
        attn_o_proj="o",
        layer_intermediate_proj="ffn.up",
        layer_output_proj="ffn.down",
    )
    if post_ln:
        fields.update(
            layer_pre_self_attn="attn", layer_pre_ffn="ffn", layer_ln_1="ln1", layer_ln_2="ln2"
        )
    else:
        fields.update(layer_pre_self_attn="ln1", layer_pre_ffn="ln2")
    fields.update(overrides)
    return adapters.AdapterModelInterface(**fields)


def toy(post_ln: bool, seed: int = 0, layers: int = 2, **overrides) -> ToyModel:
    """A seeded toy model, initialised; each layer's norms get their own random affine."""
    torch.manual_seed(seed)
    model = ToyModel(post_ln, layers).eval()
    with torch.no_grad():
        for layer in model.layers:
            for norm in (layer.ln1, layer.ln2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
    adapters.init(model, interface=interface(post_ln, **overrides))
    return model


def randomize(model: nn.Module, name: str, seed: int = 1, scale: float = 0.3) -> None:
    """Give adapter ``name`` random weights so that it changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.get_adapter(name).values():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(0))
