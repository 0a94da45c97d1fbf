"""Train an adapter with ``accelerate``: the script that test_accelerate.py launches.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file docs/accelerate-ddp.yaml \
        tests/integration/accelerate_train.py OUT

A tiny seeded Llama gets a LoRA adapter (and, where adapters-bottleneck is installed, a
sequential bottleneck adapter stacked after it); both train for a few steps on fixed data with
the loop accelerate documents (``prepare``, ``backward``, a sharded ``DataLoader``). Each rank
writes ``OUT/rank<N>.pt``: its adapter weights, the names of the parameters that had a
gradient, how many values DDP all-reduced per step, and what accelerate set up. The same
functions run in one process without accelerate for the reference (``train_single``).

Self-contained on purpose (no import from ``tests``): the launcher runs it as a plain file.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.data import DataLoader

import adapters
from adapters import Stack
from adapters.registry.loading import installed_methods
from adapters.testing import llama_interface

STEPS = 4
GLOBAL_BATCH = 8
LENGTH = 6
LR = 0.5


def methods() -> list[str]:
    """The adapters this run trains: LoRA, plus a bottleneck adapter where it is installed."""
    return ["lora", "bottleneck"] if "bottleneck" in installed_methods() else ["lora"]


def build_model() -> torch.nn.Module:
    """A tiny seeded Llama with the adapters of `methods` added and set to train."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = LlamaForCausalLM(config)
    names = methods()
    adapters.init(model, interface=llama_interface(names))
    # B (LoRA) and the up projection (bottleneck) start non-zero so that every tensor moves
    model.add_adapter("l", config="lora[r=4, alpha=16, init_weights='bert', init_weights_seed=1]")
    if "bottleneck" in names:
        model.add_adapter("b", config="seq_bn[reduction_factor=4, init_weights='bert']")
        model.train_adapter(Stack("l", "b"))
    else:
        model.train_adapter("l")
    return model


def adapter_names() -> list[str]:
    return ["l", "b"] if "bottleneck" in methods() else ["l"]


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor, keyed ``<adapter>/<key>``."""
    return {
        f"{name}/{key}": value.detach().clone()
        for name in adapter_names()
        for key, value in model.adapter_state_dict(name).items()
    }


def data() -> torch.Tensor:
    """``STEPS`` global batches of token ids, fixed."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 100, (STEPS * GLOBAL_BATCH, LENGTH), generator=gen)


def train(model, optimizer, loader, backward, on_grads=None) -> None:
    """The loop: one optimizer step per batch; ``on_grads(model)`` sees the gradients."""
    model.train()
    for ids in loader:
        loss = model(input_ids=ids, labels=ids).loss
        backward(loss)
        if on_grads is not None:
            on_grads()
        optimizer.step()
        optimizer.zero_grad()


def train_single() -> dict[str, torch.Tensor]:
    """One process, no accelerate, the whole global batch per step: the reference."""
    model = build_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    train(model, optimizer, DataLoader(data(), batch_size=GLOBAL_BATCH), lambda x: x.backward())
    return adapter_weights(model)


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = build_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    per_process = GLOBAL_BATCH // accelerator.num_processes
    loader = DataLoader(data(), batch_size=per_process)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    reduced: list[int] = []
    if isinstance(prepared, torch.nn.parallel.DistributedDataParallel):

        def count_and_allreduce(state, bucket):
            reduced.append(bucket.buffer().numel())
            work = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        prepared.register_comm_hook(None, count_and_allreduce)

    with_grad: set[str] = set()

    def record_grads() -> None:
        with_grad.update(n for n, p in model.named_parameters() if p.grad is not None)

    train(prepared, optimizer, loader, accelerator.backward, record_grads)
    unwrapped = accelerator.unwrap_model(prepared)
    torch.save(
        {
            "adapter": adapter_weights(unwrapped),
            "with_grad": sorted(with_grad),
            "adapter_params": sorted(n for n, p in unwrapped.named_parameters() if p.requires_grad),
            "reduced_per_step": sum(reduced) / STEPS,
            "adapter_numel": sum(v.numel() for v in adapter_weights(unwrapped).values()),
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "backend": accelerator.state.backend,
            "wrapper": type(prepared).__name__,
            "steps": len(loader),
        },
        os.path.join(out_dir, f"rank{accelerator.process_index}.pt"),
    )
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
