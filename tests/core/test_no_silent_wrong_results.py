"""No silently wrong result (issue 8): unknown adapters in a setup, non-finite or duplicated
config values, merged adapters that are overwritten or deleted, Trainer-style saves, pickling
and unloading."""

from __future__ import annotations

import copy
import io
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

import adapters
import adapters.checkpoint.model
from adapters import AdapterSetup, CompositionError, ConfigError
from adapters.configs import resolve_config

from ..models import llama
from .conftest import init_toy, randomize


@pytest.fixture
def model(toy_plugins):
    model = init_toy()
    model.add_adapter("a", config="toy_lora[r=3]", set_active=True)
    randomize(model, "a")
    return model


# -- unknown adapters in a setup -----------------------------------------------------------


def test_adapter_setup_naming_a_missing_adapter_raises(model, ids):
    with AdapterSetup("typo"), pytest.raises(CompositionError, match="'typo'.*not added"):
        model(ids)


def test_adapter_setup_of_a_deleted_adapter_raises_even_after_a_good_call(model, ids):
    setup = AdapterSetup("a")
    with setup:
        model(ids)
    model.delete_adapter("a")
    with setup, pytest.raises(CompositionError, match="'a'"):
        model(ids)


def test_a_valid_adapter_setup_still_runs(model, ids):
    with AdapterSetup("a"):
        adapted = model(ids).logits
    model.set_active_adapters(None)
    assert not torch.equal(adapted, model(ids).logits)


# -- config values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, match",
    [
        ("toy_lora[r=2, r=3]", "given twice"),
        ("toy_lora[r=1e999]", "finite"),
        ("toy_lora[targets=('q', -1e999)]", "finite"),
        ({"method": "toy_lora", "r": float("nan")}, "finite"),
        ({"method": "toy_lora", "targets": ["q", float("inf")]}, "finite"),
    ],
)
def test_non_finite_and_duplicate_values_are_refused(toy_plugins, config, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(config)


def test_non_finite_values_in_config_objects_are_refused_at_add(toy_plugins):
    from .toy_plugins import ToyLoRAConfig

    model = init_toy()
    with pytest.raises(ConfigError, match="finite"):
        model.add_adapter("a", config=ToyLoRAConfig(r=float("nan")))
    assert not model.has_adapters()


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"method": "toy_lora", "r": 2, "r": 3}', "'r' appears twice"),
        ('{"method": "toy_lora", "r": NaN}', "not finite"),
        ('{"method": "toy_lora", "r": 1e999}', "not finite"),
        ('{"method": "toy_lora", "r": Infinity}', "not finite"),
    ],
)
def test_json_config_files_with_duplicates_or_non_finite_numbers_are_refused(
    toy_plugins, tmp_path, text, match
):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        resolve_config(str(path))


# -- merged adapters -----------------------------------------------------------------------


def _base_weights(model):
    return {k: v.clone() for k, v in adapters.checkpoint.model.base_state_dict(model).items()}


def test_deleting_a_merged_adapter_resets_the_base_weights_first(model, ids):
    base = _base_weights(model)
    model.merge_adapter("a")
    model.delete_adapter("a")
    after = adapters.checkpoint.model.base_state_dict(model)
    for key, value in base.items():  # the toy plugin resets by subtraction: float error only
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=0)


def test_overwriting_a_merged_adapter_resets_the_base_weights_first(model, tmp_path):
    base = _base_weights(model)
    model.merge_adapter("a")
    model.add_adapter("a", config="toy_lora[r=2]", overwrite_ok=True)
    assert not model.is_merged("a")
    after = adapters.checkpoint.model.base_state_dict(model)
    for key, value in base.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=0)
    model.save_pretrained(str(tmp_path / "m"))  # no merged change is saved as the base model
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    for key, value in saved.items():
        torch.testing.assert_close(value, base[key], atol=1e-6, rtol=0)


