"""adapters: parameter-efficient adapter methods for any PyTorch / transformers model.

The core knows no method by itself; methods come from plugins (``adapters-lora``,
``adapters-reft``, third parties) found through the ``adapters.methods`` entry points.
Config classes such as ``adapters.LoRAConfig`` resolve lazily to the installed plugin's class.
"""

from __future__ import annotations

from typing import Any

from . import _moved
from ._runtime.api import ModelAdaptersMixin
from ._runtime.initialization import init, load_model
from ._runtime.state import is_initialized
from .composition import Average, BatchSplit, Fuse, MultiTask, Parallel, Split, Stack
from .configs import AdapterConfig, ConfigUnion
from .context import AdapterSetup, ForwardContext, current_context
from .errors import (
    AdapterNotFoundError,
    AdaptersError,
    CheckpointError,
    CompositionError,
    ConfigError,
    InterfaceError,
    InterfacePathError,
    MethodNotInstalledError,
    NotInitializedError,
)
from .fusion_config import (
    AdapterFusionConfig,
    DynamicAdapterFusionConfig,
    StaticAdapterFusionConfig,
)
from .interface import AdapterModelInterface
from .registry.loading import CheckpointFormat, MethodSpec, hookimpl

__version__ = "0.1.0"

_moved.install()


class _AdapterMethodMeta(type):
    def __iter__(cls):
        from .registry.loading import installed_methods

        return iter(installed_methods())

    def __contains__(cls, name: object) -> bool:
        from .registry.loading import installed_methods

        return name in installed_methods()

    def __getattr__(cls, name: str) -> str:
        from .registry.loading import get_registry

        if name in get_registry().methods:
            return name
        raise AttributeError(
            f"no installed adapter method {name!r}; installed: {sorted(get_registry().methods)}"
        )

    def __repr__(cls) -> str:
        return f"AdapterMethod({', '.join(cls)})"


class AdapterMethod(metaclass=_AdapterMethodMeta):
    """The method names of the installed plugins: ``list(AdapterMethod)``,
    ``"lora" in AdapterMethod``, ``AdapterMethod.lora == "lora"`` (when installed)."""

    @staticmethod
    def names() -> list[str]:
        """Installed method names, sorted."""
        return list(AdapterMethod)


def __getattr__(name: str) -> Any:
    """Resolve ``adapters.<SomethingConfig>`` to the installed plugin's config class, and
    ``adapters.AdapterTrainer`` (which needs transformers) on first use."""
    if name == "AdapterTrainer":
        from .tools.trainer import AdapterTrainer

        return AdapterTrainer
    if name.endswith("Config") and name[:1].isupper():
        from .errors import MethodNotInstalledError as _Missing
        from .registry.loading import distribution_for, get_registry

        registry = get_registry()
        cls = registry.config_class_named(name)
        if cls is not None:
            return cls
        dist = distribution_for(class_name=name)
        if dist is not None or registry.refusal_for(class_name=name):
            missing = f"adapters.{name} needs the {dist} package: pip install {dist}"
            raise _Missing(registry.unavailable(f"adapters.{name}", missing, class_name=name))
    raise AttributeError(f"module 'adapters' has no attribute {name!r}")


__all__ = [
    "AdapterConfig",
    "AdapterFusionConfig",
    "AdapterMethod",
    "AdapterModelInterface",
    "AdapterNotFoundError",
    "AdapterSetup",
    "AdaptersError",
    "Average",
    "BatchSplit",
    "CheckpointError",
    "CheckpointFormat",
    "CompositionError",
    "ConfigError",
    "ConfigUnion",
    "DynamicAdapterFusionConfig",
    "ForwardContext",
    "Fuse",
    "InterfaceError",
    "InterfacePathError",
    "MethodNotInstalledError",
    "MethodSpec",
    "ModelAdaptersMixin",
    "MultiTask",
    "NotInitializedError",
    "Parallel",
    "Split",
    "Stack",
    "StaticAdapterFusionConfig",
    "current_context",
    "hookimpl",
    "init",
    "is_initialized",
    "load_model",
]
