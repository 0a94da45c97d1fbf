"""Tiny models and interfaces shared by every test package (importable as ``tests.models``).

Interfaces are plain dicts so that a test can change ``adapter_methods`` or a path with
``{**LLAMA_INTERFACE, "adapter_methods": ["reft"]}`` before building an
``AdapterModelInterface``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: The seed example's interface (Gemma-2; fits Llama and Qwen2 too).
SEED_INTERFACE: dict[str, Any] = dict(
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

#: The second seed example: spelled with ``adapter_types`` and listing ``bottleneck``.
SEED_INTERFACE_2: dict[str, Any] = dict(
    {k: v for k, v in SEED_INTERFACE.items() if k != "adapter_methods"},
    adapter_types=["bottleneck", "lora", "reft"],
    layer_pre_self_attn="input_layernorm",
    layer_pre_cross_attn=None,
    layer_pre_ffn="pre_feedforward_layernorm",
    layer_ln_1="post_attention_layernorm",
    layer_ln_2="post_feedforward_layernorm",
)

LLAMA_INTERFACE: dict[str, Any] = dict(SEED_INTERFACE, adapter_methods=["lora"])

GPT2_INTERFACE: dict[str, Any] = dict(
    adapter_methods=["lora"],
    model_embeddings="wte",
    model_layers="h",
    layer_self_attn="attn",
    attn_qkv_proj="c_attn",
    attn_o_proj="c_proj",
    layer_intermediate_proj="mlp.c_fc",
    layer_output_proj="mlp.c_proj",
)

BERT_INTERFACE: dict[str, Any] = dict(
    adapter_methods=["lora"],
    model_embeddings="embeddings.word_embeddings",
    model_layers="encoder.layer",
    layer_self_attn="attention",
    attn_q_proj="self.query",
    attn_k_proj="self.key",
    attn_v_proj="self.value",
    attn_o_proj="output.dense",
    layer_intermediate_proj="intermediate.dense",
    layer_output_proj="output.dense",
)

BART_INTERFACE: dict[str, Any] = dict(
    adapter_methods=["lora"],
    model_embeddings="shared",
    model_layers=["encoder.layers", "decoder.layers"],
    layer_self_attn="self_attn",
    layer_cross_attn="encoder_attn",
    attn_q_proj="q_proj",
    attn_k_proj="k_proj",
    attn_v_proj="v_proj",
    attn_o_proj="out_proj",
    layer_intermediate_proj="fc1",
    layer_output_proj="fc2",
)

#: Width 32, 2 layers, grouped-query attention (4 query heads, 2 key/value heads).
TINY_DECODER: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
)


def llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny seeded ``LlamaForCausalLM`` in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_DECODER, **overrides})).eval()


def gemma2(seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny seeded ``Gemma2ForCausalLM`` (the seed examples' architecture) in eval mode."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(**{**TINY_DECODER, "head_dim": 8, **overrides})
    return Gemma2ForCausalLM(config).eval()


def bart(seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny seeded ``BartForConditionalGeneration`` (two layer stacks, cross-attention)."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(
        **{
            "d_model": 32,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "vocab_size": 100,
            "max_position_embeddings": 32,
            **overrides,
        }
    )
    return BartForConditionalGeneration(config).eval()


#: BART with its sub-block sites (post-LN: each sub-block's norm follows its residual add), as
#: the bottleneck plugin needs them; ``adapter_methods`` is set by the tests.
BART_SUBBLOCK_INTERFACE: dict[str, Any] = dict(
    BART_INTERFACE,
    layer_pre_self_attn="self_attn",
    layer_pre_cross_attn="encoder_attn",
    layer_pre_ffn="fc1",
    layer_ln_1="self_attn_layer_norm",
    layer_ln_cross_attn="encoder_attn_layer_norm",
    layer_ln_2="final_layer_norm",
)


#: T5: encoder blocks hold [self-attention, FFN], decoder blocks [self-attention,
#: cross-attention, FFN], so the decoder gets its own sub-paths through ``stack_paths``.
T5_INTERFACE: dict[str, Any] = dict(
    adapter_methods=["lora"],
    model_embeddings="shared",
    model_layers=["encoder.block", "decoder.block"],
    layer_self_attn="layer.0.SelfAttention",
    attn_q_proj="q",
    attn_k_proj="k",
    attn_v_proj="v",
    attn_o_proj="o",
    layer_intermediate_proj="layer.1.DenseReluDense.wi",
    layer_output_proj="layer.1.DenseReluDense.wo",
    layer_pre_self_attn="layer.0.layer_norm",
    layer_pre_ffn="layer.1.layer_norm",
    model_final_norm="decoder.final_layer_norm",
    stack_paths={
        "decoder.block": {
            "layer_cross_attn": "layer.1.EncDecAttention",
            "layer_pre_cross_attn": "layer.1.layer_norm",
            "layer_intermediate_proj": "layer.2.DenseReluDense.wi",
            "layer_output_proj": "layer.2.DenseReluDense.wo",
            "layer_pre_ffn": "layer.2.layer_norm",
        }
    },
)


def t5(seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny seeded ``T5ForConditionalGeneration`` (2 encoder and 2 decoder blocks)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        **{
            "d_model": 32,
            "d_ff": 64,
            "d_kv": 8,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "vocab_size": 100,
            **overrides,
        }
    )
    return T5ForConditionalGeneration(config).eval()


def greedy_uncached(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int
) -> torch.Tensor:
    """Greedy decoding by full forward calls without a KV cache (positions from the mask): the
    reference ``generate`` must equal, with and without its cache."""
    tokens, step_mask = ids, mask
    for _ in range(steps):
        positions = (step_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            tokens, attention_mask=step_mask, position_ids=positions, use_cache=False
        ).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        step_mask = torch.cat([step_mask, torch.ones_like(nxt)], 1)
    return tokens
