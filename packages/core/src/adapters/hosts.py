"""`AdapterHost`: the base class of the modules that hold a method's adapters at one site.

A host is a child module of the site it adapts (``q_proj.adapters_lora``, a layer's
``adapters_reft``); it holds one unit per adapter in a ``ModuleDict`` and owns everything a
method would otherwise re-implement:

- **the one way into the forward pass**: `add_hook` (a forward hook or pre-hook on any module),
  `add_sub_block_hook` (a sub-block's output with its residual input, `adapters.subblocks`),
  `add_virtual_tokens` (embeddings prepended to the model input, `adapters.virtual`) and
  `add_kv_prefix` (keys and values prepended to an attention, `adapters.prefix`). Each returns
  a `Handle` (an object with ``remove()``) that the host keeps; `remove_hooks` and `detach`
  remove them all, and a failed core operation removes those it registered (copies and pickles
  of the model keep working: torch re-binds a hook handle to the copied model's hook
  dictionaries, and the other handles refer to the copied model);
- **activity**: `owns` (this host holds the adapter and it is not merged) and `is_active` (the
  setup names one of them), cached per setup object in eager mode so an added but inactive
  adapter costs one hook call that returns at once; under ``torch.compile`` the answer is folded
  into the graph (Dynamo guards on the setup) and nothing is cached;
- **merge bookkeeping**: `merged` (names merged into the site's weights), `keep_original` /
  `restore_original` (the original weight and bias, kept once for a bit-exact reset);
- **rollback**: every change it makes during a core operation (attaching, hooks, units,
  parametrisations, `protect`-ed tensors) is recorded in the operation's undo log
  (`adapters._runtime.rollback`), so a failed ``add_adapter`` leaves the model exactly as it was.

Minimal use (the example plugin, ``examples/adapters-hidden-scale``)::

    class ScaleHost(AdapterHost):
        def hook(self, module, args, output):
            setup = context_for(self.model).setup
            if not self.is_active(setup):
                return None
            return apply_setup(setup, output, self.scale_one, owns=self.owns)

    host = ScaleHost.attach(layer_module, "hidden_scale", model)  # hook registered, recorded
    host.add_unit(name, ScaleUnit(width))                          # recorded
    ...
    host.remove_unit(name)
    if host.is_empty:
        host.detach()

Parameters shared across layers (VeRA's random matrices, a prefix-tuning MLP, a model-wide
prompt) live in a `SharedParameters` host on the base model: one unit per adapter, saved,
loaded, moved and counted once (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from ._runtime.rollback import record_undo
from .composition import AdapterCompositionBlock
from .context import is_compiling
from .errors import ConfigError
from .prefix import KVPrefixHandle, PrefixProvider, register_kv_prefix
from .subblocks import SubBlockFn, SubBlockHookHandle, register_hook
from .virtual import VirtualProvider, VirtualTokensHandle, register_virtual_tokens

if TYPE_CHECKING:
    from .sites import AttentionSite, ModelSites, SubBlockSite

H = TypeVar("H", bound="AdapterHost")
M = TypeVar("M", bound=nn.Module)


def placement_of(module: nn.Module) -> tuple[torch.device | None, torch.dtype]:
    """Where the adapters of ``module`` go: the device of its first floating parameter or
    buffer (None when it has none), and float32, or float64 in a float64 model (never half
    precision: core applies ``add_adapter(..., adapter_dtype=...)`` afterwards)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, torch.promote_types(tensor.dtype, torch.float32)
    return None, torch.float32


