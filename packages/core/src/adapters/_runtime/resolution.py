"""Path resolution: an `AdapterModelInterface` resolved against a model into `ModelSites`,
every layer of every stack checked, with errors that name the closest child."""

from __future__ import annotations

import difflib

from torch import nn

from ..errors import InterfaceError, InterfacePathError
from ..interface import AdapterModelInterface
from ..sites import AttentionSite, LayerSite, ModelSites, ModuleSite, ParameterSite, SubBlockSite
from .geometry import _fill_geometry, _text_config, positional_kind


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

    def find_parameter(
        self, start: nn.Module, start_path: str, field_name: str, name: str, value: str
    ) -> ParameterSite:
        owner_path, _, attr = value.rpartition(".")
        if owner_path:
            owner = self.find(start, start_path, field_name, owner_path)
            module, where = owner.module, owner.path
        else:
            module, where = start, start_path
        parametrizations = getattr(module, "parametrizations", None)
        is_param = attr in module._parameters and module._parameters[attr] is not None
        if not is_param and not (parametrizations is not None and attr in parametrizations):
            children = [n for n, p in module.named_parameters(recurse=False)]
            if parametrizations is not None:
                children += list(parametrizations.keys())
            close = difflib.get_close_matches(attr, children, n=1, cutoff=0.5)
            raise InterfacePathError(
                field_name, value, where, attr, children, close[0] if close else None
            )
        path = f"{where}.{attr}" if where else attr
        return ParameterSite(name, path, module, attr)


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
    "ln_cross_attn": "layer_ln_cross_attn",
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
    must exist in at least one stack. A stack's layers are resolved with that stack's
    ``stack_paths`` overrides (`AdapterModelInterface.for_stack`); an override of ``None``
    says the part is absent there.

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
    if interface.model_final_norm is not None:
        sites.final_norm = lookup.find(
            base, base_path, "model_final_norm", interface.model_final_norm
        )
    sites.lm_head = _resolve_lm_head(model, interface, lookup)
    sites.positional = positional_kind(model, base)

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
        stack_interface = interface.for_stack(stack)
        stack_layers = [
            _resolve_layer(lookup, layer, len(sites.layers) + i, stack, i, stack_interface)
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
    config = _text_config(model)
    for layer in sites.layers:
        for attn in (layer.self_attn, layer.cross_attn):
            if attn is not None:
                _fill_geometry(attn, config, layer.index_in_stack, sites.positional)
    return sites


def _resolve_lm_head(
    model: nn.Module, interface: AdapterModelInterface, lookup: _Lookup
) -> ModuleSite | None:
    if interface.model_lm_head is not None:
        return lookup.find(model, "", "model_lm_head", interface.model_lm_head)
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        head = getter()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(head, nn.Module):
        return None
    return ModuleSite("model_lm_head", lookup.path_of(head), head)


def _resolve_base(model: nn.Module, interface: AdapterModelInterface, lookup: _Lookup) -> nn.Module:
    if interface.base_model is not None:
        try:
            return lookup.find(model, "", "base_model", interface.base_model).module
        except InterfacePathError:
            if _is_bare_backbone(model, interface):
                return model
            raise
    candidate = getattr(model, "base_model", None)
    if isinstance(candidate, nn.Module):
        return candidate
    return model


def _is_bare_backbone(model: nn.Module, interface: AdapterModelInterface) -> bool:
    """Whether ``model`` is itself the base model an interface's ``base_model`` path names:
    the path is absent but the layer stacks resolve from the model. AdapterHub resolves the
    base model as ``getattr(model, base_model, model)``, so an interface written for
    ``LlamaForCausalLM`` (``base_model="model"``) also serves a bare ``LlamaModel``; the
    layer check keeps the error about ``base_model`` for a model that has neither."""
    for stack in interface.layer_stacks:
        current: object = model
        for part in stack.split("."):
            current = _child(current, part)
            if current is None:
                return False
    return True


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
    for name, value in interface.layer_parameters.items():
        key = f"layer_parameters[{name!r}]"
        try:
            site.parameters[name] = lookup.find_parameter(layer, layer_path, key, name, value)
        except InterfacePathError as error:
            missing[key] = error
    site.sub_blocks = _sub_blocks(site, interface)
    return site, missing


def _sub_blocks(site: LayerSite, interface: AdapterModelInterface) -> dict[str, SubBlockSite]:
    placement = interface.layer_norm_placement or (
        "post"
        if any(
            getattr(interface, name) is not None
            for name in ("layer_ln_1", "layer_ln_2", "layer_ln_cross_attn")
        )
        else "pre"
    )
    blocks: dict[str, SubBlockSite] = {}
    for kind, attn, residual, norm in (
        ("self_attn", site.self_attn, site.pre_self_attn, site.ln_1),
        ("cross_attn", site.cross_attn, site.pre_cross_attn, site.ln_cross_attn),
    ):
        if attn is not None:
            blocks[kind] = SubBlockSite(
                kind=kind,
                layer_index=site.index,
                output=attn.o if attn.o is not None else attn.attn,
                residual=residual,
                norm=norm if placement != "pre" else None,
                norm_placement=placement,
                layer=site.layer,
            )
    if site.output is not None:
        blocks["ffn"] = SubBlockSite(
            kind="ffn",
            layer_index=site.index,
            output=site.output,
            residual=site.pre_ffn,
            norm=site.ln_2 if placement != "pre" else None,
            norm_placement=placement,
            layer=site.layer,
        )
    return blocks


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
