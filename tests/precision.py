"""Half-precision helpers shared by the test packages (importable as ``tests.precision``):
a tiny Llama in float16 / bfloat16 next to its float32 twin, and a few training steps with
``torch.amp.GradScaler`` (float16) or plain bf16 that report losses and which tensors moved."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import adapters
from adapters import AdapterModelInterface
from tests import models

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 61, 7], [12, 1, 77, 31, 9, 50, 2, 44]])
HALF = [torch.bfloat16, torch.float16]


def llama_pair(
    interface: dict[str, Any], dtype: torch.dtype, seed: int = 0
) -> tuple[nn.Module, nn.Module]:
    """(float32 tiny Llama, the same weights in ``dtype``), both initialised for adapters."""
    reference = models.llama(seed)
    half = copy.deepcopy(reference).to(dtype)
    return (
        adapters.init(reference, interface=AdapterModelInterface(**interface)),
        adapters.init(half, interface=AdapterModelInterface(**interface)),
    )


def adapter_dtypes(model: nn.Module, name: str) -> set[torch.dtype]:
    """The dtypes of adapter ``name``'s floating parameters."""
    return {p.dtype for m in model.get_adapter(name).values() for p in m.parameters()}


def perturb(model: nn.Module, name: str, seed: int = 1, scale: float = 0.1) -> None:
    """Add seeded noise to every parameter of adapter ``name`` (LoRA's B starts at zero), in
    float32 then cast, so two models given the same call get the same (rounded) weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(model.get_adapter(name)):
            for _, p in sorted(model.get_adapter(name)[key].named_parameters()):
                noise = scale * torch.randn(p.shape, generator=gen)
                p.copy_((p.float() + noise).to(p.dtype))


def copy_adapter(source: nn.Module, target: nn.Module, name: str) -> None:
    """Copy adapter ``name``'s tensors from ``source`` to ``target`` (cast to target's dtypes)."""
    tensors = source.adapter_state_dict(name)
    with torch.no_grad():
        for key, value in target.adapter_state_dict(name).items():
            value.copy_(tensors[key])


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def train(
    model: nn.Module, name: str, steps: int = 8, lr: float = 1e-2
) -> tuple[list[float], dict[str, bool]]:
    """Train adapter ``name`` on a tiny next-token task (memorise ``IDS``) with AdamW: with a
    ``GradScaler`` when the model is float16. Returns the float32 losses of each step and, per
    adapter tensor, whether it changed. Raises if a loss, gradient or weight is non-finite."""
    model.train_adapter(name)
    params = {
        f"{key}.{pname}": p
        for key, module in model.get_adapter(name).items()
        for pname, p in module.named_parameters()
    }
    before = {k: p.detach().clone() for k, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    fp16 = next(model.parameters()).dtype == torch.float16
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=IDS, labels=IDS).loss
        if not torch.isfinite(loss):
            raise AssertionError(f"non-finite loss {loss.item()}")
        losses.append(loss.item())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        for key, p in params.items():
            if not torch.isfinite(p).all():
                raise AssertionError(f"non-finite adapter weight {key}")
    with torch.no_grad():
        losses.append(model(input_ids=IDS, labels=IDS).loss.item())
    model.eval()
    moved = {k: not torch.equal(before[k], p.detach()) for k, p in params.items()}
    return losses, moved
