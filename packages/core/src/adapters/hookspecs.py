"""The hook specifications: the one contract between adapters-core and method plugins.

A plugin is a module (or object) with functions decorated by ``@adapters.hookimpl`` whose names
are the specs below, exposed through the entry-point group ``adapters.methods``, and which
declares the contract version it implements::

    # adapters_mymethod/plugin.py
    from adapters.plugin import hookimpl

    ADAPTERS_CONTRACT = "1.1"

    @hookimpl
    def adapters_register_methods(register): ...

    # pyproject.toml of adapters-mymethod
    [project.entry-points."adapters.methods"]
    mymethod = "adapters_mymethod.plugin"

Core calls every hook with keyword arguments, so an implementation may accept just the
arguments it uses, and new arguments can be added without breaking plugins.

Loading is strict (`adapters.registry.loading`); a plugin is refused as a whole, and the others
still load, when:

- its ``ADAPTERS_CONTRACT`` is missing or not served by this core: the major version must be
  `CONTRACT_VERSION`'s and the minor version at most its minor (`PluginContractError`);
- it implements a hook that no spec below names (a misspelling), or a function named
  ``adapters_*`` lacks ``@hookimpl`` (`PluginError`);
- it claims a method, preset, config-class or checkpoint-format name that another plugin
  already owns (`PluginConflictError`; a checkpoint-format name is owned per method when the
  formats list their ``methods``).

Each spec says in which contract version it appeared (``versionadded``) or changed.

The life of an adapter, as core drives it:

1. At load time core calls `adapters_register_methods` once per plugin to learn its methods,
   config classes, presets and which composition blocks each supports.
2. ``adapters.init(model, interface)`` resolves the interface into `adapters.sites.ModelSites`
   and calls `adapters_init_model`.
3. ``model.add_adapter(name, config)`` calls `adapters_add_adapter`; the plugin whose config it
   is creates the adapter's modules, attaches them (forward hooks, pre-hooks or
   parametrisations on the sites' modules) and returns them keyed by name-independent keys.
   Core owns everything generic from there: parameters, freezing, summary, device moves,
   saving and loading (``state_dict`` of the returned modules), atomicity, train/eval mode.
4. During a forward call, a method's layers read `adapters.context.current_context()` for the
   effective setup, the attention mask and per-example positions, and compose with
   `adapters.composition.apply_setup` (with ``handlers=`` for blocks the method evaluates
   itself, such as ``Fuse`` and ``Split``).
5. ``merge_adapter``, ``reset_adapter`` and ``delete_adapter`` call the matching hooks.
6. For a method that declares ``Fuse``: ``add_adapter_fusion`` / ``delete_adapter_fusion`` call
   `adapters_add_fusion` / `adapters_delete_fusion`.

Method-specific hooks (adding, deleting, merging, resetting and averaging adapters; adding and
deleting fusion layers) are called only on the plugin that owns the method (since contract 1.1;
`adapters.registry.loading.Registry.call_owner`), so an implementation never sees another
plugin's config and needs no "not mine" check. Contract-1.0 plugins that still return ``None``
for configs that are not theirs behave exactly as before.

Everything a plugin may import from core is in one namespace, `adapters.plugin`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from .configs import AdapterConfig
    from .declarations import CheckpointFormat, MethodSpec
    from .fusion_config import AdapterFusionConfig
    from .sites import ModelSites

#: The version of this contract. A plugin declares the version it implements as
#: ``ADAPTERS_CONTRACT = "MAJOR.MINOR"`` on its plugin object (module or instance); core serves
#: it when the majors are equal and the plugin's minor is at most this minor. A minor release
#: only adds (hooks, keyword arguments, fields); a major release may change or remove.
CONTRACT_VERSION = "1.1"

hookspec = pluggy.HookspecMarker("adapters")


@hookspec
def adapters_register_methods(register: Callable[[MethodSpec], None]) -> None:
    """Declare the methods this plugin provides.

    Called once per plugin when plugins are loaded. Call ``register(MethodSpec(...))`` for each
    method: its name (as listed in ``AdapterModelInterface.adapter_methods``), its config
    classes, named presets (``{"lora": LoRAConfig(), "ia3": IA3Config()}``), the composition
    blocks it supports, and whether it can merge into the base weights. Method, preset and
    config-class names are owned: one already declared by another plugin (or twice by this
    one) gets this whole plugin refused, and the registry stays as it was.

    .. versionadded:: 1.0
    """


@hookspec
def adapters_register_checkpoint_formats(register: Callable[[CheckpointFormat], None]) -> None:
    """Declare readers/writers for foreign checkpoint formats (PEFT, AdapterHub, ...).

    Called once per plugin when plugins are loaded. Call ``register(CheckpointFormat(...))``
    for each format. ``model.load_adapter(path)`` asks each format's ``detect`` whether it reads
    a directory that is not in this library's own format; ``save_adapter(..., format=name)``
    uses its ``write``. Format names (and aliases) are owned like method names, per method
    when a format lists the ``methods`` it serves: two plugins may serve one name for
    disjoint methods (see `adapters.declarations.CheckpointFormat`).

    .. versionadded:: 1.0
    """


@hookspec
def adapters_init_model(model: nn.Module, sites: ModelSites) -> None:
    """``adapters.init`` prepared ``model``; ``sites`` is its resolved interface.

    Called once per model, after validation, for every plugin whose method the interface lists.
    Use it to check that the sites have what the method needs; raise an
    `adapters.errors.InterfaceError` to abort ``init`` (the model is then left as it was).

    .. versionadded:: 1.0
    """


@hookspec(firstresult=True)
def adapters_add_adapter(
    model: nn.Module, sites: ModelSites, name: str, config: AdapterConfig
) -> dict[str, nn.Module] | None:
    """Create adapter ``name`` for ``config`` (a config of a method this plugin owns).

    Create the modules, register them as submodules of the model (e.g. a ``ModuleDict`` child of
    the site's module, keyed by adapter name) and attach forward hooks / pre-hooks to the sites'
    modules. Hooks must read the active setup from the forward context at call time, so that
    an added but inactive adapter costs (almost) nothing, and must be bound methods or
    ``functools.partial`` objects, not closures created in a loop, so that ``copy.deepcopy``
    of the model copies them correctly.

    Return a dict mapping *name-independent* keys (use ``site.path``, e.g.
    ``"model.layers.0.self_attn.q_proj"``) to the modules holding this adapter's parameters.
    Core saves ``{key}.{param}`` tensors from them, moves them, freezes/unfreezes them and puts
    them in the model's train/eval mode.
    Raise `adapters.errors.ConfigError` for options the model cannot support.

    .. versionadded:: 1.0
    .. versionchanged:: 1.1
       Called only on the plugin that owns the method.
    """


@hookspec(firstresult=True)
def adapters_delete_adapter(
    model: nn.Module, sites: ModelSites, name: str, config: AdapterConfig
) -> bool | None:
    """Remove adapter ``name``: its modules and hooks. If it is merged, the base weights stay
    merged (this is how ``merge_and_unload`` is done). Return True.

    .. versionadded:: 1.0
    .. versionchanged:: 1.1
       Called only on the plugin that owns the method.
    """


@hookspec(firstresult=True)
def adapters_merge_adapter(
    model: nn.Module, sites: ModelSites, name: str, config: AdapterConfig
) -> bool | None:
    """Fold adapter ``name`` into the base weights so that the model computes the same outputs
    with the adapter inactive. Return True when merged. Methods that cannot
    merge declare ``MethodSpec(can_merge=False)`` and core raises before calling this.

    .. versionadded:: 1.0
    .. versionchanged:: 1.1
       Called only on the plugin that owns the method.
    """


@hookspec(firstresult=True)
def adapters_reset_adapter(
    model: nn.Module, sites: ModelSites, name: str, config: AdapterConfig
) -> bool | None:
    """Undo ``adapters_merge_adapter`` for ``name``: restore the original base weights.
    Return True.

    .. versionadded:: 1.0
    .. versionchanged:: 1.1
       Called only on the plugin that owns the method.
    """


@hookspec(firstresult=True)
def adapters_average_adapter(
    model: nn.Module,
    sites: ModelSites,
    sources: list[tuple[str, AdapterConfig, float]],
    combine_strategy: str,
    options: dict[str, Any],
) -> tuple[AdapterConfig, dict[str, Any]] | None:
    """Combine existing adapters into a new one with ``combine_strategy`` other than
    ``"linear"`` (core does ``"linear"`` itself: the weighted sum of every parameter).

    ``sources`` are (name, config, weight) with weights already normalised if the user asked;
    ``options`` are the strategy's extra keyword arguments (e.g. ``svd_rank``). Return the new
    adapter's config and its tensors under the name-independent keys your
    `adapters_add_adapter` produces for that config; core adds the adapter and loads them
    (atomically). Return None if you do not implement the
    strategy (core then raises). Raise `adapters.errors.ConfigError` for bad options.

    .. versionadded:: 1.0
    .. versionchanged:: 1.1
       Called only on the plugin that owns the method.
    """


@hookspec
def adapters_setup_changed(model: nn.Module, sites: ModelSites, setup: Any) -> None:
    """The model's active setup changed (``set_active_adapters``, ``train_adapter``, delete).

    ``setup`` is the new `adapters.composition.AdapterCompositionBlock` or None. Optional and
    informational: forward hooks must still read the setup from the forward context, because
    `adapters.AdapterSetup` can activate adapters for one block of code without calling this.

    .. versionadded:: 1.0
    .. deprecated:: 1.1
       Retired: hooks read the setup from the forward context. Core still calls it on
       contract-1.0 plugins that implement it; new plugins should not.
    """


@hookspec(firstresult=True)
def adapters_add_fusion(
    model: nn.Module,
    sites: ModelSites,
    name: str,
    children: list[str],
    config: AdapterFusionConfig,
    method: str,
) -> dict[str, nn.Module] | None:
    """Create fusion layer ``name`` fusing adapters ``children`` (in order) if ``method`` is
    yours (``model.add_adapter_fusion``).

    Core calls it only for the one method that declares `adapters.Fuse` in
    ``MethodSpec.compositions`` and owns every child, after checking that the children are
    added. Create and register the layer's modules like `adapters_add_adapter` does (e.g. in a
    ``ModuleDict`` keyed by fusion name on your hosts) and return them under name-independent
    keys; core saves, freezes, trains (``train_adapter_fusion``), moves and rolls them back.
    At forward time evaluate the `adapters.Fuse` block (its ``name`` is the fusion's name) with
    a handler passed to `adapters.composition.apply_setup`. ``config`` is an
    `adapters.fusion_config.AdapterFusionConfig`; raise `adapters.errors.ConfigError` for
    options you do not support.

    .. versionadded:: 1.0
    .. versionchanged:: 1.1
       Called only on the plugin that owns the method.
    """


@hookspec(firstresult=True)
def adapters_delete_fusion(
    model: nn.Module, sites: ModelSites, name: str, children: list[str], method: str
) -> bool | None:
    """Remove fusion layer ``name`` (its modules and any hooks only it needed) if ``method`` is
    yours (``model.delete_adapter_fusion``). Return True.

    .. versionadded:: 1.0
    .. versionchanged:: 1.1
       Called only on the plugin that owns the method.
    """


@hookspec(firstresult=True)
def adapters_fusion_regularization_loss(
    model: nn.Module,
    sites: ModelSites,
    name: str,
    children: list[str],
    config: AdapterFusionConfig,
    method: str,
) -> Any:
    """The regularisation term of fusion layer ``name`` if ``method`` is yours: a scalar
    tensor the user adds to the training loss (AdapterHub's fusion pulls each value matrix
    towards the identity, ``0.01 * ||I - V||^2`` summed over layers).

    Core calls it from ``model.get_fusion_regularization_loss()`` for every fusion layer whose
    ``config.regularization`` is True and whose parameters train, and sums the answers. Return
    None if ``method`` is not yours or the layer has nothing to regularise.

    .. versionadded:: 1.0
    .. deprecated:: 1.1
       Retired: core sums ``regularization()`` of the fusion modules `adapters_add_fusion`
       returned (a module may define ``regularization() -> Tensor | None``). Core calls this
       hook, on the owner, only when none of the layer's modules defines it (1.0 plugins).
    """
