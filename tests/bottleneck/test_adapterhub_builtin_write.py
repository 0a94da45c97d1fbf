"""``save_adapter(dir, name, format="adapterhub", layout="builtin")`` writes the key layout of
AdapterHub's built-in BERT-family models and reads back identically (no fixture: a tiny
seeded BERT). AdapterHub 1.3.0 itself loading these directories was checked once with
``tests/fixtures/bottleneck/check_builtin_write.py`` (see tests/fixtures/README.md)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import adapters
from adapters import Fuse
from adapters.errors import CheckpointError

from .test_adapterhub import BERT

IDS = torch.tensor([[3, 17, 42, 8, 61, 5], [12, 9, 77, 31, 2, 50]])
BUILTIN_KEY = re.compile(
    r"^(?:bert\.)?(?:encoder\.layer\.\d+\.(?:attention\.output|output)\.adapters\.(?P<a>\w+)\.|"
    r"invertible_adapters\.(?P<b>\w+)\.|bert\.shared_parameters\.(?P<c>\w+)\.)"
)


def bert(head: bool = False, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model = (BertForSequenceClassification if head else BertModel)(config).eval()
    adapters.init(model, interface=adapters.AdapterModelInterface(**BERT))
    return model


def randomise(model, name, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.get_adapter(name).values():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def output(model):
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize(
    ("config", "head"),
    [
        ("double_seq_bn[reduction_factor=4]", False),
        ("seq_bn_inv[reduction_factor=4]", False),
        ("par_bn[reduction_factor=4]", False),
        ("compacter[reduction_factor=4,phm_dim=2]", True),
    ],
)
def test_builtin_layout_has_adapterhubs_bert_keys_and_reads_back(tmp_path, config, head):
    model = bert(head)
    base = output(model)
    model.add_adapter("task", config=config, set_active=True)
    randomise(model, "task")
    expected = output(model)
    assert (expected - base).abs().max() > 1e-3
    model.save_adapter(str(tmp_path / "out"), "task", format="adapterhub", layout="builtin")
    written = torch.load(tmp_path / "out" / "pytorch_adapter.bin", weights_only=True)
    for key in written:
        match = BUILTIN_KEY.match(key)
        assert match and "task" in match.groups(), key
    assert len(written) == len(model.adapter_state_dict("task"))
    if config.startswith("double"):
        assert "encoder.layer.1.attention.output.adapters.task.adapter_up.weight" in written
        assert "encoder.layer.1.output.adapters.task.adapter_up.weight" in written
    meta = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert meta["name"] == "task" and meta["config"]["architecture"] is None
    other = bert(head)
    assert other.load_adapter(str(tmp_path / "out"), load_as="task", set_active=True) == "task"
    torch.testing.assert_close(output(other), expected, atol=0, rtol=0)


def test_plugin_and_builtin_layouts_differ_only_in_key_names(tmp_path):
    model = bert()
    model.add_adapter("task", config="double_seq_bn[reduction_factor=4]")
    randomise(model, "task")
    model.save_adapter(str(tmp_path / "p"), "task", format="adapterhub")
    model.save_adapter(str(tmp_path / "b"), "task", format="adapterhub", layout="builtin")
    plugin = torch.load(tmp_path / "p" / "pytorch_adapter.bin", weights_only=True)
    builtin = torch.load(tmp_path / "b" / "pytorch_adapter.bin", weights_only=True)
    renamed = {
        k.replace(".attention_adapters.", ".attention.output.").replace(
            ".output_adapters.", ".output."
        ): v
        for k, v in plugin.items()
    }
    assert sorted(renamed) == sorted(builtin)
    for key, value in builtin.items():
        assert torch.equal(renamed[key], value)


def test_builtin_fusion_layout_reads_back(tmp_path):
    model = bert()
    for seed, name in enumerate(("a", "b"), start=1):
        model.add_adapter(name, config="seq_bn[reduction_factor=4]")
        randomise(model, name, seed)
    model.add_adapter_fusion(Fuse("a", "b"), config="dynamic", set_active=True)
    with torch.no_grad():
        for p in model.get_adapter_fusion("a,b").values():
            for q in p.parameters():
                q.add_(torch.randn(q.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    expected = output(model)
    for name in ("a", "b"):
        model.save_adapter(str(tmp_path / name), name, format="adapterhub", layout="builtin")
    model.save_adapter_fusion(str(tmp_path / "f"), "a,b", format="adapterhub", layout="builtin")
    written = torch.load(tmp_path / "f" / "pytorch_model_adapter_fusion.bin", weights_only=True)
    assert "encoder.layer.0.output.adapter_fusion_layer.a,b.value.weight" in written
    other = bert()
    for name in ("a", "b"):
        other.load_adapter(str(tmp_path / name))
    assert other.load_adapter_fusion(str(tmp_path / "f"), set_active=True) == "a,b"
    torch.testing.assert_close(output(other), expected, atol=0, rtol=0)


def test_unknown_layout_and_unrepresentable_shared_rule_are_refused(tmp_path):
    model = bert()
    model.add_adapter("task", config="seq_bn")
    with pytest.raises(CheckpointError, match="layout='bert' is not an AdapterHub key layout"):
        model.save_adapter(str(tmp_path / "x"), "task", format="adapterhub", layout="bert")
    assert not (tmp_path / "x").exists()
    model.add_adapter("phm", config="compacter[reduction_factor=4,phm_dim=2]")
    with pytest.raises(CheckpointError, match="shared_parameters"):
        model.save_adapter(str(tmp_path / "y"), "phm", format="adapterhub", layout="builtin")
    assert not (tmp_path / "y").exists()


def test_adapters_convert_writes_the_builtin_layout(tmp_path, capsys):
    """``adapters convert ... --format adapterhub --option layout=builtin``: an AdapterHub
    plugin-interface directory rewritten for AdapterHub's built-in BERT models."""
    from adapters import cli

    model = bert()
    model.add_adapter("task", config="double_seq_bn[reduction_factor=4]", set_active=True)
    randomise(model, "task")
    expected = output(model)
    model.save_adapter(str(tmp_path / "src"), "task")
    model.save_pretrained(str(tmp_path / "base"))
    interface = tmp_path / "interface.json"
    interface.write_text(json.dumps(adapters.AdapterModelInterface(**BERT).to_dict()))
    argv = ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--model"]
    argv += [str(tmp_path / "base"), "--model-class", "BertModel", "--interface", str(interface)]
    argv += ["--format", "adapterhub", "--option", "layout=builtin"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    written = torch.load(tmp_path / "out" / "pytorch_adapter.bin", weights_only=True)
    assert "encoder.layer.0.attention.output.adapters.task.adapter_up.weight" in written
    other = bert()
    other.load_adapter(str(tmp_path / "out"), load_as="task", set_active=True)
    torch.testing.assert_close(output(other), expected, atol=0, rtol=0)
    assert cli.main([*argv[:-2], "--option", "layout"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err
