"""Data-parallel training of an adapter: two CPU processes (gloo) with DistributedDataParallel.

Both ranks must end with identical adapter weights, equal to one process training on the same
global batch, and only the adapter's gradients may travel between the processes.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("adapters_lora")

import adapters
from adapters import AdapterModelInterface
from tests.models import LLAMA_INTERFACE, llama

STEPS = 4
GLOBAL_BATCH = 8


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 100, (GLOBAL_BATCH, 6), generator=gen) for _ in range(STEPS)]


def _model() -> torch.nn.Module:
    model = llama()
    adapters.init(model, interface=AdapterModelInterface(**LLAMA_INTERFACE))
    model.add_adapter("l", config="lora[r=4, alpha=16, init_weights='bert']")
    model.train_adapter("l")
    return model


def _train(model: torch.nn.Module, step_model: torch.nn.Module, rows: slice) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for ids in _batches():
        ids = ids[rows]
        loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        reduced: list[int] = []

        def count_and_allreduce(state, bucket):
            reduced.append(bucket.buffer().numel())
            work = dist.all_reduce(bucket.buffer().div_(world), async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        ddp.register_comm_hook(None, count_and_allreduce)
        share = GLOBAL_BATCH // world
        _train(model, ddp, slice(rank * share, (rank + 1) * share))
        torch.save(
            {"adapter": model.adapter_state_dict("l"), "reduced": sum(reduced) // STEPS},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        for layer in model.adapter_sites.layers:
            fully_shard(layer.layer.module)
        fully_shard(model)
        share = GLOBAL_BATCH // world
        _train(model, model, slice(rank * share, (rank + 1) * share))
        full = {
            key: value.full_tensor() if hasattr(value, "full_tensor") else value
            for key, value in model.adapter_state_dict("l").items()
        }
        torch.save(
            {"adapter": full, "class": type(model).__name__},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    single = _model()
    _train(single, single, slice(0, GLOBAL_BATCH))
    expected = single.adapter_state_dict("l")
    adapter_numel = sum(p.numel() for p in expected.values())

    for result in ranks:
        assert result["adapter"].keys() == expected.keys()
        for key, value in result["adapter"].items():
            torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-6)
        # only the adapter's gradients are all-reduced, once per step
        assert result["reduced"] == adapter_numel
    for key, value in ranks[0]["adapter"].items():
        assert torch.equal(value, ranks[1]["adapter"][key])


def test_fsdp_shards_and_trains_an_adapter_like_one_process(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _model()
    _train(single, single, slice(0, GLOBAL_BATCH))
    expected = single.adapter_state_dict("l")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["class"].startswith("FSDP")  # the model really was sharded
        assert result["adapter"].keys() == expected.keys()
        for key, value in result["adapter"].items():
            torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-6)
