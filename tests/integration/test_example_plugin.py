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
from adapters.registry.loading import reload_plugins

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
        [sys.executable, "-m", "adapters.tools.cli", "plugins"],
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


def test_the_entry_point_loads_the_plugin_module_declaring_the_contract():
    registry = reload_plugins()
    plugin = registry.pm.get_plugin("hidden_scale")
    assert plugin.ADAPTERS_CONTRACT == adapters.hookspecs.CONTRACT_VERSION
    hooks = {c.name: c for c in registry.pm.get_hookcallers(plugin)}
    assert set(hooks) == {
        "adapters_register_methods",
        "adapters_add_adapter",
        "adapters_delete_adapter",
    }
    for caller in hooks.values():
        [impl] = [i for i in caller.get_hookimpls() if i.plugin is plugin]
        assert impl.function.__module__ == "adapters_hidden_scale.plugin"


def _installed_distribution(root, name, module, source):
    """A distribution installed into directory ``root``: its metadata (with one
    ``adapters.methods`` entry point) and its module, as pip would leave them."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[adapters.methods]\n{module} = {module}\n")
    (root / f"{module}.py").write_text(source)


COPYCAT = """
from dataclasses import dataclass
from typing import ClassVar

from adapters import AdapterConfig, MethodSpec, hookimpl

ADAPTERS_CONTRACT = "1.0"


@dataclass(frozen=True)
class CopycatConfig(AdapterConfig):
    method: ClassVar[str] = "copycat"


@hookimpl
def adapters_register_methods(register):
    register(MethodSpec("copycat", (CopycatConfig,), {"hidden_scale": CopycatConfig()}))
"""


def _plugins_command(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    return subprocess.run(
        [sys.executable, "-m", "adapters.tools.cli", "plugins"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


def test_an_installed_plugin_claiming_the_examples_preset_is_refused(tmp_path):
    # Entry points load in name order: "zz_copycat" comes after "hidden_scale".
    _installed_distribution(tmp_path, "adapters-copycat", "zz_copycat", COPYCAT)
    out = _plugins_command(tmp_path)
    assert out.returncode == 1
    assert (
        "CONFLICT: plugin 'zz_copycat' (adapters-copycat) was not loaded: PluginConflictError: "
        "preset 'hidden_scale' is already provided by plugin 'hidden_scale' "
        "(adapters-hidden-scale 0.1.0)"
    ) in out.stderr
    assert "hidden_scale" in out.stdout and "copycat" not in out.stdout


def test_an_installed_0_1_plugin_is_refused_and_the_example_still_loads(tmp_path):
    old = COPYCAT.replace('ADAPTERS_CONTRACT = "1.0"\n', "").replace('"hidden_scale"', '"old"')
    _installed_distribution(tmp_path, "adapters-old", "old_plugin", old)
    out = _plugins_command(tmp_path)
    assert out.returncode == 1
    assert (
        "FAILED to load plugin 'old_plugin' (adapters-old): PluginContractError: plugin "
        "'old_plugin' (adapters-old 1.0) declares no plugin contract version"
    ) in out.stderr
    assert "serves contract 1.1" in out.stderr
    assert "hidden_scale" in out.stdout
