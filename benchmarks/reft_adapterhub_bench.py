"""AdapterHub ``adapters`` 1.3.0 ReFT timings: adapter creation and one training step.

Run in the reference venv (``adapters==1.3.0``), one thread:

    <ref-venv>/bin/python benchmarks/reft_adapterhub_bench.py --reps 10 --json out.json

``benchmarks/reft_bench.py --adapterhub-python <ref-venv>/bin/python`` runs this script
between its own rounds and compares. The model and the ReFT config match reft_bench.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

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
BATCH, SEQ = 4, 64
REFT = dict(prefix_positions=3, suffix_positions=3, r=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", default=None, help="write the raw times here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    from transformers import AutoModelForCausalLM, LlamaConfig

    import adapters

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**MODEL))
    adapters.init(model)
    config = adapters.LoReftConfig(**REFT)

    create = []
    for i in range(args.reps):
        start = time.perf_counter()
        model.add_adapter(f"tmp{i}", config=config)
        create.append(time.perf_counter() - start)
        model.delete_adapter(f"tmp{i}")

    model.add_adapter("t", config=config)
    model.train_adapter("t")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, MODEL["vocab_size"], (BATCH, SEQ), generator=generator)
    mask = torch.ones_like(ids)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        optimizer.step()

    step()  # warm-up
    train = []
    for _ in range(args.reps):
        start = time.perf_counter()
        step()
        train.append(time.perf_counter() - start)

    result = {
        "adapters_version": adapters.__version__,
        "create_s": create,
        "train_step_s": train,
        "create_median_s": statistics.median(create),
        "train_step_median_s": statistics.median(train),
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    print(
        f"AdapterHub ReFT: create {result['create_median_s'] * 1e3:.2f} ms, "
        f"train step {result['train_step_median_s'] * 1e3:.2f} ms (medians of {args.reps})"
    )


if __name__ == "__main__":
    main()
