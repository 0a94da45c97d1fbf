"""Which keyword parameters a model class's own ``forward`` takes (cached per class), so core
adds or passes a keyword only where the model understands it."""

from __future__ import annotations

import inspect
from typing import Any

_TAKES: dict[tuple[type, str], bool] = {}


def forward_takes(model: Any, name: str) -> bool:
    """Whether ``type(model).forward`` has a parameter called ``name``."""
    key = (type(model), name)
    found = _TAKES.get(key)
    if found is None:
        try:
            found = name in inspect.signature(type(model).forward).parameters
        except (TypeError, ValueError):
            found = False
        _TAKES[key] = found
    return found
