"""Per-model state that core keeps on an initialised model (a plain object in the instance's
``__dict__``, not a module): the interface, the resolved sites and the added adapters."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..composition import AdapterCompositionBlock
from ..configs import AdapterConfig, config_parts
from ..errors import NotInitializedError
from ..fusion_config import AdapterFusionConfig
from ..interface import AdapterModelInterface
from ..sites import ModelSites

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
class FusionEntry:
    """One added fusion layer (``add_adapter_fusion``): the adapters it fuses, its config, the
    method that owns it and the modules that method created."""

    name: str
    children: tuple[str, ...]
    config: AdapterFusionConfig
    method: str
    modules: dict[str, nn.Module] = field(default_factory=dict)

    def parameters(self) -> Iterable[nn.Parameter]:
        return AdapterEntry.parameters(self)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under name-independent keys ``{key}.{param}``."""
        return AdapterEntry.state_dict(self)  # type: ignore[arg-type]


@dataclass
class AdaptersState:
    """Per-model state kept by core (a plain object on the model instance, not a module)."""

    interface: AdapterModelInterface
    sites: ModelSites
    adapters: dict[str, AdapterEntry] = field(default_factory=dict)
    fusions: dict[str, FusionEntry] = field(default_factory=dict)
    active_setup: AdapterCompositionBlock | None = None
    # handles of the model-level hooks ``init`` registered (removed when adapters are unloaded)
    hook_handles: list[Any] = field(default_factory=list)
    # Activation checkpointing re-runs layers during backward, after the model call that ran
    # them has returned. Each training call's context is remembered per layer input (see
    # _LayerHooks) so a re-run layer gets the context of the call it recomputes;
    # ``last_training_context`` is the fallback.
    last_training_context: Any = None
    layer_contexts: OrderedDict = field(default_factory=OrderedDict)
    recompute_context: Any = None
    layer_hook_handles: list[Any] = field(default_factory=list)  # only while in train mode
    # ``adapter_names`` lists seen recently → their `PerExample` setup (index tensors made once)
    per_example_setups: OrderedDict = field(default_factory=OrderedDict)
    # ``add_embeddings`` / ``set_active_embeddings``
    # (an `adapters._runtime.embeddings.EmbeddingsState`)
    embeddings: Any = None
    # `adapters.virtual.register_virtual_tokens` providers, in registration order
    virtual_providers: list[Any] = field(default_factory=list)

    def __deepcopy__(self, memo: dict) -> AdaptersState:
        # Modules inside are deep-copied through the memo, so copies point at the copied model.
        new = copy.copy(self)
        memo[id(self)] = new
        new.sites = copy.deepcopy(self.sites, memo)
        new.adapters = copy.deepcopy(self.adapters, memo)
        new.fusions = copy.deepcopy(self.fusions, memo)
        new.embeddings = copy.deepcopy(self.embeddings, memo)
        new.virtual_providers = copy.deepcopy(self.virtual_providers, memo)  # rebinds methods
        new.per_example_setups = OrderedDict()  # index tensors may sit on another device
        new.active_setup = self.active_setup
        new.hook_handles = copy.deepcopy(self.hook_handles, memo)  # bound to the copy's dicts
        new.last_training_context = None
        new.layer_contexts = OrderedDict()
        new.recompute_context = None
        new.layer_hook_handles = copy.deepcopy(self.layer_hook_handles, memo)
        return new


def get_state(model: nn.Module) -> AdaptersState:
    """The adapters state of ``model``; raises `NotInitializedError` if ``init`` was not called."""
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
