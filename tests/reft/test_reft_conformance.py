"""The adapters.testing conformance kit run against the ReFT family (LoReFT, NoReFT, DiReFT),
on a tiny Llama and on a tiny right-padded BERT encoder."""

from __future__ import annotations

from typing import Any

import torch

from adapters import AdapterModelInterface
from adapters.testing import AdapterMethodConformance
from adapters_reft import LoReftConfig
from tests.conformance import CORE_GAPS
from tests.models import BERT_INTERFACE


class TestReftConformance(AdapterMethodConformance):
    method_config = [
        "loreft",
        "noreft",
        "direft",
        LoReftConfig(prefix_positions=2, suffix_positions=2, r=2, layers=(1,)),
    ]
    bad_configs = [
        "loreft[r=0]",
        "loreft[prefix_positions=0, suffix_positions=0]",
        "noreft[dropout=1.0]",
        "direft[non_linearity='softmaxx']",
        lambda: LoReftConfig(layers=(7,)),
    ]
    known_failures = CORE_GAPS


class TestReftConformanceOnBert(AdapterMethodConformance):
    """The kit on an encoder (a tiny ``BertModel``, right padding): no ``generate``, the
    compared output is ``last_hidden_state``."""

    method_config = "loreft"
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
