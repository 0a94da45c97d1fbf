"""The plugin from docs/writing-a-plugin.md, installed as a distribution and found through its
entry point (tox installs examples/adapters-hidden-scale in the core and all environments)."""

import os
import subprocess
import sys

import pytest
import torch

if os.environ.get("ADAPTERS_REQUIRE_EXAMPLE_PLUGIN") == "1":
    import adapters_hidden_scale  # noqa: F401  (must be installed here: fail, don't skip)
else:
    pytest.importorskip("adapters_hidden_scale")

import adapters
from adapters import AdapterModelInterface, Average, Stack
from adapters.plugins import reload_plugins

from .. import models


def tiny_llama():
    return models.llama()


INTERFACE = AdapterModelInterface(**{**models.SEED_INTERFACE, "adapter_methods": ["hidden_scale"]})


def test_entry_point_is_discovered_with_its_distribution():
    registry = reload_plugins()
    spec = registry.methods["hidden_scale"]
    assert spec.distribution == "adapters-hidden-scale" and spec.version == "0.1.0"
    assert "hidden_scale" in adapters.AdapterMethod
    assert adapters.HiddenScaleConfig is spec.config_classes[0]


def test_plugins_command_lists_it():
    out = subprocess.run(
        [sys.executable, "-m", "adapters.cli", "plugins"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "hidden_scale" in out.stdout and "adapters-hidden-scale" in out.stdout


def test_the_example_trains_saves_and_loads(tmp_path):
    model = tiny_llama()
    adapters.init(model, interface=INTERFACE)
    ids = torch.randint(0, 100, (2, 6))
    base = model(ids).logits
    model.add_adapter("scale", config="hidden_scale[layers=(0,)]")
    model.train_adapter("scale")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.adapter_summary(as_dict=True)[0]["#param"] == 32
    model.eval()
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base)
    model.save_adapter(str(tmp_path / "scale"), "scale")
    fresh = tiny_llama()
    adapters.init(fresh, interface=INTERFACE)
    fresh.load_adapter(str(tmp_path / "scale"), set_active=True)
    assert torch.equal(fresh(ids).logits, adapted)
    fresh.add_adapter("other", config="hidden_scale")
    fresh.set_active_adapters(Average("scale", "other"))
    assert not torch.equal(fresh(ids).logits, adapted)
    fresh.set_active_adapters(Stack("scale", "other"))
    assert torch.equal(fresh(ids).logits, adapted)  # "other" is still the identity
