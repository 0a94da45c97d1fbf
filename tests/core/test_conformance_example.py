"""The adapters.testing conformance kit run against the documented example plugin,
examples/adapters-hidden-scale (installed in the tox env ``core``)."""

from __future__ import annotations

import pytest

from adapters.testing import AdapterMethodConformance

from ..conformance import CORE_GAPS

hidden_scale = pytest.importorskip("adapters_hidden_scale")


class TestHiddenScaleConformance(AdapterMethodConformance):
    method_config = ["hidden_scale", hidden_scale.HiddenScaleConfig(layers=(1,))]
    bad_configs = [
        "hidden_scale[layers=('first',)]",
        lambda: hidden_scale.HiddenScaleConfig(layers=(0.5,)),
    ]
    known_failures = CORE_GAPS
