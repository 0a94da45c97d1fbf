"""`adapters.init` and the adapter API it gives a model.

``init`` gives the model's instance a subclass of its own class that adds `ModelAdaptersMixin`
(the model's class itself is never modified), resolves the interface into sites, and registers
two hooks on the model: a forward pre-hook that opens the forward context (and replicates the
batch for ``Parallel``) and a forward hook that closes it. Base ``state_dict`` keys and the
``forward`` signature stay as they were.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import context as ctx_mod
from .composition import (
    AdapterCompositionBlock,
    BatchSplit,
    Parallel,
    SetupLike,
    blocks_used_by,
    expand_parallel,
    parse_composition,
)
from .configs import AdapterConfig, ConfigUnion, config_parts, resolve_config
from .errors import (
    AdapterNotFoundError,
    CompositionError,
    ConfigError,
    InterfaceError,
    NotInitializedError,
)
from .interface import AdapterModelInterface
from .plugins import MethodSpec, distribution_for, get_registry
from .sites import ModelSites, resolve_sites

STATE_ATTR = "_adapters_state"


@dataclass
class AdapterEntry:
    """One added adapter: its config and the modules each method part created."""

    name: str
    config: AdapterConfig
    modules: dict[str, nn.Module] = field(default_factory=dict)
    merged: bool = False

    @property
    def methods(self) -> list[str]:
        return [c.method for c in config_parts(self.config)]

    def parameters(self) -> Iterable[nn.Parameter]:
        seen: set[int] = set()
        for module in self.modules.values():
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under name-independent keys ``{key}.{param}``."""
        result: dict[str, torch.Tensor] = {}
        for key, module in self.modules.items():
            for pname, tensor in module.state_dict().items():
                result[f"{key}.{pname}"] = tensor
        return result


@dataclass
class AdaptersState:
    """Per-model state kept by core (a plain object on the model instance, not a module)."""

    interface: AdapterModelInterface
    sites: ModelSites
    adapters: dict[str, AdapterEntry] = field(default_factory=dict)
    active_setup: AdapterCompositionBlock | None = None
    hook_handles: list[Any] = field(default_factory=list)
    original_class: type | None = None
    missing_methods: list[str] = field(default_factory=list)
    # Activation checkpointing re-runs layers during backward, after the model call that ran
    # them has returned. Each training call's context is remembered per layer input (see
    # _LayerHooks) so a re-run layer gets the context of the call it recomputes;
    # ``last_training_context`` is the fallback.
    last_training_context: Any = None
    layer_contexts: OrderedDict = field(default_factory=OrderedDict)
    recompute_context: Any = None
    layer_hook_handles: list[Any] = field(default_factory=list)  # only while in train mode

    def __deepcopy__(self, memo: dict) -> AdaptersState:
        # Modules inside are deep-copied through the memo, so copies point at the copied model.
        new = copy.copy(self)
        memo[id(self)] = new
        new.sites = copy.deepcopy(self.sites, memo)
        new.adapters = copy.deepcopy(self.adapters, memo)
        new.active_setup = self.active_setup
        new.hook_handles = []  # the copied model's hooks live in its own hook dicts
        new.last_training_context = None
        new.layer_contexts = OrderedDict()
        new.recompute_context = None
        new.layer_hook_handles = copy.deepcopy(self.layer_hook_handles, memo)
        return new


def _state(model: nn.Module) -> AdaptersState:
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise NotInitializedError(
            f"{type(model).__name__} is not prepared for adapters; call "
            "adapters.init(model, interface=...) first"
        )
    return state


def is_initialized(model: nn.Module) -> bool:
    """Whether ``adapters.init`` has prepared ``model``."""
    return STATE_ATTR in model.__dict__


# ---------------------------------------------------------------------------------------------
# Forward context hooks
# ---------------------------------------------------------------------------------------------


