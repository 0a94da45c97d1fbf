"""Hostile folders: saved folders changed as an attacker or an unlucky copy would. Every load
raises this library's own error (an `AdaptersError`, never a raw one, never a hang) and leaves
the model exactly as it was."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch

import adapters
from adapters import AdaptersError, CheckpointError
from adapters.checkpoint.format import MANIFEST_NAME
from adapters.checkpoint.manifest import write_manifest

from ..models import llama
from .saving import build, mark

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _write(folder, name, data, update_manifest=True):
    path = os.path.join(folder, name)
    if os.path.lexists(path):
        os.remove(path)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    if update_manifest:
        write_manifest(folder)


def _meta(folder, **changes):
    with open(os.path.join(folder, CONFIG)) as f:
        meta = json.load(f)
    meta.update(changes)
    _write(folder, CONFIG, json.dumps(meta))


def _config(folder, **changes):
    with open(os.path.join(folder, CONFIG)) as f:
        meta = json.load(f)
    meta["config"].update(changes)
    _write(folder, CONFIG, json.dumps(meta))


def _manifest(folder, edit):
    path = os.path.join(folder, MANIFEST_NAME)
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


def _entry(rel, **info):
    def edit(manifest):
        manifest["files"][rel] = {"size": 1, "sha256": "0" * 64, **info}

    return edit


def _huge_header(folder):
    """A safetensors header announcing a 2**40-element tensor in a tiny file."""
    header = json.dumps(
        {"x": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}
    ).encode()
    _write(folder, WEIGHTS, struct.pack("<Q", len(header)) + header + b"\0" * 16)


def _fifo(folder):
    os.remove(os.path.join(folder, WEIGHTS))
    os.mkfifo(os.path.join(folder, WEIGHTS))


def _link(folder, name, target):
    os.remove(os.path.join(folder, name))
    os.symlink(target, os.path.join(folder, name))


def _loop(folder):
    _link(folder, CONFIG, CONFIG)


def _extra_tensor(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(folder, WEIGHTS))
    tensors["top:model.embed_tokens.weight"] = torch.zeros(100, 32)
    save_file(tensors, os.path.join(folder, WEIGHTS))
    write_manifest(folder)


ADAPTER_FOLDERS = {
    "truncated weights": lambda d: _write(d, WEIGHTS, b"\0" * 10, update_manifest=False),
    "truncated weights, manifest updated": lambda d: _write(d, WEIGHTS, b"\0" * 10),
    "weights are a folder": lambda d: (
        os.remove(os.path.join(d, WEIGHTS)),
        os.mkdir(os.path.join(d, WEIGHTS)),
    ),
    "weights are a FIFO": _fifo,
    "weights link to /dev/zero": lambda d: _link(d, WEIGHTS, "/dev/zero"),
    "config links to itself": _loop,
    "a huge tensor announced": _huge_header,
    "a tensor of the base model": _extra_tensor,
    "config nested 100000 deep": lambda d: _write(d, CONFIG, "[" * 100000 + "]" * 100000),
    "config not UTF-8": lambda d: _write(d, CONFIG, b'{"format": "adapters\xff"}'),
    "config is a list": lambda d: _write(d, CONFIG, "[1, 2]"),
    "config format_version 99": lambda d: _meta(d, format_version=99),
    "config format_version -1": lambda d: _meta(d, format_version=-1),
    "config format_version 2.x": lambda d: _meta(d, format_version="x.2"),
    "config config is a string": lambda d: _meta(d, config="toy_lora"),
    "config r is a string": lambda d: _config(d, r="x"),
    "config r is 10**100": lambda d: _config(d, r=10**100),
    "config method unknown": lambda d: _config(d, method="nope"),
    "config union of garbage": lambda d: _config(d, method="union", configs="ab"),
    "manifest not JSON": lambda d: open(os.path.join(d, MANIFEST_NAME), "w").write("{"),
    "manifest files a list": lambda d: _manifest(d, lambda m: m.update(files=[])),
    "manifest files empty": lambda d: _manifest(d, lambda m: m.update(files={})),
    "manifest size negative": lambda d: _manifest(d, _entry(WEIGHTS, size=-1)),
    "manifest size a bool": lambda d: _manifest(d, _entry(WEIGHTS, size=True)),
    "manifest size 10**30": lambda d: _manifest(d, _entry(WEIGHTS, size=10**30)),
    "manifest sha256 not hex": lambda d: _manifest(d, _entry(WEIGHTS, sha256="z" * 64)),
    "manifest lists ../x": lambda d: _manifest(d, _entry("../x")),
    "manifest lists /etc/passwd": lambda d: _manifest(d, _entry("/etc/passwd")),
    "manifest lists a\\b": lambda d: _manifest(d, _entry("a\\b")),
    "manifest format_version 99": lambda d: _manifest(d, lambda m: m.update(format_version=99)),
    "manifest missing": lambda d: os.remove(os.path.join(d, MANIFEST_NAME)),
    "empty folder": lambda d: [os.remove(os.path.join(d, n)) for n in os.listdir(d)],
}


@pytest.mark.parametrize("change", sorted(ADAPTER_FOLDERS))
def test_a_hostile_adapter_folder_raises_our_error_and_changes_nothing(tmp_path, change):
    model = build()
    mark(model, 0.5)
    folder = str(tmp_path / "d")
    model.save_adapter(folder, "a")
    ADAPTER_FOLDERS[change](folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdaptersError):
        model.load_adapter(folder, load_as="a", overwrite_ok=True)
    with pytest.raises(AdaptersError):
        model.load_adapter(folder, load_as="c")
    assert list(model.adapters_config) == ["a", "b"]
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


SETUP = "adapter_setup.json"


def _setup(folder, **changes):
    with open(os.path.join(folder, SETUP)) as f:
        setup = json.load(f)
    setup.update(changes)
    _write(folder, SETUP, json.dumps(setup))


MODEL_FOLDERS = {
    "adapters is a string": lambda d: _setup(d, adapters="ab"),
    "adapters holds a number": lambda d: _setup(d, adapters=[1]),
    "adapters holds a path": lambda d: _setup(d, adapters=["../../x"]),
    "adapters lists one twice": lambda d: _setup(d, adapters=["a", "a"]),
    "fusions holds a number": lambda d: _setup(d, fusions=[5]),
    "active nested deep": lambda d: _setup(d, active=json.loads("[" * 500 + "]" * 500)),
    "active unknown block": lambda d: _setup(d, active={"type": "Nope", "children": []}),
    "interface not JSON": lambda d: _write(d, "adapter_interface.json", "{"),
    "interface a list": lambda d: _write(d, "adapter_interface.json", "[]"),
    "an adapter folder added": lambda d: shutil.copytree(
        os.path.join(d, "adapters", "a"), os.path.join(d, "adapters", "z")
    ),
    "adapter weights swapped": lambda d: shutil.copy(
        os.path.join(d, "adapters", "a", WEIGHTS), os.path.join(d, "adapters", "b", WEIGHTS)
    ),
    "manifest cut": lambda d: _manifest(d, lambda m: m["files"].pop(SETUP)),
    "base weights linked out": lambda d: (
        shutil.move(os.path.join(d, "model.safetensors"), os.path.join(d, "..", "w")),
        os.symlink(os.path.join(d, "..", "w"), os.path.join(d, "model.safetensors")),
        write_manifest(d),
    ),
}


@pytest.mark.parametrize("change", sorted(MODEL_FOLDERS))
def test_a_hostile_model_folder_raises_our_error(tmp_path, change):
    model = build()
    mark(model, 0.25)
    with torch.no_grad():
        for tensor in model.adapter_state_dict("b").values():
            tensor.fill_(0.75)
    model.set_active_adapters("a")
    folder = str(tmp_path / "m")
    model.save_pretrained(folder)
    MODEL_FOLDERS[change](folder)
    with pytest.raises(CheckpointError):
        adapters.load_model(folder, type(llama()))
