"""``adapters demo``: the library end to end in under a minute on a CPU, offline.

Builds a small Llama-style model from a config (or loads ``--model``), applies the seed
interface, adds a LoRA adapter, trains it on a toy task (continue a counting sequence) with a
progress bar, prints the adapter summary, saves the adapter, reloads it into a fresh model and
checks that both give the same outputs.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any

import torch

SEED_INTERFACE = dict(
    adapter_methods=["lora", "reft"],
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
DEMO_CONFIG = "lora[r=8, alpha=16, attn_matrices=['q', 'k', 'v', 'o'], output_lora=True]"


def register_command(subparsers: Any) -> None:
    """Adds ``demo`` to the ``adapters`` command (entry point group ``adapters.commands``)."""
    parser = subparsers.add_parser("demo", help="train, save and reload a LoRA adapter (offline)")
    parser.add_argument("--model", help="a local path or hub name of a Llama-style causal LM")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument(
        "--output-dir",
        default="adapters-demo-output",
        help="where the adapter is saved (default ./adapters-demo-output)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_demo)


def _build_model(name: str | None, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    if name:
        return AutoModelForCausalLM.from_pretrained(name)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config)


def _batches(vocab: int, seq_len: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Counting sequences ``s, s+1, s+2, ...`` (mod vocab): trivial to predict once learned,
    and unknown to a randomly initialised or pretrained model."""
    starts = torch.randint(0, vocab, (batch, 1), generator=generator)
    return (starts + torch.arange(seq_len)) % vocab


def _progress(total: int) -> Any:
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="training", unit="step", file=sys.stdout)
    except ImportError:  # tqdm comes with transformers; keep a plain fallback anyway
        return None


def run_demo(args: argparse.Namespace) -> int:
    import adapters
    from adapters import AdapterModelInterface

    started = time.perf_counter()
    interface = AdapterModelInterface(**SEED_INTERFACE)
    model = _build_model(args.model, args.seed)
    fresh = copy.deepcopy(model)  # an untouched copy to reload into later
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "reft" may not be installed; the demo uses LoRA only
        adapters.init(model, interface=interface)
    print(
        f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters; adapter config: {DEMO_CONFIG}"
    )
    model.add_adapter("demo", config=DEMO_CONFIG)
    model.train_adapter("demo")

    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    bar = _progress(args.steps)
    losses = []
    for step in range(args.steps):
        ids = _batches(vocab, 16, 16, generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
        elif step % 10 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.3f}")
    if bar is not None:
        bar.close()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"loss: {first:.3f} (first 5 steps) -> {last:.3f} (last 5 steps)")

    model.eval()
    print(model.adapter_summary())
    output_dir = os.path.abspath(args.output_dir)
    adapter_dir = os.path.join(output_dir, "demo")
    model.save_adapter(adapter_dir, "demo")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapters.init(fresh, interface=interface)
    fresh.eval()
    fresh.load_adapter(adapter_dir, set_active=True)
    probe = _batches(vocab, 16, 4, torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        expected = model(input_ids=probe).logits
        reloaded = fresh(input_ids=probe).logits
    difference = (expected - reloaded).abs().max().item()
    agree = difference <= 1e-5
    accuracy = (reloaded[:, :-1].argmax(-1) == probe[:, 1:]).float().mean().item()
    print(
        f"reloaded adapter from {adapter_dir}: outputs "
        f"{'agree' if agree else 'DIFFER'} (max |difference| {difference:.2e}); "
        f"next-token accuracy on the counting task {accuracy:.0%}"
    )
    print(
        f"saved: {adapter_dir} (adapter_config.json, adapter_model.safetensors); "
        f"took {time.perf_counter() - started:.1f} s"
    )
    if not agree or not last < first:
        print(
            "demo FAILED: " + ("reloaded outputs differ" if not agree else "loss did not fall"),
            file=sys.stderr,
        )
        return 1
    return 0
