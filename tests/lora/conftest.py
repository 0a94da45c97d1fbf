"""Fixtures of the adapters-lora tests; helpers live in lora_helpers.py."""

from __future__ import annotations

import pytest
from torch import nn

from .lora_helpers import LLAMA_INTERFACE, build_llama, init


@pytest.fixture
def llama() -> nn.Module:
    """A tiny seeded Llama prepared with the LoRA tests' Llama interface."""
    return init(build_llama(), LLAMA_INTERFACE)
