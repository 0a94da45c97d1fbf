"""adapters-lora against PEFT (same rank, alpha and targets) and the base model.

Run (one thread, in a venv with adapters-core, adapters-lora, peft, transformers):

    python benchmarks/lora_bench.py [--reps 30] [--json benchmarks/results/lora.json]

Each measurement interleaves the variants in a random order per repetition, so machine noise
hits them alike, and reports the median time of each variant and the median and spread
(25th-75th percentile) of the per-repetition ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch

MODEL = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=1000,
    max_position_embeddings=256,
)
BATCH, SEQ = 4, 64
RANK, ALPHA = 8, 16
TARGETS = ["q", "v"]

INTERFACE = dict(
    adapter_methods=["lora"],
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


def base_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**MODEL)).eval()


def make_ours(model: torch.nn.Module) -> torch.nn.Module:
    import adapters

    adapters.init(model, interface=adapters.AdapterModelInterface(**INTERFACE))
    model.add_adapter("a", config=f"lora[r={RANK}, alpha={ALPHA}, attn_matrices={TARGETS!r}]")
    return model


def make_peft(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=[f"{t}_proj" for t in TARGETS]
    )
    return get_peft_model(model, config)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(
    variants: dict[str, Callable[[], object]], reps: int, warmup: int = 3
) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(0)
    for _ in range(reps):
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            times[name].append(timed(variants[name]))
    return times


def ratio_stats(times: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    ratios = sorted(a / b for a, b in zip(times[num], times[den]))
    q = statistics.quantiles(ratios, n=4)
    return {"median": statistics.median(ratios), "p25": q[0], "p75": q[2]}


def train_step(model: torch.nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer):
    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def forward(model: torch.nn.Module, ids: torch.Tensor):
    def run() -> None:
        with torch.inference_mode():
            model(input_ids=ids)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", default="benchmarks/results/lora.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    ids = torch.randint(
        0, MODEL["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0)
    )
    template = base_model()
    results: dict[str, dict] = {}

    # init + add_adapter vs get_peft_model (fresh copies each time; copying is not timed)
    creation: dict[str, list[float]] = {"ours": [], "peft": []}
    rng = random.Random(1)
    for _ in range(args.reps):
        pair = [("ours", make_ours), ("peft", make_peft)]
        rng.shuffle(pair)
        for name, make in pair:
            fresh = copy.deepcopy(template)
            creation[name].append(timed(lambda make=make, fresh=fresh: make(fresh)))
    results["init + add_adapter vs get_peft_model"] = {
        "ratio": ratio_stats(creation, "ours", "peft"),
        "median_s": {k: statistics.median(v) for k, v in creation.items()},
    }

    base = copy.deepcopy(template)
    ours = make_ours(copy.deepcopy(template))
    peft_model = make_peft(copy.deepcopy(template))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero B so both compute a real delta
        for unit in ours.get_adapter("a").values():
            for p in unit.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    ours.train_adapter("a")
    peft_model.train()
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
    opt_peft = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    times = interleave(
        {"ours": train_step(ours, ids, opt_ours), "peft": train_step(peft_model, ids, opt_peft)},
        args.reps,
    )
    results["training step vs PEFT"] = {
        "ratio": ratio_stats(times, "ours", "peft"),
        "median_s": {k: statistics.median(v) for k, v in times.items()},
    }

    ours.eval()
    peft_model.eval()
    times = interleave(
        {"ours": forward(ours, ids), "peft": forward(peft_model, ids), "base": forward(base, ids)},
        args.reps,
    )
    results["active inference vs PEFT"] = {
        "ratio": ratio_stats(times, "ours", "peft"),
        "median_s": {k: statistics.median(v) for k, v in times.items()},
    }

    ours.set_active_adapters(None)
    times = interleave({"ours": forward(ours, ids), "base": forward(base, ids)}, args.reps)
    results["added but inactive vs base"] = {
        "ratio": ratio_stats(times, "ours", "base"),
        "median_s": {k: statistics.median(v) for k, v in times.items()},
    }

    ours.set_active_adapters("a")
    ours.merge_adapter("a")
    times = interleave({"ours": forward(ours, ids), "base": forward(base, ids)}, args.reps)
    results["merged vs base"] = {
        "ratio": ratio_stats(times, "ours", "base"),
        "median_s": {k: statistics.median(v) for k, v in times.items()},
    }

    print(
        f"LoRA r={RANK} on {TARGETS}, Llama-style {MODEL['num_hidden_layers']} layers x "
        f"{MODEL['hidden_size']}, batch {BATCH} x {SEQ} tokens, 1 thread, {args.reps} reps"
    )
    print(f"{'measurement':40s} {'median ratio':>12s} {'p25':>7s} {'p75':>7s}")
    for name, r in results.items():
        s = r["ratio"]
        print(f"{name:40s} {s['median']:12.3f} {s['p25']:7.3f} {s['p75']:7.3f}")
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "model": MODEL,
        "batch": BATCH,
        "seq": SEQ,
        "rank": RANK,
        "targets": TARGETS,
        "reps": args.reps,
    }
    try:
        import peft
        import transformers

        meta.update(peft=peft.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
