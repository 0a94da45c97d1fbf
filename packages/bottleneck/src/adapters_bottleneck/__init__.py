"""adapters-bottleneck: bottleneck adapters for adapters-core.

Installed, it registers the ``bottleneck`` method with AdapterHub's presets (``"seq_bn"`` /
``"pfeiffer"``, ``"double_seq_bn"`` / ``"houlsby"``, ``"par_bn"`` / ``"parallel"``,
``"scaled_par_bn"`` / ``"scaled_parallel"``, ``"adapterplus"``, ``"seq_bn_inv"`` /
``"pfeiffer+inv"``, ``"double_seq_bn_inv"`` / ``"houlsby+inv"``, ``"compacter"``,
``"compacter++"``) and AdapterHub's checkpoint format for bottleneck adapters and fusion
layers (``"adapterhub"``, alias ``"adapterhub-bottleneck"``)::

    model.add_adapter("task", config="seq_bn[reduction_factor=8]")
"""

from __future__ import annotations

from .config import (
    AdapterPlusConfig,
    BnConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    DoubleSeqBnConfig,
    DoubleSeqBnInvConfig,
    HoulsbyConfig,
    HoulsbyInvConfig,
    ParallelConfig,
    ParBnConfig,
    PfeifferConfig,
    PfeifferInvConfig,
    SeqBnConfig,
    SeqBnInvConfig,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterPlusConfig",
    "BnConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "DoubleSeqBnConfig",
    "DoubleSeqBnInvConfig",
    "HoulsbyConfig",
    "HoulsbyInvConfig",
    "ParBnConfig",
    "ParallelConfig",
    "PfeifferConfig",
    "PfeifferInvConfig",
    "SeqBnConfig",
    "SeqBnInvConfig",
]
