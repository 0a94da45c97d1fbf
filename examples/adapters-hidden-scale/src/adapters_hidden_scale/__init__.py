"""A complete, minimal adapters plugin: ``hidden_scale`` multiplies each layer's output hidden
state by ``1 + s``, with ``s`` a learned vector per layer (zero at start, so a new adapter
changes nothing until trained). It is the worked example of docs/writing-a-plugin.md.

Installed, it registers the ``hidden_scale`` method (preset ``"hidden_scale"``) through the
``adapters.methods`` entry point, which names `adapters_hidden_scale.plugin`.
"""

from __future__ import annotations

from .config import HiddenScaleConfig

__version__ = "0.1.0"

__all__ = ["HiddenScaleConfig"]
