"""An AdapterHub 1.3.0 bottleneck checkpoint from its *built-in* Llama support loads with
AdapterHub's outputs (fixture made by tests/fixtures/adapterhub/make_fixtures.py)."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

import adapters

from .test_adapterhub import LLAMA

HERE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "adapterhub")
EXPECTED = load_file(os.path.join(HERE, "expected.safetensors"))


def test_adapterhub_builtin_llama_seq_bn_gives_adapterhubs_outputs():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(os.path.join(HERE, "llama", "base")).eval()
    adapters.init(model, interface=adapters.AdapterModelInterface(**LLAMA))
    base = EXPECTED["llama/base"]
    model.load_adapter(os.path.join(HERE, "llama", "builtin_seq_bn"), set_active=True)
    with torch.no_grad():
        got = model(input_ids=EXPECTED["llama/input_ids"]).logits
    assert (got - base).abs().max() > 1e-2
    torch.testing.assert_close(got, EXPECTED["llama/builtin_seq_bn"], atol=1e-4, rtol=0)
