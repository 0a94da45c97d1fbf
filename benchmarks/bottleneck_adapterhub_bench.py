"""AdapterHub ``adapters`` 1.3.0 bottleneck timings: creation, training step, active
inference (seq_bn and par_bn on all-MiniLM-L6-v2 and a Llama-style model) and AdapterFusion
of 2 and 8 seq_bn adapters on all-MiniLM-L6-v2.

Run in the reference venv (``adapters==1.3.0``), one thread:

    <ref-venv>/bin/python benchmarks/bottleneck_adapterhub_bench.py --reps 10 [--json out.json]

prints the median of each measurement. ``benchmarks/bottleneck_bench.py --adapterhub-python
<ref-venv>/bin/python`` starts it with ``--serve`` instead and alternates single runs of ours
and of this process. The measurement code is ``bottleneck_common.prepare``, the same as ours;
AdapterHub is attached with its *built-in* model support (``adapters.init(model)`` without an
interface), for BertModel and for LlamaForCausalLM alike.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
from bottleneck_common import CLOCKS, medians, prepare, serve, set_clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", default=None, help="write the medians here")
    parser.add_argument("--serve", action="store_true", help="answer names on stdin")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = parser.parse_args()
    set_clock(args.clock)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    import transformers

    import adapters
    from adapters.composition import Fuse

    def init(model: torch.nn.Module, kind: str) -> torch.nn.Module:
        adapters.init(model)  # built-in BERT / Llama support
        return model

    measurements = prepare(init, Fuse)
    if args.serve:
        print(
            "@meta "
            + json.dumps(
                {
                    "adapters_version": adapters.__version__,
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                }
            ),
            flush=True,
        )
        serve(measurements)
        return
    result = medians(measurements, args.reps)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"adapters_version": adapters.__version__, "median_s": result}, f, indent=2)
    for key, value in result.items():
        print(f"{key:28s} {value * 1e3:9.2f} ms")


if __name__ == "__main__":
    main()
