"""An AdapterHub user's script for a custom model (the plugin interface), written against
AdapterHub ``adapters`` 1.3.0's API as its custom-interface tests and docs use it, runs here
with only the imports changed.

What the script still had to change is listed in docs/migrating-from-adapterhub.md ("An
AdapterHub script, unchanged"): nothing in the body below; the differences it meets are
behaviours (``flatten()`` returns a list, a ``set`` comparison is written ``set(...)``).
"""

from __future__ import annotations

import tempfile

import pytest
import torch

pytest.importorskip("adapters_lora")
pytest.importorskip("adapters_reft")

# -- the only lines an AdapterHub user changes: none, the names are the same -----------------
import adapters
from adapters import (
    AdapterModelInterface,
    AdapterSetup,
    IA3Config,
    LoRAConfig,
    LoReftConfig,
    MultiTask,
    Parallel,
    Stack,
    load_model,
)

# ---------------------------------------------------------------------------------------------


def test_an_adapterhub_custom_interface_script_runs_unchanged():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=16,
        head_dim=8,
        vocab_size=100,
        pad_token_id=0,
    )
    interface = AdapterModelInterface(
        adapter_types=["lora", "reft"],
        model_embeddings="embed_tokens",
        model_layers="layers",
        layer_self_attn="self_attn",
        layer_cross_attn=None,
        attn_k_proj="k_proj",
        attn_q_proj="q_proj",
        attn_v_proj="v_proj",
        attn_o_proj="o_proj",
        layer_intermediate_proj="mlp.up_proj",
        layer_output_proj="mlp.down_proj",
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    adapters.init(model, interface=interface)
    model.eval()
    ids = torch.randint(1, 100, (3, 6), generator=torch.Generator().manual_seed(1))
    base = model(input_ids=ids).logits

    # add, activate, train: LoRA, IA3 and LoReFT
    model.add_adapter("lora", config=LoRAConfig(r=4, alpha=8))
    model.add_adapter("ia3", config=IA3Config())
    model.add_adapter("reft", config=LoReftConfig(r=2))
    assert model.has_adapters()
    assert len(list(model.iter_layers())) == 4
    model.train_adapter("lora")
    assert model.active_adapters == Stack("lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    trained = model(input_ids=ids).logits
    assert not torch.allclose(trained, base)

    # AdapterSetup, lists, Parallel, MultiTask
    with AdapterSetup("lora"):
        torch.testing.assert_close(model(input_ids=ids).logits, trained)
    model.set_active_adapters(["lora", "ia3"])
    assert set(model.active_adapters.flatten()) == {"lora", "ia3"}
    model.active_adapters = Parallel("lora", "reft")
    assert model(input_ids=ids).logits.shape[0] == 2 * ids.shape[0]
    model.set_active_adapters(MultiTask("lora", "ia3"))
    per_task = model(input_ids=ids, task_ids=torch.tensor([0, 1, 0])).logits
    torch.testing.assert_close(per_task[0], trained[0])

    # merge and reset
    model.set_active_adapters("lora")
    model.merge_adapter("lora")
    torch.testing.assert_close(model(input_ids=ids).logits, trained, atol=1e-4, rtol=0)
    model.reset_adapter()

    # averaging
    model.add_adapter("lora2", config=LoRAConfig(r=4, alpha=8, dropout=0.1))
    model.average_adapter("avg", ["lora", "lora2"], weights=[0.5, 0.5])
    assert "avg" in model.adapters_config

    # save / load an adapter, and the full model
    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(tmp, "lora")
        loading_info: dict = {}
        name = model.load_adapter(tmp, load_as="lora_copy", loading_info=loading_info)
        assert name == "lora_copy" and not loading_info["missing_keys"]
        with AdapterSetup("lora_copy"):
            torch.testing.assert_close(model(input_ids=ids).logits, trained)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        model2, info = load_model(
            tmp, Gemma2ForCausalLM, output_loading_info=True, interface=interface
        )
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert "reft" in model2.adapters_config
        model2.eval()
        with AdapterSetup("lora"):
            torch.testing.assert_close(model2(input_ids=ids).logits, trained, atol=1e-4, rtol=0)

    # summary, delete
    summary = model.adapter_summary()
    assert "lora" in summary and "Full model" in summary
    model.delete_adapter("lora_copy")
    assert "lora_copy" not in model.adapters_config
