"""Saving and loading: our format round trip, AdapterHub ReFT checkpoints, safety."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from adapters import CheckpointError
from adapters.registry.loading import get_registry
from adapters_reft import DiReftConfig
from adapters_reft.interop import FORMAT_NAME, detect_adapterhub

from .reft_helpers import batch, decoder_interface, init_quietly, randomise

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "reft")


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(
    "config",
    [
        "loreft[prefix_positions=2, suffix_positions=2, r=2]",
        "noreft[tied_weights=True, suffix_positions=1]",
        "direft[prefix_positions=0, suffix_positions=3]",
    ],
)
def test_save_load_round_trip_gives_identical_outputs(llama, tmp_path, config):
    llama.add_adapter("a", config=config, set_active=True)
    randomise(llama, "a")
    inputs = batch()
    expected = _logits(llama, inputs)
    llama.save_adapter(str(tmp_path / "a"), "a")
    llama.delete_adapter("a")
    llama.load_adapter(str(tmp_path / "a"), load_as="b", set_active=True)
    assert torch.equal(_logits(llama, inputs), expected)


def test_saved_direft_reloads_as_direft(llama, tmp_path):
    llama.add_adapter("a", config="direft")
    llama.save_adapter(str(tmp_path / "a"), "a")
    with open(tmp_path / "a" / "adapter_config.json", encoding="utf-8") as f:
        assert json.load(f)["config"]["subtract_projection"] is False
    llama.load_adapter(str(tmp_path / "a"), load_as="b")
    loaded = llama.adapters_config["b"]
    assert loaded.subtract_projection is False and loaded.orthogonality is False


def test_saved_tensor_keys_do_not_depend_on_the_adapter_name(llama, tmp_path):
    llama.add_adapter("some_name", config="loreft[layers=[0]]")
    llama.save_adapter(str(tmp_path / "x"), "some_name")
    keys = sorted(load_file(str(tmp_path / "x" / "adapter_model.safetensors")))
    assert keys == [
        "layers.0.reft.prefix.learned_source.bias",
        "layers.0.reft.prefix.learned_source.weight",
        "layers.0.reft.prefix.projection.weight",
    ]


def test_delete_removes_hooks_modules_and_state_dict_keys(llama):
    keys = set(llama.state_dict())
    hooks = [len(s.layer.module._forward_hooks) for s in llama.adapter_sites]
    llama.add_adapter("a", config="loreft")
    llama.add_adapter("b", config="loreft")
    llama.delete_adapter("a")
    assert "a" not in llama.adapter_sites.layers[0].layer.module.adapters_reft.interventions
    llama.delete_adapter("b")
    assert set(llama.state_dict()) == keys
    assert [len(s.layer.module._forward_hooks) for s in llama.adapter_sites] == hooks
    assert not hasattr(llama.adapter_sites.layers[0].layer.module, "adapters_reft")


def test_deepcopy_keeps_the_adapter_working_independently(llama):
    llama.add_adapter("a", config="loreft[suffix_positions=2]", set_active=True)
    randomise(llama, "a")
    inputs = batch()
    clone = copy.deepcopy(llama)
    assert torch.equal(_logits(clone, inputs), _logits(llama, inputs))
    with torch.no_grad():
        for tensor in llama.adapter_state_dict("a").values():
            tensor.mul_(0.5)
    assert not torch.equal(_logits(clone, inputs), _logits(llama, inputs))
    clone.delete_adapter("a")
    assert "a" in llama.adapters_config


# --- AdapterHub -------------------------------------------------------------------------------


def _fixture_model():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(os.path.join(FIXTURES, "model")).eval()
    return init_quietly(model, decoder_interface())


@pytest.fixture(scope="module")
def expected():
    return load_file(os.path.join(FIXTURES, "expected.safetensors"))


def _real_logits(model, expected):
    inputs = {"input_ids": expected["input_ids"], "attention_mask": expected["attention_mask"]}
    return _logits(model, inputs)[expected["attention_mask"].bool()]


def test_fixture_base_model_matches_the_reference(expected):
    mask = expected["attention_mask"].bool()
    torch.testing.assert_close(
        _real_logits(_fixture_model(), expected), expected["base"][mask], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("case", ["loreft_untied", "noreft_tied", "loreft_prefix", "noreft_suffix"])
def test_adapterhub_checkpoint_gives_identical_logits(expected, case):
    model = _fixture_model()
    name = model.load_adapter(os.path.join(FIXTURES, case), set_active=True)
    mask = expected["attention_mask"].bool()
    assert name == case
    assert (expected[case][mask] - expected["base"][mask]).abs().max() > 0.1
    torch.testing.assert_close(
        _real_logits(model, expected), expected[case][mask], atol=1e-5, rtol=1e-5
    )


def test_adapterhub_one_sided_checkpoint_loads_one_unit(expected):
    model = _fixture_model()
    model.load_adapter(os.path.join(FIXTURES, "noreft_suffix"))
    units = {k.split(".reft.")[1].split(".")[0] for k in model.adapter_state_dict("noreft_suffix")}
    assert units == {"suffix"}


def test_adapterhub_direft_needs_the_users_config(expected):
    model = _fixture_model()
    path = os.path.join(FIXTURES, "direft_layer1")
    mask = expected["attention_mask"].bool()
    model.load_adapter(path, load_as="as_saved", set_active=True)
    assert model.adapters_config["as_saved"].subtract_projection is True  # AdapterHub lost it
    assert (_real_logits(model, expected) - expected["direft_layer1"][mask]).abs().max() > 1e-3
    config = DiReftConfig(prefix_positions=2, suffix_positions=1, layers=[1])
    model.load_adapter(path, config=config, load_as="told", set_active=True)
    torch.testing.assert_close(
        _real_logits(model, expected), expected["direft_layer1"][mask], atol=1e-5, rtol=1e-5
    )


def test_adapterhub_config_override_must_match_the_tensors():
    model = _fixture_model()
    with pytest.raises(CheckpointError, match="differs from the checkpoint in"):
        model.load_adapter(os.path.join(FIXTURES, "noreft_tied"), config="noreft[r=2]")
    assert not model.adapters_config


def test_only_the_reft_reader_claims_adapterhub_reft_directories():
    claims = [
        (fmt.name, fmt.methods)
        for fmt in get_registry().formats
        if fmt.detect(os.path.join(FIXTURES, "loreft_untied"))
    ]
    assert claims == [(FORMAT_NAME, ("reft",))]
    assert get_registry().format_for("adapterhub-reft", "reft").name == "adapterhub"


def test_detect_ignores_other_adapterhub_methods(tmp_path):
    shutil.copytree(os.path.join(FIXTURES, "noreft_tied"), tmp_path / "lora")
    config_file = tmp_path / "lora" / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["config"]["architecture"] = "lora"
    config_file.write_text(json.dumps(data))
    assert detect_adapterhub(os.path.join(FIXTURES, "noreft_tied"))
    assert not detect_adapterhub(str(tmp_path / "lora"))


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bin_checkpoint_is_never_unpickled(tmp_path, capsys):
    target = tmp_path / "evil"
    shutil.copytree(os.path.join(FIXTURES, "noreft_suffix"), target)
    with open(target / "pytorch_adapter.bin", "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    model = _fixture_model()
    with pytest.raises(CheckpointError, match="weights_only=True"):
        model.load_adapter(str(target))
    assert "unpickled!" not in capsys.readouterr().out


def test_an_adapterhub_directory_loads_under_the_name_it_records(tmp_path):
    shutil.copytree(os.path.join(FIXTURES, "loreft_prefix"), tmp_path / "renamed")
    assert _fixture_model().load_adapter(str(tmp_path / "renamed")) == "loreft_prefix"
