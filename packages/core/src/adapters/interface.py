"""`AdapterModelInterface`: a plain, serialisable description of where a model keeps its parts.

Field names say where a path is resolved from: ``model_*`` from the base model, ``layer_*`` from
one transformer layer, ``attn_*`` from an attention module. Values are dotted paths
(``"mlp.up_proj"``). Resolution against a real model happens in :mod:`adapters.sites`.
"""

from __future__ import annotations

import copy
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
    "model_final_norm",
    "model_lm_head",
    "layer_ln_cross_attn",
)

#: Fields a stack may override in ``stack_paths`` (everything resolved from a layer or an
#: attention module).
STACK_FIELDS = (
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
    "layer_ln_cross_attn",
    "layer_norm_placement",
    "layer_parameters",
)

#: Where a layer's norms sit relative to each sub-block's residual add (see `layer_norm_placement`).
NORM_PLACEMENTS = ("pre", "post", "sandwich")

#: Fields added after 0.1; ``to_dict`` leaves them out while unset so that an interface that
#: does not use them still loads in adapters-core 0.1.
_NEW_FIELDS = (
    "layer_ln_cross_attn",
    "model_final_norm",
    "model_lm_head",
    "layer_norm_placement",
    "layer_parameters",
    "stack_paths",
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
            ``base_model`` attribute when it has one, else the model itself. When the path is
            absent but ``model_layers`` resolves from the model itself (a bare backbone such as
            ``LlamaModel`` given an interface written for ``LlamaForCausalLM``), the model is
            its own base model, as in AdapterHub.
        model_final_norm: the norm whose output feeds the LM head (``"norm"`` in Llama,
            ``"decoder.final_layer_norm"`` in T5), relative to the base model.
        model_lm_head: the output embeddings / LM head, relative to the **top-level** model
            (the head sits outside the base model); when not given, the model's
            ``get_output_embeddings()`` is used if it returns a module.
        layer_ln_cross_attn: the norm at the cross-attention sub-block's residual add (BART's
            ``encoder_attn_layer_norm``), relative to a layer.
        layer_norm_placement: where the norms named by ``layer_ln_1``/``layer_ln_2`` sit
            relative to each sub-block's residual add: ``"post"`` (``norm(residual + out)``,
            BERT), ``"sandwich"`` (``residual + norm(out)``, Gemma 2/3) or ``"pre"`` (no norm at
            the add; the norm is the ``layer_pre_*`` module, Llama). Default: ``"post"`` when
            ``layer_ln_1`` or ``layer_ln_2`` is given, else ``"pre"``.
        layer_parameters: parameter sites: ``{name: path}`` of weights that are bare
            ``nn.Parameter`` s rather than modules, relative to a layer (transformers 5 MoE
            experts: ``{"experts.gate_up": "mlp.experts.gate_up_proj"}``).
        stack_paths: per-stack overrides of the layer and attention fields, keyed by a
            ``model_layers`` entry: ``{"decoder.block": {"layer_output_proj":
            "layer.2.DenseReluDense.wo"}}`` (T5). A value of ``None`` says the part is absent
            from that stack.
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
    model_final_norm: str | None = None
    model_lm_head: str | None = None
    layer_ln_cross_attn: str | None = None
    layer_norm_placement: str | None = None
    layer_parameters: dict[str, str] = field(default_factory=dict)
    stack_paths: dict[str, dict[str, Any]] = field(default_factory=dict)

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
        model_final_norm: str | None = None,
        model_lm_head: str | None = None,
        layer_ln_cross_attn: str | None = None,
        layer_norm_placement: str | None = None,
        layer_parameters: dict[str, str] | None = None,
        stack_paths: dict[str, dict[str, Any]] | None = None,
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
        self.model_final_norm = model_final_norm
        self.model_lm_head = model_lm_head
        self.layer_ln_cross_attn = layer_ln_cross_attn
        self.layer_norm_placement = layer_norm_placement
        self.layer_parameters = dict(layer_parameters or {})
        self.stack_paths = {
            str(stack): dict(fields) if isinstance(fields, dict) else fields
            for stack, fields in (stack_paths or {}).items()
        }
        self._check()

    def _check(self) -> None:
        self._check_paths()
        if self.model_layers is None:
            raise InterfaceError(
                "model_layers is required: the path of the layer list, e.g. 'layers'"
            )
        stacks = self.layer_stacks
        if not stacks or any(not isinstance(s, str) or not s for s in stacks):
            raise InterfaceError(
                f"model_layers={self.model_layers!r} must be a path or a list of paths"
            )
        if len(set(self.adapter_methods)) != len(self.adapter_methods):
            raise InterfaceError(f"adapter_methods={self.adapter_methods!r} lists a method twice")
        self._check_stack_paths()

    def _check_paths(self) -> None:
        for name in _PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip(".")):
                raise InterfaceError(f"{name}={value!r} must be a dotted path string or None")
        if self.layer_norm_placement not in (None, *NORM_PLACEMENTS):
            raise InterfaceError(
                f"layer_norm_placement={self.layer_norm_placement!r} is not one of "
                f"{list(NORM_PLACEMENTS)} (or None for the default: 'post' when layer_ln_1/"
                "layer_ln_2 is given, else 'pre')"
            )
        if not isinstance(self.layer_parameters, dict) or any(
            not isinstance(k, str) or not k or not isinstance(v, str) or not v.strip(".")
            for k, v in self.layer_parameters.items()
        ):
            raise InterfaceError(
                f"layer_parameters={self.layer_parameters!r} must map names to dotted parameter "
                "paths, e.g. {'experts.gate_up': 'mlp.experts.gate_up_proj'}"
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

    def _check_stack_paths(self) -> None:
        if not isinstance(self.stack_paths, dict):
            raise InterfaceError(
                f"stack_paths={self.stack_paths!r} must map a model_layers entry to a dict of "
                "field overrides"
            )
        for stack, overrides in self.stack_paths.items():
            if stack not in self.layer_stacks:
                raise InterfaceError(
                    f"stack_paths names the stack {stack!r}, which is not in "
                    f"model_layers={self.layer_stacks!r}; use one of those paths as the key"
                )
            if not isinstance(overrides, dict):
                raise InterfaceError(
                    f"stack_paths[{stack!r}]={overrides!r} must be a dict of field overrides"
                )
            unknown = sorted(set(overrides) - set(STACK_FIELDS))
            if unknown:
                raise InterfaceError(
                    f"stack_paths[{stack!r}] overrides {unknown}, which a stack cannot override; "
                    f"allowed: {list(STACK_FIELDS)}"
                )
            try:
                self.for_stack(stack)._check_paths()
            except InterfaceError as error:
                raise InterfaceError(f"in stack_paths[{stack!r}]: {error}") from None

    def for_stack(self, stack: str) -> AdapterModelInterface:
        """The interface as it applies to the layers of ``stack``: shared fields with that
        stack's ``stack_paths`` overrides applied (and no ``stack_paths`` of its own)."""
        if not self.stack_paths:
            return self
        overrides = self.stack_paths.get(stack) or {}
        effective = copy.copy(self)
        for name, value in overrides.items():
            setattr(effective, name, dict(value) if isinstance(value, dict) else value)
        if effective.layer_parameters is None:
            effective.layer_parameters = {}
        effective.stack_paths = {}
        return effective

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
        """A JSON-serialisable dict; ``from_dict`` restores an equal interface.

        Fields added after 0.1 (final norm, LM head, norm placement, parameter sites, per-stack
        paths) appear only when set, so an interface that does not use them stays readable by
        adapters-core 0.1.
        """
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _NEW_FIELDS and not value:
                continue
            data[f.name] = _copy(value)
        return data

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
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value
