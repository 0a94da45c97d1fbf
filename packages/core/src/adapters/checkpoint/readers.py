"""Readers that plugins use for checkpoint files: JSON objects and tensor files, never
unpickling (part of the plugin contract)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
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
    """The tensors of the ``.safetensors`` file ``path``; `CheckpointError` naming the file if
    it is missing, unreadable or not a safetensors file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r} does not exist or is not a regular file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as error:
        raise CheckpointError(f"{path!r} is not a readable safetensors file: {error}") from None


def safetensors_from_bytes(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes (already read, e.g. by
    `adapters.checkpoint.manifest.read_listed`); `CheckpointError` naming ``source``."""
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as error:
        raise CheckpointError(f"{source} is not a readable safetensors file: {error}") from None


# ---------------------------------------------------------------------------------------------
# checking tensors: every tensor from every source
# ---------------------------------------------------------------------------------------------

#: Floating dtypes a checkpoint tensor may have (checked for NaN and infinity).
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
#: Other dtypes a checkpoint tensor may have (for integer or boolean buffers).
EXACT_DTYPES = frozenset(
    {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
)


def checked_tensors(tensors: Mapping[Any, Any], source: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, after refusing with `CheckpointError` (naming
    ``source`` and the key): keys that are not strings, values that are not plain tensors with
    values (sparse, meta, other layouts), dtypes outside `FLOAT_DTYPES` and `EXACT_DTYPES` (float8,
    complex, quantized) and NaN or infinite values (they give NaN outputs)."""
    if not isinstance(tensors, Mapping):
        raise CheckpointError(f"{source} does not hold a mapping of tensors")
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        if value.layout != torch.strided or value.is_meta:
            raise CheckpointError(
                f"{source}: tensor {key!r} is not a plain tensor with values ({value.layout}, "
                f"device {value.device})"
            )
        if value.dtype not in FLOAT_DTYPES and value.dtype not in EXACT_DTYPES:
            raise CheckpointError(
                f"{source}: tensor {key!r} has dtype {value.dtype}, which checkpoints of "
                "adapters do not use (expected float16, bfloat16, float32 or float64); "
                "convert it before loading"
            )
        if value.dtype in FLOAT_DTYPES and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{source}: tensor {key!r} holds NaN or infinite values; the checkpoint is "
                "corrupt or was saved after training diverged"
            )
    return dict(tensors)


def match_tensors(
    expected: Mapping[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    source: str,
    what: str,
) -> None:
    """Check ``tensors`` (already `checked_tensors`) against the tensors ``expected`` that
    they will be copied into: the same keys, no more and no fewer; the same shapes; a floating
    value for a floating target and the same dtype for any other; targets that hold values
    (not on the meta device). `CheckpointError` naming ``source``, ``what`` and the key."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match {what} on this model: missing {len(missing)} tensors "
            f"{missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}. Was it saved for "
            "another model or interface?"
        )
    bad = [
        (k, tuple(tensors[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if bad:
        key, got, want = bad[0]
        raise CheckpointError(
            f"{source}: tensor {key!r} has shape {got}, {what} expects {want} ({len(bad)} "
            "mismatched); was it saved with another config (e.g. r) or model size?"
        )
    for key, target in expected.items():
        value = tensors[key]
        if target.is_floating_point() != value.is_floating_point() or (
            not target.is_floating_point() and target.dtype != value.dtype
        ):
            raise CheckpointError(
                f"{source}: tensor {key!r} has dtype {value.dtype}, {what} expects "
                f"{'floating-point values' if target.is_floating_point() else target.dtype}"
            )
        if target.is_meta:
            raise CheckpointError(
                f"{what} has tensor {key!r} on the meta device (no storage), so {source} cannot "
                "be loaded into it: materialise the model's weights first (load it with "
                "from_pretrained, or model.to_empty(device=...) and load its state dict)"
            )


def copy_tensors(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the ``expected`` tensors in place (after `match_tensors`), cast to
    each target's dtype and device."""
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(dtype=target.dtype, device=target.device))
