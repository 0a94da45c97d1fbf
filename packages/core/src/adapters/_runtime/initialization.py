"""`adapters.init`: prepare any model for adapters, and `load_model` for a saved one.

``init`` gives the model's instance a subclass of its own class that adds
`adapters._runtime.api.ModelAdaptersMixin` (the model's class itself is never modified),
resolves the interface into sites, and registers two hooks on the model: a forward pre-hook that
opens the forward context (and replicates the batch for ``Parallel``) and a forward hook that
closes it. Base ``state_dict`` keys and the ``forward`` signature stay as they were.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..checkpoint.adapter import _read_any, add_read_adapter
from ..checkpoint.atomic import READ_ATTEMPTS, identity
from ..checkpoint.model import MODEL_WEIGHTS_NAME, active_setup_of, check_saved_model_folder
from ..checkpoint.readers import load_safetensors, read_json_strict
from ..errors import CheckpointError, InterfaceError
from ..interface import INTERFACE_FILENAME, AdapterModelInterface
from ..registry.loading import distribution_for, get_registry
from . import rollback
from .api import GenerateMixin, ModelAdaptersMixin
from .forward import ForwardHooks
from .fusion import add_read_fusion, read_fusion_once
from .lifecycle import ORIGINAL_CLASS_ATTR, original_class_of
from .recompute import sync_layer_hooks
from .resolution import resolve_sites
from .state import STATE_ATTR, AdaptersState, get_state, is_initialized

_SUBCLASSES: dict[type, type] = {}


def rebuild_adapted_model(original: type) -> nn.Module:
    """An empty instance of the adapted subclass of ``original``; pickle and ``copy`` then
    restore its ``__dict__``. What a pickled adapted model stores instead of its class."""
    instance = original.__new__(original)
    instance.__class__ = adapted_class(original)
    return instance


def _reduce_adapted(self: nn.Module, protocol: Any) -> Any:
    # The subclass has the original's qualified name (so reprs and type(model).__name__ stay
    # the same), under which pickle would find the original class: store the original and
    # rebuild the subclass from it on load.
    return (rebuild_adapted_model, (original_class_of(type(self)),), self.__getstate__())


def adapted_class(cls: type) -> type:
    """The subclass ``init`` gives instances of ``cls`` (one per class, created once)."""
    if issubclass(cls, ModelAdaptersMixin):
        return cls
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        bases: tuple[type, ...] = (ModelAdaptersMixin,)
        if callable(getattr(cls, "generate", None)):
            bases = (GenerateMixin, *bases)
        sub = type(
            cls.__name__,
            (*bases, cls),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
                ORIGINAL_CLASS_ATTR: cls,  # for pickling and merge_and_unload / unload
                "__reduce_ex__": _reduce_adapted,
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
    if not isinstance(model, nn.Module):
        raise InterfaceError(
            f"adapters.init needs a torch.nn.Module (a model); got {type(model).__name__}"
        )
    if is_initialized(model):
        state = get_state(model)
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
    state = AdaptersState(interface=interface, sites=sites)
    hooks = ForwardHooks()
    try:
        with rollback.operation(model):
            model.__class__ = adapted_class(original_class)
            model.__dict__[STATE_ATTR] = state
            for handle in (
                model.register_forward_pre_hook(hooks.pre_forward, with_kwargs=True, prepend=True),
                model.register_forward_hook(hooks.post_forward, with_kwargs=True, always_call=True),
            ):
                state.hook_handles.append(handle)
                rollback.record_undo(model, handle.remove)
            sync_layer_hooks(model, model.training)
            rollback.record_undo(model, lambda: sync_layer_hooks(model, False))
            enabled = {
                spec.plugin
                for m, spec in registry.methods.items()
                if m in interface.adapter_methods
            }
            others = [p for n, p in registry.pm.list_name_plugin() if n not in enabled]
            registry.pm.subset_hook_caller("adapters_init_model", remove_plugins=others)(
                model=model, sites=sites
            )
            if adapters_config:
                _add_adapters(model, adapters_config)
    except BaseException:
        model.__dict__.pop(STATE_ATTR, None)
        model.__class__ = original_class
        raise
    for method in missing:
        dist = distribution_for(method=method)
        warnings.warn(
            "the interface enables "
            + get_registry().unavailable(
                f"adapter method {method!r}, which",
                f"adapter method {method!r} but its plugin is not installed; install it with: "
                f"pip install {dist}",
                method=method,
            ),
            stacklevel=2,
        )
    return model


def _add_adapters(model: nn.Module, configs: Mapping[str, Any]) -> None:
    for name, config in configs.items():
        model.add_adapter(name, config=config)  # type: ignore[operator]


def load_model(
    path: str, model_class: Any, interface: AdapterModelInterface | None = None, **kwargs: Any
) -> Any:
    """Load a model saved with ``save_pretrained`` of an initialised model: the base model
    (``model_class.from_pretrained(path, **kwargs)``; for a plain ``nn.Module`` class,
    ``model_class(**kwargs)`` and ``model.safetensors``), its interface, its adapters, its
    fusion layers and its active setup. ``interface`` (as in AdapterHub) replaces the saved
    ``adapter_interface.json``, which is then not needed.

    The folder is checked first: a half-written folder (no ``adapter_setup.json`` or manifest),
    a folder mixing files of different saves or holding adapter or fusion folders its manifest
    does not list, links leading out of it, a newer format version and adapter names that are
    not plain names (paths) raise `CheckpointError` before anything is loaded. Adapters and
    fusion layers are read from ``path/adapters`` and ``path/adapter_fusions`` only, as the
    manifest lists them. When a save replaces the folder during the load, it is loaded again:
    the model is the old or the new save, never a mix.

    With ``output_loading_info=True`` (a ``from_pretrained`` option) it returns
    ``(model, loading_info)`` as ``from_pretrained`` and AdapterHub's ``load_model`` do;
    ``loading_info`` is transformers' (``missing_keys``, ``unexpected_keys``, ...) for the
    base model; adapters load strictly (a mismatch raises), so they add no keys to it."""
    path = os.fspath(path)
    for attempt in range(READ_ATTEMPTS):
        before = identity(path)
        try:
            result = _load_model_once(path, model_class, interface, dict(kwargs))
        except Exception as error:  # from_pretrained raises many types for a vanished file
            if identity(path) == before:
                raise
            if attempt + 1 < READ_ATTEMPTS:
                continue  # a save replaced the folder meanwhile: load the new one
            raise CheckpointError(
                f"{path!r} was replaced by a save while being loaded ({type(error).__name__}: "
                f"{error}); try again once the saves are done"
            ) from error
        if identity(path) == before:
            return result
    raise CheckpointError(
        f"{path!r} was replaced by saves {READ_ATTEMPTS} times while being loaded; try again "
        "once the saves are done"
    )


def _saved_interface(path: str) -> AdapterModelInterface:
    interface_path = os.path.join(path, INTERFACE_FILENAME)
    if not os.path.isfile(interface_path):
        raise CheckpointError(
            f"{path!r} has no {INTERFACE_FILENAME}; was it saved from a model prepared "
            "with adapters.init? Pass interface=..., or for a plain transformers "
            "checkpoint use from_pretrained + init"
        )
    data = read_json_strict(interface_path)
    try:
        return AdapterModelInterface.from_dict(data)
    except (InterfaceError, TypeError, ValueError) as error:
        raise CheckpointError(f"{interface_path!r} is not a valid interface: {error}") from None


def _load_model_once(
    path: str, model_class: Any, interface: AdapterModelInterface | None, kwargs: dict
) -> Any:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a directory written by save_pretrained")
    interface_given = interface is not None
    if interface is None:
        interface = _saved_interface(path)
    folder = check_saved_model_folder(path, interface_given)
    active = active_setup_of(folder.setup, repr(path))
    info: dict[str, Any] | None = None
    if hasattr(model_class, "from_pretrained"):
        model = model_class.from_pretrained(path, **kwargs)
        if kwargs.get("output_loading_info"):
            model, info = model
    else:
        want_info = bool(kwargs.pop("output_loading_info", False))
        model = model_class(**kwargs)
        weights = load_safetensors(os.path.join(path, MODEL_WEIGHTS_NAME))
        try:
            model.load_state_dict(weights)  # strict: on success nothing is missing or unexpected
        except RuntimeError as error:
            raise CheckpointError(
                f"{os.path.join(path, MODEL_WEIGHTS_NAME)!r} does not fit {model_class.__name__}"
                f"({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {error}"
            ) from None
        if want_info:
            info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    if not isinstance(model, nn.Module):
        raise CheckpointError(
            f"{getattr(model_class, '__name__', model_class)!r} built a "
            f"{type(model).__name__}, not a torch.nn.Module: pass a model class"
        )
    init(model, interface=interface)
    adapters = [(name, _read_any(model, sub, None)) for name, sub in folder.adapters]
    fusions = [(name, read_fusion_once(model, sub)) for name, sub in folder.fusions]
    for name, read in adapters:
        add_read_adapter(model, name, read)
    for name, read in fusions:
        add_read_fusion(model, read, load_as=name)
    if active is not None:
        model.set_active_adapters(active)  # type: ignore[attr-defined]
    return model if info is None else (model, info)
