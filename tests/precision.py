"""Half-precision helpers shared by the test packages (importable as ``tests.precision``):
a tiny Llama in float16 / bfloat16 next to its float32 twin, and a few training steps with
``torch.amp.GradScaler`` (float16) or plain bf16 that report losses and which tensors moved;
and the ``check_*`` functions that every method's precision tests run (each asserts)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import adapters
from adapters import AdapterModelInterface
from adapters.errors import ConfigError
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


# -- checks shared by every method's precision tests ----------------------------------------
# Each takes the interface (a dict, as in tests.models) and ``make_config``, a callable that
# returns a fresh config (or preset name) of the method under test, and asserts.

ConfigFactory = Callable[[], Any]


def _build(interface: dict[str, Any]) -> nn.Module:
    return adapters.init(models.llama(0), interface=AdapterModelInterface(**interface))


def check_dtype_policy(
    interface: dict[str, Any], make_config: ConfigFactory, dtype: torch.dtype
) -> nn.Module:
    """On a ``dtype`` model, adapter "a" (default) is float32 and "b" (``adapter_dtype="model"``)
    is ``dtype``. Returns the half-precision model for further checks."""
    _, half = llama_pair(interface, dtype)
    half.add_adapter("a", make_config())
    assert adapter_dtypes(half, "a") == {torch.float32}
    half.add_adapter("b", make_config(), adapter_dtype="model")
    assert adapter_dtypes(half, "b") == {dtype}
    return half


def check_invalid_adapter_dtype(
    interface: dict[str, Any],
    make_config: ConfigFactory,
    bad: tuple[Any, ...] = ("int8", "half-ish", torch.int32, 3),
    match: str = "adapter_dtype",
) -> None:
    """Each invalid ``adapter_dtype`` raises ``ConfigError`` (message matching ``match``) and
    leaves the bfloat16 model without adapters and with the same modules and parameters."""
    _, half = llama_pair(interface, torch.bfloat16)
    modules = [n for n, _ in half.named_modules()]
    params = [n for n, _ in half.named_parameters()]
    for value in bad:
        with pytest.raises(ConfigError, match=match):
            half.add_adapter("a", make_config(), adapter_dtype=value)
    assert not half.has_adapters()
    assert [n for n, _ in half.named_modules()] == modules
    assert [n for n, _ in half.named_parameters()] == params


def check_forward_close_to_float32(
    interface: dict[str, Any],
    make_config: ConfigFactory,
    dtype: torch.dtype,
    adapter_dtype: Any = None,
    scale: float = 0.1,
) -> None:
    """An adapter with the same (perturbed) weights on the float32 model and on its ``dtype``
    copy: the half-precision logits keep ``dtype``, are finite and close to float32 (5% of the
    largest logit in bfloat16, 1% in float16)."""
    reference, half = llama_pair(interface, dtype)
    reference.add_adapter("a", make_config(), set_active=True)
    perturb(reference, "a", scale=scale)
    half.add_adapter("a", make_config(), set_active=True, adapter_dtype=adapter_dtype)
    copy_adapter(reference, half, "a")
    expected, got = logits(reference), logits(half)
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    error = (got.float() - expected).abs().max().item()
    assert error < tolerance * expected.abs().max().item(), error


def check_training_converges(
    interface: dict[str, Any], make_config: ConfigFactory, dtype: torch.dtype, lr: float = 1e-2
) -> nn.Module:
    """`train` on the ``dtype`` model (GradScaler in float16): the loss falls by more than 0.05
    and every adapter tensor moves. Returns the trained model."""
    _, half = llama_pair(interface, dtype)
    half.add_adapter("a", make_config())
    losses, moved = train(half, "a", lr=lr)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(moved.values()), [k for k, v in moved.items() if not v]
    return half


def check_meta_device_then_to_empty(
    interface: dict[str, Any], make_config: ConfigFactory, perturbed: bool = True
) -> None:
    """A model built under ``torch.device("meta")`` takes the (seeded) adapter, and once
    materialised (``to_empty``) and loaded gives the logits of a model built normally."""
    reference = _build(interface)
    reference.add_adapter("a", make_config(), set_active=True)
    if perturbed:
        perturb(reference, "a")
    with torch.device("meta"):
        meta = _build(interface)
        meta.add_adapter("a", make_config(), set_active=True)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.load_state_dict(reference.state_dict(), strict=False)
    copy_adapter(reference, meta, "a")
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            meta.get_buffer(name).copy_(buffer)
    torch.testing.assert_close(logits(meta), logits(reference))


def check_seeded_init_under_device_context(
    interface: dict[str, Any], make_config: ConfigFactory
) -> None:
    """``add_adapter`` inside ``with torch.device("meta")`` (cuda on a GPU) creates the adapter
    on the adapted weights' device with the same seeded values as outside it."""
    plain = _build(interface)
    plain.add_adapter("a", make_config())
    inside = _build(interface)
    with torch.device("meta"):
        inside.add_adapter("a", make_config())
    expected = plain.adapter_state_dict("a")
    got = inside.adapter_state_dict("a")
    assert got.keys() == expected.keys() and expected
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
