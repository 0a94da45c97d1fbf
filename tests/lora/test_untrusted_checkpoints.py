"""LoRA checkpoints users can trust (issue 8): untrusted PEFT/AdapterHub configs, rank limits,
names, portable keys and 0.1 (format 1) checkpoints."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import adapters
from adapters.errors import CheckpointError, ConfigError
from tests.models import LLAMA_INTERFACE, SEED_INTERFACE, llama

from .lora_helpers import FIXTURES, init

V0_1 = os.path.join(os.path.dirname(__file__), "..", "fixtures", "core", "v0_1")
IDS = torch.arange(14).reshape(2, 7) % 100


def _lora_llama():
    model = llama()
    adapters.init(model, interface={**SEED_INTERFACE, "adapter_methods": ["lora"]})
    return model


def _peft_copy(tmp_path, **changes):
    target = tmp_path / "peft"
    shutil.copytree(os.path.join(FIXTURES, "llama", "peft_lora"), target)
    meta = json.loads((target / "adapter_config.json").read_text())
    meta.update(changes)
    (target / "adapter_config.json").write_text(json.dumps(meta))
    return target


def _fixture_llama():
    import transformers as tf

    base = tf.LlamaForCausalLM.from_pretrained(os.path.join(FIXTURES, "llama", "base")).eval()
    return init(base, LLAMA_INTERFACE)


@pytest.mark.parametrize("pattern", ["(a+)+$", "(.*.*)*x", "q_proj|v_proj", "[qv]_proj"])
def test_peft_rank_pattern_is_never_run_as_a_regular_expression(tmp_path, pattern, monkeypatch):
    target = _peft_copy(tmp_path, rank_pattern={pattern: 4})
    model = _fixture_llama()
    ran = []

    def guarded(name):
        real = getattr(re, name)

        def call(expression, *args, **kwargs):
            if expression == pattern:  # the checkpoint's key reached the regex engine
                ran.append(name)
            return real(expression, *args, **kwargs)

        return call

    for name in ("compile", "match", "fullmatch", "search", "findall", "finditer", "sub"):
        monkeypatch.setattr(re, name, guarded(name))
    with pytest.raises(CheckpointError, match="not as regular expressions"):
        model.load_adapter(str(target))
    assert ran == []
    assert not model.has_adapters()


def test_peft_patterns_match_module_path_suffixes(tmp_path):
    from adapters_lora.interop import _pattern_value

    module = "model.layers.0.self_attn.q_proj"
    assert _pattern_value({"q_proj": 4}, module, 8, "rank_pattern") == 4
    assert _pattern_value({"layers.0.self_attn.q_proj": 4}, module, 8, "rank_pattern") == 4
    assert _pattern_value({"proj": 4}, module, 8, "rank_pattern") == 8  # not a path suffix
    assert _pattern_value({"layers.1.self_attn.q_proj": 4}, module, 8, "rank_pattern") == 8


@pytest.mark.parametrize(
    "text, match",
    [
        ('"lora_alpha": NaN', "not finite"),
        ('"lora_alpha": 1e999', "not finite"),
        ('"r": 4, "r": 8', "'r' appears twice"),
    ],
)
def test_peft_config_with_non_finite_or_duplicate_values_is_refused(tmp_path, text, match):
    target = _peft_copy(tmp_path)
    raw = (target / "adapter_config.json").read_text()
    (target / "adapter_config.json").write_text(raw.replace("{", "{" + text + ",", 1))
    model = _fixture_llama()
    with pytest.raises(CheckpointError, match=match) as info:
        model.load_adapter(str(target))
    assert "adapter_config.json" in str(info.value)
    assert not model.has_adapters()


def test_adapterhub_config_with_an_infinite_alpha_is_refused(tmp_path):
    target = tmp_path / "ah"
    shutil.copytree(os.path.join(FIXTURES, "llama", "ah_lora"), target)
    raw = (target / "adapter_config.json").read_text()
    meta = json.loads(raw)
    meta["config"]["alpha"] = "INF"
    text = json.dumps(meta).replace('"INF"', "Infinity")
    (target / "adapter_config.json").write_text(text)
    model = _fixture_llama()
    with pytest.raises(CheckpointError, match="not finite"):
        model.load_adapter(str(target))


@pytest.mark.parametrize("config", ["lora[alpha=1e999]", "lora[alpha=-1e999]", "lora[r=8, r=9]"])
def test_lora_config_strings_with_bad_numbers_or_duplicates_are_refused(config):
    with pytest.raises(ConfigError):
        _lora_llama().add_adapter("a", config=config)


def test_lora_nan_alpha_object_is_refused_at_add():
    from adapters_lora import LoRAConfig

    model = _lora_llama()
    with pytest.raises(ConfigError, match="finite"):
        model.add_adapter("a", config=LoRAConfig(alpha=float("nan")))


def test_rank_above_min_in_out_is_refused_at_add():
    model = _lora_llama()  # width 32; v_proj has 2 key/value heads of 8: 16 outputs
    keys = list(model.state_dict())
    with pytest.raises(ConfigError, match=r"r=17 exceeds min\(in, out\) = 16 .*v_proj"):
        model.add_adapter("a", config="lora[r=17]")
    assert list(model.state_dict()) == keys
    model.add_adapter("ok", config="lora[r=16]")


@pytest.mark.parametrize("name", ["train", "forward", "to", "keys", "../x", "/abs"])
def test_lora_adapter_names_that_break_module_dicts_or_paths_raise_config_error(name):
    model = _lora_llama()
    with pytest.raises(ConfigError, match="is not allowed"):
        model.add_adapter(name, config="lora")


def test_lora_checkpoint_of_version_0_1_still_loads():
    model = _lora_llama()
    model.load_adapter(os.path.join(V0_1, "lora"), set_active=True)
    expected = load_file(os.path.join(V0_1, "expected.safetensors"))["lora"]
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_lora_adapter_moves_between_head_classes(tmp_path):
    source = _lora_llama()
    source.add_adapter("a", config="lora[r=4, output_lora=True]", set_active=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for m in source.get_adapter("a").values() for p in m.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    hidden = source(IDS, output_hidden_states=True).hidden_states[-1]
    source.save_adapter(str(tmp_path / "a"), "a")
    bare = tf.LlamaModel(llama().config).eval()
    bare.load_state_dict(llama().model.state_dict())
    adapters.init(bare, interface={**SEED_INTERFACE, "adapter_methods": ["lora"]})
    bare.load_adapter(str(tmp_path / "a"), set_active=True)
    out = bare(IDS, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(out, hidden, atol=1e-5, rtol=1e-5)


# -- issue 16: nothing silently wrong -------------------------------------------------------------


def test_leave_out_takes_layer_indices_not_booleans():
    with pytest.raises(ConfigError, match="True/False are not indices"):
        adapters.configs.resolve_config("lora[leave_out=[True]]")
    assert adapters.configs.resolve_config("lora[leave_out=[1]]").leave_out == (1,)


def test_an_adapterhub_file_holding_two_adapters_is_refused(tmp_path):
    target = tmp_path / "ah"
    shutil.copytree(os.path.join(FIXTURES, "llama", "ah_lora"), target)
    tensors = torch.load(target / "pytorch_adapter.bin", weights_only=True)
    renamed = {k.replace(".loras.ah_lora.", ".loras.zzz."): v * 3 for k, v in tensors.items()}
    torch.save({**tensors, **dict(list(renamed.items())[:2])}, target / "pytorch_adapter.bin")
    model = _fixture_llama()
    with pytest.raises(CheckpointError, match="mixes two adapters|several AdapterHub adapters"):
        model.load_adapter(str(target))
    assert model.adapters_config == {}


def test_loading_into_a_model_on_the_meta_device_is_refused(tmp_path):
    real = _lora_llama()
    real.add_adapter("a", config="lora[r=2]")
    real.save_adapter(str(tmp_path / "a"), "a")
    with torch.device("meta"):
        empty = llama()
    adapters.init(empty, interface={**SEED_INTERFACE, "adapter_methods": ["lora"]})
    with pytest.raises(CheckpointError, match="meta device"):
        empty.load_adapter(str(tmp_path / "a"))
    assert empty.adapters_config == {}
    empty.add_adapter("m", config="lora[r=2]")
    with pytest.raises(CheckpointError, match="meta device"):
        empty.save_adapter(str(tmp_path / "m"), "m")
