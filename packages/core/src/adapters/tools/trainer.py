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

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer

from .._runtime.fusion import copy_fusion_tensors, read_fusion_checkpoint
from .._runtime.state import get_state, is_initialized
from ..composition import setup_from_dict, setup_to_dict
from ..errors import CheckpointError, NotInitializedError

CHECKPOINT_INDEX = "adapters_checkpoint.json"
TRAINABLE_WEIGHTS = "trainable_weights.safetensors"
ADAPTERS_DIR = "adapters"
FUSIONS_DIR = "fusions"
_TRAINING_ARGS = "training_args.bin"  # transformers.trainer.TRAINING_ARGS_NAME
_STAGING = "trainer_checkpoint_staging"


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
    module docstring for the layout). The base model's frozen weights are not written."""
    os.makedirs(directory, exist_ok=True)
    names = list(model.adapters_config)  # type: ignore[attr-defined]
    if names:
        model.save_all_adapters(os.path.join(directory, ADAPTERS_DIR))  # type: ignore[attr-defined]
    fusions = list(model.adapter_fusions)  # type: ignore[attr-defined]
    if fusions:
        model.save_all_adapter_fusions(os.path.join(directory, FUSIONS_DIR))  # type: ignore[attr-defined]
    extra = trainable_base_weights(model)
    if extra:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in extra.items()}
        save_file(tensors, os.path.join(directory, TRAINABLE_WEIGHTS))
    index = {
        "adapters": names,
        "fusions": fusions,
        "active": setup_to_dict(model.active_adapters),  # type: ignore[attr-defined]
        "trainable_weights": sorted(extra),
    }
    with open(os.path.join(directory, CHECKPOINT_INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def load_training_checkpoint(model: nn.Module, directory: str) -> None:
    """Load a checkpoint written by `save_training_checkpoint` into ``model``.

    An adapter that exists in the model gets the saved values copied into its parameters (same
    tensors, so an optimizer that holds them stays valid); one that does not is added. The saved
    active setup becomes active again, and the other trainable weights are copied in place.

    Raises:
        CheckpointError: ``directory`` is not such a checkpoint, or an existing adapter's config
            differs from the saved one, or a saved weight has no parameter of that name/shape.
    """
    index_path = os.path.join(directory, CHECKPOINT_INDEX)
    if not os.path.isfile(index_path):
        raise CheckpointError(
            f"{directory!r} has no {CHECKPOINT_INDEX}: it was not written by AdapterTrainer "
            "(a checkpoint of the plain Trainer holds the full model; load it with "
            "from_pretrained instead)"
        )
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        names = list(index["adapters"])
        fusions = list(index.get("fusions", []))
        active = setup_from_dict(index.get("active"))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index_path}: malformed checkpoint index ({error})") from error
    for name in names:
        path = os.path.join(directory, ADAPTERS_DIR, name)
        if name in model.adapters_config:  # type: ignore[attr-defined]
            _load_in_place(model, path, name)
        else:
            model.load_adapter(path, load_as=name)  # type: ignore[attr-defined]
    for name in fusions:
        path = os.path.join(directory, FUSIONS_DIR, name)
        if name in model.adapter_fusions:  # type: ignore[attr-defined]
            _load_fusion_in_place(model, path, name)
        else:
            model.load_adapter_fusion(path, load_as=name)  # type: ignore[attr-defined]
    weights_path = os.path.join(directory, TRAINABLE_WEIGHTS)
    if os.path.isfile(weights_path):
        _copy_weights(model, load_file(weights_path), weights_path)
    if active is not None:
        model.set_active_adapters(active)  # type: ignore[attr-defined]


def _load_in_place(model: nn.Module, path: str, name: str) -> None:
    staging = model.load_adapter(path, load_as=_STAGING)  # type: ignore[attr-defined]
    try:
        saved = model.adapters_config[staging]  # type: ignore[attr-defined]
        current = model.adapters_config[name]  # type: ignore[attr-defined]
        if saved.to_dict() != current.to_dict():
            raise CheckpointError(
                f"adapter {name!r} in {path!r} has config {saved.to_dict()}, but the model's "
                f"adapter {name!r} has {current.to_dict()}; resume with the same configs"
            )
        targets = model.get_adapter(name)  # type: ignore[attr-defined]
        with torch.no_grad():
            for key, source in model.get_adapter(staging).items():  # type: ignore[attr-defined]
                targets[key].load_state_dict(source.state_dict())
    finally:
        model.delete_adapter(staging)  # type: ignore[attr-defined]


def _load_fusion_in_place(model: nn.Module, path: str, name: str) -> None:
    _, children, config, tensors = read_fusion_checkpoint(model, path)
    entry = get_state(model).fusions[name]
    if list(children) != list(entry.children) or config != entry.config:
        raise CheckpointError(
            f"fusion {name!r} in {path!r} fuses {list(children)} with {config}, but the model's "
            f"fusion {name!r} fuses {list(entry.children)} with {entry.config}; resume with the "
            "same fusion layers"
        )
    copy_fusion_tensors(entry, tensors, source=path)


def _copy_weights(model: nn.Module, tensors: dict[str, torch.Tensor], path: str) -> None:
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        param = params.get(key)
        if param is None or param.shape != value.shape:
            raise CheckpointError(
                f"{path}: weight {key!r} {tuple(value.shape)} has no parameter of that name and "
                "shape in the model; resume with the model the checkpoint was trained on"
            )
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)
