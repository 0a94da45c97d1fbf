"""``adapters demo``: the library end to end on a CPU, offline.

By default (`adapters.tools.demo_sentiment`): the real pretrained all-MiniLM-L6-v2 fine-tuned
with an adapter of each chosen method on the VADER sentiment lexicon (positive vs negative words
and phrases, held-out accuracy before and after, parameters and checkpoint size next to full
fine-tuning, a plot and a JSON summary). ``--method all`` runs every installed method.

With ``--quick`` (for CI and scripts): builds a small Llama-style model from a config (or loads ``--model``), describes it with an
`AdapterModelInterface`, adds an adapter of an installed method (``--method``, or the method's
default preset; ``--config`` for any config string), trains it on a toy task (continue a
counting sequence), prints the adapter summary, saves the adapter, reloads it into a fresh copy
of the model and checks that both give the same outputs.

Core names no method here: the method and its default preset come from the plugin registry.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any

import torch

from .._runtime.initialization import init
from ..configs import AdapterConfig, config_parts, resolve_config
from ..errors import ConfigError, MethodNotInstalledError
from ..interface import AdapterModelInterface
from ..registry.known import FIRST_PARTY
from ..registry.loading import Registry, get_registry

#: Where a Llama-style model (transformers' ``LlamaForCausalLM`` and most decoder LMs) keeps
#: its parts.
LLAMA_PATHS = dict(
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


def add_command(subparsers: Any) -> None:
    """Add ``demo`` to the ``adapters`` command."""
    parser = subparsers.add_parser(
        "demo",
        help="train, save and reload an adapter of an installed method on a tiny model (offline)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--method",
        help="an installed method (see `adapters plugins`), or `all` (every installed method; not "
        "with --quick); default: the first installed of the first-party methods, else the first "
        "installed method",
    )
    parser.add_argument(
        "--config",
        help='a config string, e.g. "lora[r=8, alpha=16]" (default: the method\'s default preset)',
    )
    parser.add_argument(
        "--model", help="--quick only: a local path or hub name of a Llama-style causal LM"
    )
    parser.add_argument("--steps", type=int, help="training steps (default 300; 200 with --quick)")
    parser.add_argument("--lr", type=float, help="learning rate (default 0.002; 0.02 with --quick)")
    parser.add_argument(
        "--output-dir",
        default="adapters-demo-output",
        help="where the adapter is saved (default ./adapters-demo-output)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the tiny-model demo (a few seconds, no pretrained model or data set needed)",
    )
    parser.set_defaults(func=demo_command)


def demo_method(registry: Registry, requested: str | None = None) -> str:
    """The method the demo uses: ``requested`` if installed, else the first installed
    first-party method (in the order of `adapters.registry.known.FIRST_PARTY`), else the first
    installed method by name.

    Raises:
        MethodNotInstalledError: ``requested`` is not installed, or no method is.
    """
    installed = sorted(registry.methods)
    if requested is not None:
        if requested not in registry.methods:
            raise registry.missing_method_error(requested)
        return requested
    first_party = [m for known in FIRST_PARTY.values() for m in known["methods"]]
    for method in first_party + installed:
        if method in registry.methods:
            return method
    raise MethodNotInstalledError(
        "adapters demo needs an adapter method plugin and none is installed; install one, "
        "e.g. pip install adapters-lora"
    )


def demo_config(registry: Registry, method: str, config: str | None = None) -> AdapterConfig:
    """``config`` resolved, or ``method``'s default preset (the first it declares).

    Raises:
        ConfigError: ``method`` declares no preset and no ``config`` is given, or ``config``
            belongs to another method.
    """
    if config is None:
        presets = registry.methods[method].presets
        if not presets:
            raise ConfigError(
                f"method {method!r} declares no preset; pass one with --config "
                f'(e.g. --config \'{{"method": "{method}"}}\' as a JSON file)'
            )
        return next(iter(presets.values()))
    resolved = resolve_config(config)
    methods = [part.method for part in config_parts(resolved)]
    if method not in methods:
        raise ConfigError(f"--config {config!r} is for {methods}, not for --method {method!r}")
    return resolved


def demo_command(args: argparse.Namespace) -> int:
    """Run the demo from parsed ``adapters demo`` arguments; returns the exit status."""
    registry = get_registry()
    try:
        if args.method == "all":
            if args.quick or args.config is not None:
                raise ConfigError("--method all runs each method's default preset, without --quick")
            if not registry.methods:
                demo_method(registry)  # raises with what to install
            configs = [(m, demo_config(registry, m)) for m in sorted(registry.methods)]
        elif args.config is not None and args.method is None:
            config = resolve_config(args.config)
            configs = [(config_parts(config)[0].method, config)]
        else:
            method = demo_method(registry, args.method)
            configs = [(method, demo_config(registry, method, args.config))]
    except (ConfigError, MethodNotInstalledError) as error:
        print(f"adapters demo: {error}", file=sys.stderr)
        return 2
    if args.quick:
        return run_demo(
            configs[0][1],
            model_name=args.model,
            steps=200 if args.steps is None else args.steps,
            lr=2e-2 if args.lr is None else args.lr,
            output_dir=args.output_dir,
            seed=args.seed,
        )
    if args.model is not None:
        print("adapters demo: --model is for --quick", file=sys.stderr)
        return 2
    from .demo_sentiment import run_sentiment_demo

    try:
        return run_sentiment_demo(
            configs,
            steps=300 if args.steps is None else args.steps,
            lr=2e-3 if args.lr is None else args.lr,
            seed=args.seed,
            output_dir=args.output_dir,
        )
    except MethodNotInstalledError as error:
        print(f"adapters demo: {error}", file=sys.stderr)
        return 2


def _build_model(name: str | None, seed: int) -> torch.nn.Module:
    try:
        from transformers import AutoModelForCausalLM, LlamaConfig
    except ImportError:
        raise MethodNotInstalledError(
            "adapters demo builds a transformers model: pip install 'adapters-core[transformers]'"
        ) from None
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


def run_demo(
    config: AdapterConfig,
    *,
    model_name: str | None = None,
    steps: int = 200,
    lr: float = 2e-2,
    output_dir: str = "adapters-demo-output",
    seed: int = 0,
) -> int:
    """Train an adapter with ``config`` on the counting task, save it, reload it into a fresh
    model and compare. Prints what it does; returns 0 if the loss fell and the reloaded
    adapter gives the same outputs, else 1."""
    started = time.perf_counter()
    methods = [part.method for part in config_parts(config)]
    interface = AdapterModelInterface(adapter_methods=methods, **LLAMA_PATHS)
    model = _build_model(model_name, seed)
    fresh = copy.deepcopy(model)  # an untouched copy to reload into later
    init(model, interface=interface)
    print(
        f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters; method: {', '.join(methods)}; adapter config: {config}"
    )
    model.add_adapter("demo", config=config)
    model.train_adapter("demo")

    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    bar = _progress(steps)
    losses = []
    for step in range(steps):
        ids = _batches(vocab, 16, 16, generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
        elif step % 10 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps} loss {loss.item():.3f}")
    if bar is not None:
        bar.close()
    window = max(1, min(5, steps // 2))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"loss: {first:.3f} (first {window} steps) -> {last:.3f} (last {window} steps)")

    model.eval()
    print(model.adapter_summary())
    adapter_dir = os.path.join(os.path.abspath(output_dir), "demo")
    model.save_adapter(adapter_dir, "demo")

    init(fresh, interface=interface)
    fresh.eval()
    fresh.load_adapter(adapter_dir, set_active=True)
    probe = _batches(vocab, 16, 4, torch.Generator().manual_seed(seed + 1))
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
    print(f"saved: {adapter_dir}; took {time.perf_counter() - started:.1f} s")
    if not agree or not last < first:
        print(
            "demo FAILED: " + ("reloaded outputs differ" if not agree else "loss did not fall"),
            file=sys.stderr,
        )
        return 1
    return 0
