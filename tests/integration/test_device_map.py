"""Models loaded with ``device_map`` (accelerate dispatch) take adapters like any other model.

Only CPU is available here, so this covers the dispatch code path with every module on the CPU;
multi-device maps need a GPU run.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("adapters_lora")

import adapters
from adapters import AdapterModelInterface
from tests.models import LLAMA_INTERFACE, llama


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}])
def test_a_device_map_model_takes_an_adapter_like_a_plain_one(tmp_path, device_map):
    from transformers import LlamaForCausalLM

    llama().save_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    outputs = []
    for kwargs in ({"device_map": device_map}, {}):
        model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, **kwargs).eval()
        adapters.init(model, interface=AdapterModelInterface(**LLAMA_INTERFACE))
        torch.manual_seed(3)
        model.add_adapter("a", config="lora[init_weights='bert']", set_active=True)
        unit = next(iter(model.get_adapter("a").values()))
        assert unit.lora_A.dtype == torch.float32  # adapter weights stay fp32 on a bf16 model
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
    assert torch.isfinite(outputs[0]).all()
    assert torch.equal(outputs[0], outputs[1])
