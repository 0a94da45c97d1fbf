"""What the conformance kit (`adapters.testing`) knows core does not do yet, shared by the
kit's runs against LoRA, ReFT, bottleneck and the example plugin; and the kit's run on a tiny
BERT encoder (`ConformanceOnBert`).

Each entry marks one check ``xfail(strict=True)``: when the missing piece lands the check
passes, pytest reports XPASS(strict), and the entry must be deleted here.
"""

from __future__ import annotations

from typing import Any

import torch

from adapters import AdapterModelInterface
from adapters.testing import AdapterMethodConformance
from tests.models import BERT_INTERFACE

CORE_GAPS: dict[str, str] = {}


class ConformanceOnBert(AdapterMethodConformance):
    """The kit on an encoder: a tiny ``BertModel`` whose last example is right-padded, so no
    ``generate`` and the compared output is ``last_hidden_state``. Subclass it (as
    ``Test...``) with a ``method_config``."""

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
