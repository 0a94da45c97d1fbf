"""torch.compile (inductor, fullgraph) against eager: the base model, LoRA and LoReFT.

Run (one thread, in a venv with adapters-core, adapters-lora, adapters-reft, transformers):

    OMP_NUM_THREADS=1 python benchmarks/compile_bench.py [--reps 30] \
        [--json benchmarks/results/compile.json]

Same model, batch and timing method as ``lora_bench.py`` (variants interleaved in a random
order per repetition; median times and the median / 25th-75th percentile of per-repetition
ratios). Every compiled model is first checked against its eager twin (max |difference|
reported). Inference only, under ``torch.inference_mode()``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import warnings

import torch
from lora_bench import BATCH, INTERFACE, MODEL, SEQ, base_model, forward, interleave, ratio_stats

LORA = "lora[r=8, alpha=16, attn_matrices=['q', 'v']]"
LOREFT = "loreft[r=4, prefix_positions=3, suffix_positions=3]"


def adapted(template: torch.nn.Module, config: str) -> torch.nn.Module:
    import adapters

    model = copy.deepcopy(template)
    methods = ["lora", "reft"]
    adapters.init(
        model, interface=adapters.AdapterModelInterface(**INTERFACE | {"adapter_methods": methods})
    )
    model.add_adapter("a", config=config, set_active=True)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero weights so the adapter computes a real edit
        for unit in model.get_adapter("a").values():
            for name, p in unit.named_parameters():
                if "projection" not in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", default="benchmarks/results/compile.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    ids = torch.randint(
        0, MODEL["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0)
    )
    template = base_model()
    models = {
        "base": copy.deepcopy(template),
        "lora": adapted(template, LORA),
        "loreft": adapted(template, LOREFT),
    }
    results: dict[str, dict] = {}
    variants = {}
    for name, model in models.items():
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        start = time.perf_counter()
        with torch.inference_mode():
            eager_out = model(input_ids=ids).logits
            compiled_out = compiled(input_ids=ids).logits
        compile_s = time.perf_counter() - start
        results[f"{name}: compiled vs eager"] = {
            "max_abs_diff": float((eager_out - compiled_out).abs().max()),
            "first_call_s": compile_s,
        }
        variants[f"{name} eager"] = forward(model, ids)
        variants[f"{name} compiled"] = forward(compiled, ids)
    times = interleave(variants, args.reps)
    for name in models:
        entry = results[f"{name}: compiled vs eager"]
        entry["ratio"] = ratio_stats(times, f"{name} compiled", f"{name} eager")
        entry["median_s"] = {
            "eager": statistics.median(times[f"{name} eager"]),
            "compiled": statistics.median(times[f"{name} compiled"]),
        }
    for name in ("lora", "loreft"):
        for mode in ("eager", "compiled"):
            results[f"{name} {mode} vs base {mode}"] = {
                "ratio": ratio_stats(times, f"{name} {mode}", f"base {mode}")
            }

    print(
        f"inductor, fullgraph; Llama-style {MODEL['num_hidden_layers']} layers x "
        f"{MODEL['hidden_size']}, batch {BATCH} x {SEQ} tokens, 1 thread, {args.reps} reps"
    )
    print(f"{'measurement':32s} {'median ratio':>12s} {'p25':>7s} {'p75':>7s}  medians")
    for name, r in results.items():
        s = r["ratio"]
        medians = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in r.get("median_s", {}).items())
        print(f"{name:32s} {s['median']:12.3f} {s['p25']:7.3f} {s['p75']:7.3f}  {medians}")
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "model": MODEL,
        "batch": BATCH,
        "seq": SEQ,
        "lora": LORA,
        "loreft": LOREFT,
        "reps": args.reps,
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
