"""``model(**inputs, adapter_names=[...])`` with LoRA, IA3 and DoRA adapters (core's generic
per-example path)."""

from __future__ import annotations

import pytest
import torch

from adapters import AdapterNotFoundError, AdapterSetup
from adapters_lora import IA3Config, LoRAConfig

from .lora_helpers import IDS, logits, randomise


@pytest.fixture
def mixed(llama):
    llama.add_adapter("lora", LoRAConfig(r=4, attn_matrices=("q", "v"), intermediate_lora=True))
    llama.add_adapter("dora", LoRAConfig(r=2, use_dora=True))
    llama.add_adapter("ia3", IA3Config())
    for seed, name in enumerate(("lora", "dora")):
        randomise(llama, name, seed)
    randomise(llama, "ia3", 7, around_one=True)
    return llama


def alone(model, name, ids):
    with AdapterSetup(name):
        return logits(model, ids)


def test_each_example_equals_running_it_alone(mixed):
    ids = torch.cat([IDS, IDS.flip(0), IDS[:1]])  # 5 examples
    names = ["dora", None, "lora", "ia3", "lora"]
    out = logits(mixed, ids, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(out[i], alone(mixed, name, ids)[i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[2], alone(mixed, None, ids)[2], atol=1e-3)


def test_unknown_name_raises(mixed):
    with pytest.raises(AdapterNotFoundError, match="'loraa'"):
        logits(mixed, adapter_names=["loraa", None])


def test_generate_per_prompt(mixed):
    names = ["ia3", "lora"]
    out = mixed.generate(IDS, max_new_tokens=4, do_sample=False, adapter_names=names)
    for i, name in enumerate(names):
        with AdapterSetup(name):
            single = mixed.generate(IDS[i : i + 1], max_new_tokens=4, do_sample=False)
        torch.testing.assert_close(out[i], single[0])