def test_merge_and_unload_returns_the_plain_original_class_with_merged_weights(model, ids):
    cls = type(llama())
    adapted = model(ids).logits
    keys = set(type(llama())(llama().config).state_dict())
    plain = model.merge_and_unload()
    assert plain is model and type(plain) is cls
    assert not adapters.is_initialized(plain)
    assert not plain._forward_pre_hooks and not plain._forward_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in plain.modules())
    assert set(plain.state_dict()) == keys
    assert not hasattr(plain, "adapter_summary") and not hasattr(plain, "adapters_config")
    torch.testing.assert_close(plain(ids).logits, adapted, atol=1e-5, rtol=0)


def test_merge_and_unload_keeps_every_merged_change(model, ids):
    model.add_adapter("b", config="toy_lora[r=2]")
    randomize(model, "b", seed=3)
    model.merge_adapter("b")
    both = model(ids).logits  # a active and unmerged, b merged
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain(ids).logits, both, atol=1e-5, rtol=0)


def test_unload_removes_every_adapter_without_merging(model, ids):
    base = llama()(ids).logits
    model.add_adapter("b", config="toy_lora")
    model.merge_adapter("a")
    plain = model.unload()
    assert type(plain) is type(llama()) and not adapters.is_initialized(plain)
    torch.testing.assert_close(plain(ids).logits, base, atol=1e-5, rtol=0)
    adapters.init(plain, interface=init_toy().adapter_interface)  # can start again
    assert not plain.has_adapters()


# -- Trainer-style saves -------------------------------------------------------------------


def test_save_pretrained_with_state_dict_none_keeps_adapter_tensors_out(model, tmp_path):
    # the keywords transformers' Trainer passes (pitfall 33)
    model.save_pretrained(str(tmp_path / "ckpt"), state_dict=None, safe_serialization=True)
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert saved and not [k for k in saved if "toy_lora" in k]
    assert set(saved) == set(llama().state_dict()) - {"lm_head.weight"} or set(saved) == set(
        llama().state_dict()
    )


def test_save_pretrained_with_a_full_state_dict_drops_adapter_tensors(model, tmp_path):
    full = model.state_dict()
    assert [k for k in full if "toy_lora" in k]
    model.save_pretrained(str(tmp_path / "ckpt"), state_dict=full, safe_serialization=True)
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert not [k for k in saved if "toy_lora" in k]
    loaded = adapters.load_model(str(tmp_path / "ckpt"), type(llama()))
    assert list(loaded.adapters_config) == ["a"]


def test_trainer_files_written_after_save_pretrained_survive_the_next_save(model, tmp_path):
    folder = tmp_path / "checkpoint-1"
    model.save_pretrained(str(folder), state_dict=None)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 1}))
    model.save_pretrained(str(folder), state_dict=None)
    assert json.loads((folder / "trainer_state.json").read_text()) == {"step": 1}


# -- pickling and copying ------------------------------------------------------------------


def test_torch_save_and_load_give_identical_outputs(model, ids):
    expected = model(ids).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert type(again).__name__ == type(model).__name__ and adapters.is_initialized(again)
    assert torch.equal(again(ids).logits, expected)
    again.delete_adapter("a")  # the copy is independent and fully working
    assert not torch.equal(again(ids).logits, expected)
    assert torch.equal(model(ids).logits, expected)


def test_pickle_round_trip(model, ids):
    expected = model(ids).logits
    again = pickle.loads(pickle.dumps(model))
    assert torch.equal(again(ids).logits, expected)
    with AdapterSetup("typo"), pytest.raises(CompositionError):
        again(ids)


def test_deepcopy_gives_identical_outputs(model, ids):
    expected = model(ids).logits
    clone = copy.deepcopy(model)
    assert torch.equal(clone(ids).logits, expected)
    assert type(clone) is type(model)


def test_a_pickled_adapted_model_runs_in_a_fresh_process(model, tmp_path, ids):
    import subprocess
    import sys

    torch.save(model, tmp_path / "model.pt")
    torch.save(model(ids).logits, tmp_path / "expected.pt")
    code = (
        "import torch, adapters; "
        f"m = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False); "
        f"e = torch.load({str(tmp_path / 'expected.pt')!r}); "
        f"ids = torch.tensor({ids.tolist()}); "
        "assert adapters.is_initialized(m); "
        "assert torch.equal(m(ids).logits, e); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
