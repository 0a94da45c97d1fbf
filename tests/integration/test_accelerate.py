"""``accelerate launch`` with the training guide's config: two CPU processes (gloo) train a LoRA
adapter (and a bottleneck adapter where installed) and end with identical adapter weights,
equal to one process training on the same global batch; only adapter parameters get gradients
and only they are all-reduced.

The launched script is accelerate_train.py next to this file; the config is
docs/accelerate-ddp.yaml, which docs/training.md shows verbatim (checked below).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("adapters_lora")

from tests.integration import accelerate_train as script

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "docs" / "accelerate-ddp.yaml"


def test_the_guide_shows_the_config_file_verbatim():
    guide = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", guide, flags=re.DOTALL)
    assert CONFIG.read_text(encoding="utf-8") in blocks


def test_accelerate_launch_trains_like_one_process_on_the_global_batch(tmp_path):
    env = dict(
        os.environ,
        # what `--cpu` would mean, for the multi-process launcher (`--cpu` starts one process)
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(sys.path),
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",  # what the `accelerate` command runs
        "launch",
        "--config_file",
        str(CONFIG),
        str(Path(script.__file__)),
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    initial_model = script.build_model()
    initial = script.adapter_weights(initial_model)
    trainable = sorted(n for n, p in initial_model.named_parameters() if p.requires_grad)
    # the trainable parameters are exactly the adapters' tensors
    assert sum(p.numel() for p in initial_model.parameters() if p.requires_grad) == sum(
        v.numel() for v in initial.values()
    )
    expected = script.train_single()
    assert len(expected) == len(initial) > 0
    for key, value in expected.items():  # training moved every adapter tensor
        assert (value - initial[key]).abs().max() > 1e-5, key

    for result in ranks:
        # really two processes of one data-parallel job, each on its half of every batch
        assert result["num_processes"] == 2
        assert result["distributed_type"] == "DistributedType.MULTI_CPU"
        assert result["backend"] == "gloo"
        assert result["wrapper"] == "DistributedDataParallel"
        assert result["steps"] == script.STEPS
        # only the adapters train, all of their parameters get gradients, and DDP all-reduces
        # exactly those values once per step (find_unused_parameters not needed)
        assert result["adapter_params"] == trainable
        assert result["with_grad"] == trainable
        assert (
            result["reduced_per_step"]
            == result["adapter_numel"]
            == sum(v.numel() for v in expected.values())
        )
        assert result["adapter"].keys() == expected.keys()
        for key, value in result["adapter"].items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)
    for key, value in ranks[0]["adapter"].items():
        assert torch.equal(value, ranks[1]["adapter"][key])
