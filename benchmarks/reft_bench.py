"""adapters-reft against the base model (forward overhead) and against AdapterHub's ReFT
(adapter creation, training step).

Run (one thread, in a venv with adapters-core, adapters-reft, transformers):

    python benchmarks/reft_bench.py [--reps 30] [--rounds 5] \
        [--adapterhub-python <ref-venv>/bin/python] [--json benchmarks/results/reft.json]

Forward overhead: base model, model with an added but inactive LoReFT adapter and with it
active are timed in a random order per repetition (interleaved), and the per-repetition ratios
to the base are reported as median and spread (25th-75th percentile).

Against AdapterHub (a different venv, so a different process): ``--rounds`` rounds alternate a
block of our measurements with a block run by ``reft_adapterhub_bench.py`` in the reference
venv; each round gives one ratio (ours / AdapterHub, medians of the block), reported as median
and spread. The model (Llama, 8 layers, width 256) and the config (LoReFT, r=4, 3 prefix and 3
suffix positions, untied) are the same on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

MODEL = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=1000,
    max_position_embeddings=256,
)
#: a wider model for the forward overhead: ReFT's cost is per layer and per edited token, so
#: relative to the layer's own compute it shrinks as the model grows.
LARGE = dict(
    MODEL,
    hidden_size=1024,
    intermediate_size=2752,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=8,
)
BATCH, SEQ = 4, 64
REFT = dict(prefix_positions=3, suffix_positions=3, r=4)
HERE = os.path.dirname(os.path.abspath(__file__))

INTERFACE = dict(
    adapter_methods=["reft"],
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
)


def build_model(sizes: dict | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    import adapters

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**(sizes or MODEL))).eval()
    return adapters.init(model, interface=adapters.AdapterModelInterface(**INTERFACE))


def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, MODEL["vocab_size"], (BATCH, SEQ), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, : SEQ // 4] = 0  # one left-padded example, as in batched inference
    return {"input_ids": ids, "attention_mask": mask}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2]}


def forward_overhead(reps: int, sizes: dict) -> dict[str, object]:
    """Base vs inactive vs active adapter, interleaved; ratios per repetition."""
    from adapters import AdapterSetup
    from adapters_reft import LoReftConfig

    model = build_model(sizes)
    model.add_adapter("t", config=LoReftConfig(**REFT))
    batch = inputs()

    def run(setup: str | None) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad(), AdapterSetup(setup):
                return model(**batch)

        return call

    variants = {"base": run(None), "inactive": None, "active": run("t")}
    model_no_adapter = build_model(sizes)

    def base_call() -> object:
        with torch.no_grad():
            return model_no_adapter(**batch)

    variants["base"] = base_call
    variants["inactive"] = run(None)
    for fn in variants.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            times[name].append(timed(variants[name]))
    ratios = {
        name: summary([t / b for t, b in zip(times[name], times["base"])])
        for name in ("inactive", "active")
    }
    return {
        "model": {"type": "llama", **sizes},
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio_to_base": ratios,
    }


def ours_block(reps: int) -> dict[str, float]:
    """Our creation time and training step time (medians of ``reps``)."""
    from adapters_reft import LoReftConfig

    model = build_model()
    config = LoReftConfig(**REFT)
    create = []
    for i in range(reps):
        create.append(timed(lambda i=i: model.add_adapter(f"tmp{i}", config=config)))
        model.delete_adapter(f"tmp{i}")
    model.add_adapter("t", config=config)
    model.train_adapter("t")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = inputs()
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])  # as the AdapterHub script

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()

    step()
    train = [timed(step) for _ in range(reps)]
    return {"create_s": statistics.median(create), "train_step_s": statistics.median(train)}


def adapterhub_block(python: str, reps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ah.json")
        subprocess.run(
            [
                python,
                os.path.join(HERE, "reft_adapterhub_bench.py"),
                "--reps",
                str(reps),
                "--json",
                out,
            ],
            check=True,
            capture_output=True,
            text=True,
            # the reference venv must not see our ``adapters`` (same import name)
            env={
                **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                "OMP_NUM_THREADS": "1",
            },
        )
        with open(out, encoding="utf-8") as f:
            data = json.load(f)
    return {
        "create_s": data["create_median_s"],
        "train_step_s": data["train_step_median_s"],
        "version": data["adapters_version"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--adapterhub-python", default=None)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "reft.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    random.seed(0)

    result: dict[str, object] = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": 1,
        "model": {"type": "llama", **MODEL},
        "batch": [BATCH, SEQ],
        "reft": {"preset": "loreft", **REFT},
        "reps": args.reps,
        "rounds": args.rounds,
    }
    print(f"forward overhead ({args.reps} interleaved reps, batch {BATCH}x{SEQ}) ...")
    result["forward"] = forward_overhead(args.reps, MODEL)
    print("forward overhead, wider model ...")
    result["forward_large"] = forward_overhead(max(args.reps // 2, 5), LARGE)

    rounds = []
    for i in range(args.rounds):
        ours = ours_block(max(args.reps // 3, 5))
        entry = {"ours": ours}
        if args.adapterhub_python:
            entry["adapterhub"] = adapterhub_block(args.adapterhub_python, max(args.reps // 3, 5))
        rounds.append(entry)
        print(f"round {i + 1}/{args.rounds}: {entry}")
    result["rounds"] = rounds
    comparison: dict[str, object] = {
        key: {"ours_median_s": statistics.median(r["ours"][key] for r in rounds)}
        for key in ("create_s", "train_step_s")
    }
    if args.adapterhub_python:
        for key in ("create_s", "train_step_s"):
            ratios = [r["ours"][key] / r["adapterhub"][key] for r in rounds]
            comparison[key]["adapterhub_median_s"] = statistics.median(
                r["adapterhub"][key] for r in rounds
            )
            comparison[key]["ratio_ours_to_adapterhub"] = summary(ratios)
        result["adapterhub_version"] = rounds[0]["adapterhub"]["version"]
    result["vs_adapterhub"] = comparison

    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(table(result))
    print(f"wrote {args.json}")


def table(result: dict) -> str:
    lines = [
        "| measurement | median | ratio (median, p25-p75) |",
        "|---|---|---|",
    ]
    for key in ("forward", "forward_large"):
        fwd = result[key]
        size = f"d={fwd['model']['hidden_size']}, {fwd['model']['num_hidden_layers']} layers"
        lines.append(
            f"| forward ({size}), base model | {fwd['median_s']['base'] * 1e3:.2f} ms | 1 |"
        )
        for name in ("inactive", "active"):
            r = fwd["ratio_to_base"][name]
            lines.append(
                f"| forward ({size}), LoReFT {name} | "
                f"{fwd['median_s'][name] * 1e3:.2f} ms | {r['median']:.3f} "
                f"({r['p25']:.3f}-{r['p75']:.3f}) vs base |"
            )
    for key, label in (
        ("create_s", "create 8-layer LoReFT adapter"),
        ("train_step_s", "training step (fwd+bwd+AdamW)"),
    ):
        c = result["vs_adapterhub"][key]
        ours = f"{c['ours_median_s'] * 1e3:.2f} ms"
        if "ratio_ours_to_adapterhub" in c:
            r = c["ratio_ours_to_adapterhub"]
            lines.append(
                f"| {label}: ours / AdapterHub | {ours} / "
                f"{c['adapterhub_median_s'] * 1e3:.2f} ms | {r['median']:.3f} "
                f"({r['p25']:.3f}-{r['p75']:.3f}) |"
            )
        else:
            lines.append(f"| {label}: ours | {ours} | (no AdapterHub run) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
