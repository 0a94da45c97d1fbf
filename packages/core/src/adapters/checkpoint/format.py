"""Our checkpoint format: file names, format versions (refusing newer ones) and the
versions recorded in a save, and portable tensor keys (relative to the base model)."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..interface import INTERFACE_FILENAME
from ..registry.loading import get_registry

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MANIFEST_NAME = "adapters_manifest.json"
FORMAT = "adapters"
#: The checkpoint format this version writes; it reads every version up to this one.
FORMAT_VERSION = 2
SETUP_NAME = "adapter_setup.json"
ADAPTERS_SUBDIR = "adapters"
#: Where ``save_pretrained`` puts fusion layers (``adapter_fusions/<name>``).
FUSIONS_SUBDIR = "adapter_fusions"
#: Marks a portable key of a module outside the base model (kept relative to the top level).
TOP_PREFIX = "top:"
# Names our saves write; an old folder's files of these names are never carried over.
_OURS = {
    CONFIG_NAME,
    WEIGHTS_NAME,
    MANIFEST_NAME,
    SETUP_NAME,
    INTERFACE_FILENAME,
    ADAPTERS_SUBDIR,
    FUSIONS_SUBDIR,
}


# ---------------------------------------------------------------------------------------------
# format versions
# ---------------------------------------------------------------------------------------------


def check_format_version(meta: Mapping[str, Any], source: str) -> int:
    """The major ``format_version`` of a file of ours (1 when absent); a newer major than this
    library reads raises `CheckpointError` naming the version and the upgrade."""
    raw = meta.get("format_version", 1)
    major: Any = raw
    if isinstance(raw, str):
        head = raw.split(".", 1)[0]
        major = int(head) if head.isdigit() else None
    if not isinstance(major, int) or isinstance(major, bool) or major < 1:
        raise CheckpointError(
            f"{source}: field 'format_version' is {raw!r}; expected a positive integer"
        )
    if major > FORMAT_VERSION:
        raise CheckpointError(
            f"{source} was saved in checkpoint format version {raw} by a newer adapters-core "
            f"({_saved_core_version(meta)}); this adapters-core "
            f"({_dist_version('adapters-core') or 'unknown'}) reads versions up to "
            f"{FORMAT_VERSION}. Upgrade: pip install -U adapters-core"
        )
    return major


def _saved_core_version(meta: Mapping[str, Any]) -> str:
    versions = meta.get("versions")
    if isinstance(versions, Mapping) and versions.get("adapters-core"):
        return f"version {versions['adapters-core']}"
    return "unknown version"


# ---------------------------------------------------------------------------------------------
# portable keys
# ---------------------------------------------------------------------------------------------


def base_model_prefix(model: nn.Module) -> str:
    """The path of the base model inside ``model`` followed by ``.`` (``"model."`` for
    ``LlamaForCausalLM``), or ``""`` when ``model`` is the base model (``LlamaModel``)."""
    path = model.adapter_sites.base_model.path  # type: ignore[attr-defined]
    return f"{path}." if path else ""


def _split_part(key: str) -> tuple[str, str]:
    # keys of a ConfigUnion's parts start with "<method>/"; module paths never contain "/"
    head, sep, rest = key.partition("/")
    return (head + sep, rest) if sep and not head.startswith(TOP_PREFIX) else ("", key)


def to_portable_keys(model: nn.Module, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Plugin keys (paths from the top-level model) → portable keys (relative to the base
    model; ``top:`` + the full path for anything outside it)."""
    prefix = base_model_prefix(model)
    result = {}
    for key, value in tensors.items():
        part, rest = _split_part(key)
        if prefix:
            rest = rest[len(prefix) :] if rest.startswith(prefix) else TOP_PREFIX + rest
        result[part + rest] = value
    return result


def from_portable_keys(model: nn.Module, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `to_portable_keys` for ``model`` (which may have another head class)."""
    prefix = base_model_prefix(model)
    result = {}
    for key, value in tensors.items():
        part, rest = _split_part(key)
        rest = rest[len(TOP_PREFIX) :] if rest.startswith(TOP_PREFIX) else prefix + rest
        result[part + rest] = value
    return result


def _versions(methods: list[str]) -> dict[str, str]:
    versions = {"adapters-core": _dist_version("adapters-core"), "torch": torch.__version__}
    transformers_version = _dist_version("transformers")
    if transformers_version:
        versions["transformers"] = transformers_version
    registry = get_registry()
    for method in methods:
        spec = registry.methods.get(method)
        if spec is not None and spec.distribution:
            versions[spec.distribution] = spec.version or ""
    return {k: v for k, v in versions.items() if v}


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""
