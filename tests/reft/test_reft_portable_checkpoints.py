"""ReFT checkpoints (issue 8): stable keys naming the side, 0.1 (format 1) checkpoints migrate,
and an adapter moves between head classes."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import adapters
from tests.models import SEED_INTERFACE, llama

V0_1 = os.path.join(os.path.dirname(__file__), "..", "fixtures", "core", "v0_1")
IDS = torch.arange(14).reshape(2, 7) % 100
INTERFACE = {**SEED_INTERFACE, "adapter_methods": ["reft"]}


def test_reft_checkpoint_of_version_0_1_migrates_its_unit_keys():
    model = llama()
    adapters.init(model, interface=INTERFACE)
    model.load_adapter(os.path.join(V0_1, "loreft"), set_active=True)
    keys = set(model.adapter_state_dict("loreft"))
    assert "model.layers.0.reft.suffix.projection.weight" in keys
    assert not [k for k in keys if ".units." in k]
    expected = load_file(os.path.join(V0_1, "expected.safetensors"))["loreft"]
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_reft_keys_name_the_side_and_are_relative_to_the_base_model(tmp_path):
    model = llama()
    adapters.init(model, interface=INTERFACE)
    model.add_adapter("a", config="loreft[layers=[1], prefix_positions=1, suffix_positions=2]")
    model.save_adapter(str(tmp_path / "a"), "a")
    keys = sorted(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert keys == [
        f"layers.1.reft.{side}.{param}"
        for side in ("prefix", "suffix")
        for param in ("learned_source.bias", "learned_source.weight", "projection.weight")
    ]


def test_reft_adapter_saved_on_causal_lm_loads_on_the_bare_model(tmp_path):
    import transformers as tf

    source = llama()
    adapters.init(source, interface=INTERFACE)
    source.add_adapter("a", config="loreft[r=2, prefix_positions=2]", set_active=True)
    hidden = source(IDS, output_hidden_states=True).hidden_states[-1]
    source.save_adapter(str(tmp_path / "a"), "a")
    bare = tf.LlamaModel(llama().config).eval()
    bare.load_state_dict(llama().model.state_dict())
    adapters.init(bare, interface=INTERFACE)
    bare.load_adapter(str(tmp_path / "a"), set_active=True)
    out = bare(IDS, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(out, hidden, atol=1e-5, rtol=1e-5)


def _v1_copy(tmp_path, edit):
    import shutil

    from safetensors.torch import save_file

    target = tmp_path / "loreft"
    shutil.copytree(os.path.join(V0_1, "loreft"), target)
    weights = str(target / "adapter_model.safetensors")
    save_file(edit(load_file(weights)), weights)
    return str(target)


def test_a_format_1_file_holding_old_and_new_unit_keys_is_refused(tmp_path):
    """units.0 (format 1) and prefix (format 2) name the same tensor: neither may win."""
    from adapters import CheckpointError

    def both(tensors):
        old = "model.layers.0.reft.units.0.projection.weight"
        return {**tensors, old.replace("units.0", "prefix"): tensors[old] * 2}

    model = llama()
    adapters.init(model, interface=INTERFACE)
    with pytest.raises(CheckpointError, match="same tensor"):
        model.load_adapter(_v1_copy(tmp_path, both))
    assert model.adapters_config == {}


def test_a_unit_index_of_thousands_of_digits_is_our_error(tmp_path):
    from adapters import CheckpointError

    def huge(tensors):
        key = "model.layers.0.reft.units.0.projection.weight"
        return {**tensors, key.replace("units.0", "units." + "9" * 5000): tensors[key].clone()}

    model = llama()
    adapters.init(model, interface=INTERFACE)
    with pytest.raises(CheckpointError, match="unexpected 1"):
        model.load_adapter(_v1_copy(tmp_path, huge))
