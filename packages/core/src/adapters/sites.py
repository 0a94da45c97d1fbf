"""Resolve an `AdapterModelInterface` against a model into *sites*: typed handles on the modules
that adapter methods attach to. Plugins receive sites; they never parse interface strings.

Every layer of every stack is checked, not only the first, and a bad path raises an
`InterfacePathError` naming the field, the value, where it was looked up, the closest child
name and the available children.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from .errors import InterfaceError, InterfacePathError
from .interface import AdapterModelInterface


@dataclass(eq=False)
class ModuleSite:
    """One module of the model that adapters may attach to.

    Attributes:
        field: the interface field it came from (``"attn_q_proj"``).
        path: dotted path from the top-level model (``"model.layers.0.self_attn.q_proj"``);
            unique, so plugins use it as a stable, name-independent key.
        module: the module itself.
    """

    field: str
    path: str
    module: nn.Module

    @property
    def in_features(self) -> int | None:
        """Input width of a linear-like module (``nn.Linear``, GPT-2 ``Conv1D``), else None."""
        return projection_shape(self.module)[0]

    @property
    def out_features(self) -> int | None:
        """Output width of a linear-like module, else None."""
        return projection_shape(self.module)[1]


@dataclass(eq=False)
class AttentionSite:
    """An attention module and its projections (``q``/``k``/``v`` or fused ``qkv``, and ``o``)."""

    kind: str  # "self" or "cross"
    attn: ModuleSite
    q: ModuleSite | None = None
    k: ModuleSite | None = None
    v: ModuleSite | None = None
    qkv: ModuleSite | None = None
    o: ModuleSite | None = None

    def projection(self, name: str) -> ModuleSite | None:
        """The projection called ``name`` (``"q"``, ``"k"``, ``"v"``, ``"o"`` or ``"qkv"``)."""
        if name not in ("q", "k", "v", "o", "qkv"):
            raise ValueError(f"unknown attention projection {name!r}; expected q, k, v, o or qkv")
        return getattr(self, name)


@dataclass(eq=False)
class LayerSite:
    """One transformer layer and the hook points inside it.

    Attributes:
        index: position among all layers of all stacks (0-based), as used by ``leave_out`` and
            ReFT's ``layers``.
        stack: the ``model_layers`` path this layer belongs to.
        index_in_stack: position within its stack.
        layer: the layer module itself (its output is the layer's hidden state).
        self_attn / cross_attn: attention sites, or None where the layer has none.
        intermediate / output: the feed-forward up and down projections.
        pre_self_attn / pre_cross_attn / pre_ffn: modules whose input is the residual stream
            before the corresponding sub-block.
        ln_1 / ln_2: norms after the attention and feed-forward sub-blocks.
    """

    index: int
    stack: str
    index_in_stack: int
    layer: ModuleSite
    self_attn: AttentionSite | None = None
    cross_attn: AttentionSite | None = None
    intermediate: ModuleSite | None = None
    output: ModuleSite | None = None
    pre_self_attn: ModuleSite | None = None
    pre_cross_attn: ModuleSite | None = None
    pre_ffn: ModuleSite | None = None
    ln_1: ModuleSite | None = None
    ln_2: ModuleSite | None = None

    @property
    def hidden_size(self) -> int | None:
        """Width of the layer's hidden state, read from its modules (no config needed)."""
        candidates = []
        for attn in (self.self_attn, self.cross_attn):
            if attn is not None and attn.o is not None:
                candidates.append(attn.o.out_features)
        if self.output is not None:
            candidates.append(self.output.out_features)
        for norm in (self.pre_self_attn, self.pre_ffn, self.ln_1, self.ln_2):
            if norm is not None:
                candidates.append(_norm_width(norm.module))
        for attn in (self.self_attn, self.cross_attn):
            if attn is not None:
                for proj in (attn.q, attn.qkv):
                    if proj is not None:
                        candidates.append(proj.in_features)
        if self.intermediate is not None:
            candidates.append(self.intermediate.in_features)
        return next((c for c in candidates if c), None)

    def attention(self, kind: str) -> AttentionSite | None:
        """``"self"`` or ``"cross"`` attention site."""
        if kind == "self":
            return self.self_attn
        if kind == "cross":
            return self.cross_attn
        raise ValueError(f"unknown attention kind {kind!r}; expected 'self' or 'cross'")


@dataclass(eq=False)
class ModelSites:
    """Everything an interface resolves to for one model.

    Attributes:
        model: the top-level model given to ``adapters.init``.
        base_model: the base model (paths ``model_*`` are relative to it).
        embeddings: the token embedding module, if the interface names one.
        layers: every layer of every stack, in order.
        interface: the interface these sites were resolved from.
    """

    model: nn.Module
    base_model: ModuleSite
    interface: AdapterModelInterface
    embeddings: ModuleSite | None = None
    layers: list[LayerSite] = field(default_factory=list)

    def __iter__(self) -> Iterator[LayerSite]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int | None:
        """Hidden width of the first layer that tells it (see `LayerSite.hidden_size`)."""
        return next((s.hidden_size for s in self.layers if s.hidden_size), None)


def projection_shape(module: nn.Module) -> tuple[int | None, int | None]:
    """(in_features, out_features) of a linear-like module, read from the module itself."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D
        return module.weight.shape[0], module.weight.shape[1]
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_f, int) and isinstance(out_f, int):
        return in_f, out_f
    return None, None


def _norm_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if weight is not None and getattr(weight, "ndim", 0) == 1:
        return int(weight.shape[0])
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    return None


class _Lookup:
    """Walks dotted paths, producing `InterfacePathError`s that explain themselves."""

    def __init__(self, root: nn.Module) -> None:
        self.names = {id(m): n for n, m in root.named_modules(remove_duplicate=False)}

    def path_of(self, module: nn.Module) -> str:
        return self.names.get(id(module), "")

    def find(self, start: nn.Module, start_path: str, field_name: str, value: str) -> ModuleSite:
        current, where = start, start_path
        for part in value.split("."):
            child = _child(current, part)
            if child is None:
                children = _child_names(current)
                close = difflib.get_close_matches(part, children, n=1, cutoff=0.5)
                raise InterfacePathError(
                    field_name, value, where, part, children, close[0] if close else None
                )
            current = child
            where = f"{where}.{part}" if where else part
        if not isinstance(current, nn.Module):
            raise InterfaceError(
                f"{field_name}={value!r} in {start_path or '<model>'} is a "
                f"{type(current).__name__}, not a torch.nn.Module"
            )
        return ModuleSite(field_name, self.path_of(current) or where, current)


def _child(module: object, name: str) -> object | None:
    if isinstance(module, nn.Module) and name in module._modules:
        return module._modules[name]
    if isinstance(module, nn.ModuleList | nn.Sequential) and name.isdigit():
        index = int(name)
        return module[index] if index < len(module) else None
    value = getattr(module, name, None)
    return value if isinstance(value, nn.Module) else None


def _child_names(module: object) -> list[str]:
    if isinstance(module, nn.Module):
        return list(module._modules.keys())
    return []


_LAYER_FIELDS = {
    "intermediate": "layer_intermediate_proj",
    "output": "layer_output_proj",
    "pre_self_attn": "layer_pre_self_attn",
    "pre_cross_attn": "layer_pre_cross_attn",
    "pre_ffn": "layer_pre_ffn",
    "ln_1": "layer_ln_1",
    "ln_2": "layer_ln_2",
}
_ATTN_FIELDS = {
    "q": "attn_q_proj",
    "k": "attn_k_proj",
    "v": "attn_v_proj",
    "qkv": "attn_qkv_proj",
    "o": "attn_o_proj",
}


def resolve_sites(model: nn.Module, interface: AdapterModelInterface) -> ModelSites:
    """Resolve ``interface`` against ``model``; validates every layer of every stack.

    With several layer stacks (encoder and decoder), a part may be absent from a whole stack
    (no cross-attention in encoder layers) but not from only some layers of a stack, and it
    must exist in at least one stack.

    Raises:
        InterfacePathError: a path does not resolve; the message names the closest match.
        InterfaceError: the layer list is not a list of modules, or layers of one stack differ.
    """
    lookup = _Lookup(model)
    base = _resolve_base(model, interface, lookup)
    base_path = lookup.path_of(base)
    sites = ModelSites(
        model=model, base_model=ModuleSite("base_model", base_path, base), interface=interface
    )
    if interface.model_embeddings is not None:
        sites.embeddings = lookup.find(
            base, base_path, "model_embeddings", interface.model_embeddings
        )

    multi = len(interface.layer_stacks) > 1
    stacks_lacking: dict[str, int] = {}
    first_error: dict[str, InterfacePathError] = {}
    for stack in interface.layer_stacks:
        layer_list = lookup.find(base, base_path, "model_layers", stack).module
        if not isinstance(layer_list, nn.ModuleList | nn.Sequential) or len(layer_list) == 0:
            raise InterfaceError(
                f"model_layers={stack!r} must name a non-empty nn.ModuleList of layers; found "
                f"{type(layer_list).__name__}"
            )
        stack_layers = [
            _resolve_layer(lookup, layer, len(sites.layers) + i, stack, i, interface)
            for i, layer in enumerate(layer_list)
        ]
        optional_per_stack = _check_consistent(stack, stack_layers, multi)
        for name, error in optional_per_stack.items():
            stacks_lacking[name] = stacks_lacking.get(name, 0) + 1
            first_error.setdefault(name, error)
        sites.layers.extend(site for site, _ in stack_layers)
    for name, count in stacks_lacking.items():
        if count == len(interface.layer_stacks):
            raise first_error[name]
    return sites


def _resolve_base(model: nn.Module, interface: AdapterModelInterface, lookup: _Lookup) -> nn.Module:
    if interface.base_model is not None:
        return lookup.find(model, "", "base_model", interface.base_model).module
    candidate = getattr(model, "base_model", None)
    if isinstance(candidate, nn.Module):
        return candidate
    return model


def _resolve_layer(
    lookup: _Lookup,
    layer: nn.Module,
    index: int,
    stack: str,
    index_in_stack: int,
    interface: AdapterModelInterface,
) -> tuple[LayerSite, dict[str, InterfacePathError]]:
    """Resolve one layer; optional parts that are missing are reported, not raised, so that the
    caller can decide whether a stack may lack them."""
    layer_path = lookup.path_of(layer)
    site = LayerSite(
        index=index,
        stack=stack,
        index_in_stack=index_in_stack,
        layer=ModuleSite("model_layers", layer_path, layer),
    )
    missing: dict[str, InterfacePathError] = {}

    def find(field_name: str, start: nn.Module, start_path: str) -> ModuleSite | None:
        value = getattr(interface, field_name)
        if value is None:
            return None
        try:
            return lookup.find(start, start_path, field_name, value)
        except InterfacePathError as error:
            missing[field_name] = error
            return None

    for kind, field_name in (("self", "layer_self_attn"), ("cross", "layer_cross_attn")):
        attn = find(field_name, layer, layer_path)
        if attn is None:
            continue
        attn_site = AttentionSite(kind=kind, attn=attn)
        for proj, proj_field in _ATTN_FIELDS.items():
            setattr(attn_site, proj, find(proj_field, attn.module, attn.path))
            if f"{proj_field}" in missing:
                # Keep the error per attention kind so both are reported distinctly.
                missing[f"{field_name}.{proj_field}"] = missing.pop(proj_field)
        setattr(site, f"{kind}_attn", attn_site)
    for attr, field_name in _LAYER_FIELDS.items():
        setattr(site, attr, find(field_name, layer, layer_path))
    return site, missing


def _check_consistent(
    stack: str,
    stack_layers: list[tuple[LayerSite, dict[str, InterfacePathError]]],
    multi: bool,
) -> dict[str, InterfacePathError]:
    """Every layer of a stack must have the same parts. Returns the fields this whole stack
    lacks, each with the first error seen (only allowed with several stacks)."""
    fields = set()
    for _, missing in stack_layers:
        fields.update(missing)
    result: dict[str, InterfacePathError] = {}
    for name in sorted(fields):
        failing = [site.index_in_stack for site, missing in stack_layers if name in missing]
        error = next(missing[name] for _, missing in stack_layers if name in missing)
        if len(failing) != len(stack_layers):
            # Present in some layers, missing in others: always an error, named per layer.
            raise InterfaceError(
                f"{error} (in {stack} layer {failing[0]}; layers {failing} of stack {stack!r} "
                "lack it while others have it)"
            )
        if not multi:
            raise error
        result[name] = error
    return result
