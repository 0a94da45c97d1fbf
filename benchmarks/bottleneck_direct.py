"""One library alone in its own process: an adapted model against the plain model, thread CPU
time, alternating runs. The check behind the "outside the harness" lines of the bottleneck
section of docs/benchmarks.md (no second process waiting, no worker protocol).

Run it once in each venv and compare the printed times (one thread):

    OMP_NUM_THREADS=1 python benchmarks/bottleneck_direct.py --library ours --config par_bn
    OMP_NUM_THREADS=1 <ref-venv>/bin/python benchmarks/bottleneck_direct.py \\
        --library adapterhub --config par_bn

``--measure train`` times a training step (forward, backward, AdamW) instead of inference.
Both sides build the same model and batch (``bottleneck_common.py``); ours is attached with
the interface of ``bottleneck_bench.py``, AdapterHub with its built-in support.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from bottleneck_common import batch, build, forward_fn, step_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", choices=["ours", "adapterhub"], required=True)
    parser.add_argument("--config", default="par_bn")
    parser.add_argument("--model", choices=["llama", "minilm"], default="llama")
    parser.add_argument("--measure", choices=["inference", "train"], default="inference")
    parser.add_argument("--reps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)

    base = build(args.model)
    inputs = batch(args.model)
    model = copy.deepcopy(base)
    if args.library == "adapterhub":
        import adapters  # AdapterHub's package, in its own venv

        adapters.init(model)
    else:
        from bottleneck_bench import init_ours

        init_ours(model, args.model)
    model.add_adapter("a", config=args.config)
    if args.measure == "train":
        model.train_adapter("a")
        adapted, plain = step_fn(model, inputs), None
    else:
        model.eval()
        model.set_active_adapters("a")
        adapted, plain = forward_fn(model, inputs), forward_fn(base, inputs)
    for _ in range(5):
        adapted()
        if plain is not None:
            plain()
    times: dict[str, list[float]] = {"adapted": [], "plain": []}
    for _ in range(args.reps):
        for key, fn in (("adapted", adapted), ("plain", plain)):
            if fn is None:
                continue
            start = time.thread_time()
            fn()
            times[key].append(time.thread_time() - start)
    summary = {
        key: {"min_ms": min(v) * 1e3, "median_ms": statistics.median(v) * 1e3}
        for key, v in times.items()
        if v
    }
    print(json.dumps({"library": args.library, "config": args.config, **vars(args), **summary}))


if __name__ == "__main__":
    main()
