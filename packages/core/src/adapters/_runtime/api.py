"""The adapter API that ``adapters.init`` gives a model (names as in AdapterHub ``adapters``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .. import context as ctx_mod
from ..checkpoint import adapter as saving
from ..checkpoint import model as model_folder
from ..composition import (
    AdapterCompositionBlock,
    BatchSplit,
    Fuse,
    MultiTask,
    Parallel,
    PerExample,
    SetupLike,
    blocks_used_by,
    expand_parallel,
    find_blocks,
    names_outside,
    parse_composition,
)
from ..configs import AdapterConfig, ConfigUnion, config_parts, resolve_config
from ..errors import AdapterNotFoundError, CompositionError, ConfigError, InterfaceError
from ..fusion_config import AdapterFusion
from ..interface import AdapterModelInterface
from ..registry.loading import MethodSpec, get_registry
from ..sites import ModelSites
from . import averaging, embeddings, fusion, lifecycle, multitask, rollback, selection
from .naming import validate_adapter_name
from .precision import AdapterDtype, apply_adapter_dtype, check_adapter_dtype
from .recompute import sync_layer_hooks
from .state import AdapterEntry, get_state


class ModelAdaptersMixin:
    """The adapter API ``adapters.init`` gives a model (names as in AdapterHub ``adapters``)."""

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def adapter_interface(self) -> AdapterModelInterface:
        """The interface this model was initialised with."""
        return get_state(self).interface

    @property
    def adapter_sites(self) -> ModelSites:
        """The resolved sites (what plugins attach to)."""
        return get_state(self).sites

    def iter_layers(self) -> Iterator[tuple[int, nn.Module]]:
        """``(index, layer module)`` for every layer the interface names, in order (AdapterHub's
        ``iter_layers``); with several ``model_layers`` stacks the index runs over all of them,
        as in ``leave_out``."""
        for layer in get_state(self).sites.layers:
            yield layer.index, layer.layer.module

    def get_layer(self, idx: int) -> nn.Module:
        """The layer module at index ``idx`` of `iter_layers` (AdapterHub's ``get_layer``)."""
        layers = get_state(self).sites.layers
        if not isinstance(idx, int) or not -len(layers) <= idx < len(layers):
            raise IndexError(f"layer index {idx!r} out of range; the model has {len(layers)}")
        return layers[idx].layer.module

    def iter_attentions(self) -> Iterator[tuple[int, str, nn.Module]]:
        """``(layer index, "self" | "cross", attention module)`` for every attention module the
        interface names (AdapterHub's ``iter_attentions``)."""
        for layer in get_state(self).sites.layers:
            for attn in (layer.self_attn, layer.cross_attn):
                if attn is not None:
                    yield layer.index, attn.kind, attn.attn.module

    def iter_layer_ffns(self) -> Iterator[tuple[int, str, nn.Module]]:
        """``(layer index, "intermediate" | "output", projection)`` for the feed-forward
        projections the interface names (AdapterHub's ``iter_layer_ffns``)."""
        for layer in get_state(self).sites.layers:
            for kind, site in (("intermediate", layer.intermediate), ("output", layer.output)):
                if site is not None:
                    yield layer.index, kind, site.module

    @property
    def adapters_config(self) -> dict[str, AdapterConfig]:
        """``{name: config}`` of every added adapter."""
        return {n: e.config for n, e in get_state(self).adapters.items()}

    def has_adapters(self) -> bool:
        """Whether any adapter has been added."""
        return bool(get_state(self).adapters)

    def _entry(self, name: str) -> AdapterEntry:
        entries = get_state(self).adapters
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
        adapter_dtype: AdapterDtype = None,
    ) -> None:
        """Add a new adapter called ``adapter_name``.

        Args:
            config: a config object, dict, preset string (``"lora[r=16]"``), union
                (``"lora|loreft"``) or JSON path; default: the first method of the interface's
                default preset (e.g. ``"lora"``).
            overwrite_ok: replace an existing adapter of that name instead of raising.
            set_active: make it the active setup.
            adapter_dtype: the dtype of the adapter's weights. None (default): float32 on a
                float16 / bfloat16 model (a config's own ``dtype`` option is kept), so that
                mixed-precision training updates them exactly; ``"model"``: the dtype of the
                adapted model weights; or a floating ``torch.dtype``. The forward pass casts
                between the adapter's and the activations' dtype either way.
        """
        state = get_state(self)
        validate_adapter_name(adapter_name)
        adapter_dtype = check_adapter_dtype(adapter_dtype)
        if adapter_name in state.adapters and not overwrite_ok:
            raise ConfigError(
                f"an adapter named {adapter_name!r} already exists; pass overwrite_ok=True to "
                "replace it or choose another name"
            )
        config = self._default_config() if config is None else resolve_config(config)
        self._check_method_enabled(config)
        registry = get_registry()
        old_entry = state.adapters.get(adapter_name)
        old_active = state.active_setup
        was_merged = old_entry is not None and old_entry.merged
        entry = AdapterEntry(name=adapter_name, config=config)
        try:
            with rollback.operation(self) as log:
                if old_entry is not None:
                    self.delete_adapter(adapter_name)  # a merged one is reset first
                for part in config_parts(config):
                    modules = registry.call_owner(
                        "adapters_add_adapter",
                        registry.method_of(part).name,
                        model=self,
                        sites=state.sites,
                        name=adapter_name,
                        config=part,
                    )
                    if modules is None:
                        raise ConfigError(
                            f"the {part.method!r} plugin created no adapter for "
                            f"{type(part).__name__} (its adapters_add_adapter hook returned None)"
                        )
                    earlier = self._adapter_param_ids() | {id(p) for p in entry.parameters()}
                    apply_adapter_dtype(self, modules, adapter_dtype, part, earlier)  # type: ignore
                    prefix = f"{part.method}/" if isinstance(config, ConfigUnion) else ""
                    for key, module in modules.items():
                        entry.modules[prefix + key] = module
                self._check_registered(entry)
                # Every module the plugin created (units and their hosts) follows the model's
                # train/eval mode, so e.g. dropout stays off in a model loaded for inference.
                for module in self.modules():  # type: ignore[attr-defined]
                    if id(module) not in log.modules_before:
                        module.training = self.training  # type: ignore[attr-defined]
                state.adapters[adapter_name] = entry
        except BaseException:
            state.adapters.pop(adapter_name, None)
            if old_entry is not None:
                state.adapters[adapter_name] = old_entry
                state.active_setup = old_active
                if was_merged:
                    self.merge_adapter(adapter_name)
            raise
        if set_active:
            self.set_active_adapters(adapter_name)

    def _default_config(self) -> AdapterConfig:
        registry = get_registry()
        for method in get_state(self).interface.adapter_methods:
            spec = registry.methods.get(method)
            if spec is not None and spec.presets:
                return next(iter(spec.presets.values()))
        raise ConfigError("add_adapter needs config=... (no installed method has a default preset)")

    def _check_method_enabled(self, config: AdapterConfig) -> None:
        state = get_state(self)
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
        """Remove an adapter, its modules and hooks. A merged adapter is reset first: the base
        weights lose its change (the same holds when ``add_adapter(..., overwrite_ok=True)``
        replaces a merged adapter). To keep merged weights, use ``merge_and_unload``. An
        adapter that a fusion layer fuses is refused: delete the fusion first."""
        self._check_not_fused(adapter_name)
        if self._entry(adapter_name).merged:
            self.reset_adapter(adapter_name)
        self._drop_adapter(adapter_name)

    def _check_not_fused(self, adapter_name: str) -> None:
        state = get_state(self)
        users = [f.name for f in state.fusions.values() if adapter_name in f.children]
        if users:
            raise CompositionError(
                f"adapter {adapter_name!r} is fused by fusion layer(s) {users}; delete them first "
                f"with model.delete_adapter_fusion({users[0]!r})"
            )

    def _drop_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it is merged, its change stays in the base weights."""
        self._check_not_fused(adapter_name)
        state = get_state(self)
        entry = self._entry(adapter_name)
        registry = get_registry()
        for part in config_parts(entry.config):
            registry.call_owner(
                "adapters_delete_adapter",
                part.method,
                model=self,
                sites=state.sites,
                name=adapter_name,
                config=part,
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
        state = get_state(self)
        state.active_setup = setup
        get_registry().hook.adapters_setup_changed(model=self, sites=state.sites, setup=setup)

    def validate_setup(self, setup: AdapterCompositionBlock) -> None:
        """Raise `CompositionError` if ``setup`` cannot run on this model."""
        state = get_state(self)
        registry = get_registry()
        expand_parallel(setup)  # raises for Parallel in unsupported places
        if not isinstance(setup, MultiTask) and find_blocks(setup, MultiTask):
            raise CompositionError(
                f"MultiTask is supported at the top of a setup only; found it nested in "
                f"{setup.name}"
            )
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
                    # core serves both by batch replication / row selection over BatchSplit
                    supported.update((Parallel, PerExample, MultiTask))
                unsupported = sorted(b.__name__ for b in blocks - supported)
                if unsupported:
                    allowed = sorted(b.__name__ for b in supported) or ["a single adapter"]
                    raise CompositionError(
                        f"adapter {name!r} ({spec.name}) cannot be used in {', '.join(unsupported)}; "
                        f"the {spec.name} method supports {', '.join(allowed)}"
                    )
        fusion.validate_fuse_blocks(state, setup)

    @property
    def active_adapters(self) -> AdapterCompositionBlock | None:
        """The active setup (a composition block) or None."""
        return get_state(self).active_setup

    @active_adapters.setter
    def active_adapters(self, setup: SetupLike) -> None:
        self.set_active_adapters(setup)

    # -- training ---------------------------------------------------------------------------
    def _adapter_param_ids(self) -> set[int]:
        state = get_state(self)
        entries = [*state.adapters.values(), *state.fusions.values()]
        return {id(p) for e in entries for p in e.parameters()}

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
        sync_layer_hooks(self, mode)  # type: ignore[arg-type]
        return result

    def train_adapter(self, adapter_setup: SetupLike, train_embeddings: bool = False) -> None:
        """Train only the adapters in ``adapter_setup``: everything else (base model, heads,
        other adapters) is frozen; the setup becomes active and the model goes to train mode.

        Adapters inside a `Fuse` block stay frozen and the fusion layer trains: fusion training
        trains the fusion layer, not the adapters it fuses (as `train_adapter_fusion`)."""
        setup = parse_composition(adapter_setup)
        if setup is None:
            raise CompositionError("train_adapter needs at least one adapter name")
        self.validate_setup(setup)
        for p in self.parameters():  # type: ignore[attr-defined]
            p.requires_grad_(False)
        for name in names_outside(setup, Fuse):
            for p in self._entry(name).parameters():
                p.requires_grad_(True)
        for p in fusion.fusion_parameters(get_state(self), setup):
            p.requires_grad_(True)
        if train_embeddings:
            embeddings = get_state(self).sites.embeddings
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
        state = get_state(self)
        for part in config_parts(entry.config):
            spec = registry.method_of(part)
            if not spec.can_merge:
                raise ConfigError(
                    f"adapter {name!r} is a {spec.name!r} adapter, which cannot be merged into the "
                    "base weights"
                )
        for part in config_parts(entry.config):
            done = registry.call_owner(
                "adapters_merge_adapter",
                part.method,
                model=self,
                sites=state.sites,
                name=name,
                config=part,
            )
            if not done:
                raise ConfigError(f"no plugin merged adapter {name!r} ({part.method})")
        entry.merged = True

    def reset_adapter(self, name: str | None = None) -> None:
        """Undo merging: restore the original base weights (all merged adapters if ``name`` is
        None). The adapter stays added and can be used unmerged again."""
        state = get_state(self)
        names = [name] if name is not None else [n for n, e in state.adapters.items() if e.merged]
        registry = get_registry()
        for n in names:
            entry = self._entry(n)
            if not entry.merged:
                raise ConfigError(f"adapter {n!r} is not merged; nothing to reset")
            for part in reversed(config_parts(entry.config)):
                registry.call_owner(
                    "adapters_reset_adapter",
                    part.method,
                    model=self,
                    sites=state.sites,
                    name=n,
                    config=part,
                )
            entry.merged = False

    def merge_and_unload(self, name: str | None = None) -> nn.Module:
        """Merge adapter ``name`` (default: every adapter of the active setup, and any adapter
        already merged) into the base weights, remove every adapter and everything ``init``
        added, and return the model: an instance of its original class with no hook, module or
        attribute of this library left (PEFT's semantics), for deployment."""
        state = get_state(self)
        if name is not None:
            names = [name]
        elif state.active_setup is not None:
            names = state.active_setup.flatten()
        else:
            raise ConfigError("merge_and_unload needs an adapter name or an active setup")
        for n in names:
            if not self._entry(n).merged:
                self.merge_adapter(n)
        self._delete_fusions()
        for n in list(state.adapters):
            if state.adapters[n].merged:
                self._drop_adapter(n)  # keeps its change in the base weights
            else:
                self.delete_adapter(n)
        return lifecycle.strip_adapters(self)  # type: ignore[arg-type]

    def unload(self) -> nn.Module:
        """Remove every adapter without merging (merged ones are reset first) and everything
        ``init`` added; return the model, now a plain instance of its original class with its
        original weights."""
        self._delete_fusions()
        for n in list(get_state(self).adapters):
            self.delete_adapter(n)
        return lifecycle.strip_adapters(self)  # type: ignore[arg-type]

    def _delete_fusions(self) -> None:
        for name in list(get_state(self).fusions):
            fusion.delete_adapter_fusion(self, name)

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
        state = get_state(self)
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
        active_fusions = {b.name for b in find_blocks(state.active_setup, Fuse)}
        for name, fused in state.fusions.items():
            params = list(fused.parameters())
            count = sum(p.numel() for p in params)
            rows.append(
                {
                    "name": name,
                    "architecture": f"fusion ({fused.method})",
                    "#param": count,
                    "%param": 100.0 * count / total_base if total_base else 0.0,
                    "active": name in active_fusions,
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

    # -- embeddings for new vocabularies (see adapters._runtime.embeddings) ------------------------
    def add_embeddings(
        self,
        name: str,
        tokenizer: Any,
        reference_embedding: str | None = None,
        reference_tokenizer: Any = None,
        embedding_dim: int | None = None,
    ) -> None:
        """Add an input embedding for ``tokenizer``'s vocabulary and make it active.

        Rows are drawn from ``N(0, 0.02)``; with ``reference_embedding`` (an embedding's name,
        e.g. ``"default"``, the model's own) and its ``reference_tokenizer``, the rows of the
        tokens both vocabularies share are copied from it. The new embedding is frozen;
        ``train_adapter(..., train_embeddings=True)`` trains the active one. An LM head tied to
        the input embedding switches with it. ``embedding_dim`` must equal the model's width.
        """
        embeddings.add_embeddings(
            self, name, tokenizer, reference_embedding, reference_tokenizer, embedding_dim
        )

    def set_active_embeddings(self, name: str) -> None:
        """Make embedding ``name`` the model's input embedding (``"default"``: the original);
        sets ``config.vocab_size`` to its number of rows, as AdapterHub does."""
        embeddings.set_active_embeddings(self, name)

    @property
    def active_embeddings(self) -> str:
        """The name of the active embedding (``"default"`` until another is activated)."""
        return embeddings.active_embeddings(self)

    def delete_embeddings(self, name: str) -> None:
        """Delete embedding ``name``; if it is active, ``"default"`` becomes active."""
        embeddings.delete_embeddings(self, name)

    def save_embeddings(self, path: str, name: str, tokenizer: Any = None) -> None:
        """Save embedding ``name`` into directory ``path`` (``embedding.safetensors``, and
        ``tokenizer/`` when ``tokenizer`` is given)."""
        embeddings.save_embeddings(self, path, name, tokenizer)

    def load_embeddings(self, path: str, name: str) -> Any:
        """Load an embedding saved by ``save_embeddings`` (or AdapterHub's ``embedding.pt``) as
        ``name`` and make it active; returns the tokenizer saved with it, or None."""
        return embeddings.load_embeddings(self, path, name)

    # -- fusion (see adapters._runtime.fusion) -----------------------------------------------------
    @property
    def adapter_fusions(self) -> dict[str, AdapterFusion]:
        """``{name: AdapterFusion(name, adapter_names, config, method)}`` of every fusion layer
        (AdapterHub keeps this in ``model.adapters_config.fusions``)."""
        return {
            name: AdapterFusion(name, e.children, e.config, e.method)
            for name, e in get_state(self).fusions.items()
        }

    def add_adapter_fusion(
        self,
        adapter_names: Fuse | list[str] | str,
        config: Any = None,
        name: str | None = None,
        overwrite_ok: bool = False,
        set_active: bool = False,
        adapter_dtype: AdapterDtype = None,
    ) -> str:
        """Add a fusion layer (AdapterFusion) over added adapters; returns its name.

        Args:
            adapter_names: a `Fuse` block (``Fuse("a", "b")``), a list of adapter names or
                ``"a,b"``. The adapters must belong to one method that supports ``Fuse``.
            config: ``"dynamic"`` (default), ``"static"``, with overrides
                (``"dynamic[temperature=True]"``), a dict, an `AdapterFusionConfig` or a JSON
                path.
            name: the fusion's name; default ``Fuse.name``, i.e. the names joined by commas.
            overwrite_ok: replace a fusion of that name instead of raising.
            set_active: make ``Fuse(*adapter_names)`` the active setup.
            adapter_dtype: the dtype of the fusion layer's weights, as in ``add_adapter``:
                None (default) float32 on a float16 / bfloat16 model; ``"model"`` the dtype
                of the model weights nearest to each fusion module; or a floating
                ``torch.dtype``. The forward casts between it and the activations' dtype.

        Example::

            model.add_adapter_fusion(Fuse("a", "b"), config="dynamic")
            model.train_adapter_fusion(Fuse("a", "b"))  # trains the fusion layer only
        """
        adapter_dtype = check_adapter_dtype(adapter_dtype)
        name = fusion.add_adapter_fusion(
            self, adapter_names, config, name, overwrite_ok, set_active
        )
        self._apply_fusion_dtype(name, adapter_dtype)
        return name

    def _apply_fusion_dtype(self, name: str, adapter_dtype: AdapterDtype) -> None:
        """Cast fusion layer ``name``'s parameters by the ``adapter_dtype`` rule (see
        `adapters._runtime.precision.apply_adapter_dtype`; other adapters' and fusions' parameters do
        not count as model weights for ``"model"``)."""
        entry = get_state(self).fusions[name]
        apply_adapter_dtype(self, entry.modules, adapter_dtype, None, self._adapter_param_ids())

    def delete_adapter_fusion(self, adapter_names: Fuse | list[str] | str) -> None:
        """Remove a fusion layer (given as its `Fuse` block, adapter names or name); the fused
        adapters stay. A setup using it is deactivated."""
        fusion.delete_adapter_fusion(self, adapter_names)

    def train_adapter_fusion(
        self, adapter_setup: Fuse | SetupLike, unfreeze_adapters: bool = False
    ) -> None:
        """Train the fusion layers of ``adapter_setup`` and nothing else: the fused adapters,
        every other adapter and the base model are frozen (``unfreeze_adapters=True`` trains the
        setup's adapters too). The setup becomes active and the model goes to train mode.

        ``adapter_setup`` is a setup with at least one `Fuse` block (``Fuse("a", "b")``,
        ``Stack("x", Fuse("a", "b"))``), a list of names (their fusion) or a fusion's name.
        """
        setup = fusion.fusion_setup(self, adapter_setup)
        self.validate_setup(setup)
        for p in self.parameters():  # type: ignore[attr-defined]
            p.requires_grad_(False)
        for p in fusion.fusion_parameters(get_state(self), setup):
            p.requires_grad_(True)
        if unfreeze_adapters:
            for name in setup.flatten():
                for p in self._entry(name).parameters():
                    p.requires_grad_(True)
        self._set_setup(setup)
        self.train()  # type: ignore[attr-defined]

    def get_fusion_regularization_loss(self) -> torch.Tensor | None:
        """The sum of the regularisation terms of the fusion layers that train and whose config
        has ``regularization=True`` (the ``"dynamic"`` default), as their method defines it;
        None when there is none. Add it to the loss while training a fusion::

            loss = model(**batch).loss
            reg = model.get_fusion_regularization_loss()
            (loss if reg is None else loss + reg).backward()
        """
        return fusion.fusion_regularization_loss(self)

    def get_adapter_fusion(self, adapter_names: Fuse | list[str] | str) -> dict[str, nn.Module]:
        """The modules of a fusion layer under their name-independent keys."""
        return dict(fusion.fusion_entry(self, adapter_names).modules)

    def adapter_fusion_to(
        self,
        adapter_names: Fuse | list[str] | str,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Move a fusion layer's modules to ``device`` and/or ``dtype``."""
        for module in fusion.fusion_entry(self, adapter_names).modules.values():
            module.to(device=device, dtype=dtype)

    def save_adapter_fusion(
        self,
        save_directory: str,
        adapter_names: Fuse | list[str] | str,
        format: str | None = None,
        **options: Any,
    ) -> None:
        """Save a fusion layer into ``save_directory`` (created or replaced atomically):
        ``fusion_config.json`` + ``fusion_model.safetensors``. The fused adapters are saved
        separately (``save_adapter``). ``format=`` a plugin's checkpoint format that writes
        fusion layers (e.g. AdapterHub's) writes that format instead; ``options`` are that
        format's (e.g. ``layout="builtin"`` for ``"adapterhub"``)."""
        fusion.save_adapter_fusion(self, save_directory, adapter_names, format=format, **options)

    def load_adapter_fusion(
        self,
        adapter_fusion_name_or_path: str,
        load_as: str | None = None,
        set_active: bool = False,
        overwrite_ok: bool = False,
        adapter_dtype: AdapterDtype = None,
    ) -> str:
        """Load a fusion layer saved by ``save_adapter_fusion`` (or in a foreign format a plugin
        reads, such as AdapterHub's); the adapters it fuses must be added already. Returns its
        name (``load_as`` renames it). ``adapter_dtype``: as in ``add_adapter_fusion`` (the
        saved tensors are cast to it)."""
        adapter_dtype = check_adapter_dtype(adapter_dtype)
        name = fusion.load_adapter_fusion(
            self, adapter_fusion_name_or_path, load_as, set_active, overwrite_ok
        )
        self._apply_fusion_dtype(name, adapter_dtype)
        return name

    def save_all_adapter_fusions(self, save_directory: str) -> None:
        """Save every fusion layer into ``save_directory/<name>``."""
        fusion.save_all_adapter_fusions(self, save_directory)

    # -- saving / loading (see adapters.checkpoint) -----------------------------------------
    def save_adapter(
        self, save_directory: str, adapter_name: str, format: str | None = None, **kwargs: Any
    ) -> None:
        """Save adapter ``adapter_name`` into ``save_directory`` (created or replaced
        atomically): ``adapter_config.json`` + ``adapter_model.safetensors``. ``format="peft"``
        (or another registered foreign format) writes that format instead; ``kwargs`` are
        that format's options (e.g. ``layout="builtin"`` for bottleneck adapters in
        ``"adapterhub"``)."""
        saving.save_adapter(self, save_directory, adapter_name, format=format, **kwargs)

    def load_adapter(
        self,
        adapter_name_or_path: str,
        config: Any = None,
        load_as: str | None = None,
        set_active: bool = False,
        loading_info: dict[str, list[str]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Load an adapter directory (this library's format, or a foreign one a plugin reads,
        such as PEFT or AdapterHub); returns the adapter's name. ``config`` overrides the saved
        config (for ambiguous foreign checkpoints); ``load_as`` renames it. ``adapter_dtype``
        (keyword): the dtype of the loaded weights, as in `add_adapter` (default: float32 on a
        float16 / bfloat16 model).

        ``loading_info``: a dict that gets the lists ``"missing_keys"`` and
        ``"unexpected_keys"`` (created if absent, extended otherwise), as in AdapterHub. Loading
        is strict here, so after a successful load both are empty: a checkpoint with missing
        or unexpected tensors raises `CheckpointError` and leaves the model unchanged."""
        name = saving.load_adapter(
            self,
            adapter_name_or_path,
            config=config,
            load_as=load_as,
            set_active=set_active,
            **kwargs,
        )
        if loading_info is not None:
            loading_info.setdefault("missing_keys", [])
            loading_info.setdefault("unexpected_keys", [])
        return name

    def save_all_adapters(self, save_directory: str, **kwargs: Any) -> None:
        """Save every adapter into ``save_directory/<name>``."""
        saving.save_all_adapters(self, save_directory, **kwargs)

    def load_all_adapters(self, directory: str, set_active: bool = False) -> list[str]:
        """Load every adapter directory saved by ``save_all_adapters``; returns their names."""
        return saving.load_all_adapters(self, directory, set_active=set_active)

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
        """The base model's ``save_pretrained`` without adapter tensors, plus
        ``adapter_interface.json``, the active setup, every adapter in ``adapters/<name>`` and
        every fusion layer in ``adapter_fusions/<name>``;
        ``adapters.load_model(save_directory, ModelClass)`` restores all of it."""
        if embeddings.active_embeddings(self) != embeddings.DEFAULT:
            raise ConfigError(
                f"save_pretrained with embedding {embeddings.active_embeddings(self)!r} active "
                "would save it as the model's own; call set_active_embeddings('default') first "
                "and keep the embedding with save_embeddings"
            )
        parent_save = getattr(super(), "save_pretrained", None)
        model_folder.save_pretrained(
            self,
            save_directory,
            parent_save,
            *args,
            write_extra=lambda tmp: fusion.save_pretrained_fusions(self, tmp),
            **kwargs,
        )

    def average_adapter(
        self,
        adapter_name: str,
        adapter_list: list[str],
        weights: list[float] | None = None,
        combine_strategy: str = "linear",
        normalize_weights: bool = True,
        overwrite_ok: bool = False,
        set_active: bool = False,
        svd_rank: int | None = None,
        **options: Any,
    ) -> None:
        """Add ``adapter_name`` as a weighted combination of ``adapter_list``.

        ``combine_strategy="linear"`` takes the weighted sum of every parameter (the sources'
        configs must be equal except for ``dropout`` and ``init_weights``; the new adapter gets
        the first source's config); methods may offer others (LoRA: ``"lora_delta_w_svd"``,
        ``"lora_linear_only_negate_b"``). ``weights=None``: equal weights ``1/n``.
        ``svd_rank`` is passed to strategies that take it (None: the strategy's default), as
        are further ``options``."""
        if svd_rank is not None:
            options = {**options, "svd_rank": svd_rank}
        averaging.average_adapter(
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


class GenerateMixin:
    """Added only for classes that have ``generate``."""

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` of the model's class, with the prompt length made known to methods that
        treat prompt and generated tokens differently (ReFT). A ``Parallel`` setup is refused:
        generation keeps one sequence per example, while Parallel multiplies the batch.

        ``adapter_names=[...]`` (one adapter name or None per prompt) selects an adapter per
        example for every step, as in a forward call."""
        names = kwargs.pop(selection.KWARG, None)
        setup = ctx_mod.effective_setup(self)  # type: ignore[arg-type]
        if isinstance(setup, MultiTask) or (
            multitask.KWARG in kwargs and not multitask.forward_takes_task_ids(self)  # type: ignore[arg-type]
        ):
            kwargs, task_names = multitask.take_task_ids(
                self,  # type: ignore[arg-type]
                kwargs,
                setup,
                names is not None,
                _prompt_count(args, kwargs),
            )
            names = task_names if task_names is not None else names
        if names is None and setup is not None and expand_parallel(setup) is not None:
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
        if names is not None:
            names = selection.check_names(names)
            if getattr(getattr(self, "config", None), "is_encoder_decoder", False):
                raise CompositionError(
                    "generate(adapter_names=...) is not supported for encoder-decoder models "
                    "yet (the encoder runs outside the model call); generate per adapter with "
                    "`with AdapterSetup(name): model.generate(...)`"
                )
            if isinstance(inputs, torch.Tensor) and inputs.ndim >= 1 and len(names) != len(inputs):
                raise CompositionError(
                    f"adapter_names has {len(names)} entries but generate() got "
                    f"{len(inputs)} prompts; give one adapter name (or None) per prompt"
                )
        with ctx_mod.generation_scope(prompt), selection.generation_names(names):
            return super().generate(*args, **kwargs)  # type: ignore[misc]


def _prompt_count(args: tuple, kwargs: dict) -> int | None:
    inputs = kwargs.get(
        "input_ids",
        args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("inputs_embeds"),
    )
    return int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) and inputs.ndim >= 1 else None


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
