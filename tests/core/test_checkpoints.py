"""Checkpoints users can trust (issue 8): portable keys, versions, manifests, atomic saves and
names that never leave the folder given. Core behaviour, with the toy plugins and the
documented example plugin."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters
from adapters import CheckpointError, ConfigError
from adapters.checkpoint.format import MANIFEST_NAME
from adapters.checkpoint.manifest import write_manifest

from ..models import SEED_INTERFACE, llama
from .conftest import init_toy, randomize

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "core", "v0_1")
IDS = torch.arange(14).reshape(2, 7) % 100


@pytest.fixture
def model(toy_plugins):
    model = init_toy()
    model.add_adapter("a", config="toy_lora[r=3]", set_active=True)
    randomize(model, "a")
    return model


# -- portable keys ---------------------------------------------------------------------------


def _bare_llama():
    from transformers import LlamaModel

    torch.manual_seed(0)
    return LlamaModel(llama().config).eval()


def _seq_cls():
    from transformers import LlamaForSequenceClassification

    config = llama().config
    config.num_labels = 3
    config.pad_token_id = 0
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).eval()


def _hidden(model, ids):
    out = model(ids, output_hidden_states=True)
    return out.hidden_states[-1] if hasattr(out, "hidden_states") else out.last_hidden_state


def _share_base(target):
    """Give ``target`` the base weights of the seeded ``llama()`` (another head class)."""
    getattr(target, "model", target).load_state_dict(llama().model.state_dict())


@pytest.mark.parametrize("make_target", [_bare_llama, _seq_cls, llama])
def test_adapter_saved_on_causal_lm_loads_on_other_heads_and_back(
    toy_plugins, tmp_path, make_target
):
    source = init_toy(llama())
    source.add_adapter("a", config="toy_lora[r=3]", set_active=True)
    randomize(source, "a")
    expected = _hidden(source, IDS)
    source.save_adapter(str(tmp_path / "a"), "a")

    target = make_target()
    _share_base(target)
    init_toy(target)
    target.load_adapter(str(tmp_path / "a"), set_active=True)
    torch.testing.assert_close(_hidden(target, IDS), expected, atol=1e-5, rtol=1e-5)

    # and back: saved on the other head class, loaded on LlamaForCausalLM
    target.save_adapter(str(tmp_path / "back"), "a")
    again = init_toy(llama())
    again.load_adapter(str(tmp_path / "back"), set_active=True)
    torch.testing.assert_close(_hidden(again, IDS), expected, atol=1e-5, rtol=1e-5)


def test_saved_keys_are_relative_to_the_base_model(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert keys and all(k.startswith("layers.") for k in keys)


# -- format versions -----------------------------------------------------------------------


def _rewrite_meta(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    meta.update(changes)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    write_manifest(folder)


def test_a_newer_format_version_is_refused_naming_version_and_upgrade(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    _rewrite_meta(str(tmp_path / "a"), format_version=99)
    with pytest.raises(CheckpointError, match=r"version 99.*pip install -U adapters-core"):
        model.load_adapter(str(tmp_path / "a"), load_as="b")
    assert "b" not in model.adapters_config


@pytest.mark.parametrize("bad", [0, "x", None, True])
def test_a_malformed_format_version_is_refused(model, tmp_path, bad):
    model.save_adapter(str(tmp_path / "a"), "a")
    _rewrite_meta(str(tmp_path / "a"), format_version=bad)
    with pytest.raises(CheckpointError, match="format_version"):
        model.load_adapter(str(tmp_path / "a"), load_as="b")


def test_format_1_checkpoint_of_version_0_1_still_loads():
    pytest.importorskip("adapters_hidden_scale")
    model = llama()
    adapters.init(model, interface={**SEED_INTERFACE, "adapter_methods": ["hidden_scale"]})
    name = model.load_adapter(os.path.join(FIXTURES, "hidden_scale"), set_active=True)
    expected = load_file(os.path.join(FIXTURES, "expected.safetensors"))["hidden_scale"]
    assert name == "hidden_scale"
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)


# -- manifests -----------------------------------------------------------------------------


def test_a_folder_mixing_two_saves_is_refused(toy_plugins, tmp_path):
    model = init_toy()
    model.add_adapter("a", config="toy_lora[r=3]")
    model.add_adapter("b", config="toy_lora[r=3]")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    model.save_adapter(str(tmp_path / "a"), "a")
    model.save_adapter(str(tmp_path / "b"), "b")
    # b's weights next to a's config: same shapes, so only the manifest can tell
    os.replace(
        tmp_path / "b" / "adapter_model.safetensors", tmp_path / "a" / "adapter_model.safetensors"
    )
    with pytest.raises(CheckpointError, match="mixes files of different saves"):
        model.load_adapter(str(tmp_path / "a"), load_as="c")


def test_a_format_2_folder_without_manifest_is_refused(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    os.remove(tmp_path / "a" / MANIFEST_NAME)
    with pytest.raises(CheckpointError, match="incomplete save"):
        model.load_adapter(str(tmp_path / "a"), load_as="b")


# -- atomic saves --------------------------------------------------------------------------


def test_saving_over_an_existing_save_replaces_it_whole_and_keeps_user_files(model, tmp_path):
    target = tmp_path / "a"
    model.save_adapter(str(target), "a")
    (target / "README.md").write_text("my notes")
    (target / "pytorch_adapter.bin").write_bytes(b"old")  # not ours: kept
    model.add_adapter("b", config="toy_lora[r=5]")
    model.save_adapter(str(target), "b")
    assert (target / "README.md").read_text() == "my notes"
    meta = json.loads((target / "adapter_config.json").read_text())
    assert meta["name"] == "b" and meta["config"]["r"] == 5
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp folders left


def test_a_failed_save_leaves_the_previous_save_intact(model, tmp_path, monkeypatch):
    import adapters.checkpoint.adapter as saving

    model.save_adapter(str(tmp_path / "a"), "a")
    before = {p: (tmp_path / "a" / p).read_bytes() for p in os.listdir(tmp_path / "a")}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saving, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_adapter(str(tmp_path / "a"), "a")
    after = {p: (tmp_path / "a" / p).read_bytes() for p in os.listdir(tmp_path / "a")}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_concurrent_saves_into_one_folder_end_with_one_complete_save(toy_plugins, tmp_path):
    model = init_toy()
    model.add_adapter("small", config="toy_lora[r=2]")
    model.add_adapter("large", config="toy_lora[r=6]")
    target = str(tmp_path / "shared")
    errors = []

    def save(name):
        try:
            for _ in range(15):
                model.save_adapter(target, name)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=save, args=(n,)) for n in ("small", "large") * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    name = model.load_adapter(target, load_as="check")  # verifies manifest, config and shapes
    r = model.adapters_config[name].r
    assert r in (2, 6)
    assert sorted(p for p in os.listdir(tmp_path)) == ["shared"]


def test_save_all_adapters_is_one_atomic_set(model, tmp_path):
    model.add_adapter("b", config="toy_lora[r=2]")
    model.save_all_adapters(str(tmp_path / "all"))
    assert sorted(os.listdir(tmp_path / "all")) == ["a", "adapters_manifest.json", "b"]
    model.delete_adapter("b")
    model.save_all_adapters(str(tmp_path / "all"))  # b is gone from the new set
    assert sorted(os.listdir(tmp_path / "all")) == ["a", "adapters_manifest.json"]
    fresh = init_toy()
    assert fresh.load_all_adapters(str(tmp_path / "all")) == ["a"]


def test_failed_save_pretrained_leaves_the_previous_folder_intact(model, tmp_path, monkeypatch):
    model.save_pretrained(str(tmp_path / "m"))
    before = sorted(os.listdir(tmp_path / "m"))
    monkeypatch.setattr(
        type(model.adapter_interface), "save", lambda self, d: (_ for _ in ()).throw(OSError("x"))
    )
    with pytest.raises(OSError):
        model.save_pretrained(str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path / "m")) == before
    monkeypatch.undo()
    loaded = adapters.load_model(str(tmp_path / "m"), type(llama()))
    assert list(loaded.adapters_config) == ["a"]


@pytest.mark.parametrize("remove", ["adapter_setup.json", MANIFEST_NAME])
def test_load_model_refuses_a_half_written_folder(model, tmp_path, remove):
    model.save_pretrained(str(tmp_path / "m"))
    os.remove(tmp_path / "m" / remove)
    with pytest.raises(CheckpointError, match="incomplete save"):
        adapters.load_model(str(tmp_path / "m"), type(llama()))


def test_load_model_refuses_a_folder_whose_adapter_was_swapped(toy_plugins, tmp_path):
    model = init_toy()
    model.add_adapter("a", config="toy_lora[r=3]")
    randomize(model, "a")
    model.save_pretrained(str(tmp_path / "m"))
    weights = tmp_path / "m" / "adapters" / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * 2 for k, v in tensors.items()}, str(weights))
    write_manifest(str(tmp_path / "m" / "adapters" / "a"))  # consistent inside, not with the top
    with pytest.raises(CheckpointError, match="mixes files"):
        adapters.load_model(str(tmp_path / "m"), type(llama()))


# -- names ---------------------------------------------------------------------------------

BAD_NAMES = ["", "/abs/dir", "../up", "a/b", "a\\b", "C:evil", "x" * 129, "tab\there", "a.b"]


@pytest.mark.parametrize("name", [*BAD_NAMES, "train", "forward", "to", "keys"])
def test_bad_adapter_names_are_refused_with_the_rule(toy_plugins, name):
    model = init_toy()
    keys = list(model.state_dict())
    with pytest.raises(ConfigError, match="is not allowed"):
        model.add_adapter(name, config="toy_lora")
    assert list(model.state_dict()) == keys


def test_good_names_are_accepted(toy_plugins):
    model = init_toy()
    for name in ("sst-2", "my_adapter", "Ünïcode", "x" * 128, "a b", "a@b+c"):
        model.add_adapter(name, config="toy_lora")
    assert len(model.adapters_config) == 6


def test_a_checkpoint_name_that_is_a_path_is_refused(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    _rewrite_meta(str(tmp_path / "a"), name=str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match="not an allowed adapter name"):
        model.load_adapter(str(tmp_path / "a"))
    assert model.load_adapter(str(tmp_path / "a"), load_as="fine") == "fine"


def test_load_as_is_checked(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    with pytest.raises(ConfigError, match="is not allowed"):
        model.load_adapter(str(tmp_path / "a"), load_as="../b")


def test_load_model_never_follows_paths_in_adapter_setup_json(model, tmp_path):
    outside = tmp_path / "outside"
    model.save_adapter(str(outside), "a")
    model.save_pretrained(str(tmp_path / "m"))
    setup_path = tmp_path / "m" / "adapter_setup.json"
    setup = json.loads(setup_path.read_text())
    for evil in (str(outside), "../../outside"):
        setup["adapters"] = [evil]
        setup_path.write_text(json.dumps(setup))
        write_manifest(str(tmp_path / "m"))
        with pytest.raises(CheckpointError, match="not an allowed adapter name"):
            adapters.load_model(str(tmp_path / "m"), type(llama()))


def test_symlinked_adapter_folder_leaving_the_save_is_refused(model, tmp_path):
    model.save_pretrained(str(tmp_path / "m"))
    outside = tmp_path / "outside"
    os.rename(tmp_path / "m" / "adapters" / "a", outside)
    os.symlink(outside, tmp_path / "m" / "adapters" / "a")
    with pytest.raises(CheckpointError):
        adapters.load_model(str(tmp_path / "m"), type(llama()))


# -- malformed files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"format": "adapters", "format": "adapters"}', "appears twice"),
        ("{not json", "not valid JSON"),
        ('{"format": "adapters", "format_version": 2, "config": NaN}', "not finite"),
    ],
)
def test_malformed_config_json_names_the_file(model, tmp_path, text, match):
    model.save_adapter(str(tmp_path / "a"), "a")
    (tmp_path / "a" / "adapter_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match) as info:
        model.load_adapter(str(tmp_path / "a"), load_as="b")
    assert "adapter_config.json" in str(info.value)


def test_missing_config_field_names_file_and_field(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    path = tmp_path / "a" / "adapter_config.json"
    meta = json.loads(path.read_text())
    del meta["config"]
    path.write_text(json.dumps(meta))
    write_manifest(str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match="adapter_config.json.*'config'"):
        model.load_adapter(str(tmp_path / "a"), load_as="b")


def test_non_finite_weights_are_refused_naming_the_key(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path))
    write_manifest(str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match=f"{key}.*NaN"):
        model.load_adapter(str(tmp_path / "a"), load_as="b")


def test_a_plugin_whose_detect_raises_is_reported_and_others_keep_loading(
    model, tmp_path, toy_plugins
):
    from adapters import CheckpointFormat, hookimpl
    from adapters.hookspecs import CONTRACT_VERSION

    class Broken:
        ADAPTERS_CONTRACT = CONTRACT_VERSION

        @hookimpl
        def adapters_register_checkpoint_formats(self, register):
            def detect(path):
                raise KeyError("boom")

            register(CheckpointFormat(name="broken", detect=detect, read=lambda **kw: None))

    class Works:
        ADAPTERS_CONTRACT = CONTRACT_VERSION

        @hookimpl
        def adapters_register_checkpoint_formats(self, register):
            def read(path, model, sites, config):
                return model.adapters_config["a"], dict(model._entry("a").state_dict())

            register(
                CheckpointFormat(
                    name="works", detect=lambda p: os.path.isfile(os.path.join(p, "x")), read=read
                )
            )

    toy_plugins.register(Broken(), "broken_plugin")
    toy_plugins.register(Works(), "works_plugin")
    try:
        (tmp_path / "f").mkdir()
        (tmp_path / "f" / "x").write_text("")
        with pytest.warns(UserWarning, match="broken_plugin.*detect\\(\\) raised KeyError"):
            assert model.load_adapter(str(tmp_path / "f"), load_as="c") == "c"
    finally:
        toy_plugins.unregister("broken_plugin")
        toy_plugins.unregister("works_plugin")
