"""The adapters.testing conformance kit run against the ReFT family (LoReFT, NoReFT, DiReFT),
on a tiny Llama and on a tiny right-padded BERT encoder."""

from __future__ import annotations

from adapters.testing import AdapterMethodConformance
from adapters_reft import LoReftConfig
from tests.conformance import CORE_GAPS, ConformanceOnBert


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


class TestReftConformanceOnBert(ConformanceOnBert):
    """The kit on a tiny right-padded BERT encoder."""

    method_config = "loreft"
