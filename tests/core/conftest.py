from __future__ import annotations

import warnings

import pytest
import torch

import adapters
from adapters import plugins

from .toy_plugins import ToyBottleneckPlugin, ToyLoRAPlugin, ToyShiftPlugin

LLAMA_KW = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    max_position_embeddings=64,
)

SEED_INTERFACE = dict(
    adapter_methods=["lora", "reft"],
    model_embeddings="embed_tokens",
    model_layers="layers",
    layer_self_attn="self_attn",
    layer_cross_attn=None,
    attn_k_proj="k_proj",
    attn_q_proj="q_proj",
    attn_v_proj="v_proj",
    attn_o_proj="o_proj",
    layer_intermediate_proj="mlp.up_proj",
    layer_output_proj="mlp.down_proj",
)

SEED_INTERFACE_2 = dict(
    adapter_types=["bottleneck", "lora", "reft"],
    model_embeddings="embed_tokens",
    model_layers="layers",
    layer_self_attn="self_attn",
    layer_cross_attn=None,
    attn_k_proj="k_proj",
    attn_q_proj="q_proj",
    attn_v_proj="v_proj",
    attn_o_proj="o_proj",
    layer_intermediate_proj="mlp.up_proj",
    layer_output_proj="mlp.down_proj",
    layer_pre_self_attn="input_layernorm",
    layer_pre_cross_attn=None,
    layer_pre_ffn="pre_feedforward_layernorm",
    layer_ln_1="post_attention_layernorm",
    layer_ln_2="post_feedforward_layernorm",
)

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


def llama(seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**LLAMA_KW, **overrides})).eval()


def gemma2(seed: int = 0):
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(seed)
    config = Gemma2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=100,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config).eval()


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
