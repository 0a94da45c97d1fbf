"""Tiny models and interfaces for the adapters-lora tests (fixtures are in conftest.py)."""

from __future__ import annotations

import os

import torch
import transformers as tf
from torch import nn

import adapters
from adapters import AdapterModelInterface
from tests import models
from tests.models import BART_INTERFACE, BERT_INTERFACE, GPT2_INTERFACE, LLAMA_INTERFACE

__all__ = ["BART_INTERFACE", "BERT_INTERFACE", "GPT2_INTERFACE", "LLAMA_INTERFACE"]

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "lora")
IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 61], [12, 0, 77, 31, 9, 50, 2]])


def build_llama(seed: int = 0) -> nn.Module:
    return models.llama(seed)


def build_qwen2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tf.Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = tf.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # make the q/k/v biases matter
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0.0, 0.5)
    return model


def build_gpt2(seed: int = 0, biased: bool = False) -> nn.Module:
    """Tiny GPT-2; ``biased``: non-zero projection biases (GPT-2 initialises them to zero)."""
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32)
    model = tf.GPT2LMHeadModel(cfg).eval()
    if biased:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("c_attn.bias", "c_proj.bias", "c_fc.bias")):
                    p.normal_(0.0, 0.3)
    return model


def build_bart(seed: int = 0) -> nn.Module:
    return models.bart(seed)


def init(model: nn.Module, interface: dict) -> nn.Module:
    return adapters.init(model, interface=AdapterModelInterface(**interface))


def logits(model: nn.Module, ids: torch.Tensor = IDS, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out


def randomise(model: nn.Module, name: str, seed: int = 1, around_one: bool = False) -> None:
    """Give adapter ``name`` non-trivial weights (B is zero after LoRA init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.get_adapter(name).values():
            for pname, p in module.named_parameters():
                if pname == "magnitude":
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
                else:
                    noise = 0.3 * torch.randn(p.shape, generator=gen)
                    p.copy_(1 + noise if around_one else noise)


class TinyGQA(nn.Module):
    """A custom decoder block stack (not transformers) with a fused grouped-query qkv."""

    class Attn(nn.Module):
        def __init__(self, d: int, heads: int, kv_heads: int) -> None:
            super().__init__()
            self.heads, self.kv, self.hd = heads, kv_heads, d // heads
            self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * self.hd)
            self.out = nn.Linear(heads * self.hd, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).split(
                [self.heads * self.hd, self.kv * self.hd, self.kv * self.hd], dim=-1
            )
            q = q.view(b, t, self.heads, self.hd).transpose(1, 2)
            k = k.view(b, t, self.kv, self.hd).transpose(1, 2)
            v = v.view(b, t, self.kv, self.hd).transpose(1, 2)
            rep = self.heads // self.kv
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            att = torch.softmax(q @ k.transpose(-1, -2) / self.hd**0.5, -1) @ v
            return self.out(att.transpose(1, 2).reshape(b, t, -1))

    class Block(nn.Module):
        def __init__(self, d: int, heads: int, kv_heads: int) -> None:
            super().__init__()
            self.attn = TinyGQA.Attn(d, heads, kv_heads)
            self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x):
            x = x + self.attn(x)
            return x + self.down(torch.relu(self.up(x)))

    def __init__(
        self,
        d: int = 16,
        heads: int = 4,
        kv_heads: int = 2,
        n_layers: int = 2,
        with_config: bool = True,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, d)
        self.blocks = nn.ModuleList([TinyGQA.Block(d, heads, kv_heads) for _ in range(n_layers)])
        if with_config:
            self.config = type(
                "Cfg",
                (),
                {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_size": d},
            )()

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return x


GQA_INTERFACE = dict(
    adapter_methods=["lora"],
    model_embeddings="embed",
    model_layers="blocks",
    layer_self_attn="attn",
    attn_qkv_proj="qkv",
    attn_o_proj="out",
    layer_intermediate_proj="up",
    layer_output_proj="down",
)
