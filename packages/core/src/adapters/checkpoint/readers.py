"""Readers that plugins use for checkpoint files: JSON objects and tensor files, never
unpickling (part of the plugin contract)."""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..configs import (
    load_json_strict,
)
from ..errors import CheckpointError


def read_json_object(path: str) -> dict[str, Any] | None:
    """The JSON object in file ``path``, or None when the file is missing, unreadable, not an
    object, or holds duplicate keys or non-finite numbers. Meant for a `CheckpointFormat`'s
    ``detect``, which must never raise (a reader then calls `read_json_strict` for the
    error)."""
    if not os.path.isfile(path):
        return None
    try:
        data = load_json_strict(path, error=CheckpointError)
    except CheckpointError:
        return None
    return data if isinstance(data, dict) else None


def recorded_name(path: str, key: str = "name") -> str | None:
    """The string field ``key`` of the JSON object in file ``path``, or None (missing file or
    field, not a string, unreadable): for a `CheckpointFormat`'s ``saved_name``."""
    data = read_json_object(path)
    value = data.get(key) if data is not None else None
    return value if isinstance(value, str) else None


def read_json_strict(path: str) -> dict[str, Any]:
    """The JSON object in file ``path``; a missing or malformed file, duplicate keys or
    non-finite numbers raise `CheckpointError` naming the file and key."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r} does not exist")
    data = load_json_strict(path, error=CheckpointError)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path!r} does not hold a JSON object")
    return data


def load_tensor_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a PyTorch ``.bin``/``.pt`` file read with
    ``torch.load(weights_only=True)``: plain tensors and containers only, never arbitrary
    objects. Anything else (corrupt, unsafe, not a flat dict of tensors) raises
    `CheckpointError`. For plugins reading foreign checkpoints."""
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unsafe or corrupt files
        raise CheckpointError(
            f"{path!r} cannot be read as plain tensors (weights_only=True; nothing else is "
            f"unpickled): {type(error).__name__}: {error}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path!r} does not hold a dict of tensors")
    return state


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in file ``path`` or None if there is no such file; malformed JSON,
    duplicate keys and non-finite numbers raise `CheckpointError` naming the file."""
    if not os.path.isfile(path):
        return None
    return read_json_strict(path)


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path!r} is not a readable safetensors file: {error}") from None