def made_like(
    like: nn.Module,
    build: Callable[..., M],
    *args: Any,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> M:
    """``build(*args, **kwargs)`` (a unit's constructor) run on the CPU, where seeded
    ``torch.Generator``s draw, whatever ``torch.device`` context the caller has open (``with
    torch.device("cuda")`` or ``"meta"``), then moved to `placement_of(like)` (``dtype``
    overrides the dtype): seeded weights are equal on every device. The one placement policy
    of every first-party plugin."""
    with torch.device("cpu"):
        module = build(*args, **kwargs)
    device, default_dtype = placement_of(like)
    return module.to(device=device, dtype=dtype or default_dtype)


@runtime_checkable
class Handle(Protocol):
    """What every registration into the forward pass returns (`AdapterHost.add_hook`,
    `~AdapterHost.add_sub_block_hook`, `~AdapterHost.add_virtual_tokens`,
    `~AdapterHost.add_kv_prefix`): ``remove()`` takes it off the model again (idempotent)."""

    def remove(self) -> None: ...


class AdapterHost(nn.Module):
    """Holds the adapters of one method at one site; see the module docstring.

    Subclasses implement `hook` (registered on the site by `attach`) and may rename the units
    dict with ``units_attr`` (e.g. ``"interventions"``; it is part of the model's parameter
    names). ``model`` is a plain reference to the top-level model, not a submodule.
    """

    units_attr: ClassVar[str] = "units"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.add_module(self.units_attr, nn.ModuleDict())
        self.__dict__["model"] = model  # not a submodule
        self.merged: list[str] = []
        self._handles: list[RemovableHandle] = []
        # (site, attribute name) this host is attached as; the site is a plain reference
        self.__dict__["_site"] = None
        self.attr_name: str | None = None
        self.register_buffer("original_weight", None, persistent=False)
        self.register_buffer("original_bias", None, persistent=False)
        # (setup, any of this host's adapters active in it): one tuple, replaced as a whole, so
        # threads running different AdapterSetups never read a mixed pair.
        self._activity: tuple[object, bool] = (None, False)

    # -- attaching ----------------------------------------------------------------------------
    @classmethod
    def attach(cls: type[H], module: nn.Module, attr: str, *args: Any, **kwargs: Any) -> H:
        """The host of this class at ``module.<attr>``, created, attached and hooked (with
        `on_attach`) if there is none yet. ``args`` / ``kwargs`` go to the constructor (the
        model first).

        Raises:
            ConfigError: ``module`` already has an attribute ``attr`` that is not such a host.
        """
        existing = getattr(module, attr, None)
        if isinstance(existing, cls):
            return existing
        if existing is not None:
            raise ConfigError(
                f"{type(module).__name__} already has an attribute {attr!r} "
                f"({type(existing).__name__}); {cls.__name__} cannot attach there"
            )
        host = cls(*args, **kwargs)
        module.add_module(attr, host)
        host.__dict__["_site"] = module
        host.attr_name = attr
        record_undo(host.model, host.detach)
        host.on_attach(module)
        return host

    def on_attach(self, module: nn.Module) -> None:
        """Register this host's hooks once it is attached to ``module``; default: `hook` as a
        forward hook of ``module``. Override to hook other modules too (with `add_hook`)."""
        self.add_hook(module, self.hook)

    @property
    def site_module(self) -> nn.Module | None:
        """The module this host is attached to (None once detached)."""
        return self.__dict__.get("_site")

    def detach(self) -> None:
        """Remove this host's hooks and the host itself from its site (inside a core operation,
        recorded: a rollback attaches it again)."""
        self.remove_hooks()
        module, attr = self.site_module, self.attr_name
        if module is not None and attr is not None and getattr(module, attr, None) is self:
            delattr(module, attr)
        self.__dict__["_site"] = None
        if module is not None and attr is not None:
            record_undo(self.model, lambda: self._reattach(module, attr))

    def _reattach(self, module: nn.Module, attr: str) -> None:
        module.add_module(attr, self)
        self.__dict__["_site"] = module
        self.on_attach(module)

    # -- hooks --------------------------------------------------------------------------------
    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        """The forward hook `attach` registers on the site: return the edited output, or None
        to leave it unchanged. Subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement hook()")

    def add_hook(
        self,
        module: nn.Module,
        hook: Callable[..., Any],
        *,
        pre: bool = False,
        with_kwargs: bool = False,
        prepend: bool = False,
        always_call: bool = False,
    ) -> RemovableHandle:
        """Register ``hook`` on ``module`` (a forward pre-hook with ``pre=True``) and keep the
        handle; `detach` and a rollback remove it."""
        if pre:
            handle = module.register_forward_pre_hook(
                hook, with_kwargs=with_kwargs, prepend=prepend
            )
        else:
            handle = module.register_forward_hook(
                hook, with_kwargs=with_kwargs, prepend=prepend, always_call=always_call
            )
        self._handles.append(handle)
        record_undo(self.model, handle.remove)
        return handle

    def add_sub_block_hook(
        self, site: SubBlockSite, fn: SubBlockFn, *, replace_add: bool = False
    ) -> SubBlockHookHandle:
        """`adapters.subblocks.register_hook` on ``site`` (``fn`` called with the sub-block
        output and its residual input), with the torch hook handles kept by this host:
        `remove_hooks`, `detach` and a rollback remove them. ``fn`` should be a bound method
        of this host (copies and pickles of the model carry it along)."""
        handle = register_hook(site, fn, replace_add=replace_add)
        self._handles.extend(handle.handles)
        record_undo(self.model, handle.remove)
        return handle

    def add_virtual_tokens(self, provider: VirtualProvider) -> VirtualTokensHandle:
        """`adapters.virtual.register_virtual_tokens` on this host's model: ``provider(ctx)``
        returns the `adapters.virtual.VirtualTokens` to prepend to the model input at every
        call (or None). The handle is kept by this host (`remove_hooks`, `detach` and a
        rollback remove it). ``provider`` should be a bound method of this host."""
        handle = register_virtual_tokens(self.model, provider)
        self._handles.append(handle)
        return handle

    def add_kv_prefix(self, site: AttentionSite, provider: PrefixProvider) -> KVPrefixHandle:
        """`adapters.prefix.register_kv_prefix` on attention ``site``: ``provider(module)``
        returns the keys and values to prepend to that attention at every call (or None). The
        handle is kept by this host (`remove_hooks`, `detach` and a rollback remove it, and
        with the model's last prefix the model's own attention implementation comes back).
        ``provider`` should be a bound method of this host."""
        handle = register_kv_prefix(self.model, site, provider)
        self._handles.append(handle)
        return handle

    def remove_hooks(self) -> None:
        """Remove every hook and registration this host made."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- units --------------------------------------------------------------------------------
    @property
    def adapter_units(self) -> nn.ModuleDict:
        """The units, by adapter name (the ``ModuleDict`` named ``units_attr``)."""
        return getattr(self, self.units_attr)

    @property
    def is_empty(self) -> bool:
        """Whether no adapter is left on this host."""
        return len(self.adapter_units) == 0

    def add_unit(self, name: str, unit: nn.Module) -> nn.Module:
        """Hold ``unit`` as adapter ``name``'s (recorded for rollback); returns ``unit``."""
        units = self.adapter_units
        previous = units[name] if name in units else None
        units[name] = unit
        self.invalidate()

        def undo() -> None:
            if previous is None:
                if name in units:
                    del units[name]
            else:
                units[name] = previous
            self.invalidate()

        record_undo(self.model, undo)
        return unit

    def remove_unit(self, name: str) -> None:
        """Drop adapter ``name``'s unit (and its merged mark); inside a core operation,
        recorded: a rollback puts it back."""
        units = self.adapter_units
        unit = units[name]
        was_merged = name in self.merged
        del units[name]
        if was_merged:
            self.merged.remove(name)
        self.invalidate()

        def undo() -> None:
            units[name] = unit
            if was_merged:
                self.merged.append(name)
            self.invalidate()

        record_undo(self.model, undo)

    # -- activity -----------------------------------------------------------------------------
    def owns(self, name: str) -> bool:
        """Whether adapter ``name`` runs at this host: held here and not merged."""
        return name in self.adapter_units and name not in self.merged

    def is_active(self, setup: AdapterCompositionBlock | str | None) -> bool:
        """Whether ``setup`` runs one of this host's adapters (cached per setup object)."""
        if setup is None:
            return False
        if is_compiling():  # folded into the graph; Dynamo guards on the setup
            return any(self.owns(n) for n in _names(setup))
        cached_setup, active = self._activity
        if setup is not cached_setup:
            active = any(self.owns(n) for n in _names(setup))
            self._activity = (setup, active)
        return active

    def invalidate(self) -> None:
        """Forget the cached activity answer (call after changing units or merges)."""
        self._activity = (None, False)

    # -- base tensors -------------------------------------------------------------------------
    def keep_original(self, module: nn.Module) -> None:
        """Keep a copy of ``module``'s weight and bias (once, before the first merge)."""
        if self.original_weight is not None:
            return
        with torch.no_grad():
            self.original_weight = module.weight.detach().clone()
            bias = getattr(module, "bias", None)
            self.original_bias = None if bias is None else bias.detach().clone()

    def restore_original(self, module: nn.Module) -> None:
        """Copy the kept weight and bias back into ``module`` (bit-exact)."""
        with torch.no_grad():
            module.weight.copy_(self.original_weight)
            if self.original_bias is not None:
                module.bias.copy_(self.original_bias)

    def drop_original(self) -> None:
        """Forget the kept weight and bias (nothing is merged any more)."""
        self.original_weight = self.original_bias = None

    def mark_merged(self, name: str) -> None:
        """Record that adapter ``name`` is merged into the site's weights (it stops running)."""
        self.merged.append(name)
        self.invalidate()

    def unmark_merged(self, name: str) -> None:
        """Record that adapter ``name`` is no longer merged."""
        self.merged.remove(name)
        self.invalidate()

    def protect(self, module: nn.Module, tensor_name: str) -> None:
        """Keep a copy of ``module.<tensor_name>`` that a rollback writes back, for a plugin
        that edits a base tensor in place while adding an adapter."""
        tensor = getattr(module, tensor_name, None)
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(
                f"protect({type(module).__name__}, {tensor_name!r}): the module has no tensor "
                f"{tensor_name!r} (found {type(tensor).__name__})"
            )
        saved = tensor.detach().clone()

        def undo() -> None:
            with torch.no_grad():
                getattr(module, tensor_name).copy_(saved)

        record_undo(self.model, undo)

    def parametrize(self, module: nn.Module, tensor_name: str, parametrization: nn.Module) -> None:
        """``torch.nn.utils.parametrize.register_parametrization`` recorded for rollback: a
        failed operation removes it again, which gives ``module`` back its class and its
        original tensor object (unchanged)."""
        parametrize.register_parametrization(module, tensor_name, parametrization)
        record_undo(self.model, lambda: unparametrize(module, tensor_name, parametrization))


class SharedParameters(AdapterHost):
    """The home of an adapter's parameters that several layers share (VeRA's random
    matrices, a prefix-tuning reparametrisation MLP, a model-wide soft prompt): one host per
    method, attached to the base model as ``adapters_<method>_shared``, with one unit per
    adapter and no hook of its own::

        shared = SharedParameters.of(model, sites, "vera")
        unit = shared.add_unit(name, VeraMatrices(...))  # recorded for rollback
        created[shared.key] = unit                       # saved, loaded, counted once
        ...  # per-layer units keep a plain reference: layer_unit.__dict__["shared"] = unit

    Return the unit under `key` from ``adapters_add_adapter`` next to the per-layer units: core
    then saves its tensors once (under a name-independent key relative to the base model, so
    the adapter loads on another head class), loads, moves, freezes and counts them once.
    Per-layer units must not register it as a submodule (that would count and save it once
    per layer): keep a plain reference, which ``copy.deepcopy`` and ``pickle`` carry along.
    On delete, `remove_unit` it and `detach` the host when it `is_empty`.
    """

    def on_attach(self, module: nn.Module) -> None:
        """No hook: the per-layer hosts read the shared unit."""

    @classmethod
    def of(cls, model: nn.Module, sites: ModelSites, method: str) -> SharedParameters:
        """``method``'s shared host on the base model, created (and recorded) on first use."""
        return cls.attach(sites.base_model.module, f"adapters_{method}_shared", model)

    @property
    def key(self) -> str:
        """The name-independent key to return this host's unit of an adapter under: the
        host's path in the model."""
        base = self.site_module
        for path, module in self.model.named_modules():
            if module is base:
                return f"{path}.{self.attr_name}" if path else str(self.attr_name)
        raise RuntimeError(f"{type(self).__name__} is not attached to the model")


def unparametrize(module: nn.Module, tensor_name: str, parametrization: nn.Module) -> None:
    """Remove ``parametrization`` from ``module.<tensor_name>``; when it was the last one the
    original tensor comes back unchanged and ``module`` gets its class back."""
    if not parametrize.is_parametrized(module, tensor_name):
        return
    chain = module.parametrizations[tensor_name]
    if len(chain) == 1 and chain[0] is parametrization:
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
        return
    for index, item in enumerate(chain):
        if item is parametrization:
            del chain[index]
            return


def _names(setup: AdapterCompositionBlock | str) -> list[str]:
    return [setup] if isinstance(setup, str) else setup.flatten()
