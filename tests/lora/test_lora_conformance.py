"""The adapters.testing conformance kit run against the LoRA family (LoRA, IA³, DoRA), on a
tiny Llama and on a tiny BERT encoder."""

from __future__ import annotations

from typing import Any

import torch

from adapters import AdapterModelInterface
from adapters.testing import AdapterMethodConformance
from adapters_lora import LoRAConfig
from tests.conformance import CORE_GAPS
from tests.models import BERT_INTERFACE


class TestLoRAConformance(AdapterMethodConformance):
    method_config = [
        "lora",
        "ia3",
        "dora",
        LoRAConfig(
            r=4, attn_matrices=("q", "k", "v", "o"), intermediate_lora=True, output_lora=True
        ),
    ]
    bad_configs = [
        "lora[r=0]",
        "lora[attn_matrices=['q', 'x']]",
        "ia3[r=2]",
        "lora[composition_mode='multiply']",
        {"method": "lora", "dropout": 1.5},
        lambda: LoRAConfig(use_dora=True, use_gating=True),
    ]
    known_failures = CORE_GAPS


class TestLoRAConformanceOnBert(AdapterMethodConformance):
    """The kit on an encoder (a tiny ``BertModel``, right padding): no ``generate``, the
    compared output is ``last_hidden_state``."""

    method_config = "lora"
    known_failures = CORE_GAPS

    def make_model(self) -> tuple[torch.nn.Module, AdapterModelInterface]:
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=100,
            max_position_embeddings=32,
        )
        interface = AdapterModelInterface(**{**BERT_INTERFACE, "adapter_methods": self.methods()})
        return BertModel(config).eval(), interface

    def make_inputs(self, model: torch.nn.Module, batch_size: int = 2) -> dict[str, Any]:
        inputs = super().make_inputs(model, batch_size)
        inputs["attention_mask"][-1, -2:] = 0  # the last example is right-padded
        return inputs
