"""`AdapterModelInterface`: a plain, serialisable description of where a model keeps its parts.

Field names say where a path is resolved from: ``model_*`` from the base model, ``layer_*`` from
one transformer layer, ``attn_*`` from an attention module. Values are dotted paths
(``"mlp.up_proj"``). Resolution against a real model happens in :mod:`adapters.sites`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import InterfaceError

INTERFACE_FILENAME = "adapter_interface.json"

_PATH_FIELDS = (
    "model_embeddings",
    "layer_self_attn",
    "layer_cross_attn",
    "attn_q_proj",
    "attn_k_proj",
    "attn_v_proj",
    "attn_o_proj",
    "attn_qkv_proj",
    "layer_intermediate_proj",
    "layer_output_proj",
    "layer_pre_self_attn",
    "layer_pre_cross_attn",
    "layer_pre_ffn",
    "layer_ln_1",
    "layer_ln_2",
    "base_model",
)


@dataclass(init=False)
class AdapterModelInterface:
    """Where a model keeps the parts that adapter methods attach to.

    Example (a Llama / Gemma-style decoder)::

        AdapterModelInterface(
            adapter_methods=["lora", "reft"],
            model_embeddings="embed_tokens", model_layers="layers",
            layer_self_attn="self_attn", layer_cross_attn=None,
            attn_k_proj="k_proj", attn_q_proj="q_proj", attn_v_proj="v_proj",
            attn_o_proj="o_proj",
            layer_intermediate_proj="mlp.up_proj", layer_output_proj="mlp.down_proj",
        )

    Args:
        adapter_methods: method names this model enables (``adapter_types`` is an alias).
        model_embeddings: the token embedding module, relative to the base model.
        model_layers: the layer list, relative to the base model; a list of paths for models
            with several layer stacks (e.g. ``["encoder.block", "decoder.block"]``).
        layer_self_attn / layer_cross_attn: attention modules, relative to a layer.
        attn_q_proj, attn_k_proj, attn_v_proj: separate projections, relative to an attention
            module; give all three, or ``attn_qkv_proj`` for a fused projection instead.
        attn_o_proj: the attention output projection, relative to an attention module.
        layer_intermediate_proj / layer_output_proj: the feed-forward up and down projections.
        layer_pre_self_attn, layer_pre_cross_attn, layer_pre_ffn: modules whose *input* is the
            residual stream before the respective sub-block (usually its layer norm).
        layer_ln_1 / layer_ln_2: the norms after the attention and feed-forward sub-blocks.
        base_model: path from the top-level model to the base model; defaults to the model's
            ``base_model`` attribute when it has one, else the model itself.
    """

    adapter_methods: list[str] = field(default_factory=list)
    model_embeddings: str | None = None
    model_layers: str | list[str] | None = None
    layer_self_attn: str | None = None
    layer_cross_attn: str | None = None
    attn_q_proj: str | None = None
    attn_k_proj: str | None = None
    attn_v_proj: str | None = None
    attn_o_proj: str | None = None
    attn_qkv_proj: str | None = None
    layer_intermediate_proj: str | None = None
    layer_output_proj: str | None = None
    layer_pre_self_attn: str | None = None
    layer_pre_cross_attn: str | None = None
    layer_pre_ffn: str | None = None
    layer_ln_1: str | None = None
    layer_ln_2: str | None = None
    base_model: str | None = None

    def __init__(
        self,
        adapter_methods: list[str] | None = None,
        model_embeddings: str | None = None,
        model_layers: str | list[str] | None = None,
        layer_self_attn: str | None = None,
        layer_cross_attn: str | None = None,
        attn_q_proj: str | None = None,
        attn_k_proj: str | None = None,
        attn_v_proj: str | None = None,
        attn_o_proj: str | None = None,
        attn_qkv_proj: str | None = None,
        layer_intermediate_proj: str | None = None,
        layer_output_proj: str | None = None,
        layer_pre_self_attn: str | None = None,
        layer_pre_cross_attn: str | None = None,
        layer_pre_ffn: str | None = None,
        layer_ln_1: str | None = None,
        layer_ln_2: str | None = None,
        base_model: str | None = None,
        *,
        adapter_types: list[str] | None = None,
    ) -> None:
        if adapter_methods is not None and adapter_types is not None:
            raise InterfaceError(
                "give either adapter_methods= or its alias adapter_types=, not both"
            )
        methods = adapter_methods if adapter_methods is not None else adapter_types
        if methods is None:
            raise InterfaceError(
                "AdapterModelInterface needs adapter_methods=[...] (the methods to enable, "
                "e.g. ['lora', 'reft'])"
            )
        if isinstance(methods, str):
            methods = [methods]
        self.adapter_methods = [str(m) for m in methods]
        self.model_embeddings = model_embeddings
        self.model_layers = (
            list(model_layers) if isinstance(model_layers, list | tuple) else (model_layers)
        )
        self.layer_self_attn = layer_self_attn
        self.layer_cross_attn = layer_cross_attn
        self.attn_q_proj = attn_q_proj
        self.attn_k_proj = attn_k_proj
        self.attn_v_proj = attn_v_proj
        self.attn_o_proj = attn_o_proj
        self.attn_qkv_proj = attn_qkv_proj
        self.layer_intermediate_proj = layer_intermediate_proj
        self.layer_output_proj = layer_output_proj
        self.layer_pre_self_attn = layer_pre_self_attn
        self.layer_pre_cross_attn = layer_pre_cross_attn
        self.layer_pre_ffn = layer_pre_ffn
        self.layer_ln_1 = layer_ln_1
        self.layer_ln_2 = layer_ln_2
        self.base_model = base_model
        self._check()

    def _check(self) -> None:
        for name in _PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip(".")):
                raise InterfaceError(f"{name}={value!r} must be a dotted path string or None")
        if self.model_layers is None:
            raise InterfaceError(
                "model_layers is required: the path of the layer list, e.g. 'layers'"
            )
        stacks = self.layer_stacks
        if not stacks or any(not isinstance(s, str) or not s for s in stacks):
            raise InterfaceError(
                f"model_layers={self.model_layers!r} must be a path or a list of paths"
            )
        separate = [self.attn_q_proj, self.attn_k_proj, self.attn_v_proj]
        if self.attn_qkv_proj is not None and any(p is not None for p in separate):
            raise InterfaceError(
                "give either attn_q_proj/attn_k_proj/attn_v_proj or attn_qkv_proj (fused), not both"
            )
        if (
            self.attn_qkv_proj is None
            and any(p is not None for p in separate)
            and not all(p is not None for p in separate)
        ):
            missing = [
                n
                for n, p in zip(("attn_q_proj", "attn_k_proj", "attn_v_proj"), separate)
                if p is None
            ]
            raise InterfaceError(
                f"separate attention projections need all of q, k and v; missing {missing}. "
                "For a fused projection use attn_qkv_proj instead."
            )
        if len(set(self.adapter_methods)) != len(self.adapter_methods):
            raise InterfaceError(f"adapter_methods={self.adapter_methods!r} lists a method twice")

    @property
    def layer_stacks(self) -> list[str]:
        """The layer-list paths as a list (one entry for single-stack models)."""
        if isinstance(self.model_layers, str):
            return [self.model_layers]
        return list(self.model_layers or [])

    @property
    def fused_qkv(self) -> bool:
        """True when attention uses one fused q/k/v projection."""
        return self.attn_qkv_proj is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``from_dict`` restores an equal interface."""
        return {f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterModelInterface:
        """Build an interface from ``to_dict`` output (``adapter_types`` accepted too)."""
        known = {f.name for f in dataclasses.fields(cls)} | {"adapter_types"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InterfaceError(
                f"unknown AdapterModelInterface fields {unknown}; known: {sorted(known)}"
            )
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``adapter_interface.json`` into ``directory`` and return its path."""
        path = os.path.join(directory, INTERFACE_FILENAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> AdapterModelInterface:
        """Read an interface from a JSON file or a directory holding ``adapter_interface.json``."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, INTERFACE_FILENAME)
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value
