"""Nothing lost, nothing silently wrong (issue 16): saves keep the user's files, multi-part
loads are all or nothing, the manifest is the whole truth, every tensor is checked, and a
broken plugin or a hostile input gives this library's own error. Core behaviour with the
in-test plugins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters
from adapters import (
    CheckpointError,
    CompositionError,
    ConfigError,
    Fuse,
    InterfaceError,
    Stack,
    plugins,
)
from adapters.checkpoint import atomic
from adapters.checkpoint.format import MANIFEST_NAME
from adapters.checkpoint.manifest import write_manifest
from adapters.configs import AdapterConfig, resolve_config
from adapters.fusion_config import AdapterFusionConfig

from ..models import llama
from .conftest import init_toy, randomize
from .test_fusion import build, set_logits
from .toy_fusion import ToyFusablePlugin
from .toy_plugins import ToyLoRAPlugin

IDS = torch.arange(14).reshape(2, 7) % 100


@pytest.fixture
def fusable():
    """The in-test method that owns Fuse (``build()`` adds its adapters a, b, c) and toy_lora."""
    registry = plugins.get_registry()
    registry.register(ToyFusablePlugin(), "toy_fusable")
    registry.register(ToyLoRAPlugin(), "toy_lora")
    yield registry
    registry.unregister("toy_fusable")
    registry.unregister("toy_lora")


@pytest.fixture
def model(toy_plugins):
    model = init_toy()
    for seed, name in enumerate(("a", "b"), start=1):
        model.add_adapter(name, config="toy_lora[r=3]")
        randomize(model, name, seed=seed)
    model.set_active_adapters("a")
    return model


def _files(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (links as their target text) by relative path."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                found[rel] = b"->" + os.readlink(path).encode()
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    found[rel] = f.read()
    return found


def _user_files(folder) -> None:
    """A folder as users have them: a git checkout, dot-files, their own sub-folders."""
    os.makedirs(os.path.join(folder, ".git", "objects", "ab"))
    for rel, text in {
        ".git/HEAD": "ref: refs/heads/main\n",
        ".git/objects/ab/cdef": "blob",
        ".env": "TOKEN=x\n",
        ".gitattributes": "*.safetensors filter=lfs\n",
        "README.md": "# my adapter\n",
        "notes/today.txt": "trained on ...\n",
    }.items():
        path = os.path.join(folder, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    os.symlink("README.md", os.path.join(folder, "LINK.md"))


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_model(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _flip_a_byte(path) -> None:
    with open(path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))


# -- 2. never lose the user's files -------------------------------------------------------------


@pytest.mark.parametrize("save", ["save_adapter", "save_all_adapters", "save_pretrained"])
def test_a_save_keeps_dot_files_and_sub_folders_byte_identical(model, tmp_path, save):
    folder = str(tmp_path / "d")
    _user_files(folder)
    before = _files(folder)
    for _ in range(2):  # into the user's folder, then over our own save
        if save == "save_adapter":
            model.save_adapter(folder, "a")
        else:
            getattr(model, save)(folder)
        after = _files(folder)
        assert {k: after[k] for k in before} == before
    ours = set(after) - set(before)
    assert MANIFEST_NAME in ours and not any(k.startswith((".git", "notes")) for k in ours)


def test_a_save_replaces_only_the_files_of_the_save_before(model, tmp_path):
    folder = tmp_path / "all"
    model.save_all_adapters(str(folder))
    (folder / "mine.txt").write_text("keep")
    model.delete_adapter("b")
    model.save_all_adapters(str(folder))
    assert sorted(os.listdir(folder)) == sorted([MANIFEST_NAME, "a", "mine.txt"])


def test_a_save_keeps_the_folder_mode(model, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    os.chmod(folder, 0o750)
    model.save_adapter(str(folder), "a")
    assert os.stat(folder).st_mode & 0o777 == 0o750


# -- 3. all or nothing ----------------------------------------------------------------------------


def test_load_all_adapters_adds_none_when_one_is_corrupt(model, tmp_path):
    model.save_all_adapters(str(tmp_path / "all"))
    fresh = init_toy()
    before = _params(fresh)
    _flip_a_byte(tmp_path / "all" / "b" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="not the file saved"):
        fresh.load_all_adapters(str(tmp_path / "all"))
    assert fresh.adapters_config == {} and fresh.active_adapters is None
    _same_model(fresh, before)


def test_a_failed_overwrite_keeps_the_adapter_its_values_and_the_active_setup(model, tmp_path):
    model.save_adapter(str(tmp_path / "bad"), "b")
    weights = str(tmp_path / "bad" / "adapter_model.safetensors")
    tensors = load_file(weights)
    tensors[next(iter(tensors))] = torch.full_like(next(iter(tensors.values())), float("nan"))
    save_file(tensors, weights)
    write_manifest(str(tmp_path / "bad"))  # a consistent folder whose weights are NaN
    params = next(iter(model.get_adapter("a").values())).A
    before, out = _params(model), model(IDS).logits
    with pytest.raises(CheckpointError):
        model.load_adapter(str(tmp_path / "bad"), load_as="a", overwrite_ok=True)
    assert model.active_adapters == Stack("a")
    assert next(iter(model.get_adapter("a").values())).A is params  # an optimizer keeps them
    _same_model(model, before)
    torch.testing.assert_close(model(IDS).logits, out, rtol=0, atol=0)


def test_a_failed_overwrite_of_a_merged_adapter_leaves_it_merged(model, tmp_path):
    model.save_adapter(str(tmp_path / "bad"), "b")
    meta = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
    meta["config"]["r"] = 5  # tensors of r=3: a shape mismatch after the adapter is replaced
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(meta))
    write_manifest(str(tmp_path / "bad"))
    model.merge_adapter("a")
    out = model(IDS).logits
    with pytest.raises(CheckpointError, match="shape"):
        model.load_adapter(str(tmp_path / "bad"), load_as="a", overwrite_ok=True)
    assert model.is_merged("a") and model.active_adapters == Stack("a")
    torch.testing.assert_close(model(IDS).logits, out)


def test_load_model_with_a_corrupt_second_adapter_gives_no_model(model, tmp_path):
    model.save_pretrained(str(tmp_path / "m"))
    _flip_a_byte(tmp_path / "m" / "adapters" / "b" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="not the file saved"):
        adapters.load_model(str(tmp_path / "m"), type(llama()))


# -- the trainer's checkpoints (adapters.tools.trainer needs transformers' Trainer class) --------


@pytest.fixture
def trainer_io():
    pytest.importorskip("transformers")
    from adapters.tools import trainer

    return trainer


def _trained(model):
    model.train_adapter(["a", "b"])
    model.model.norm.weight.requires_grad_(True)  # an unfrozen base weight: trainable_weights
    return model


def test_a_failed_resume_leaves_every_adapter_weight_and_the_setup(model, tmp_path, trainer_io):
    trainer_io.save_training_checkpoint(_trained(model), str(tmp_path / "ck"))
    resumed = init_toy()
    for name in ("a", "b"):
        resumed.add_adapter(name, config="toy_lora[r=3]")
    resumed.set_active_adapters("b")
    before = _params(resumed)
    _flip_a_byte(tmp_path / "ck" / "adapters" / "b" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="not the file saved"):
        trainer_io.load_training_checkpoint(resumed, str(tmp_path / "ck"))
    _same_model(resumed, before)
    assert resumed.active_adapters == Stack("b")


def test_a_resume_that_fails_late_restores_what_it_had_copied(model, tmp_path, trainer_io):
    trainer_io.save_training_checkpoint(_trained(model), str(tmp_path / "ck"))
    resumed = init_toy()
    for name in ("a", "b"):
        resumed.add_adapter(name, config="toy_lora[r=3]")
    before = _params(resumed)
    calls = []
    original = resumed.set_active_adapters

    def fail(setup):  # the last step: everything has been copied by then
        calls.append(setup)
        raise CompositionError("injected")

    resumed.set_active_adapters = fail
    with pytest.raises(CompositionError, match="injected"):
        trainer_io.load_training_checkpoint(resumed, str(tmp_path / "ck"))
    resumed.set_active_adapters = original
    assert calls and resumed.active_adapters is None
    _same_model(resumed, before)


def test_a_resume_loads_nothing_its_index_does_not_list(model, tmp_path, trainer_io):
    trainer_io.save_training_checkpoint(_trained(model), str(tmp_path / "ck"))
    weights = tmp_path / "ck" / "trainable_weights.safetensors"
    tensors = load_file(str(weights))
    assert list(tensors) == ["model.norm.weight"]
    tensors["model.embed_tokens.weight"] = torch.zeros_like(model.model.embed_tokens.weight)
    save_file(tensors, str(weights))
    index_path = tmp_path / "ck" / "adapters_checkpoint.json"
    index = json.loads(index_path.read_text())
    index.pop("trainable_weights_sha256")  # as an older checkpoint: no sha256 to compare
    index_path.write_text(json.dumps(index))
    resumed = init_toy()
    for name in ("a", "b"):
        resumed.add_adapter(name, config="toy_lora[r=3]")
    _trained(resumed)
    embedding = resumed.model.embed_tokens.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"unexpected 1 \['model.embed_tokens.weight'\]"):
        trainer_io.load_training_checkpoint(resumed, str(tmp_path / "ck"))
    assert torch.equal(resumed.model.embed_tokens.weight, embedding)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("adapters", "ab", "expected a list of names"),
        ("adapters", [1], "expected a list of names"),
        ("fusions", [5], "expected a list of names"),
        ("adapters", ["../../x"], "not an allowed adapter name"),
        ("trainable_weights", {"a": 1}, "expected a list of names"),
        ("active", {"type": "Stack"}, "field 'active' is invalid"),
    ],
)
def test_a_malformed_trainer_index_is_refused(model, tmp_path, trainer_io, field, value, match):
    trainer_io.save_training_checkpoint(_trained(model), str(tmp_path / "ck"))
    index_path = tmp_path / "ck" / "adapters_checkpoint.json"
    index = json.loads(index_path.read_text())
    index[field] = value
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=match):
        trainer_io.load_training_checkpoint(init_toy(), str(tmp_path / "ck"))


@pytest.mark.parametrize("content", ["garbage", "nan"])
def test_bad_trainable_weights_are_refused(model, tmp_path, trainer_io, content):
    trainer_io.save_training_checkpoint(_trained(model), str(tmp_path / "ck"))
    weights = tmp_path / "ck" / "trainable_weights.safetensors"
    if content == "garbage":
        weights.write_bytes(b"\x00" * 20)
        match = "sha256 differs"
    else:
        save_file(
            {"model.norm.weight": torch.full_like(model.model.norm.weight, float("nan"))},
            str(weights),
        )
        match = "NaN"
        index_path = tmp_path / "ck" / "adapters_checkpoint.json"
        index = json.loads(index_path.read_text())
        index.pop("trainable_weights_sha256")
        index_path.write_text(json.dumps(index))
    resumed = init_toy()
    norm = resumed.model.norm.weight.detach().clone()
    with pytest.raises(CheckpointError, match=match):
        trainer_io.load_training_checkpoint(resumed, str(tmp_path / "ck"))
    assert torch.equal(resumed.model.norm.weight, norm) and resumed.adapters_config == {}


def test_a_trainer_save_removes_the_temporary_files_of_a_killed_one(model, tmp_path, trainer_io):
    (tmp_path / "ck").mkdir()
    stale = tmp_path / "ck" / (".adapters_checkpoint.json.tmp-" + "0" * 32)
    stale.write_text("{")
    trainer_io.save_training_checkpoint(_trained(model), str(tmp_path / "ck"))
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path / "ck")) == [
        "adapters",
        "adapters_checkpoint.json",
        "fusions",
        "trainable_weights.safetensors",
    ]


def test_a_resume_restores_adapters_fusions_weights_and_setup(fusable, tmp_path):
    pytest.importorskip("transformers")
    from adapters.tools.trainer import load_training_checkpoint, save_training_checkpoint

    trained = build()
    trained.add_adapter_fusion(Fuse("a", "b"))
    set_logits(trained, "a,b", [0.7, -0.2])
    trained.train_adapter_fusion(Fuse("a", "b"))
    trained.model.norm.weight.requires_grad_(True)
    with torch.no_grad():
        trained.model.norm.weight.mul_(1.5)
    save_training_checkpoint(trained, str(tmp_path / "ck"))
    expected = trained(IDS).logits
    resumed = build()
    resumed.add_adapter_fusion(Fuse("a", "b"))
    load_training_checkpoint(resumed, str(tmp_path / "ck"))
    assert resumed.active_adapters == Fuse("a", "b")
    torch.testing.assert_close(resumed(IDS).logits, expected)


# -- 4. readers during a save; leftovers ---------------------------------------------------------


def _fake_leftovers(parent, base) -> list[str]:
    names = [f".{base}.tmp-abcd1234", f".{base}.old-0123456789ab"]
    for name in names:
        os.makedirs(os.path.join(parent, name, "adapters"))
    return names


def test_the_next_save_removes_what_a_killed_save_left_behind(model, tmp_path):
    leftovers = _fake_leftovers(str(tmp_path), "saved")
    (tmp_path / ".saved.tmp-notours").mkdir()  # not a name this library makes
    model.save_adapter(str(tmp_path / "saved"), "a")
    assert sorted(os.listdir(tmp_path)) == [".saved.tmp-notours", "saved"]
    assert not any(os.path.exists(tmp_path / name) for name in leftovers)


def test_a_save_leaves_the_temporary_folders_of_a_running_save_alone(model, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    leftovers = _fake_leftovers(str(tmp_path), "saved")
    fd = os.open(str(tmp_path), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # what a save running in another process holds
        model.save_adapter(str(tmp_path / "saved"), "a")
    finally:
        os.close(fd)
    assert all(os.path.isdir(tmp_path / name) for name in leftovers)
    model.save_adapter(str(tmp_path / "saved"), "a")  # alone now: it cleans up
    assert os.listdir(tmp_path) == ["saved"]


@pytest.mark.skipif(atomic._RENAMEAT2 is None, reason="renameat2 is Linux-only")
def test_on_linux_the_folder_is_swapped_in_one_step(model, tmp_path, monkeypatch):
    model.save_adapter(str(tmp_path / "d"), "a")
    seen = []

    def write_and_look(tmp):
        seen.append(os.path.isdir(tmp_path / "d"))

    real_rename = os.rename

    def rename(a, b):
        assert not os.path.basename(str(b)).startswith(".d.old-"), "the two-rename fallback ran"
        return real_rename(a, b)

    monkeypatch.setattr(atomic.os, "rename", rename)
    owns_all = lambda folder: set(os.listdir(folder))  # noqa: E731
    atomic.replace_directory(str(tmp_path / "d"), write_and_look, owns_all)
    assert seen == [True] and os.listdir(tmp_path / "d") == []


def test_without_an_exchange_the_two_rename_fallback_replaces_the_folder(
    model, tmp_path, monkeypatch
):
    monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "README.md").write_text("mine")
    for name in ("a", "b"):
        model.save_adapter(str(tmp_path / "d"), name)
    assert model.load_adapter(str(tmp_path / "d"), load_as="c") == "c"
    assert sorted(os.listdir(tmp_path)) == ["d"]
    assert (tmp_path / "d" / "README.md").read_text() == "mine"
    torch.testing.assert_close(model.adapter_state_dict("c"), model.adapter_state_dict("b"))


def test_a_read_that_sees_a_save_swap_the_folder_reads_again(model, tmp_path):
    model.save_adapter(str(tmp_path / "d"), "a")
    calls = []

    def read():
        calls.append(1)
        if len(calls) == 1:
            model.save_adapter(str(tmp_path / "d"), "b")  # a save in between
            raise FileNotFoundError("the old folder went away")
        return "read"

    assert atomic.read_consistently([str(tmp_path / "d")], read) == "read"
    assert len(calls) == 2
    with pytest.raises(CheckpointError, match="cannot read"):
        atomic.read_consistently([str(tmp_path / "d")], lambda: open(tmp_path / "nothing"))


# -- 5. the manifest is the whole truth; links -------------------------------------------------------


def _rewrite(folder, name: str, data: bytes) -> None:
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_file_linked_to_outside_the_folder_is_refused(model, tmp_path, name):
    model.save_adapter(str(tmp_path / "a"), "a")
    outside = tmp_path / "outside"
    shutil.move(str(tmp_path / "a" / name), outside)
    os.symlink(outside, tmp_path / "a" / name)
    write_manifest(str(tmp_path / "a"))  # the manifest updated too
    with pytest.raises(CheckpointError, match="symbolic link leading outside"):
        model.load_adapter(str(tmp_path / "a"), load_as="c")
    assert "c" not in model.adapters_config


def test_a_link_inside_the_folder_is_fine(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    os.symlink("adapter_config.json", tmp_path / "a" / "config-copy.json")
    assert model.load_adapter(str(tmp_path / "a"), load_as="c") == "c"


def test_a_hugging_face_cache_snapshot_keeps_loading(model, tmp_path):
    """Hub snapshots link every file to ../../blobs/<sha> of the same repository cache."""
    model.save_adapter(str(tmp_path / "saved"), "a")
    repo = tmp_path / "hub" / "models--me--adapter"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(tmp_path / "saved"))):
        shutil.copy(tmp_path / "saved" / name, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / name)
    assert model.load_adapter(str(snapshot), load_as="hub") == "hub"
    torch.testing.assert_close(model.adapter_state_dict("hub"), model.adapter_state_dict("a"))
    os.symlink(tmp_path / "saved" / "adapter_config.json", snapshot / "elsewhere.json")
    with pytest.raises(CheckpointError, match="symbolic link leading outside"):
        model.load_adapter(str(snapshot), load_as="hub2")


def test_a_linked_sub_folder_leading_out_of_a_model_folder_is_refused(model, tmp_path):
    model.save_pretrained(str(tmp_path / "m"))
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "m" / "notes")
    with pytest.raises(CheckpointError, match="symbolic link leading outside"):
        adapters.load_model(str(tmp_path / "m"), type(llama()))


@pytest.mark.parametrize("cut", ["empty", "no weights"])
def test_a_cut_manifest_is_refused(model, tmp_path, cut):
    model.save_adapter(str(tmp_path / "a"), "a")
    model.save_adapter(str(tmp_path / "b"), "b")
    shutil.copy(tmp_path / "b" / "adapter_model.safetensors", tmp_path / "a")  # swapped weights
    manifest = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())
    if cut == "empty":
        manifest["files"] = {}
    else:
        del manifest["files"]["adapter_model.safetensors"]
    (tmp_path / "a" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not list"):
        model.load_adapter(str(tmp_path / "a"), load_as="c")


def test_relabelling_a_save_as_format_1_does_not_skip_its_manifest(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    model.save_adapter(str(tmp_path / "b"), "b")
    shutil.copy(tmp_path / "b" / "adapter_model.safetensors", tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    meta["format_version"] = 1
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not the file saved"):
        model.load_adapter(str(tmp_path / "a"), load_as="c")


def test_an_adapter_folder_added_after_save_all_adapters_is_refused(model, tmp_path):
    model.save_all_adapters(str(tmp_path / "all"))
    model.save_adapter(str(tmp_path / "all" / "intruder"), "b")
    fresh = init_toy()
    with pytest.raises(CheckpointError, match="does not list"):
        fresh.load_all_adapters(str(tmp_path / "all"))
    assert fresh.adapters_config == {}


def test_load_model_reads_fusions_from_the_manifest_only(fusable, tmp_path):
    model = build()
    model.add_adapter_fusion(Fuse("a", "b"))
    set_logits(model, "a,b", [0.5, -0.5])
    model.set_active_adapters(Fuse("a", "b"))
    model.save_pretrained(str(tmp_path / "m"))
    other = build()
    other.add_adapter_fusion(Fuse("b", "c"))
    other.save_adapter_fusion(str(tmp_path / "m" / "adapter_fusions" / "b,c"), "b,c")
    with pytest.raises(CheckpointError, match="not part of the save"):
        adapters.load_model(str(tmp_path / "m"), type(llama()))
    shutil.rmtree(tmp_path / "m" / "adapter_fusions" / "b,c")
    loaded = adapters.load_model(str(tmp_path / "m"), type(llama()))
    assert list(loaded.adapter_fusions) == ["a,b"] and loaded.active_adapters == Fuse("a", "b")
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits)


def test_load_model_refuses_base_weights_added_after_the_save(model, tmp_path):
    model.save_pretrained(str(tmp_path / "m"))
    shutil.copy(tmp_path / "m" / "model.safetensors", tmp_path / "m" / "model-extra.safetensors")
    with pytest.raises(CheckpointError, match="added after the save"):
        adapters.load_model(str(tmp_path / "m"), type(llama()))


def test_a_fusion_folder_has_a_manifest_that_is_checked(fusable, tmp_path):
    model = build()
    model.add_adapter_fusion(Fuse("a", "b"))
    model.save_adapter_fusion(str(tmp_path / "f"), "a,b")
    assert MANIFEST_NAME in os.listdir(tmp_path / "f")
    _flip_a_byte(tmp_path / "f" / "fusion_model.safetensors")
    with pytest.raises(CheckpointError, match="not the file saved"):
        model.load_adapter_fusion(str(tmp_path / "f"), load_as="again")
    os.remove(tmp_path / "f" / MANIFEST_NAME)
    with pytest.raises(CheckpointError, match="incomplete save"):
        model.load_adapter_fusion(str(tmp_path / "f"), load_as="again")


# -- 6. every tensor checked -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: torch.full_like(t, float("nan")), "NaN"),
        (lambda t: t.to(torch.int64), "expects floating-point"),
        (lambda t: t.to(torch.float8_e4m3fn), "dtype torch.float8_e4m3fn"),
        (lambda t: t.to(torch.complex64), "dtype torch.complex64"),
    ],
)
def test_fusion_tensors_are_checked_like_adapter_tensors(fusable, tmp_path, change, match):
    model = build()
    model.add_adapter_fusion(Fuse("a", "b"))
    model.save_adapter_fusion(str(tmp_path / "f"), "a,b")
    weights = str(tmp_path / "f" / "fusion_model.safetensors")
    save_file({k: change(v) for k, v in load_file(weights).items()}, weights)
    write_manifest(str(tmp_path / "f"))
    with pytest.raises(CheckpointError, match=match):
        model.load_adapter_fusion(str(tmp_path / "f"), load_as="again")
    assert list(model.adapter_fusions) == ["a,b"]


def test_an_adapter_tensor_in_float8_is_refused_with_our_error(model, tmp_path):
    model.save_adapter(str(tmp_path / "a"), "a")
    weights = str(tmp_path / "a" / "adapter_model.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in load_file(weights).items()}, weights)
    write_manifest(str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match="float8"):
        model.load_adapter(str(tmp_path / "a"), load_as="c")


def test_meta_device_models_are_refused_with_the_fix(tmp_path):
    pytest.importorskip("adapters_hidden_scale")  # places its units where the layer's weights are
    interface = {**_seed(), "adapter_methods": ["hidden_scale"]}
    real = llama()
    adapters.init(real, interface=interface)
    real.add_adapter("s", config="hidden_scale")
    real.save_adapter(str(tmp_path / "s"), "s")
    with torch.device("meta"):
        empty = llama()
    adapters.init(empty, interface=interface)
    with pytest.raises(CheckpointError, match="meta device"):
        empty.load_adapter(str(tmp_path / "s"))
    assert empty.adapters_config == {}
    empty.add_adapter("m", config="hidden_scale")
    with pytest.raises(CheckpointError, match="meta device"):
        empty.save_adapter(str(tmp_path / "m"), "m")
    assert not os.path.exists(tmp_path / "m")


@pytest.mark.parametrize("content", ["nan", "garbage", "ints"])
def test_embedding_files_are_checked_too(model, tmp_path, content):
    folder = tmp_path / "emb"
    folder.mkdir()
    path = str(folder / "embedding.safetensors")
    if content == "garbage":
        (folder / "embedding.safetensors").write_bytes(b"\x07" * 40)
    elif content == "nan":
        save_file({"weight": torch.full((5, 32), float("nan"))}, path)
    else:
        save_file({"weight": torch.zeros(5, 32, dtype=torch.int64)}, path)
    with pytest.raises(CheckpointError):
        model.load_embeddings(str(folder), "e")
    assert model.active_embeddings == "default"


# -- 7. plugins cannot take the process down ---------------------------------------------------------


def test_a_plugin_exiting_at_import_is_a_load_error(monkeypatch, capsys):
    from adapters import cli

    class Ep:
        name, dist = "exits", None

        def load(self):
            sys.exit(3)

    class Good:
        name, dist = "toy_lora", None

        def load(self):
            return ToyLoRAPlugin()

    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group=None: [Ep(), Good()])
    try:
        registry = plugins.reload_plugins()
        [error] = registry.load_errors
        assert error.name == "exits" and error.error == "SystemExit: 3"
        assert "toy_lora" in registry.methods
        assert cli.main(["plugins"]) == 1
        out, err = capsys.readouterr()
        assert "exits" in out + err and "SystemExit" in out + err
    finally:
        monkeypatch.undo()
        plugins.reload_plugins()


def _register_format(registry, name, **fields):
    from adapters import CheckpointFormat, hookimpl
    from adapters.hookspecs import CONTRACT_VERSION

    class Plugin:
        ADAPTERS_CONTRACT = CONTRACT_VERSION

        @hookimpl
        def adapters_register_checkpoint_formats(self, register):
            register(CheckpointFormat(name=name, **fields))

    registry.register(Plugin(), name)


def test_a_detect_fusion_that_raises_does_not_break_fusion_loading(fusable, tmp_path):
    def boom(path):
        raise SystemExit("detect_fusion gave up")

    _register_format(
        fusable,
        "exploding",
        detect=lambda p: False,
        read=lambda **kw: None,
        detect_fusion=boom,
        read_fusion=lambda **kw: None,
    )
    try:
        model = build()
        model.add_adapter_fusion(Fuse("a", "b"))
        model.save_adapter_fusion(str(tmp_path / "f"), "a,b", format="toy_fusion_files")
        with pytest.warns(UserWarning, match=r"exploding.*detect_fusion\(\) raised SystemExit"):
            assert model.load_adapter_fusion(str(tmp_path / "f"), load_as="again") == "again"
    finally:
        fusable.unregister("exploding")


@pytest.mark.parametrize("callback", ["read", "write"])
def test_a_reader_or_writer_that_raises_gives_our_error(model, tmp_path, toy_plugins, callback):
    def explode(**kwargs):
        raise SystemExit("plugin bug")

    def write(path, **kwargs):
        with open(os.path.join(path, "x.json"), "w") as f:
            f.write("{}")

    _register_format(
        toy_plugins,
        "fragile",
        detect=lambda p: os.path.isfile(os.path.join(p, "x.json")),
        read=explode if callback == "read" else lambda **kw: None,
        write=explode if callback == "write" else write,
        methods=("toy_lora",),
    )
    try:
        target = tmp_path / "t"
        if callback == "read":
            model.save_adapter(str(target), "a", format="fragile")
            with pytest.raises(CheckpointError, match=r"read\(\) of format 'fragile'.*SystemExit"):
                model.load_adapter(str(target), load_as="c")
        else:
            target.mkdir()
            (target / "mine").write_text("kept")
            with pytest.raises(CheckpointError, match=r"write\(\) of format 'fragile'.*plugin bug"):
                model.save_adapter(str(target), "a", format="fragile")
            assert os.listdir(target) == ["mine"] and os.listdir(tmp_path) == ["t"]
    finally:
        toy_plugins.unregister("fragile")


# -- raw errors that are now this library's own --------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "toy_lora[r=" + "-" * 100000 + "1]",
        "toy_lora[r=" + "-" * 9000 + "1]",
        "toy_lora[r=" + "(" * 5000 + "1" + ")" * 5000 + "]",
        "toy_lora[r={[1]: 2}]",
        "toy_lora[r=1)(x=2]",
    ],
)
def test_hostile_config_strings_raise_config_error(toy_plugins, text):
    with pytest.raises(ConfigError):
        resolve_config(text)


@pytest.mark.parametrize("configs", ["ab", [1], None, [{"method": "toy_lora"}, "x"]])
def test_a_malformed_union_dict_raises_config_error(toy_plugins, configs):
    with pytest.raises(ConfigError, match="list of config dicts"):
        AdapterConfig.from_dict({"method": "union", "configs": configs})


@pytest.mark.parametrize("data", [[1, 2], "dynamic", 5])
def test_a_fusion_config_that_is_no_dict_raises_config_error(data):
    with pytest.raises(ConfigError, match="fusion config dict is needed"):
        AdapterFusionConfig.from_dict(data)


def test_a_saved_fusion_config_that_is_no_dict_raises_checkpoint_error(fusable, tmp_path):
    model = build()
    model.add_adapter_fusion(Fuse("a", "b"))
    model.save_adapter_fusion(str(tmp_path / "f"), "a,b")
    meta = json.loads((tmp_path / "f" / "fusion_config.json").read_text())
    meta["config"] = [1, 2]
    (tmp_path / "f" / "fusion_config.json").write_text(json.dumps(meta))
    write_manifest(str(tmp_path / "f"))
    with pytest.raises(CheckpointError, match="field 'config' is \\[1, 2\\], not an object"):
        model.load_adapter_fusion(str(tmp_path / "f"), load_as="again")


def test_init_refuses_what_is_not_a_model(toy_plugins):
    from transformers import LlamaConfig

    with pytest.raises(InterfaceError, match="needs a torch.nn.Module"):
        adapters.init(LlamaConfig(), interface={"adapter_methods": ["toy_lora"]})


def test_convert_reports_a_config_class_and_an_adapter_folder_as_model(model, tmp_path, capsys):
    from adapters import cli

    model.save_adapter(str(tmp_path / "ad"), "a")
    base = llama()
    base.save_pretrained(str(tmp_path / "base"))
    model.adapter_interface.save(str(tmp_path))
    common = ["--interface", str(tmp_path / "adapter_interface.json")]
    src, dst = str(tmp_path / "ad"), str(tmp_path / "out")
    for argv, said in [
        (["--model", str(tmp_path / "base"), "--model-class", "AutoConfig"], "not a model"),
        (["--model", str(tmp_path / "ad")], "could not be loaded"),
    ]:
        assert cli.main(["convert", src, dst, *argv, *common]) == 2
        assert said in capsys.readouterr().err
    assert not os.path.exists(dst)


def test_a_subprocess_plugin_exit_does_not_end_the_plugins_command(tmp_path):
    """End to end: an installed entry point that calls sys.exit(3) at import."""
    dist = tmp_path / "exiting_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: exiting-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[adapters.methods]\nexiting = exiting_plugin\n")
    (tmp_path / "exiting_plugin.py").write_text("import sys\nsys.exit(3)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    result = subprocess.run(
        [sys.executable, "-m", "adapters", "plugins"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert (
        "exiting" in result.stdout + result.stderr and "SystemExit" in result.stdout + result.stderr
    )


# -- virtual tokens -------------------------------------------------------------------------------


@pytest.fixture
def prompted():
    from .toy_prompt import METHOD, ToyPromptConfig, ToyPromptPlugin, set_prompt

    registry = plugins.get_registry()
    registry.register(ToyPromptPlugin(), METHOD)
    try:
        model = llama(seed=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapters.init(model, interface={**_seed(), "adapter_methods": [METHOD]})
        model.add_adapter("p", ToyPromptConfig(), set_active=True)
        set_prompt(model, "p", seed=5)
        yield model
    finally:
        registry.unregister(METHOD)


def _seed():
    from ..models import SEED_INTERFACE

    return dict(SEED_INTERFACE)


def test_virtual_tokens_refuse_a_static_cache_at_the_call(prompted):
    with pytest.raises(CompositionError, match="fixed-size cache|static or compilable cache"):
        prompted.generate(
            IDS, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static"
        )


def test_virtual_tokens_take_a_one_row_attention_mask_as_the_bare_model_does(prompted):
    with torch.no_grad():
        one_row = prompted(IDS, attention_mask=torch.ones(1, 7, dtype=torch.long)).logits
        full = prompted(IDS, attention_mask=torch.ones(2, 7, dtype=torch.long)).logits
    torch.testing.assert_close(one_row, full, rtol=0, atol=0)
    with pytest.raises(CompositionError, match="3 rows for a batch of 2"):
        prompted(IDS, attention_mask=torch.ones(3, 7, dtype=torch.long))
