"""Training adapters with the transformers ``Trainer``: checkpoints hold only what is trained.

`AdapterTrainer` is a drop-in ``transformers.Trainer`` for a model prepared with
``adapters.init``. Each checkpoint (and ``save_model``) holds

- ``adapters/<name>/``: every adapter, in this library's format;
- ``fusions/<name>/``: every fusion layer (AdapterFusion);
- ``trainable_weights.safetensors``: the other parameters that train (a classification head
  you unfroze, embeddings trained with ``train_adapter(..., train_embeddings=True)``);
- ``adapters_checkpoint.json``: which adapters and weights the checkpoint holds and the active
  setup;

plus what the Trainer itself writes (optimizer, scheduler, RNG states, ``trainer_state.json``).
The base model's weights are never copied. Resuming (``train(resume_from_checkpoint=...)``) and
``load_best_model_at_end`` load these files back *into the existing parameters*, so the
optimizer state restored by the Trainer still refers to the right tensors.

This module imports ``transformers`` (and the Trainer needs ``accelerate``); core itself does
not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer

from .._runtime.fusion import (
    ReadFusion,
    add_read_fusion,
    copy_fusion_tensors,
    read_fusion_once,
    save_adapter_fusion,
)
from .._runtime.naming import name_problem, safe_join
from .._runtime.state import get_state, is_initialized
from .._runtime.transaction import all_or_nothing
from ..checkpoint.adapter import ReadAdapter, add_read_adapter, load_tensors, read_all_adapters
from ..checkpoint.atomic import read_consistently
from ..checkpoint.format import MANIFEST_NAME
from ..checkpoint.manifest import (
    check_links,
    read_manifest,
    verify_manifest,
    write_directory_atomically,
)
from ..checkpoint.model import active_setup_of
from ..checkpoint.readers import (
    checked_tensors,
    copy_tensors,
    load_safetensors,
    match_tensors,
    read_json_strict,
)
from ..composition import setup_to_dict
from ..errors import CheckpointError, NotInitializedError

CHECKPOINT_INDEX = "adapters_checkpoint.json"
TRAINABLE_WEIGHTS = "trainable_weights.safetensors"
ADAPTERS_DIR = "adapters"
FUSIONS_DIR = "fusions"
_TRAINING_ARGS = "training_args.bin"  # transformers.trainer.TRAINING_ARGS_NAME
#: The temporary files `_write_file` makes (removed by the next save if a save was killed).
_TEMPORARY = re.compile(
    r"^\.(trainable_weights\.safetensors|adapters_checkpoint\.json)\.tmp-[0-9a-f]{32}$"
)


class AdapterTrainer(Trainer):
    """A ``transformers.Trainer`` whose checkpoints hold the adapters, not the base model.

    Use it exactly like ``Trainer``; the model must be prepared with ``adapters.init`` (train
    the adapters with ``model.train_adapter(...)`` first). Label detection, data collation,
    evaluation and everything else are the Trainer's own.

    Example::

        model.train_adapter("sentiment")
        trainer = AdapterTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev)
        trainer.train()                       # checkpoint-*/adapters/sentiment/...
        trainer.train(resume_from_checkpoint=True)
    """

    def __init__(self, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> None:
        if model is None or not is_initialized(model):
            raise NotInitializedError(
                "AdapterTrainer needs a model prepared with adapters.init(model, interface=...); "
                "use transformers.Trainer for a model without adapters"
            )
        super().__init__(model, *args, **kwargs)

    def compute_loss(self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's loss, plus ``get_fusion_regularization_loss()`` while a fusion layer
        with ``regularization=True`` trains (as AdapterHub's trainer does)."""
        result = super().compute_loss(model, inputs, *args, **kwargs)
        if not self.model.training:
            return result
        regularization = self.model.get_fusion_regularization_loss()  # type: ignore[operator]
        if regularization is None:
            return result
        if isinstance(result, tuple):
            return (result[0] + regularization.to(result[0].device), *result[1:])
        return result + regularization.to(result.device)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_training_checkpoint(self.model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, _TRAINING_ARGS))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_training_checkpoint(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_training_checkpoint(self.model, self.state.best_model_checkpoint)


def _adapter_param_ids(model: nn.Module) -> set[int]:
    """Parameters of every adapter and fusion layer (saved in their own folders)."""
    modules = [
        module
        for name in model.adapters_config  # type: ignore[attr-defined]
        for module in model.get_adapter(name).values()  # type: ignore[attr-defined]
    ]
    modules += [
        module
        for name in model.adapter_fusions  # type: ignore[attr-defined]
        for module in model.get_adapter_fusion(name).values()  # type: ignore[attr-defined]
    ]
    return {id(p) for module in modules for p in module.parameters()}


def trainable_base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train but belong to no adapter or fusion layer (heads,
    embeddings), by their ``named_parameters`` name."""
    adapter_ids = _adapter_param_ids(model)
    return {
        name: p
        for name, p in model.named_parameters()
        if p.requires_grad and id(p) not in adapter_ids
    }


def save_training_checkpoint(model: nn.Module, directory: str) -> None:
    """Write ``model``'s adapters and its other trainable weights into ``directory`` (see the
    module docstring for the layout). The base model's frozen weights are not written.

    ``adapters/`` and ``fusions/`` are each replaced atomically (with a manifest), the other
    files by writing a temporary file and renaming it; the index is written last and records
    the sha256 of ``trainable_weights.safetensors``."""
    os.makedirs(directory, exist_ok=True)
    for stale in os.listdir(directory):  # temporary files of a save that was killed
        if _TEMPORARY.match(stale):
            os.remove(os.path.join(directory, stale))
    names = list(model.adapters_config)  # type: ignore[attr-defined]
    model.save_all_adapters(os.path.join(directory, ADAPTERS_DIR))  # type: ignore[attr-defined]
    fusions = list(model.adapter_fusions)  # type: ignore[attr-defined]

    def write_fusions(tmp: str) -> None:
        for name in fusions:
            save_adapter_fusion(model, safe_join(tmp, name, kind="fusion"), name)

    write_directory_atomically(os.path.join(directory, FUSIONS_DIR), write_fusions, manifest=True)
    extra = trainable_base_weights(model)
    index: dict[str, Any] = {
        "adapters": names,
        "fusions": fusions,
        "active": setup_to_dict(model.active_adapters),  # type: ignore[attr-defined]
        "trainable_weights": sorted(extra),
    }
    weights_path = os.path.join(directory, TRAINABLE_WEIGHTS)
    if extra:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in extra.items()}
        _write_file(weights_path, lambda path: save_file(tensors, path))
        index["trainable_weights_sha256"] = _sha256(weights_path)
    elif os.path.lexists(weights_path):
        os.remove(weights_path)  # a previous save's: not part of this checkpoint

    def write_index(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)

    _write_file(os.path.join(directory, CHECKPOINT_INDEX), write_index)


def _write_file(path: str, write: Any) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: ``path`` is the old or the new file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


@dataclass
class _Checkpoint:
    """A trainer checkpoint read and checked against the model, nothing loaded yet."""

    adapters: list[tuple[str, ReadAdapter]]
    fusions: list[tuple[str, ReadFusion]]
    weights: dict[str, torch.Tensor]
    active: Any


def load_training_checkpoint(model: nn.Module, directory: str) -> None:
    """Load a checkpoint written by `save_training_checkpoint` into ``model``.

    An adapter that exists in the model gets the saved values copied into its parameters (same
    tensors, so an optimizer that holds them stays valid); one that does not is added. The saved
    active setup becomes active again, and the other trainable weights are copied in place.

    Everything is read and checked first (names, configs, shapes, dtypes, finite values, the
    manifests; the trainable weights must be exactly the ones the index lists, parameters of
    the model outside every adapter), then loaded in one step: on any error the model
    (adapters, fusion layers, weights, active setup) is exactly as before.

    Raises:
        CheckpointError: ``directory`` is not such a checkpoint, or an existing adapter's config
            differs from the saved one, or a saved weight has no parameter of that name/shape.
    """
    directory = os.fspath(directory)
    index_path = os.path.join(directory, CHECKPOINT_INDEX)
    if not os.path.isfile(index_path):
        raise CheckpointError(
            f"{directory!r} has no {CHECKPOINT_INDEX}: it was not written by AdapterTrainer "
            "(a checkpoint of the plain Trainer holds the full model; load it with "
            "from_pretrained instead)"
        )
    watched = [os.path.join(directory, ADAPTERS_DIR), os.path.join(directory, FUSIONS_DIR)]

    def read() -> _Checkpoint:
        check_links(directory)
        return _read_checkpoint(model, directory, _read_index(index_path))

    checkpoint = read_consistently(watched, read)
    overwritten = [
        tensor
        for name, _ in checkpoint.adapters
        if name in model.adapters_config  # type: ignore[attr-defined]
        for tensor in model.adapter_state_dict(name).values()  # type: ignore[attr-defined]
    ]
    state = get_state(model)
    overwritten += [
        tensor
        for name, _ in checkpoint.fusions
        if name in state.fusions
        for tensor in state.fusions[name].state_dict().values()
    ]
    params = dict(model.named_parameters())
    overwritten += [params[key] for key in checkpoint.weights]
    with all_or_nothing(model, overwritten):
        for name, read_adapter in checkpoint.adapters:
            if name in model.adapters_config:  # type: ignore[attr-defined]
                load_tensors(model, name, read_adapter.tensors, source=read_adapter.path)
            else:
                add_read_adapter(model, name, read_adapter)
        for name, read_fusion in checkpoint.fusions:
            if name in state.fusions:
                copy_fusion_tensors(state.fusions[name], read_fusion.tensors, read_fusion.path)
            else:
                add_read_fusion(model, read_fusion, load_as=name)
        copy_tensors({key: params[key] for key in checkpoint.weights}, checkpoint.weights)
        if checkpoint.active is not None:
            model.set_active_adapters(checkpoint.active)  # type: ignore[attr-defined]


def _read_index(path: str) -> dict[str, Any]:
    """The checkpoint index, every field checked: names are lists of allowed names."""
    index = read_json_strict(path)
    checked: dict[str, Any] = {}
    for key, kind, required in (
        ("adapters", "adapter", True),
        ("fusions", "fusion", False),
        ("trainable_weights", None, False),
    ):
        if key not in index and required:
            raise CheckpointError(f"{path!r}: field {key!r} is missing")
        value = index.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CheckpointError(
                f"{path!r}: field {key!r} is {value!r}; expected a list of names (strings)"
            )
        if len(set(value)) != len(value):
            raise CheckpointError(f"{path!r}: field {key!r} lists a name twice: {value}")
        if kind is not None:
            for name in value:
                problem = name_problem(name)
                if problem is not None:
                    raise CheckpointError(
                        f"{path!r}: field {key!r} lists {name!r}, which is not an allowed "
                        f"{kind} name ({problem})"
                    )
        checked[key] = value
    digest = index.get("trainable_weights_sha256")
    if digest is not None and not isinstance(digest, str):
        raise CheckpointError(f"{path!r}: field 'trainable_weights_sha256' is not a string")
    checked["trainable_weights_sha256"] = digest
    checked["active"] = active_setup_of(index, repr(path))
    return checked


def _read_checkpoint(model: nn.Module, directory: str, index: dict[str, Any]) -> _Checkpoint:
    adapters_dir = os.path.join(directory, ADAPTERS_DIR)
    adapters: list[tuple[str, ReadAdapter]] = []
    if index["adapters"] or os.path.isdir(adapters_dir):
        found = dict(read_all_adapters(model, adapters_dir))
        if sorted(found) != sorted(index["adapters"]):
            raise CheckpointError(
                f"{adapters_dir!r} holds the adapters {sorted(found)} but {CHECKPOINT_INDEX} "
                f"lists {index['adapters']}: the checkpoint mixes two saves"
            )
        adapters = [(name, found[name]) for name in index["adapters"]]
    for name, read in adapters:
        if name in model.adapters_config:  # type: ignore[attr-defined]
            current = model.adapters_config[name]  # type: ignore[attr-defined]
            if read.config.to_dict() != current.to_dict():
                raise CheckpointError(
                    f"adapter {name!r} in {read.path!r} has config {read.config.to_dict()}, but "
                    f"the model's adapter {name!r} has {current.to_dict()}; resume with the same "
                    "configs"
                )
            entry = model._entry(name)  # type: ignore[operator]
            match_tensors(
                entry.state_dict(),
                read.tensors,
                read.path,
                f"adapter {name!r} ({read.config.method})",
            )
    fusions = _read_fusions(model, directory, index["fusions"])
    weights = _read_weights(model, directory, index)
    return _Checkpoint(adapters, fusions, weights, index["active"])


def _read_fusions(
    model: nn.Module, directory: str, names: list[str]
) -> list[tuple[str, ReadFusion]]:
    fusions_dir = os.path.join(directory, FUSIONS_DIR)
    manifest = read_manifest(fusions_dir) if os.path.isdir(fusions_dir) else None
    if manifest is not None:
        listed = sorted({rel.split("/", 1)[0] for rel in manifest["files"] if "/" in rel})
        if listed != sorted(names):
            raise CheckpointError(
                f"{fusions_dir!r} holds the fusion layers {listed} but {CHECKPOINT_INDEX} lists "
                f"{names}: the checkpoint mixes two saves"
            )
        verify_manifest(fusions_dir, hash_files=lambda rel: rel.endswith("/" + MANIFEST_NAME))
    state = get_state(model)
    fusions = []
    for name in names:
        read = read_fusion_once(model, safe_join(fusions_dir, name, kind="fusion"))
        entry = state.fusions.get(name)
        if entry is not None:
            if list(read.children) != list(entry.children) or read.config != entry.config:
                raise CheckpointError(
                    f"fusion {name!r} in {read.path!r} fuses {read.children} with {read.config}, "
                    f"but the model's fusion {name!r} fuses {list(entry.children)} with "
                    f"{entry.config}; resume with the same fusion layers"
                )
            match_tensors(
                entry.state_dict(), read.tensors, read.path, f"fusion {name!r} ({entry.method})"
            )
        fusions.append((name, read))
    return fusions


def _read_weights(
    model: nn.Module, directory: str, index: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The trainable weights: exactly the ones the index lists, each a parameter of the model
    that belongs to no adapter or fusion layer, with its shape and a floating dtype."""
    listed = index["trainable_weights"]
    path = os.path.join(directory, TRAINABLE_WEIGHTS)
    if not listed:
        return {}
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{directory!r} lacks {TRAINABLE_WEIGHTS}, which {CHECKPOINT_INDEX} lists "
            f"({listed[:3]}): an incomplete checkpoint"
        )
    digest = index["trainable_weights_sha256"]
    if digest is not None and _sha256(path) != digest:
        raise CheckpointError(
            f"{path!r} is not the file saved with {CHECKPOINT_INDEX} (sha256 differs): the "
            "checkpoint mixes two saves, or the file was changed"
        )
    tensors = checked_tensors(load_safetensors(path), path)
    params = dict(model.named_parameters())
    adapter_ids = _adapter_param_ids(model)
    for key in listed:
        param = params.get(key)
        if param is None or id(param) in adapter_ids:
            raise CheckpointError(
                f"{path}: weight {key!r} has no parameter of that name in the model outside "
                "its adapters; resume with the model the checkpoint was trained on"
            )
    expected = {key: params[key] for key in listed}
    match_tensors(expected, tensors, path, "the model's trainable weights (the index lists them)")
    return tensors


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
