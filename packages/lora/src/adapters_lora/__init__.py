"""adapters-lora: LoRA, IA3 and DoRA for ``adapters`` (adapters-core).

Installing the distribution registers the ``lora`` method (presets ``"lora"``, ``"ia3"``,
``"dora"``) through the ``adapters.methods`` entry point, and the ``"peft"`` (read/write) and
``"adapterhub"`` (read) checkpoint formats.
"""

from .config import DoRAConfig, IA3Config, LoRAConfig

__version__ = "0.1.0"

__all__ = ["DoRAConfig", "IA3Config", "LoRAConfig"]
