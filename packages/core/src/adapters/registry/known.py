"""Which first-party distribution provides which method, preset and config class.

Data only: for error messages ("install adapters-lora") and for the order in which
``adapters demo`` picks a default among installed methods. Core never branches on a method
name. Third-party methods need no entry here; their distribution is assumed to be
``adapters-<method>``.
"""

from __future__ import annotations

FIRST_PARTY: dict[str, dict[str, tuple[str, ...]]] = {
    "adapters-lora": {
        "methods": ("lora",),
        "presets": ("lora", "ia3", "dora"),
        "classes": ("LoRAConfig", "IA3Config", "DoRAConfig"),
    },
    "adapters-reft": {
        "methods": ("reft",),
        "presets": ("loreft", "noreft", "direft"),
        "classes": ("ReftConfig", "LoReftConfig", "NoReftConfig", "DiReftConfig"),
    },
    "adapters-bottleneck": {
        "methods": ("bottleneck",),
        "presets": (
            "seq_bn",
            "double_seq_bn",
            "par_bn",
            "pfeiffer",
            "houlsby",
            "parallel",
            "scaled_parallel",
            "adapterplus",
            "seq_bn_inv",
            "double_seq_bn_inv",
            "scaled_par_bn",
            "pfeiffer+inv",
            "houlsby+inv",
            "compacter",
            "compacter++",
        ),
        "classes": (
            "BnConfig",
            "SeqBnConfig",
            "DoubleSeqBnConfig",
            "ParBnConfig",
            "AdapterPlusConfig",
            "SeqBnInvConfig",
            "DoubleSeqBnInvConfig",
            "PfeifferConfig",
            "HoulsbyConfig",
            "ParallelConfig",
            "PfeifferInvConfig",
            "HoulsbyInvConfig",
            "CompacterConfig",
            "CompacterPlusPlusConfig",
        ),
    },
}