class _ForwardHooks:
    """The pre-hook and hook core registers on the top-level model (bound methods, so that
    ``copy.deepcopy`` of the model keeps them working)."""

    def pre_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        state = model.__dict__.get(STATE_ATTR)
        if state is None:
            return None
        setup = effective_setup(model)
        branches = 1
        if setup is not None:
            parallel = expand_parallel(setup)
            if parallel is not None:
                args, kwargs, batch = _replicate_inputs(args, kwargs, len(parallel))
                branches = len(parallel)
                setup = BatchSplit(*parallel.children, batch_sizes=[batch] * branches)
        ctx = _build_context(
            model, setup, args, _with_positional_names(model, args, kwargs), branches
        )
        ctx_mod.push_context(ctx)
        return (args, kwargs) if branches > 1 else None

    def post_forward(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state = model.__dict__.get(STATE_ATTR)
        if state is None:
            return
        if not ctx_mod.is_compiling():
            ctx = ctx_mod.current_context()
            if (
                ctx is not None
                and ctx.model is model
                and model.training
                and torch.is_grad_enabled()
            ):
                state.last_training_context = ctx
        ctx_mod.pop_context()


_POSITIONAL_NAMES: dict[type, list[str]] = {}


def _with_positional_names(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """``kwargs`` plus positional arguments under their parameter names (e.g. a mask passed
    as ``model(ids, mask)``), for reading inputs; the call itself is not changed."""
    if not args:
        return kwargs
    cls = type(model)
    names = _POSITIONAL_NAMES.get(cls)
    if names is None:
        try:
            params = inspect.signature(cls.forward).parameters.values()
        except (TypeError, ValueError):
            params = []
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [p.name for p in params if p.kind in kinds][1:]  # drop self
        _POSITIONAL_NAMES[cls] = names
    named = dict(zip(names, args))
    named.update(kwargs)
    return named


class _LayerHooks:
    """A forward pre-hook on every layer, active only in training mode.

    During a model call it remembers the call's context under the layer's input tensor; when
    activation checkpointing re-runs the layer during backward (no model call open), the same
    saved input identifies the call being recomputed and its context is made current for the
    layer's methods (`adapters.context.context_for`). This keeps gradients right even when
    several training calls run before one ``backward()``. (Reentrant checkpointing runs the
    first pass without gradients, so calls are remembered whether or not gradients are on.)
    """

    MAX_CALLS = 16  # training calls remembered per layer before the oldest are forgotten

    def __init__(self, model: nn.Module) -> None:
        self.__dict__["model"] = model

    def pre_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        model = self.__dict__["model"]
        if not model.training or ctx_mod.is_compiling():
            return
        state = model.__dict__.get(STATE_ATTR)
        hidden = args[0] if args else kwargs.get("hidden_states")
        if state is None or not isinstance(hidden, torch.Tensor):
            return
        key = (id(module), hidden.data_ptr(), tuple(hidden.shape))
        ctx = ctx_mod.current_context()
        if ctx is not None and ctx.model is model:
            state.layer_contexts[key] = ctx
            state.layer_contexts.move_to_end(key)
            while len(state.layer_contexts) > self.MAX_CALLS * len(state.sites.layers):
                state.layer_contexts.popitem(last=False)
        elif ctx is None and torch.is_grad_enabled():
            state.recompute_context = state.layer_contexts.get(key)


def _sync_layer_hooks(model: nn.Module, training: bool) -> None:
    """Attach the `_LayerHooks` pre-hooks in train mode and remove them in eval mode, so that
    inference pays nothing for them."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        return
    if training and not state.layer_hook_handles:
        hooks = _LayerHooks(model)
        state.layer_hook_handles = [
            layer.layer.module.register_forward_pre_hook(
                hooks.pre_layer, with_kwargs=True, prepend=True
            )
            for layer in state.sites.layers
        ]
    elif not training and state.layer_hook_handles:
        for handle in state.layer_hook_handles:
            handle.remove()
        state.layer_hook_handles = []
        state.layer_contexts.clear()
        state.recompute_context = state.last_training_context = None


def effective_setup(model: nn.Module) -> AdapterCompositionBlock | None:
    """The setup a forward call of ``model`` runs with: the innermost open `AdapterSetup`, else
    the model's active setup. Merged adapters are skipped by their plugins, not here."""
    overrides = ctx_mod.setup_override()
    if overrides:
        return overrides[-1]
    return _state(model).active_setup


_NOT_BATCHED = {
    "cache_position",
    "past_key_values",
    "cache",
    "use_cache",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "logits_to_keep",
}


def _replicate_inputs(args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict, int]:
    batch = _batch_size(args, kwargs)
    if batch is None:
        raise CompositionError("Parallel needs tensor inputs with a batch dimension")
    cache = _cache_of(kwargs)
    if cache is not None and _cache_len(cache) > 0:
        raise CompositionError(
            "Parallel with a filled KV cache is not supported; run generate() per adapter with "
            "AdapterSetup(name), or pass use_cache=False"
        )

    def rep(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            return value.repeat(n, *([1] * (value.ndim - 1)))
        return value

    new_args = tuple(rep(a) for a in args)
    new_kwargs = {k: (v if k in _NOT_BATCHED else rep(v)) for k, v in kwargs.items()}
    return new_args, new_kwargs, batch


def _cache_of(kwargs: dict) -> Any:
    # transformers 4.x calls it past_key_values; 5.x generate passes it as cache
    for key in ("past_key_values", "cache"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


def _cache_len(cache: Any) -> int:
    getter = getattr(cache, "get_seq_length", None)
    if callable(getter):
        try:
            return int(getter())
        except Exception:
            return 0
    if isinstance(cache, tuple | list) and cache and isinstance(cache[0], tuple | list):
        return int(cache[0][0].shape[-2])
    return 0


def _main_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for key in ("input_ids", "inputs_embeds", "input_values", "pixel_values", "input_features"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return None


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    main = _main_input(args, kwargs)
    return int(main.shape[0]) if main is not None and main.ndim >= 1 else None


def _build_context(
    model: nn.Module,
    setup: AdapterCompositionBlock | None,
    args: tuple,
    kwargs: dict,
    branches: int,
) -> ctx_mod.ForwardContext:
    main = _main_input(args, kwargs)
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        mask = None
    batch = int(main.shape[0]) if main is not None else None
    length = int(main.shape[1]) if main is not None and main.ndim >= 2 else None
    past = 0
    if mask is not None and length is not None:
        past = max(int(mask.shape[1]) - length, 0)
    else:
        cache = _cache_of(kwargs)
        if cache is not None:
            past = _cache_len(cache)
        elif isinstance(kwargs.get("cache_position"), torch.Tensor):
            past = int(kwargs["cache_position"][0])
    prompt = ctx_mod.generation_prompt_length()
    return ctx_mod.ForwardContext(
        model=model,
        setup=setup,
        attention_mask=mask,
        batch_size=batch,
        input_length=length,
        past_length=past,
        prompt_length=prompt,
        device=main.device if main is not None else None,
        parallel_branches=branches,
    )


# ---------------------------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------------------------

_SUBCLASSES: dict[type, type] = {}


def _adapter_class(cls: type) -> type:
    if issubclass(cls, ModelAdaptersMixin):
        return cls
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        bases: tuple[type, ...] = (ModelAdaptersMixin,)
        if callable(getattr(cls, "generate", None)):
            bases = (_GenerateMixin, *bases)
        sub = type(
            cls.__name__,
            (*bases, cls),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
            },
        )
        _SUBCLASSES[cls] = sub
    return sub


def init(
    model: nn.Module,
    interface: AdapterModelInterface | Mapping[str, Any] | None = None,
    adapters_config: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Prepare ``model`` for adapters and return it.

    Args:
        model: any ``torch.nn.Module`` (a transformers model or your own).
        interface: where the model keeps its parts (an `AdapterModelInterface` or its dict).
            May be omitted when the model is already initialised.
        adapters_config: optional ``{name: config}`` of adapters to add right away.

    Idempotent (a second call returns the model unchanged) and atomic: if validation or a
    plugin fails, the model is exactly as before (module tree, class, ``state_dict`` keys).
    A method listed in the interface whose plugin is not installed gives a warning naming the
    package to install.
    """
    if is_initialized(model):
        state = _state(model)
        if interface is not None:
            given = (
                interface
                if isinstance(interface, AdapterModelInterface)
                else AdapterModelInterface.from_dict(dict(interface))
            )
            if given.to_dict() != state.interface.to_dict():
                raise InterfaceError(
                    "model is already initialised with a different interface; start from a "
                    "fresh model to use another one"
                )
        if adapters_config:
            _add_adapters(model, adapters_config)
        return model
    if interface is None:
        raise InterfaceError(
            f"adapters.init needs interface=AdapterModelInterface(...) describing where "
            f"{type(model).__name__} keeps its layers and projections"
        )
    if isinstance(interface, Mapping):
        interface = AdapterModelInterface.from_dict(dict(interface))
    if not isinstance(interface, AdapterModelInterface):
        raise InterfaceError(
            f"interface must be an AdapterModelInterface, got {type(interface).__name__}"
        )
    sites = resolve_sites(model, interface)  # validates; touches nothing

    registry = get_registry()
    missing = [m for m in interface.adapter_methods if m not in registry.methods]
    original_class = type(model)
    state = AdaptersState(
        interface=interface, sites=sites, original_class=original_class, missing_methods=missing
    )
    hooks = _ForwardHooks()
    snapshot = _Snapshot(model)
    try:
        model.__class__ = _adapter_class(original_class)
        model.__dict__[STATE_ATTR] = state
        state.hook_handles.append(
            model.register_forward_pre_hook(hooks.pre_forward, with_kwargs=True, prepend=True)
        )
        state.hook_handles.append(
            model.register_forward_hook(hooks.post_forward, with_kwargs=True, always_call=True)
        )
        _sync_layer_hooks(model, model.training)
        enabled = {
            spec.plugin for m, spec in registry.methods.items() if m in interface.adapter_methods
        }
        others = [p for n, p in registry.pm.list_name_plugin() if n not in enabled]
        registry.pm.subset_hook_caller("adapters_init_model", remove_plugins=others)(
            model=model, sites=sites
        )
        if adapters_config:
            _add_adapters(model, adapters_config)
    except BaseException:
        snapshot.restore()  # modules and hooks a plugin or an adapter added
        model.__dict__.pop(STATE_ATTR, None)
        model.__class__ = original_class
        raise
    for method in missing:
        warnings.warn(
            f"the interface enables adapter method {method!r} but its plugin is not installed; "
            f"install it with: pip install {distribution_for(method=method)}",
            stacklevel=2,
        )
    return model


def _add_adapters(model: nn.Module, configs: Mapping[str, Any]) -> None:
    for name, config in configs.items():
        model.add_adapter(name, config=config)  # type: ignore[operator]


# ---------------------------------------------------------------------------------------------
# Atomicity helper
# ---------------------------------------------------------------------------------------------


class _Snapshot:
    """Records a model's module tree and hooks so a failed operation can be rolled back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.children = {id(m): dict(m._modules) for m in model.modules()}
        self.modules = list(model.modules())
        self.hooks = {
            id(m): (
                dict(m._forward_hooks),
                dict(m._forward_pre_hooks),
                dict(getattr(m, "_forward_hooks_with_kwargs", {})),
                dict(getattr(m, "_forward_pre_hooks_with_kwargs", {})),
                dict(getattr(m, "_forward_hooks_always_called", {})),
            )
            for m in self.modules
        }
        self.params = {id(m): dict(m._parameters) for m in self.modules}

    def restore(self) -> None:
        for m in self.modules:
            m._modules.clear()
            m._modules.update(self.children[id(m)])
            m._parameters.clear()
            m._parameters.update(self.params[id(m)])
            fwd, pre, fwd_kw, pre_kw, always = self.hooks[id(m)]
            for attr, saved in (
                ("_forward_hooks", fwd),
                ("_forward_pre_hooks", pre),
                ("_forward_hooks_with_kwargs", fwd_kw),
                ("_forward_pre_hooks_with_kwargs", pre_kw),
                ("_forward_hooks_always_called", always),
            ):
                current = getattr(m, attr, None)
                if current is not None:
                    current.clear()
                    current.update(saved)


# ---------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------


class ModelAdaptersMixin:
    """The adapter API ``adapters.init`` gives a model (names as in AdapterHub ``adapters``)."""

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def adapter_interface(self) -> AdapterModelInterface:
        """The interface this model was initialised with."""
        return _state(self).interface

    @property
    def adapter_sites(self) -> ModelSites:
        """The resolved sites (what plugins attach to)."""
        return _state(self).sites

    @property
    def adapters_config(self) -> dict[str, AdapterConfig]:
        """``{name: config}`` of every added adapter."""
        return {n: e.config for n, e in _state(self).adapters.items()}

    def has_adapters(self) -> bool:
        """Whether any adapter has been added."""
        return bool(_state(self).adapters)

    def _entry(self, name: str) -> AdapterEntry:
        entries = _state(self).adapters
        if name not in entries:
            known = ", ".join(entries) or "(none)"
            raise AdapterNotFoundError(f"no adapter named {name!r}; added adapters: {known}")
        return entries[name]

    # -- add / delete ---------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        config: Any = None,
        overwrite_ok: bool = False,
        set_active: bool = False,
    ) -> None:
        """Add a new adapter called ``adapter_name``.

        Args:
            config: a config object, dict, preset string (``"lora[r=16]"``), union
                (``"lora|loreft"``) or JSON path; default: the first method of the interface's
                default preset (e.g. ``"lora"``).
            overwrite_ok: replace an existing adapter of that name instead of raising.
            set_active: make it the active setup.
        """
        state = _state(self)
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ConfigError(
                f"adapter name {adapter_name!r} must be a non-empty string without '.'"
            )
        if adapter_name in state.adapters and not overwrite_ok:
            raise ConfigError(
                f"an adapter named {adapter_name!r} already exists; pass overwrite_ok=True to "
                "replace it or choose another name"
            )
        config = self._default_config() if config is None else resolve_config(config)
        self._check_method_enabled(config)
        registry = get_registry()
        snapshot = _Snapshot(self)
        old_entry = state.adapters.get(adapter_name)
        old_active = state.active_setup
        if old_entry is not None:
            self.delete_adapter(adapter_name)
        entry = AdapterEntry(name=adapter_name, config=config)
        try:
            for part in config_parts(config):
                registry.method_of(part)
                modules = registry.hook.adapters_add_adapter(
                    model=self, sites=state.sites, name=adapter_name, config=part
                )
                if modules is None:
                    raise ConfigError(
                        f"no installed plugin created an adapter for {type(part).__name__}"
                    )
                prefix = f"{part.method}/" if isinstance(config, ConfigUnion) else ""
                for key, module in modules.items():
                    entry.modules[prefix + key] = module
            self._check_registered(entry)
            # Every module the plugin created (units and their hosts) follows the model's
            # train/eval mode, so e.g. dropout stays off in a model loaded for inference.
            known = {id(m) for m in snapshot.modules}
            for module in self.modules():  # type: ignore[attr-defined]
                if id(module) not in known:
                    module.training = self.training  # type: ignore[attr-defined]
            state.adapters[adapter_name] = entry
        except BaseException:
            snapshot.restore()
            if old_entry is not None:
                state.adapters[adapter_name] = old_entry
                state.active_setup = old_active
            raise
        if set_active:
            self.set_active_adapters(adapter_name)

    def _default_config(self) -> AdapterConfig:
        registry = get_registry()
        for method in _state(self).interface.adapter_methods:
            spec = registry.methods.get(method)
            if spec is not None and spec.presets:
                return next(iter(spec.presets.values()))
        raise ConfigError("add_adapter needs config=... (no installed method has a default preset)")

    def _check_method_enabled(self, config: AdapterConfig) -> None:
        state = _state(self)
        registry = get_registry()
        for part in config_parts(config):
            if part.method not in state.interface.adapter_methods:
                raise ConfigError(
                    f"{type(part).__name__} is a {part.method!r} adapter but the interface enables "
                    f"only {state.interface.adapter_methods}; add {part.method!r} to adapter_methods"
                )
            if part.method not in registry.methods:
                raise registry.missing_method_error(part.method)

    def _check_registered(self, entry: AdapterEntry) -> None:
        inside = {id(m) for m in self.modules()}  # type: ignore[attr-defined]
        for key, module in entry.modules.items():
            if id(module) not in inside:
                raise ConfigError(
                    f"plugin returned module {key!r} for adapter {entry.name!r} that is not a "
                    "submodule of the model; register it (e.g. in a ModuleDict on the site)"
                )

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter, its modules and hooks. A merged adapter's weights stay merged."""
        state = _state(self)
        entry = self._entry(adapter_name)
        registry = get_registry()
        for part in config_parts(entry.config):
            registry.hook.adapters_delete_adapter(
                model=self, sites=state.sites, name=adapter_name, config=part
            )
        del state.adapters[adapter_name]
        if state.active_setup is not None and adapter_name in state.active_setup.flatten():
            self._set_setup(None)

    # -- activation ---------------------------------------------------------------------------
    def set_active_adapters(self, adapter_setup: SetupLike, skip_layers: Any = None) -> None:
        """Make ``adapter_setup`` (a name, list of names, composition block, or None) the setup
        every forward call uses. Validated here: unknown adapters, blocks a method does not
        support and bad nesting raise `CompositionError`."""
        if skip_layers is not None:
            raise CompositionError("skip_layers is not supported; use leave_out in the config")
        setup = parse_composition(adapter_setup)
        if setup is not None:
            self.validate_setup(setup)
        self._set_setup(setup)

    def _set_setup(self, setup: AdapterCompositionBlock | None) -> None:
        state = _state(self)
        state.active_setup = setup
        get_registry().hook.adapters_setup_changed(model=self, sites=state.sites, setup=setup)

    def validate_setup(self, setup: AdapterCompositionBlock) -> None:
        """Raise `CompositionError` if ``setup`` cannot run on this model."""
        state = _state(self)
        registry = get_registry()
        expand_parallel(setup)  # raises for Parallel in unsupported places
        for name, blocks in blocks_used_by(setup).items():
            if name not in state.adapters:
                known = ", ".join(state.adapters) or "(none)"
                raise CompositionError(
                    f"setup uses adapter {name!r}, which is not added; added: {known}"
                )
            for part in config_parts(state.adapters[name].config):
                spec: MethodSpec = registry.method_of(part)
                supported = set(spec.compositions)
                if BatchSplit in supported:
                    supported.add(Parallel)
                unsupported = sorted(b.__name__ for b in blocks - supported)
                if unsupported:
                    allowed = sorted(b.__name__ for b in supported) or ["a single adapter"]
                    raise CompositionError(
                        f"adapter {name!r} ({spec.name}) cannot be used in {', '.join(unsupported)}; "
                        f"the {spec.name} method supports {', '.join(allowed)}"
                    )

    @property
    def active_adapters(self) -> AdapterCompositionBlock | None:
        """The active setup (a composition block) or None."""
        return _state(self).active_setup

    @active_adapters.setter
    def active_adapters(self, setup: SetupLike) -> None:
        self.set_active_adapters(setup)

    # -- training ---------------------------------------------------------------------------
    def _adapter_param_ids(self) -> set[int]:
        return {id(p) for e in _state(self).adapters.values() for p in e.parameters()}

    def freeze_model(self, freeze: bool = True) -> None:
        """Freeze (or unfreeze) every parameter of the base model, heads included; adapter
        parameters are left as they are."""
        adapter_ids = self._adapter_param_ids()
        for p in self.parameters():  # type: ignore[attr-defined]
            if id(p) not in adapter_ids:
                p.requires_grad_(not freeze)

    def train(self, mode: bool = True) -> Any:
        """``nn.Module.train``; also attaches (train) or removes (eval) the per-layer pre-hooks
        that keep activation checkpointing exact, so that inference does not pay for them."""
        result = super().train(mode)  # type: ignore[misc]
        _sync_layer_hooks(self, mode)  # type: ignore[arg-type]
        return result

    def train_adapter(self, adapter_setup: SetupLike, train_embeddings: bool = False) -> None:
        """Train only the adapters in ``adapter_setup``: everything else (base model, heads,
        other adapters) is frozen; the setup becomes active and the model goes to train mode."""
        setup = parse_composition(adapter_setup)
        if setup is None:
            raise CompositionError("train_adapter needs at least one adapter name")
        self.validate_setup(setup)
        for p in self.parameters():  # type: ignore[attr-defined]
            p.requires_grad_(False)
        for name in setup.flatten():
            for p in self._entry(name).parameters():
                p.requires_grad_(True)
        if train_embeddings:
            embeddings = _state(self).sites.embeddings
            if embeddings is None:
                raise InterfaceError(
                    "train_embeddings=True needs model_embeddings in the interface"
                )
            for p in embeddings.module.parameters():
                p.requires_grad_(True)
        self._set_setup(setup)
        self.train()  # type: ignore[attr-defined]

    # -- merging ---------------------------------------------------------------------------
    def merge_adapter(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights. The forward pass then gives the same
        outputs as the unmerged, active adapter; the merged adapter adds no compute."""
        entry = self._entry(name)
        if entry.merged:
            raise ConfigError(f"adapter {name!r} is already merged; reset_adapter({name!r}) first")
        registry = get_registry()
        state = _state(self)
        for part in config_parts(entry.config):
            spec = registry.method_of(part)
            if not spec.can_merge:
                raise ConfigError(
                    f"adapter {name!r} is a {spec.name!r} adapter, which cannot be merged into the "
                    "base weights"
                )
        for part in config_parts(entry.config):
            done = registry.hook.adapters_merge_adapter(
                model=self, sites=state.sites, name=name, config=part
            )
            if not done:
                raise ConfigError(f"no plugin merged adapter {name!r} ({part.method})")
        entry.merged = True

    def reset_adapter(self, name: str | None = None) -> None:
        """Undo merging: restore the original base weights (all merged adapters if ``name`` is
        None). The adapter stays added and can be used unmerged again."""
        state = _state(self)
        names = [name] if name is not None else [n for n, e in state.adapters.items() if e.merged]
        registry = get_registry()
        for n in names:
            entry = self._entry(n)
            if not entry.merged:
                raise ConfigError(f"adapter {n!r} is not merged; nothing to reset")
            for part in reversed(config_parts(entry.config)):
                registry.hook.adapters_reset_adapter(
                    model=self, sites=state.sites, name=n, config=part
                )
            entry.merged = False

    def merge_and_unload(self, name: str | None = None) -> None:
        """Merge adapter ``name`` (default: every adapter of the active setup) and remove the
        adapter machinery, leaving a plain model with updated weights, for deployment."""
        state = _state(self)
        if name is not None:
            names = [name]
        elif state.active_setup is not None:
            names = state.active_setup.flatten()
        else:
            raise ConfigError("merge_and_unload needs an adapter name or an active setup")
        for n in names:
            if not self._entry(n).merged:
                self.merge_adapter(n)
            self.delete_adapter(n)

    def is_merged(self, name: str) -> bool:
        """Whether adapter ``name`` is merged into the base weights."""
        return self._entry(name).merged

    # -- access ---------------------------------------------------------------------------
    def get_adapter(self, name: str) -> dict[str, nn.Module]:
        """The modules of adapter ``name`` under their name-independent keys."""
        return dict(self._entry(name).modules)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of adapter ``name`` under name-independent keys (what is saved)."""
        return self._entry(name).state_dict()

    def adapter_to(self, name: str, device: Any = None, dtype: torch.dtype | None = None) -> None:
        """Move adapter ``name``'s modules to ``device`` and/or ``dtype``."""
        for module in self._entry(name).modules.values():
            module.to(device=device, dtype=dtype)

    def adapter_summary(self, as_dict: bool = False) -> str | list[dict[str, Any]]:
        """A table of the adapters: name, architecture, #param, %param, active, train, and a
        "Full model" row. ``as_dict=True`` returns the rows as dicts (exact integer #param)."""
        state = _state(self)
        adapter_ids = self._adapter_param_ids()
        base_params = [p for p in self.parameters() if id(p) not in adapter_ids]  # type: ignore
        total_base = sum(p.numel() for p in base_params)
        active = set(state.active_setup.flatten()) if state.active_setup else set()
        rows = []
        for name, entry in state.adapters.items():
            params = list(entry.parameters())
            count = sum(p.numel() for p in params)
            rows.append(
                {
                    "name": name,
                    "architecture": "union"
                    if isinstance(entry.config, ConfigUnion)
                    else entry.config.method,
                    "#param": count,
                    "%param": 100.0 * count / total_base if total_base else 0.0,
                    "active": name in active,
                    "train": any(p.requires_grad for p in params),
                }
            )
        rows.append(
            {
                "name": "Full model",
                "architecture": "",
                "#param": total_base,
                "%param": 100.0,
                "active": True,
                "train": any(p.requires_grad for p in base_params),
            }
        )
        if as_dict:
            return rows
        return _format_summary(rows)

    # -- saving / loading (see adapters.saving) ---------------------------------------------
    def save_adapter(
        self, save_directory: str, adapter_name: str, format: str | None = None, **kwargs: Any
    ) -> None:
        """Save adapter ``adapter_name`` into ``save_directory`` (created or replaced
        atomically): ``adapter_config.json`` + ``adapter_model.safetensors``. ``format="peft"``
        (or another registered foreign format) writes that format instead."""
        from .saving import save_adapter

        save_adapter(self, save_directory, adapter_name, format=format, **kwargs)

    def load_adapter(
        self,
        adapter_name_or_path: str,
        config: Any = None,
        load_as: str | None = None,
        set_active: bool = False,
        **kwargs: Any,
    ) -> str:
        """Load an adapter directory (this library's format, or a foreign one a plugin reads,
        such as PEFT or AdapterHub); returns the adapter's name. ``config`` overrides the saved
        config (for ambiguous foreign checkpoints); ``load_as`` renames it."""
        from .saving import load_adapter

        return load_adapter(
            self,
            adapter_name_or_path,
            config=config,
            load_as=load_as,
            set_active=set_active,
            **kwargs,
        )

    def save_all_adapters(self, save_directory: str, **kwargs: Any) -> None:
        """Save every adapter into ``save_directory/<name>``."""
        from .saving import save_all_adapters

        save_all_adapters(self, save_directory, **kwargs)

    def load_all_adapters(self, directory: str, set_active: bool = False) -> list[str]:
        """Load every adapter directory saved by ``save_all_adapters``; returns their names."""
        from .saving import load_all_adapters

        return load_all_adapters(self, directory, set_active=set_active)

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
        """The base model's ``save_pretrained`` without adapter tensors, plus
        ``adapter_interface.json``, the active setup and every adapter in ``adapters/<name>``;
        ``adapters.load_model(save_directory, ModelClass)`` restores all of it."""
        from .saving import save_pretrained

        save_pretrained(self, save_directory, *args, **kwargs)

    def average_adapter(
        self,
        adapter_name: str,
        adapter_list: list[str],
        weights: list[float] | None = None,
        combine_strategy: str = "linear",
        normalize_weights: bool = True,
        overwrite_ok: bool = False,
        set_active: bool = False,
        **options: Any,
    ) -> None:
        """Add ``adapter_name`` as a weighted combination of ``adapter_list``.

        ``combine_strategy="linear"`` takes the weighted sum of every parameter (all sources must
        have the same config); methods may offer others (LoRA: ``"lora_delta_w_svd"``)."""
        from .averaging import average_adapter

        average_adapter(
            self,
            adapter_name,
            adapter_list,
            weights,
            combine_strategy,
            normalize_weights,
            overwrite_ok,
            set_active,
            options,
        )


class _GenerateMixin:
    """Added only for classes that have ``generate``."""

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` of the model's class, with the prompt length made known to methods that
        treat prompt and generated tokens differently (ReFT). A ``Parallel`` setup is refused:
        generation keeps one sequence per example, while Parallel multiplies the batch."""
        setup = effective_setup(self)  # type: ignore[arg-type]
        if setup is not None and expand_parallel(setup) is not None:
            raise CompositionError(
                f"generate() cannot run the Parallel setup {setup.name}; generate once per "
                "branch instead, e.g. `with AdapterSetup('a'): model.generate(...)`"
            )
        inputs = kwargs.get(
            "input_ids",
            args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("inputs_embeds"),
        )
        prompt = (
            int(inputs.shape[1]) if isinstance(inputs, torch.Tensor) and inputs.ndim >= 2 else None
        )
        with ctx_mod.generation_scope(prompt):
            return super().generate(*args, **kwargs)  # type: ignore[misc]


def _format_summary(rows: list[dict[str, Any]]) -> str:
    header = ["Name", "Architecture", "#Param", "%Param", "Active", "Train"]
    table = [
        [
            r["name"],
            r["architecture"],
            f"{r['#param']:,}",
            f"{r['%param']:.3f}",
            "yes" if r["active"] else "no",
            "yes" if r["train"] else "no",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return " | ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    rule = "-" * len(line(header))
    body = [line(row) for row in table[:-1]]
    return "\n".join([rule, line(header), rule, *body, rule, line(table[-1]), rule])
