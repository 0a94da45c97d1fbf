"""The adapters.testing conformance kit run against every bottleneck config."""

from __future__ import annotations

from adapters.testing import AdapterMethodConformance
from adapters_bottleneck import SeqBnConfig
from tests.conformance import CORE_GAPS


class TestBottleneckConformance(AdapterMethodConformance):
    method_config = [
        "seq_bn",
        "double_seq_bn",
        "par_bn",
        "scaled_par_bn",
        "adapterplus",
        "seq_bn_inv",
        "double_seq_bn_inv[inv_adapter='glow']",
        "compacter[reduction_factor=4]",
        "compacter++[reduction_factor=4]",
        SeqBnConfig(reduction_factor={"0": 2, "default": 8}, leave_out=(1,)),
    ]
    bad_configs = [
        "seq_bn[reduction_factor=0]",
        "seq_bn[non_linearity='relu7']",
        "par_bn[original_ln_after=False]",
        "seq_bn[scaling='vector']",
        "compacter[reduction_factor=3]",  # phm_dim=4 does not divide the bottleneck size
        lambda: SeqBnConfig(residual_before_ln="post_add", original_ln_before=False),
    ]
    known_failures = CORE_GAPS
