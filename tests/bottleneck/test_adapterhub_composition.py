"""AdapterHub 1.3.0 AdapterFusion layers and Split give AdapterHub's outputs (fixtures made by
``tests/fixtures/bottleneck/make_fixtures.py --composition``): two seq_bn adapters and fusion
layers saved by AdapterHub, on the tiny Llama (plugin interface) and on all-MiniLM-L6-v2
(built-in BertModel), for a left-padded batch with an attention mask."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from adapters import Fuse, Split
from adapters.errors import CheckpointError

from .test_adapterhub import HERE, llama, minilm

EXPECTED = load_file(os.path.join(HERE, "composition.safetensors"))
FUSIONS = [("llama", "dynamic"), ("llama", "static"), ("minilm", "dynamic")]


def build(kind):
    model = llama() if kind == "llama" else minilm()
    root = os.path.join(HERE, kind, "composition", "adapters")
    for name in ("a", "b"):
        assert model.load_adapter(os.path.join(root, name)) == name
    return model


def output(model, kind):
    """The outputs at the positions the attention mask keeps (padding rows are left out:
    transformers versions differ there)."""
    mask = EXPECTED[f"{kind}/attention_mask"]
    with torch.no_grad():
        out = model(input_ids=EXPECTED[f"{kind}/input_ids"], attention_mask=mask)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return out[mask.bool()]


def expected(kind, name):
    return EXPECTED[f"{kind}/{name}"][EXPECTED[f"{kind}/attention_mask"].bool()]


@pytest.mark.parametrize(("kind", "config"), FUSIONS)
def test_adapterhub_fusion_gives_adapterhubs_outputs(kind, config):
    model = build(kind)
    for name in ("a", "b"):
        model.set_active_adapters(name)
        torch.testing.assert_close(output(model, kind), expected(kind, name), atol=1e-4, rtol=0)
    path = os.path.join(HERE, kind, "composition", config)
    assert model.load_adapter_fusion(path, set_active=True) == config
    assert model.active_adapters == Fuse("a", "b", name=config)
    assert model.adapter_fusions[config].config.value is (config == "dynamic")
    got = output(model, kind)
    for name in ("a", "b"):  # the fusion is something else than either adapter
        assert (got - expected(kind, name)).abs().max() > 0.1
    torch.testing.assert_close(got, expected(kind, f"fuse_{config}"), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "minilm"])
def test_adapterhub_split_gives_adapterhubs_outputs(kind):
    model = build(kind)
    model.set_active_adapters(Split("a", "b", splits=[3, 4]))
    got = output(model, kind)
    for name in ("a", "b"):
        assert (got - expected(kind, name)).abs().max() > 0.1
    torch.testing.assert_close(got, expected(kind, "split"), atol=1e-4, rtol=0)


def test_adapterhub_fusion_needs_its_adapters_first():
    model = llama()
    with pytest.raises(CheckpointError, match="load those adapters first"):
        model.load_adapter_fusion(os.path.join(HERE, "llama", "composition", "dynamic"))
    assert not model.adapter_fusions


def test_adapterhub_fusion_with_a_missing_tensor_is_refused_and_changes_nothing(tmp_path):
    target = tmp_path / "dynamic"
    shutil.copytree(os.path.join(HERE, "llama", "composition", "dynamic"), target)
    weights = target / "pytorch_model_adapter_fusion.bin"
    tensors = torch.load(weights, weights_only=True)
    tensors.pop(next(k for k in tensors if k.endswith("value.weight")))
    torch.save(tensors, weights)
    model = build("llama")
    with pytest.raises(CheckpointError, match="missing 1 tensors"):
        model.load_adapter_fusion(str(target))
    assert not model.adapter_fusions


def test_adapterhub_fusion_written_by_us_reads_back(tmp_path):
    model = build("llama")
    model.load_adapter_fusion(os.path.join(HERE, "llama", "composition", "dynamic"))
    model.save_adapter_fusion(str(tmp_path / "out"), "dynamic", format="adapterhub")
    original = torch.load(
        os.path.join(HERE, "llama", "composition", "dynamic", "pytorch_model_adapter_fusion.bin"),
        weights_only=True,
    )
    written = torch.load(tmp_path / "out" / "pytorch_model_adapter_fusion.bin", weights_only=True)
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        torch.testing.assert_close(written[key], value, atol=0, rtol=0)
    other = build("llama")
    other.load_adapter_fusion(str(tmp_path / "out"), set_active=True)
    torch.testing.assert_close(
        output(other, "llama"), expected("llama", "fuse_dynamic"), atol=1e-4, rtol=0
    )


def test_adapterhub_fusion_saved_from_a_model_with_a_head_reads_on_the_bare_model(tmp_path):
    """AdapterHub's keys carry a ``bert.`` prefix when saved from ``BertForSequenceClassification``
    or ``BertAdapterModel``; they load on ``BertModel`` (and the outputs are unchanged)."""
    source = os.path.join(HERE, "minilm", "composition", "dynamic")
    target = tmp_path / "dynamic"
    shutil.copytree(source, target)
    weights = target / "pytorch_model_adapter_fusion.bin"
    tensors = torch.load(weights, weights_only=True)
    torch.save({f"bert.{k}": v for k, v in tensors.items()}, weights)
    model = build("minilm")
    model.load_adapter_fusion(str(target), set_active=True)
    torch.testing.assert_close(
        output(model, "minilm"), expected("minilm", "fuse_dynamic"), atol=1e-4, rtol=0
    )


def test_fusion_layers_where_no_fused_adapter_sits_are_dropped_and_partial_ones_refused():
    path = os.path.join(HERE, "llama", "composition", "dynamic")
    model = llama()
    model.add_adapter("a", config="seq_bn[reduction_factor=4,leave_out=[1]]")
    model.add_adapter("b", config="seq_bn[reduction_factor=4]")
    with pytest.raises(CheckpointError, match="where only some of \\['a', 'b'\\] sit"):
        model.load_adapter_fusion(path)
    assert not model.adapter_fusions
    model.delete_adapter("b")
    model.add_adapter("b", config="seq_bn[reduction_factor=4,leave_out=[1]]")
    model.load_adapter_fusion(path)  # layer 1's fusion layer is unused: dropped
    assert sorted(model.get_adapter_fusion("dynamic")) == [
        "model.layers.0.bottleneck.output_adapter.fusion"
    ]
