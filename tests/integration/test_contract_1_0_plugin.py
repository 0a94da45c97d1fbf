"""A plugin written for contract 1.0 keeps loading and behaving exactly as before under
contract 1.1 (the frozen copy in tests/fixtures/contract_1_0 of the example plugin as it was)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

if os.environ.get("ADAPTERS_REQUIRE_EXAMPLE_PLUGIN") == "1":
    import adapters_hidden_scale  # noqa: F401  (its entry point is what loads the 1.0 copy)
else:
    pytest.importorskip("adapters_hidden_scale")

ROOT = pathlib.Path(__file__).parents[2]
FROZEN = ROOT / "tests" / "fixtures" / "contract_1_0"

SCRIPT = r"""
import json, sys, tempfile
import torch
import adapters
from adapters.registry import get_registry
import adapters_hidden_scale.plugin as plugin
from tests import models

spec = get_registry().methods["hidden_scale"]
model = models.llama()
interface = adapters.AdapterModelInterface(
    **{**models.SEED_INTERFACE, "adapter_methods": ["hidden_scale"]}
)
adapters.init(model, interface=interface)
model.eval()
ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
model.add_adapter("a", config="hidden_scale[layers=(0, 1)]", set_active=True)
model.add_adapter("b", config="hidden_scale[layers=(1,)]")
gen = torch.Generator().manual_seed(1)
with torch.no_grad():
    for name, param in model.named_parameters():
        if ".units." in name:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
out = {"file": plugin.__file__, "contract": plugin.ADAPTERS_CONTRACT,
       "errors": [e.error for e in get_registry().load_errors]}
out["a"] = model(ids).logits.flatten()[:20].tolist()
model.set_active_adapters(adapters.Stack("a", "b"))
out["stack"] = model(ids).logits.flatten()[:20].tolist()
with tempfile.TemporaryDirectory() as folder:
    model.save_adapter(folder, "b")
    model.load_adapter(folder, load_as="c", set_active=True)
    out["c"] = model(ids).logits.flatten()[:20].tolist()
model.delete_adapter("a")
out["summary"] = [(r["name"], r["#param"]) for r in model.adapter_summary(as_dict=True)]
print("RESULT" + json.dumps(out))
"""


def _run(frozen: bool) -> dict:
    env = dict(os.environ)
    paths = [str(FROZEN)] if frozen else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_a_contract_1_0_plugin_loads_and_behaves_as_the_current_one():
    old, new = _run(frozen=True), _run(frozen=False)
    assert old["file"].startswith(str(FROZEN)) and old["contract"] == "1.0"
    assert not new["file"].startswith(str(FROZEN)) and new["contract"] == "1.1"
    assert old["errors"] == [] and new["errors"] == []
    for key in ("a", "stack", "c", "summary"):
        assert old[key] == new[key], key


def test_a_contract_1_0_plugin_passes_the_conformance_kit():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(FROZEN), str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/core/test_conformance_example.py",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
