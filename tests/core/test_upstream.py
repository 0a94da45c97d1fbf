"""tests/upstream.py: a failure is skipped only when the plain model fails too, never a failure
of ours; checks run once per (capability, model config); on the pinned versions every
capability holds for the models the gated tests build."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers

from tests import models, upstream

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_capabilities(monkeypatch):
    """Two in-test capabilities: ``works`` and ``broken`` (the plain model cannot), each
    counting its calls; results start empty and are put back afterwards."""
    calls = {"works": 0, "broken": 0}

    def works(model):
        calls["works"] += 1

    def broken(model):
        calls["broken"] += 1
        raise RuntimeError("upstream cannot\nsecond line")

    monkeypatch.setitem(upstream.CAPABILITIES, "works", works)
    monkeypatch.setitem(upstream.CAPABILITIES, "broken", broken)
    monkeypatch.setattr(upstream, "_results", {})
    return calls


def tiny():
    return models.llama(num_hidden_layers=1)


def test_a_failure_skips_when_the_plain_model_fails_too(fake_capabilities):
    with pytest.raises(pytest.skip.Exception) as skipped:
        with upstream.relies_on("broken", tiny):
            raise AssertionError("ours failed the same way")
    message = str(skipped.value)
    assert message.startswith(f"upstream: transformers {transformers.__version__}: ")
    assert "the plain LlamaForCausalLM fails broken: RuntimeError: upstream cannot" in message
    assert "second line" not in message


def test_a_failure_of_ours_is_raised_when_the_plain_model_works(fake_capabilities):
    with pytest.raises(AssertionError, match="ours broke"):
        with upstream.relies_on("works", tiny):
            raise AssertionError("ours broke")
    with pytest.raises(pytest.fail.Exception, match="ours failed explicitly"):
        with upstream.relies_on("works", tiny):
            pytest.fail("ours failed explicitly")
    assert fake_capabilities["works"] == 1  # the second failure used the cached result


def test_a_passing_block_runs_no_check_and_is_not_skipped(fake_capabilities):
    ran = []
    with upstream.relies_on("broken", tiny):
        ran.append(True)
    assert ran == [True]
    assert fake_capabilities == {"works": 0, "broken": 0}


def test_checks_run_once_per_capability_and_config(fake_capabilities):
    for _ in range(3):
        for build in (tiny, tiny, lambda: models.llama(num_hidden_layers=2)):
            with pytest.raises(pytest.skip.Exception):
                with upstream.relies_on("broken", build):
                    raise AssertionError
    assert fake_capabilities["broken"] == 2  # two configs
    eager = lambda: models.llama(num_hidden_layers=1, attn_implementation="eager")  # noqa: E731
    with pytest.raises(pytest.skip.Exception):
        with upstream.relies_on("broken", eager):
            raise AssertionError
    assert fake_capabilities["broken"] == 3  # the attention implementation is part of the key


def test_an_unknown_capability_is_refused_before_the_block_runs():
    with pytest.raises(KeyError, match="unknown capability 'compiled_trainin'"):
        with upstream.relies_on("compiled_trainin", tiny):
            pytest.fail("must not run")


def _pinned_transformers() -> set[str]:
    pins = set()
    for path in (ROOT / "constraints").glob("*.txt"):
        pins.update(re.findall(r"^transformers==(\S+)$", path.read_text(), flags=re.M))
    return pins


#: Every (capability, plain model) a gated test relies on.
GATED = {
    "compiled_training-llama": ("compiled_training", models.llama),
    "compiled_checkpointed_training-llama": ("compiled_checkpointed_training", models.llama),
    "compiled_training-reft_llama": (
        "compiled_training",
        lambda: models.llama(pad_token_id=0, attn_implementation="eager"),
    ),
    "cached_generation-llama": ("cached_generation", models.llama),
    "cached_generation-llama_pad0": ("cached_generation", lambda: models.llama(pad_token_id=0)),
    "cached_generation-reft_llama": (
        "cached_generation",
        lambda: models.llama(pad_token_id=0, attn_implementation="eager"),
    ),
    "cached_generation-t5": ("cached_generation", models.t5),
    "cached_generation-bart": ("cached_generation", lambda: models.bart(dropout=0.0)),
    "sdpa-llama": ("sdpa", lambda: models.llama(attn_implementation="sdpa")),
}


@pytest.mark.parametrize("case", GATED)
def test_on_the_pinned_versions_every_capability_holds(case):
    """Where the installed transformers is one the constraints files pin, no gated test can be
    skipped: every capability holds. (The canary, ``tox -e latest``, may differ.)"""
    if transformers.__version__ not in _pinned_transformers():
        pytest.skip(f"transformers {transformers.__version__} is not a pinned version")
    torch._dynamo.reset()
    name, build = GATED[case]
    assert upstream.failure(upstream.CAPABILITIES[name], build()) is None
