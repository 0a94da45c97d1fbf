"""An in-test plugin for a method that owns ``Fuse`` and ``Split`` (a bottleneck family's shape).

``toy_fusable`` adds a learned vector to each layer's output. It evaluates setups with core's
`apply_setup` and handles two blocks itself:

- ``Fuse``: ``hidden + sum_i softmax(logits)_i * (child_i(hidden) - hidden)``, where ``logits``
  is the fusion layer's parameter (one per layer, created by ``adapters_add_fusion``);
- ``Split``: child ``i`` edits the next ``splits[i]`` positions of the sequence.

Core handles every other block, also inside a ``Fuse`` or ``Split``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapters import (
    AdapterConfig,
    Average,
    BatchSplit,
    CheckpointFormat,
    Fuse,
    MethodSpec,
    Split,
    Stack,
    hookimpl,
)
from adapters.composition import apply_setup
from adapters.context import context_for


@dataclass(frozen=True)
class ToyFusableConfig(AdapterConfig):
    method: ClassVar[str] = "toy_fusable"


class ToyShiftVector(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(d))


class ToyFusionLayer(nn.Module):
    def __init__(self, n: int, static: bool):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n))
        self.static = static


class ToyFusableHost(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.units = nn.ModuleDict()
        self.fusions = nn.ModuleDict()
        self.__dict__["model"] = model
        self.fuse_calls = 0

    def _owns(self, name):
        return name in self.units

    def _apply_one(self, name, h, rows):
        return h + self.units[name].shift

    def fuse(self, block, hidden, rows, compose):
        self.fuse_calls += 1
        layer = self.fusions[block.name]
        weights = layer.logits.softmax(dim=0)
        out = hidden
        for weight, child in zip(weights, block.children):
            out = out + weight * (compose(child, hidden, rows) - hidden)
        return out

    def split(self, block, hidden, rows, compose):
        parts, start = [], 0
        for child, size in zip(block.children, block.splits):
            parts.append(compose(child, hidden[:, start : start + size], rows))
            start += size
        parts.append(hidden[:, start:])
        return torch.cat(parts, dim=1)

    def hook(self, module, args, output):
        setup = context_for(self.model).setup
        if setup is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        new = apply_setup(
            setup,
            hidden,
            self._apply_one,
            self._owns,
            handlers={Fuse: self.fuse, Split: self.split},
        )
        return (new, *output[1:]) if isinstance(output, tuple) else new


def _never(path):
    return False


def _no_adapters(**kwargs):
    raise AssertionError("toy_fusion_files holds fusion layers only")


def _detect_fusion(path):
    return os.path.isfile(os.path.join(path, "toy_fusion.json"))


def _read_fusion(path, model, sites):
    """The toy format keeps the layer's logits as ``layer{i}`` and its meta in a JSON file."""
    with open(os.path.join(path, "toy_fusion.json")) as f:
        meta = json.load(f)
    raw = load_file(os.path.join(path, "toy_fusion.safetensors"))
    tensors = {f"{layer.layer.path}.logits": raw[f"layer{layer.index}"] for layer in sites.layers}
    return meta["fusion"], meta["adapters"], meta["kind"], tensors


def _write_fusion(path, model, sites, name, children, config, state_dict):
    kind = "dynamic" if config.value else "static"
    with open(os.path.join(path, "toy_fusion.json"), "w") as f:
        json.dump({"fusion": name, "adapters": children, "kind": kind}, f)
    raw = {
        f"layer{layer.index}": state_dict[f"{layer.layer.path}.logits"] for layer in sites.layers
    }
    save_file(raw, os.path.join(path, "toy_fusion.safetensors"))


class ToyFusablePlugin:
    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_register_checkpoint_formats(self, register):
        register(
            CheckpointFormat(
                "toy_fusion_files",
                detect=_never,
                read=_no_adapters,
                detect_fusion=_detect_fusion,
                read_fusion=_read_fusion,
                write_fusion=_write_fusion,
            )
        )

    @hookimpl
    def adapters_register_methods(self, register):
        register(
            MethodSpec(
                "toy_fusable",
                (ToyFusableConfig,),
                {"toy_fusable": ToyFusableConfig()},
                compositions=(Stack, BatchSplit, Average, Fuse, Split),
            )
        )

    def _host(self, model, layer):
        module = layer.layer.module
        host = getattr(module, "toy_fusable", None)
        if host is None:
            host = ToyFusableHost(model)
            module.toy_fusable = host
            host.handle = module.register_forward_hook(host.hook)
        return host

    def _drop_if_empty(self, layer):
        host = layer.layer.module.toy_fusable
        if not len(host.units) and not len(host.fusions):
            host.handle.remove()
            del layer.layer.module.toy_fusable

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyFusableConfig):
            return None
        created = {}
        for layer in sites.layers:
            host = self._host(model, layer)
            host.units[name] = ToyShiftVector(layer.hidden_size)
            created[layer.layer.path] = host.units[name]
        return created

    @hookimpl
    def adapters_delete_adapter(self, model, sites, name, config):
        if not isinstance(config, ToyFusableConfig):
            return None
        for layer in sites.layers:
            del layer.layer.module.toy_fusable.units[name]
            self._drop_if_empty(layer)
        return True

    @hookimpl
    def adapters_add_fusion(self, model, sites, name, children, config, method):
        if method != "toy_fusable":
            return None
        created = {}
        for layer in sites.layers:
            host = self._host(model, layer)
            host.fusions[name] = ToyFusionLayer(len(children), static=not config.value)
            created[layer.layer.path] = host.fusions[name]
        return created

    @hookimpl
    def adapters_delete_fusion(self, model, sites, name, children, method):
        if method != "toy_fusable":
            return None
        for layer in sites.layers:
            del layer.layer.module.toy_fusable.fusions[name]
            self._drop_if_empty(layer)
        return True

    @hookimpl
    def adapters_fusion_regularization_loss(self, model, sites, name, children, config, method):
        if method != "toy_fusable":
            return None
        layers = [layer.layer.module.toy_fusable.fusions[name] for layer in sites.layers]
        return 0.01 * sum((layer.logits**2).sum() for layer in layers)
