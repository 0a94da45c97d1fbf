"""Import paths of contract 1.0 that the 1.1 layout moved, kept working for plugins and user
code written against them.

Each old module name resolves to the module that now holds it (the same module object, so a
``monkeypatch`` of the old path patches the new one); ``adapters.saving``, which 1.1 split into
the ``adapters.checkpoint`` subpackage, resolves to a module holding every name it had.
New code imports from the new places: a plugin from ``adapters`` and its public modules.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

#: old module -> the module that holds it now.
MOVED = {
    **{
        f"adapters.{name}": f"adapters._runtime.{name}"
        for name in (
            "api",
            "averaging",
            "embeddings",
            "forward",
            "fusion",
            "initialization",
            "lifecycle",
            "multitask",
            "naming",
            "precision",
            "recompute",
            "rollback",
            "selection",
            "signature",
            "state",
        )
    },
    **{
        f"adapters.{name}": f"adapters.tools.{name}"
        for name in ("cli", "convert", "demo", "demo_sentiment", "trainer")
    },
    "adapters.plugins": "adapters.registry.loading",
    "adapters.contract": "adapters.registry.contract",
    "adapters._known": "adapters.registry.known",
    "adapters._catalog": "adapters.registry.catalog",
}

#: old module -> the modules whose names it held (a split module).
SPLIT = {
    "adapters.saving": (
        "adapters.checkpoint.format",
        "adapters.checkpoint.manifest",
        "adapters.checkpoint.readers",
        "adapters.checkpoint.foreign",
        "adapters.checkpoint.adapter",
        "adapters.checkpoint.model",
        "adapters._runtime.averaging",
    ),
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names of moved modules (consulted after the ordinary finders)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname in MOVED or fullname in SPLIT:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default module; exec_module fills or replaces it

    def exec_module(self, module: ModuleType) -> None:
        name = module.__name__
        if name in MOVED:
            # the import system returns whatever sys.modules holds after exec_module
            sys.modules[name] = importlib.import_module(MOVED[name])
            return
        for source in SPLIT[name]:
            for key, value in vars(importlib.import_module(source)).items():
                if not key.startswith("__"):
                    module.__dict__.setdefault(key, value)


def install() -> None:
    """Add the finder once (``import adapters`` calls this)."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
