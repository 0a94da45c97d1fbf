"""Fixtures of the ReFT tests; helpers live in reft_helpers.py."""

from __future__ import annotations

import pytest
import torch

from .reft_helpers import tiny_llama


@pytest.fixture
def llama() -> torch.nn.Module:
    """A tiny seeded Llama (2 layers, width 32) prepared with the seed interface, eval mode."""
    return tiny_llama()
