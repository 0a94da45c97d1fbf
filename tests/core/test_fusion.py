"""Methods that handle Fuse and Split through apply_setup handlers, and the fusion-layer API
(add / train / delete / save / load), with the in-test ``toy_fusable`` plugin."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from adapters import (
    AdapterNotFoundError,
    AdapterSetup,
    Average,
    BatchSplit,
    CheckpointError,
    CompositionError,
    ConfigError,
    Fuse,
    Split,
    Stack,
    hookimpl,
    plugins,
)
from adapters.fusion_config import (
    AdapterFusionConfig,
    DynamicAdapterFusionConfig,
    StaticAdapterFusionConfig,
    resolve_fusion_config,
)

from ..models import llama
from .conftest import init_toy, randomize
from .toy_fusion import ToyFusablePlugin, ToyFusionLayer
from .toy_plugins import ToyLoRAPlugin

METHODS = ["toy_fusable", "toy_lora"]


@pytest.fixture
def fusable_plugins():
    registry = plugins.get_registry()
    registry.register(ToyFusablePlugin(), "toy_fusable")
    registry.register(ToyLoRAPlugin(), "toy_lora")
    yield registry
    registry.unregister("toy_fusable")
    registry.unregister("toy_lora")


def build(layers: int = 2):
    model = init_toy(llama(num_hidden_layers=layers), methods=METHODS)
    for seed, name in enumerate(("a", "b", "c"), start=1):
        model.add_adapter(name, config="toy_fusable")
        randomize(model, name, seed=seed)
    model.add_adapter("l", config="toy_lora")
    randomize(model, "l", seed=9)
    return model


@pytest.fixture
def model(fusable_plugins):
    return build()


@pytest.fixture
def ids():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def run(model, setup, ids, **kwargs):
    with AdapterSetup(setup):
        return model(ids, **kwargs).logits


def set_logits(model, fusion, values):
    with torch.no_grad():
        for module in model.get_adapter_fusion(fusion).values():
            module.logits.copy_(torch.tensor(values))


def softmax(values):
    return torch.tensor(values).softmax(dim=0).tolist()


# -- Fuse / Split handled by the method, the rest by core -----------------------------------------


def test_fuse_handler_runs_inside_stack_and_batch_split(model, ids):
    model.add_adapter_fusion(Fuse("a", "b"))
    set_logits(model, "a,b", [1.5, -0.5])
    weights = softmax([1.5, -0.5])
    fused = run(model, Stack("c", Fuse("a", "b")), ids)
    torch.testing.assert_close(
        fused, run(model, Stack("c", Average("a", "b", weights=weights)), ids)
    )
    assert not torch.allclose(fused, run(model, Stack("c", "a"), ids))
    split = run(model, BatchSplit(Fuse("a", "b"), "c", batch_sizes=[1, 1]), ids)
    torch.testing.assert_close(split[:1], run(model, Fuse("a", "b"), ids)[:1])
    torch.testing.assert_close(split[1:], run(model, "c", ids)[1:])


def test_blocks_inside_a_fuse_are_handled_by_core(model, ids):
    model.add_adapter_fusion(Fuse("a", "b"))
    set_logits(model, "a,b", [0.3, 0.1])
    weights = softmax([0.3, 0.1])
    fused = run(model, Fuse(Stack("c", "a"), "b"), ids)  # named "a,b": the fusion of a and b
    expected = run(model, Average(Stack("c", "a"), "b", weights=weights), ids)
    torch.testing.assert_close(fused, expected)


def test_fuse_of_another_method_leaves_lora_sites_to_core(model, ids):
    model.add_adapter_fusion(Fuse("a", "b"))
    mixed = run(model, Stack("l", Fuse("a", "b")), ids)
    assert not torch.allclose(mixed, run(model, Fuse("a", "b"), ids))
    assert not torch.allclose(mixed, run(model, "l", ids))


def test_split_handler_gives_each_child_its_positions(fusable_plugins):
    # One layer: the logits at a position depend only on that position's layer output.
    model = build(layers=1)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    out = run(model, Split("a", Stack("b", "c"), splits=[3, 2]), ids)
    torch.testing.assert_close(out[:, :3], run(model, "a", ids)[:, :3])
    torch.testing.assert_close(out[:, 3:5], run(model, Stack("b", "c"), ids)[:, 3:5])
    torch.testing.assert_close(out[:, 5:], run(model, None, ids)[:, 5:])


def test_fuse_needs_its_fusion_layer(model):
    with pytest.raises(CompositionError, match=r"needs the fusion layer 'a,b'.*add_adapter_fusion"):
        model.set_active_adapters(Fuse("a", "b"))
    model.add_adapter_fusion(Fuse("a", "b"), name="ab")
    with pytest.raises(CompositionError, match=r"fuses \['a', 'c'\] but fusion layer 'ab'"):
        model.set_active_adapters(Fuse("a", "c", name="ab"))
    model.set_active_adapters(Fuse("a", "b", name="ab"))


def test_a_method_without_fuse_cannot_be_fused(model):
    model.add_adapter("l2", config="toy_lora")
    with pytest.raises(CompositionError, match=r"'l' \(toy_lora\).*no method declares Fuse"):
        model.add_adapter_fusion(["l", "l2"])
    with pytest.raises(CompositionError, match="no method declares Fuse"):
        model.add_adapter_fusion(["a", "l"])
    assert model.adapter_fusions == {}


# -- the fusion API ----------------------------------------------------------------------------


def test_add_adapter_fusion_registers_a_layer_per_site(model):
    name = model.add_adapter_fusion(Fuse("a", "b"), config="static")
    assert name == "a,b"
    info = model.adapter_fusions["a,b"]
    assert info.adapter_names == ("a", "b") and info.method == "toy_fusable"
    assert info.config == StaticAdapterFusionConfig()
    modules = model.get_adapter_fusion(Fuse("a", "b"))
    assert sorted(modules) == ["model.layers.0", "model.layers.1"]
    assert all(m.logits.shape == (2,) for m in modules.values())
    rows = {r["name"]: r for r in model.adapter_summary(as_dict=True)}
    assert rows["a,b"]["#param"] == 4 and rows["a,b"]["architecture"] == "fusion (toy_fusable)"
    assert model.active_adapters is None


def test_add_adapter_fusion_accepts_adapterhub_spellings(model):
    assert model.add_adapter_fusion(["a", "b"]) == "a,b"
    assert model.add_adapter_fusion("b,c", set_active=True) == "b,c"
    assert model.active_adapters == Fuse("b", "c")
    assert model.add_adapter_fusion(Fuse("a", "c", name="mine")) == "mine"
    assert model.add_adapter_fusion(["a", "b", "c"], name="abc") == "abc"
    assert set(model.adapter_fusions) == {"a,b", "b,c", "mine", "abc"}


def test_add_adapter_fusion_refuses_bad_requests_and_changes_nothing(model):
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(AdapterNotFoundError, match="'zz'"):
        model.add_adapter_fusion(["a", "zz"])
    with pytest.raises(ConfigError, match="unknown fusion config 'dynamc'"):
        model.add_adapter_fusion(["a", "b"], config="dynamc")
    with pytest.raises(CompositionError, match="distinct"):
        model.add_adapter_fusion(["a", "a"])
    model.add_adapter_fusion(["a", "b"])
    with pytest.raises(ConfigError, match="already exists; pass overwrite_ok=True"):
        model.add_adapter_fusion(["a", "b"])
    model.delete_adapter_fusion(["a", "b"])
    assert [n for n, _ in model.named_modules()] == before


def test_a_plugin_failure_in_add_adapter_fusion_rolls_back(model, fusable_plugins):
    model.add_adapter_fusion(["a", "b"])
    set_logits(model, "a,b", [0.7, 0.2])
    before = [n for n, _ in model.named_modules()]

    class Failing(ToyFusablePlugin):
        @hookimpl
        def adapters_add_fusion(self, model, sites, name, children, config, method):
            super().adapters_add_fusion(model, sites, name, children, config, method)
            raise ConfigError("toy_fusable refuses")

    fusable_plugins.unregister("toy_fusable")
    fusable_plugins.register(Failing(), "toy_fusable")
    with pytest.raises(ConfigError, match="toy_fusable refuses"):
        model.add_adapter_fusion(["a", "b"], overwrite_ok=True)
    assert [n for n, _ in model.named_modules()] == before
    assert model.get_adapter_fusion("a,b")["model.layers.0"].logits.tolist() == pytest.approx(
        [0.7, 0.2]
    )


def test_overwrite_ok_replaces_the_fusion(model):
    model.add_adapter_fusion(["a", "b"], config="static")
    set_logits(model, "a,b", [1.0, 2.0])
    model.add_adapter_fusion(["a", "b"], config="dynamic", overwrite_ok=True)
    assert model.adapter_fusions["a,b"].config == DynamicAdapterFusionConfig()
    assert model.get_adapter_fusion("a,b")["model.layers.0"].logits.tolist() == [0.0, 0.0]


def test_train_adapter_fusion_trains_only_the_fusion_layer(model, ids):
    model.add_adapter_fusion(Fuse("a", "b"))
    model.train_adapter_fusion(Fuse("a", "b"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.toy_fusable.fusions.a,b.logits" for i in range(2)}
    assert model.training and model.active_adapters == Fuse("a", "b")
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [m.logits.grad for m in model.get_adapter_fusion("a,b").values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    rows = {r["name"]: r for r in model.adapter_summary(as_dict=True)}
    assert rows["a,b"]["train"] and rows["a,b"]["active"]
    assert not rows["a"]["train"] and not rows["b"]["train"]


def test_train_adapter_fusion_accepts_names_and_can_unfreeze_the_adapters(model):
    model.add_adapter_fusion(["a", "b"], name="ab")
    model.train_adapter_fusion("ab", unfreeze_adapters=True)
    assert model.active_adapters == Fuse("a", "b", name="ab")
    rows = {r["name"]: r for r in model.adapter_summary(as_dict=True)}
    assert rows["ab"]["train"] and rows["a"]["train"] and rows["b"]["train"]
    assert not rows["c"]["train"] and not rows["Full model"]["train"]
    model.add_adapter_fusion(["b", "c"])
    model.train_adapter_fusion(["b", "c"])
    assert model.active_adapters == Fuse("b", "c")
    model.train_adapter_fusion([["b", "c"]])  # AdapterHub's nested-list form
    assert model.active_adapters == Stack(Fuse("b", "c"))
    with pytest.raises(CompositionError, match="needs a setup with a Fuse block"):
        model.train_adapter_fusion(Stack("a"))


def test_train_adapter_with_a_fuse_does_not_unfreeze_the_fused_adapters(model):
    model.add_adapter_fusion(Fuse("a", "b"))
    model.train_adapter(Stack("c", Fuse("a", "b")))
    rows = {r["name"]: r for r in model.adapter_summary(as_dict=True)}
    assert rows["c"]["train"] and rows["a,b"]["train"]
    assert not rows["a"]["train"] and not rows["b"]["train"]
    assert not rows["Full model"]["train"]


def test_fusion_regularization_loss_sums_the_methods_terms_of_training_fusions(model):
    model.add_adapter_fusion(Fuse("a", "b"))  # dynamic: regularization=True
    model.add_adapter_fusion(Fuse("b", "c"), config="static")  # regularization=False
    set_logits(model, "a,b", [1.0, 2.0])
    set_logits(model, "b,c", [3.0, 3.0])
    model.train_adapter("c")
    assert model.get_fusion_regularization_loss() is None  # no fusion trains
    model.train_adapter_fusion(Stack(Fuse("a", "b"), Fuse("b", "c")))
    loss = model.get_fusion_regularization_loss()
    torch.testing.assert_close(loss, torch.tensor(0.01 * 2 * (1.0 + 4.0)))
    loss.backward()
    assert model.get_adapter_fusion("a,b")["model.layers.0"].logits.grad.tolist() == pytest.approx(
        [0.02, 0.04]
    )


def test_freeze_model_leaves_fusion_layers_alone(model):
    model.add_adapter_fusion(Fuse("a", "b"))
    model.train_adapter_fusion(Fuse("a", "b"))
    model.freeze_model(False)
    model.freeze_model(True)
    assert all(
        p.requires_grad for m in model.get_adapter_fusion("a,b").values() for p in m.parameters()
    )


def test_delete_adapter_fusion_removes_layers_and_deactivates(model, ids):
    base_names = [n for n, _ in model.named_modules()]
    model.add_adapter_fusion(Fuse("a", "b"), set_active=True)
    model.delete_adapter_fusion(Fuse("a", "b"))
    assert model.active_adapters is None and model.adapter_fusions == {}
    assert [n for n, _ in model.named_modules()] == base_names
    with pytest.raises(AdapterNotFoundError, match="no adapter fusion named 'a,b'"):
        model.delete_adapter_fusion("a,b")


def test_a_fused_adapter_cannot_be_deleted_before_its_fusion(model):
    model.add_adapter_fusion(Fuse("a", "b"))
    with pytest.raises(CompositionError, match=r"fused by fusion layer\(s\) \['a,b'\]"):
        model.delete_adapter("a")
    model.delete_adapter_fusion("a,b")
    model.delete_adapter("a")


def test_save_and_load_adapter_fusion_round_trip(fusable_plugins, tmp_path, ids):
    model = build()
    model.add_adapter_fusion(Fuse("a", "b"), config="static[temperature=True]")
    set_logits(model, "a,b", [0.9, -0.4])
    expected = run(model, Stack("c", Fuse("a", "b")), ids)
    model.save_adapter_fusion(str(tmp_path / "fusion"), Fuse("a", "b"))
    for name in ("a", "b", "c"):
        model.save_adapter(str(tmp_path / name), name)
    meta = json.loads((tmp_path / "fusion" / "fusion_config.json").read_text())
    assert meta["adapter_names"] == ["a", "b"] and meta["method"] == "toy_fusable"
    assert meta["config"]["temperature"] is True and meta["config"]["value"] is False

    fresh = init_toy(llama(), methods=METHODS)
    for name in ("a", "b", "c"):
        fresh.load_adapter(str(tmp_path / name))
    assert fresh.load_adapter_fusion(str(tmp_path / "fusion")) == "a,b"
    assert fresh.adapter_fusions["a,b"].config == resolve_fusion_config("static[temperature=True]")
    torch.testing.assert_close(run(fresh, Stack("c", Fuse("a", "b")), ids), expected)

    assert (
        fresh.load_adapter_fusion(str(tmp_path / "fusion"), load_as="ab", set_active=True) == "ab"
    )
    assert fresh.active_adapters == Fuse("a", "b", name="ab")
    torch.testing.assert_close(run(fresh, Stack("c", Fuse("a", "b", name="ab")), ids), expected)


def test_load_adapter_fusion_needs_its_adapters_and_its_tensors(model, tmp_path):
    model.add_adapter_fusion(["b", "c"])
    model.save_adapter_fusion(str(tmp_path / "f"), "b,c")
    fresh = init_toy(llama(), methods=METHODS)
    fresh.add_adapter("b", config="toy_fusable")
    with pytest.raises(CheckpointError, match=r"\['c'\] are not added; load those adapters first"):
        fresh.load_adapter_fusion(str(tmp_path / "f"))
    fresh.add_adapter("c", config="toy_fusable")
    before = [n for n, _ in fresh.named_modules()]
    weights = tmp_path / "f" / "fusion_model.safetensors"
    from safetensors.torch import load_file, save_file

    from adapters.checkpoint.manifest import write_manifest

    tensors = load_file(str(weights))
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="not the file saved with the rest"):
        fresh.load_adapter_fusion(str(tmp_path / "f"))  # the manifest sees the change
    write_manifest(str(tmp_path / "f"))  # a consistent folder with a tensor missing
    with pytest.raises(CheckpointError, match="missing 1 tensors"):
        fresh.load_adapter_fusion(str(tmp_path / "f"))
    assert [n for n, _ in fresh.named_modules()] == before and fresh.adapter_fusions == {}
    with pytest.raises(CheckpointError, match="not an adapter fusion"):
        fresh.load_adapter_fusion(str(tmp_path))


def test_fusion_layers_in_a_plugins_foreign_format_round_trip(fusable_plugins, tmp_path, ids):
    model = build()
    model.add_adapter_fusion(Fuse("a", "b"), config="static")
    set_logits(model, "a,b", [0.4, -1.1])
    expected = run(model, Fuse("a", "b"), ids)
    model.save_adapter_fusion(str(tmp_path / "f"), "a,b", format="toy_fusion_files")
    assert sorted(os.listdir(tmp_path / "f")) == ["toy_fusion.json", "toy_fusion.safetensors"]
    model.delete_adapter_fusion("a,b")
    assert model.load_adapter_fusion(str(tmp_path / "f"), set_active=True) == "a,b"
    assert model.adapter_fusions["a,b"].config == StaticAdapterFusionConfig()
    torch.testing.assert_close(model(ids).logits, expected)
    with pytest.raises(CheckpointError, match="cannot write format 'nope' for fusion 'a,b'"):
        model.save_adapter_fusion(str(tmp_path / "g"), "a,b", format="nope")
    assert not (tmp_path / "g").exists()


def test_save_all_adapter_fusions(model, tmp_path):
    model.add_adapter_fusion(["a", "b"])
    model.add_adapter_fusion(["b", "c"], name="bc")
    model.save_all_adapter_fusions(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["a,b", "bc"]


def test_deepcopy_keeps_fusions_independent(model, ids):
    model.add_adapter_fusion(Fuse("a", "b"), set_active=True)
    set_logits(model, "a,b", [0.5, 0.0])
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(ids).logits, model(ids).logits)
    set_logits(clone, "a,b", [-3.0, 3.0])
    assert not torch.allclose(clone(ids).logits, model(ids).logits)
    assert model.get_adapter_fusion("a,b")["model.layers.0"].logits.tolist() == [0.5, 0.0]


# -- fusion configs ----------------------------------------------------------------------------


def test_fusion_configs_have_adapterhubs_presets_and_fields():
    static, dynamic = resolve_fusion_config("static"), resolve_fusion_config(None)
    assert static.to_dict() == {
        "key": True,
        "query": True,
        "value": False,
        "query_before_ln": False,
        "regularization": False,
        "residual_before": False,
        "temperature": False,
        "value_before_softmax": True,
        "value_initialized": False,
        "dropout_prob": None,
    }
    assert dynamic.value and dynamic.regularization and dynamic.value_initialized is True
    assert resolve_fusion_config({"architecture": "fusion", **static.to_dict()}) == static
    assert resolve_fusion_config("dynamic[dropout_prob=0.1]").dropout_prob == 0.1


def test_fusion_configs_refuse_unknown_or_ill_typed_options():
    with pytest.raises(ConfigError, match=r"no option\(s\) \['keys'\]"):
        resolve_fusion_config("dynamic[keys=False]")
    with pytest.raises(ConfigError, match="temperature=1 is invalid; expected True or False"):
        AdapterFusionConfig(temperature=1)
    with pytest.raises(ConfigError, match="dropout_prob=1.5"):
        resolve_fusion_config({"dropout_prob": 1.5})


def test_save_pretrained_and_load_model_keep_fusions(fusable_plugins, tmp_path, ids):
    import adapters

    model = build()
    model.add_adapter_fusion(Fuse("a", "b"), set_active=True)
    set_logits(model, "a,b", [1.2, -0.3])
    expected = model(ids).logits
    model.save_pretrained(str(tmp_path / "full"))
    weights = (tmp_path / "full" / "model.safetensors").read_bytes()
    assert b"fusions" not in weights  # fusion tensors stay out of the base weights
    loaded = adapters.load_model(str(tmp_path / "full"), type(llama()))
    assert loaded.active_adapters == Fuse("a", "b")
    torch.testing.assert_close(loaded(ids).logits, expected)

    model.delete_adapter_fusion("a,b")
    model.save_pretrained(str(tmp_path / "full"))
    assert adapters.load_model(str(tmp_path / "full"), type(llama())).adapter_fusions == {}


@pytest.mark.parametrize("name", ["../up", "/abs/dir", "train", "x" * 129])
def test_fusion_names_follow_the_adapter_name_rule(model, name):
    with pytest.raises(ConfigError, match="fusion name .* is not allowed"):
        model.add_adapter_fusion(Fuse("a", "b"), name=name)
    assert not model.adapter_fusions


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fusion_layers_take_add_adapters_dtype_rule(fusable_plugins, dtype, tmp_path, monkeypatch):
    """Float32 fusion weights on a half-precision model by default, the model's dtype with
    ``adapter_dtype="model"``, any floating dtype on request; an invalid value changes
    nothing; ``load_adapter_fusion`` takes the same option."""
    model = build().to(dtype)
    create = ToyFusionLayer.__init__

    def create_in_model_dtype(self, *args, **kwargs):  # as a plugin following the layer would
        create(self, *args, **kwargs)
        self.to(dtype)

    monkeypatch.setattr(ToyFusionLayer, "__init__", create_in_model_dtype)

    def dtypes(fusion):
        return {p.dtype for m in model.get_adapter_fusion(fusion).values() for p in m.parameters()}

    assert model.add_adapter_fusion(["a", "b"]) == "a,b"
    assert dtypes("a,b") == {torch.float32}
    model.add_adapter_fusion(["a", "b"], name="ab_model", adapter_dtype="model")
    assert dtypes("ab_model") == {dtype}
    model.add_adapter_fusion(["a", "b"], name="ab_64", adapter_dtype="float64")
    assert dtypes("ab_64") == {torch.float64}
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ConfigError, match="adapter_dtype='int8'"):
        model.add_adapter_fusion(["a", "c"], adapter_dtype="int8")
    assert "a,c" not in model.adapter_fusions
    assert [n for n, _ in model.named_modules()] == names
    model.save_adapter_fusion(str(tmp_path / "f"), "a,b")
    model.load_adapter_fusion(str(tmp_path / "f"), load_as="loaded", adapter_dtype="model")
    assert dtypes("loaded") == {dtype}
    model.load_adapter_fusion(str(tmp_path / "f"), load_as="loaded32")
    assert dtypes("loaded32") == {torch.float32}
