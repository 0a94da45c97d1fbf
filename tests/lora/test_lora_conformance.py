"""The adapters.testing conformance kit run against the LoRA family (LoRA, IA³, DoRA), on a
tiny Llama and on a tiny BERT encoder."""

from __future__ import annotations

from adapters.testing import AdapterMethodConformance
from adapters_lora import LoRAConfig
from tests.conformance import CORE_GAPS, ConformanceOnBert


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


class TestLoRAConformanceOnBert(ConformanceOnBert):
    """The kit on a tiny right-padded BERT encoder."""

    method_config = "lora"
