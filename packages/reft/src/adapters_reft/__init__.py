"""adapters-reft: ReFT (LoReFT, NoReFT, DiReFT) for adapters-core.

Installed, it registers the ``reft`` method (presets ``"loreft"``, ``"noreft"``, ``"direft"``)
and the ``"adapterhub"`` checkpoint reader for ReFT (alias ``"adapterhub-reft"``) through
the ``adapters.methods`` entry point::

    model.add_adapter("task", config="loreft[prefix_positions=2, suffix_positions=2]")
"""

from __future__ import annotations

from .config import DiReftConfig, LoReftConfig, NoReftConfig, ReftConfig

__version__ = "0.1.0"

__all__ = ["DiReftConfig", "LoReftConfig", "NoReftConfig", "ReftConfig"]
