import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters
from adapters import CheckpointError, CheckpointFormat, Stack, hookimpl
from adapters.checkpoint.manifest import write_manifest

from .conftest import init_toy, llama, randomize
from .toy_plugins import ToyLoRAConfig


@pytest.fixture
def model(toy_plugins):
    model = init_toy()
    model.add_adapter("a", config="toy_lora[r=3]", set_active=True)
    randomize(model, "a")
    return model


def test_saved_directory_has_config_and_safetensors(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    assert sorted(os.listdir(tmp_path / "a")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapters_manifest.json",
    ]
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["method"] == "toy_lora" and meta["config"]["r"] == 3
    assert meta["interface"]["model_layers"] == "layers"
    assert meta["versions"]["adapters-core"] and meta["versions"]["torch"]


def test_weight_keys_do_not_depend_on_the_adapter_name(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    model.load_adapter(str(tmp_path / "a"), load_as="other")
    model.save_adapter(str(tmp_path / "other"), "other")
    first = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    second = load_file(str(tmp_path / "other" / "adapter_model.safetensors"))
    assert sorted(first) == sorted(second)
    assert all("other" not in k and ".a." not in k for k in second)
    assert "layers.0.self_attn.q_proj.A" in first  # relative to the base model


def test_round_trip_gives_identical_outputs_in_a_fresh_model(model, tmp_path, ids):
    expected = model(ids).logits
    model.save_adapter(str(tmp_path / "a"), "a")
    fresh = init_toy(llama())
    name = fresh.load_adapter(str(tmp_path / "a"), set_active=True)
    assert name == "a" and fresh.active_adapters == Stack("a")
    assert torch.equal(fresh(ids).logits, expected)


def test_saving_into_an_existing_directory_keeps_other_files(model, tmp_path):
    target = tmp_path / "a"
    target.mkdir()
    (target / "README.md").write_text("my notes")
    model.save_adapter(str(target), "a")
    assert (target / "README.md").read_text() == "my notes"
    assert (target / "adapter_model.safetensors").exists()


def test_a_failed_save_leaves_no_partial_directory(model, tmp_path, monkeypatch):
    import adapters.checkpoint.adapter as saving

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saving, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_adapter(str(tmp_path / "a"), "a")
    assert os.listdir(tmp_path) == []


def test_corrupt_weights_raise_and_leave_the_model_unchanged(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    write_manifest(str(tmp_path / "a"))  # a consistent folder, with bad weights
    keys = list(model.state_dict())
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        model.load_adapter(str(tmp_path / "a"), load_as="b")
    assert list(model.state_dict()) == keys and "b" not in model.adapters_config


def test_mismatched_shapes_raise_and_leave_the_model_unchanged(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    meta_path = tmp_path / "a" / "adapter_config.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["r"] = 5
    meta_path.write_text(json.dumps(meta))
    write_manifest(str(tmp_path / "a"))
    keys = list(model.state_dict())
    with pytest.raises(CheckpointError, match="has shape .*expects"):
        model.load_adapter(str(tmp_path / "a"), load_as="b")
    assert list(model.state_dict()) == keys and "b" not in model.adapters_config


def test_missing_tensors_raise(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(path))
    write_manifest(str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match="missing 1 tensors"):
        model.load_adapter(str(tmp_path / "a"), load_as="b")


def test_existing_name_is_not_overwritten_by_load(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    with pytest.raises(CheckpointError, match="load_as="):
        model.load_adapter(str(tmp_path / "a"))


def test_unknown_directory_format_is_explained(model, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "pytorch_adapter.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="not an adapter checkpoint in a known format"):
        model.load_adapter(str(tmp_path / "x"))
    with pytest.raises(CheckpointError, match="not a directory"):
        model.load_adapter(str(tmp_path / "nothing"))


def test_save_all_and_load_all_round_trip(model, tmp_path, ids):
    model.add_adapter("s", config="toy_shift[prefix=2]")
    randomize(model, "s")
    model.save_all_adapters(str(tmp_path))
    fresh = init_toy(llama())
    assert sorted(fresh.load_all_adapters(str(tmp_path))) == ["a", "s"]
    for name in ("a", "s"):
        for key, tensor in model.adapter_state_dict(name).items():
            assert torch.equal(fresh.adapter_state_dict(name)[key], tensor)


def test_save_pretrained_and_load_model_restore_interface_adapters_and_setup(model, tmp_path, ids):
    from transformers import LlamaForCausalLM

    model.add_adapter("s", config="toy_shift")
    randomize(model, "s")
    model.set_active_adapters(Stack("a", "s"))
    expected = model(ids).logits
    model.save_pretrained(str(tmp_path))
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert not any("toy_" in k for k in weights)  # base checkpoint holds only base keys
    loaded = adapters.load_model(str(tmp_path), LlamaForCausalLM)
    assert loaded.active_adapters == Stack("a", "s")
    assert loaded.adapter_interface == model.adapter_interface
    torch.testing.assert_close(loaded(ids).logits, expected)


def test_save_pretrained_refuses_merged_adapters(model, tmp_path):
    model.merge_adapter("a")
    with pytest.raises(CheckpointError, match="merged"):
        model.save_pretrained(str(tmp_path))


class ForeignFormat:
    """A foreign format with a differently named weights file and config."""

    ADAPTERS_CONTRACT = "1.0"

    def __init__(self, format_name="foreign", saved_name=None):
        self.format_name, self.saved_name = format_name, saved_name

    @hookimpl
    def adapters_register_checkpoint_formats(self, register):
        register(
            CheckpointFormat(
                self.format_name,
                detect=self.detect,
                read=self.read,
                write=self.write,
                saved_name=self.saved_name,
            )
        )

    def detect(self, path):
        return os.path.isfile(os.path.join(path, "foreign.json"))

    def read(self, path, model, sites, config):
        with open(os.path.join(path, "foreign.json")) as f:
            rank = json.load(f)["rank"]
        tensors = load_file(os.path.join(path, "weights.safetensors"))
        return config or ToyLoRAConfig(r=rank), {
            k.replace("::", "."): v for k, v in tensors.items()
        }

    def write(self, path, model, sites, name, config, state_dict):
        with open(os.path.join(path, "foreign.json"), "w") as f:
            json.dump({"rank": config.r}, f)
        save_file(
            {k.replace(".", "::"): v for k, v in state_dict.items()},
            os.path.join(path, "weights.safetensors"),
        )


def test_plugins_read_and_write_foreign_formats(model, tmp_path, ids):
    from adapters.registry.loading import get_registry

    registry = get_registry()
    registry.register(ForeignFormat(), "foreign")
    try:
        expected = model(ids).logits
        model.save_adapter(str(tmp_path / "f"), "a", format="foreign")
        assert sorted(os.listdir(tmp_path / "f")) == ["foreign.json", "weights.safetensors"]
        name = model.load_adapter(str(tmp_path / "f"), load_as="again", set_active=True)
        assert name == "again"
        assert torch.equal(model(ids).logits, expected)
    finally:
        registry.unregister("foreign")
    with pytest.raises(CheckpointError, match="cannot write format 'foreign'"):
        model.save_adapter(str(tmp_path / "g"), "a", format="foreign")


def _broken(path):
    raise RuntimeError("boom")


@pytest.mark.parametrize(
    ("saved_name", "expected"),
    [(None, "folder"), (lambda path: "recorded", "recorded"), (_broken, "folder")],
)
def test_a_foreign_directory_loads_under_the_name_its_format_says_it_records(
    model, tmp_path, saved_name, expected
):
    from adapters.registry.loading import get_registry

    registry = get_registry()
    registry.register(ForeignFormat(saved_name=saved_name), "foreign")
    try:
        model.save_adapter(str(tmp_path / "folder"), "a", format="foreign")
        assert model.load_adapter(str(tmp_path / "folder")) == expected
        assert model.load_adapter(str(tmp_path / "folder"), load_as="mine") == "mine"
    finally:
        registry.unregister("foreign")


def test_a_recorded_name_that_is_not_allowed_is_refused_with_the_fix(model, tmp_path):
    from adapters.registry.loading import get_registry

    registry = get_registry()
    registry.register(ForeignFormat(saved_name=lambda path: "a/b"), "foreign")
    try:
        model.save_adapter(str(tmp_path / "folder"), "a", format="foreign")
        with pytest.raises(CheckpointError, match="records the adapter name 'a/b'.*load_as"):
            model.load_adapter(str(tmp_path / "folder"))
        assert model.load_adapter(str(tmp_path / "folder"), load_as="ok") == "ok"
    finally:
        registry.unregister("foreign")


def test_config_override_when_loading(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    with pytest.raises(CheckpointError, match="does not match"):
        model.load_adapter(str(tmp_path / "a"), config="toy_shift", load_as="b")
    assert "b" not in model.adapters_config


def test_core_never_unpickles():
    import pathlib
    import re

    source = pathlib.Path(adapters.__file__).parent
    for path in source.glob("*.py"):
        text = path.read_text()
        if path.name == "testing.py":
            # The conformance kit pickles a model and unpickles those very bytes, in memory;
            # it never reads a file with pickle.
            loads = re.findall(r"pickle\.loads?\([^)]*", text)
            assert loads and all(c.startswith("pickle.loads(pickle.dumps(") for c in loads), loads
            text = text.replace("import pickle", "")
        assert "import pickle" not in text, path
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call, (path, call)


def test_load_tensor_file_reads_plain_tensors_and_refuses_objects(tmp_path):
    import pickle

    from adapters.checkpoint.readers import load_tensor_file

    tensors = {"a": torch.ones(2)}
    torch.save(tensors, tmp_path / "plain.bin")
    assert torch.equal(load_tensor_file(str(tmp_path / "plain.bin"))["a"], torch.ones(2))

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps({"a": Payload()}))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_tensor_file(str(tmp_path / "evil.bin"))
    assert not (tmp_path / "pwned").exists()
    torch.save({"a": [1, 2]}, tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match="dict of tensors"):
        load_tensor_file(str(tmp_path / "list.bin"))


def test_read_json_object_never_raises(tmp_path):
    from adapters.checkpoint.readers import read_json_object

    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json_object(str(tmp_path / "bad.json")) is None
    assert read_json_object(str(tmp_path / "list.json")) is None
    assert read_json_object(str(tmp_path / "missing.json")) is None
    assert read_json_object(str(tmp_path / "ok.json")) == {"a": 1}


def test_average_adapter_linear_is_the_weighted_sum_of_parameters(model):
    model.add_adapter("b", config="toy_lora[r=3]")
    randomize(model, "b", seed=7)
    model.average_adapter("avg", ["a", "b"], weights=[1, 3])
    for key, value in model.adapter_state_dict("avg").items():
        expected = (
            0.25 * model.adapter_state_dict("a")[key] + 0.75 * model.adapter_state_dict("b")[key]
        )
        torch.testing.assert_close(value, expected)


def test_average_adapter_unsupported_strategy_adds_nothing(model):
    with pytest.raises(adapters.ConfigError, match="not supported"):
        model.average_adapter("avg", ["a"], combine_strategy="magic")
    assert "avg" not in model.adapters_config


def test_plugin_strategies_choose_the_new_adapters_config(model):
    model.add_adapter("b", config="toy_lora[r=3]")
    randomize(model, "b", seed=7)
    model.average_adapter("t", ["a", "b"], weights=[1, 1], combine_strategy="truncate", rank=2)
    assert model.adapters_config["t"].r == 2
    key = "model.layers.0.self_attn.q_proj.A"
    expected = 0.5 * (model.adapter_state_dict("a")[key] + model.adapter_state_dict("b")[key])
    torch.testing.assert_close(model.adapter_state_dict("t")[key], expected[:2])


def test_a_saved_config_reloads_as_its_own_class(toy_plugins, tmp_path):
    from .toy_plugins import ToyWideLoRAConfig

    model = init_toy()
    model.add_adapter("w", config="toy_wide_lora")
    model.save_adapter(str(tmp_path / "w"), "w")
    fresh = init_toy(llama())
    fresh.load_adapter(str(tmp_path / "w"))
    assert type(fresh.adapters_config["w"]) is ToyWideLoRAConfig
    assert fresh.adapters_config["w"] == ToyWideLoRAConfig()


def test_a_directory_claimed_by_two_formats_is_an_error(model, tmp_path):
    from adapters.registry.loading import get_registry

    registry = get_registry()
    registry.register(ForeignFormat(), "foreign")
    registry.register(ForeignFormat("foreign2"), "foreign2")  # detects the same files
    try:
        model.save_adapter(str(tmp_path / "f"), "a", format="foreign")
        with pytest.raises(CheckpointError, match="claimed by several checkpoint formats"):
            model.load_adapter(str(tmp_path / "f"), load_as="x")
    finally:
        registry.unregister("foreign")
        registry.unregister("foreign2")


class SharedFormat:
    """Serves the format name ``"shared"`` (alias ``"shared-<method>"``) for one method."""

    ADAPTERS_CONTRACT = "1.0"

    def __init__(self, method):
        self.method = method

    @hookimpl
    def adapters_register_checkpoint_formats(self, register):
        register(
            CheckpointFormat(
                "shared",
                detect=self.detect,
                read=self.read,
                write=self.write,
                methods=(self.method,),
                aliases=(f"shared-{self.method}",),
                write_options=("flavour",),
            )
        )

    def detect(self, path):
        return os.path.isfile(os.path.join(path, f"{self.method}.json"))

    def read(self, path, model, sites, config):
        with open(os.path.join(path, f"{self.method}.json")) as f:
            saved = adapters.AdapterConfig.from_dict(json.load(f))
        return config or saved, load_file(os.path.join(path, "weights.safetensors"))

    def write(self, path, model, sites, name, config, state_dict, flavour="plain"):
        with open(os.path.join(path, f"{self.method}.json"), "w") as f:
            json.dump(config.to_dict(), f)
        with open(os.path.join(path, "flavour.txt"), "w") as f:
            f.write(flavour)
        save_file(state_dict, os.path.join(path, "weights.safetensors"))


def test_a_formats_write_options_are_passed_on_and_others_refused(model, tmp_path):
    registry = adapters.registry.loading.get_registry()
    registry.register(SharedFormat("toy_lora"), "shared_lora")
    try:
        model.save_adapter(str(tmp_path / "a"), "a", format="shared", flavour="salty")
        assert (tmp_path / "a" / "flavour.txt").read_text() == "salty"
        with pytest.raises(CheckpointError, match=r"does not take the option\(s\) \['colour'\]"):
            model.save_adapter(str(tmp_path / "b"), "a", format="shared", colour="red")
        assert not (tmp_path / "b").exists()
        with pytest.raises(TypeError, match="unexpected options"):
            model.save_adapter(str(tmp_path / "c"), "a", flavour="salty")  # our format
    finally:
        registry.unregister("shared_lora")


def test_one_format_name_served_by_two_plugins_dispatches_on_the_method(model, tmp_path, ids):
    registry = adapters.registry.loading.get_registry()
    model.add_adapter("s", config="toy_shift")
    randomize(model, "s", seed=2)
    registry.register(SharedFormat("toy_lora"), "shared_lora")
    try:
        registry.register(SharedFormat("toy_shift"), "shared_shift")
        assert "shared" in registry.format_names()
        expected = {}
        for name in ("a", "s"):
            model.set_active_adapters(name)
            expected[name] = model(ids).logits
            model.save_adapter(str(tmp_path / name), name, format="shared")
        assert os.path.isfile(tmp_path / "a" / "toy_lora.json")
        assert os.path.isfile(tmp_path / "s" / "toy_shift.json")
        assert not os.path.exists(tmp_path / "a" / "toy_shift.json")
        for name in ("a", "s"):  # read back through each format's detect
            model.load_adapter(str(tmp_path / name), load_as=f"{name}2", set_active=True)
            torch.testing.assert_close(model(ids).logits, expected[name], atol=0, rtol=0)
        model.save_adapter(str(tmp_path / "alias"), "a", format="shared-toy_lora")
        assert os.path.isfile(tmp_path / "alias" / "toy_lora.json")
        with pytest.raises(
            CheckpointError,
            match=r"'shared-toy_lora' for adapter 's': it serves the methods \['toy_lora'\] and "
            "this is a 'toy_shift' adapter",
        ):
            model.save_adapter(str(tmp_path / "bad"), "s", format="shared-toy_lora")
        assert not (tmp_path / "bad").exists()
    finally:
        registry.unregister("shared_lora")
        registry.unregister("shared_shift")
    assert "shared" not in registry.format_names()
