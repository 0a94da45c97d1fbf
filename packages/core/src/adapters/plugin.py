"""The plugin namespace: everything a method plugin may use from adapters-core, in one place.

A plugin imports from here and nowhere else in ``adapters`` (the first-party plugins do; a test
checks it). What is not exported here is private to core and may change in any release; what is
exported here is the plugin contract, versioned by `CONTRACT_VERSION` (minor versions only add)::

    from adapters.plugin import AdapterConfig, AdapterHost, MethodSpec, Stack, hookimpl

    ADAPTERS_CONTRACT = "1.1"

The groups, as the plugin guide (``docs/writing-a-plugin.md``) teaches them:

- declaring a plugin: `hookimpl`, `CONTRACT_VERSION`, `MethodSpec`, `CheckpointFormat`;
- configs: `AdapterConfig`, `AdapterFusionConfig`, `ACTIVATIONS` (activation functions by name);
- sites (what ``adapters.init`` resolved the interface to): `ModelSites`, `LayerSite`,
  `ModuleSite`, `ParameterSite`, `AttentionSite`, `SubBlockSite`, `projection_shape`;
- the forward pass: `AdapterHost`, the one way in (``add_hook``, ``add_sub_block_hook``,
  ``add_virtual_tokens``, ``add_kv_prefix``, each returning a `Handle`; units; rollback),
  `SharedParameters` (parameters shared across layers), `made_like` / `placement_of` (the one
  placement policy: build on the CPU, place like the adapted module), `VirtualTokens`,
  `ForwardContext`, `context_for`, `is_compiling`, `record_undo`;
- composition: the blocks (`Stack`, `Parallel`, `Fuse`, `Split`, `BatchSplit`, `Average`,
  `PerExample`, `AdapterCompositionBlock`), `apply_setup`, `CompositionHandler`, `Compose`,
  `Rows`, `select_rows`;
- checkpoints: `load_tensor_file`, `read_json_object`, `recorded_name` (readers that never
  unpickle), `configs_equal_for_average`;
- errors: `AdaptersError`, `ConfigError`, `InterfaceError`, `CompositionError`,
  `CheckpointError`.
"""

from __future__ import annotations

from ._runtime.averaging import configs_equal_for_average
from ._runtime.rollback import record_undo
from .activations import ACTIVATIONS
from .checkpoint.readers import load_tensor_file, read_json_object, recorded_name
from .composition import (
    AdapterCompositionBlock,
    Average,
    BatchSplit,
    Compose,
    CompositionHandler,
    Fuse,
    Parallel,
    PerExample,
    Rows,
    Split,
    Stack,
    apply_setup,
    select_rows,
)
from .configs import AdapterConfig
from .context import ForwardContext, context_for, is_compiling
from .declarations import CheckpointFormat, MethodSpec
from .errors import AdaptersError, CheckpointError, CompositionError, ConfigError, InterfaceError
from .fusion_config import AdapterFusionConfig
from .hookspecs import CONTRACT_VERSION
from .hosts import AdapterHost, Handle, SharedParameters, made_like, placement_of
from .registry.loading import hookimpl
from .sites import (
    AttentionSite,
    LayerSite,
    ModelSites,
    ModuleSite,
    ParameterSite,
    SubBlockSite,
    projection_shape,
)
from .virtual import VirtualTokens

__all__ = [
    "ACTIVATIONS",
    "CONTRACT_VERSION",
    "AdapterCompositionBlock",
    "AdapterConfig",
    "AdapterFusionConfig",
    "AdapterHost",
    "AdaptersError",
    "AttentionSite",
    "Average",
    "BatchSplit",
    "CheckpointError",
    "CheckpointFormat",
    "Compose",
    "CompositionError",
    "CompositionHandler",
    "ConfigError",
    "ForwardContext",
    "Fuse",
    "Handle",
    "InterfaceError",
    "LayerSite",
    "MethodSpec",
    "ModelSites",
    "ModuleSite",
    "Parallel",
    "ParameterSite",
    "PerExample",
    "Rows",
    "SharedParameters",
    "Split",
    "Stack",
    "SubBlockSite",
    "VirtualTokens",
    "apply_setup",
    "configs_equal_for_average",
    "context_for",
    "hookimpl",
    "is_compiling",
    "load_tensor_file",
    "made_like",
    "placement_of",
    "projection_shape",
    "read_json_object",
    "record_undo",
    "recorded_name",
    "select_rows",
]
