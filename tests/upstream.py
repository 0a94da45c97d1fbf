"""Tell an upstream breakage from ours (importable as ``tests.upstream``).

A test that relies on something transformers and torch give the plain model (a compiled
training step, with activation checkpointing or without; cached generation; SDPA) wraps its
body in ``with relies_on(capability, build):``, where ``build()`` makes the plain model the
test adapts, built the same way, with no adapters. The body runs as before; only if it fails
is the plain model checked, and only if the plain model cannot do the capability either is the
test skipped, with ``upstream: transformers <version>: <reason>``. Otherwise the failure is
raised as it was: a failure of ours is never hidden, and a passing test costs no check.

Each check result is kept per (capability, model class, config) for the session.
``tests/core/test_upstream.py`` tests this module; on the pinned versions
(``constraints/*.txt``) it also checks that every capability holds for the models the gated
tests build, so a broken check cannot turn a failure of ours into a skip in CI.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator

import pytest
import torch
import transformers
from torch import nn

Check = Callable[[nn.Module], None]

#: What each capability checks on the plain model, by name (``relies_on``'s first argument).
CAPABILITIES: dict[str, Check] = {}
#: Per (capability, model class, config): ``None`` if the plain model can, else the reason.
_results: dict[tuple[str, str, str], str | None] = {}


def capability(name: str) -> Callable[[Check], Check]:
    """Register a check: it gets a freshly built plain model and raises if it cannot."""

    def register(check: Check) -> Check:
        CAPABILITIES[name] = check
        return check

    return register


@contextlib.contextmanager
def relies_on(name: str, build: Callable[[], nn.Module]) -> Iterator[None]:
    """Run the block; if it fails and the plain model ``build()`` returns cannot do ``name``
    either, skip the test with the upstream reason, else re-raise the block's failure."""
    if name not in CAPABILITIES:
        raise KeyError(f"unknown capability {name!r}; known: {', '.join(sorted(CAPABILITIES))}")
    try:
        yield
    except (Exception, pytest.fail.Exception) as ours:
        reason = plain_failure(name, build)
        if reason is None:
            raise
        message = f"upstream: transformers {transformers.__version__}: {reason}"
        try:  # reported at the test's location, not this line (pytest's own skip markers do so)
            skipped = pytest.skip.Exception(message, _use_item_location=True)
        except TypeError:  # a pytest without that keyword
            skipped = pytest.skip.Exception(message)
        raise skipped from ours


def plain_failure(name: str, build: Callable[[], nn.Module]) -> str | None:
    """Why the plain model ``build()`` returns cannot do ``name`` (``None``: it can), checked
    once per (capability, model class, config) per session."""
    model = build()
    key = (name, f"{type(model).__module__}.{type(model).__qualname__}", _config_key(model))
    if key not in _results:
        _results[key] = failure(CAPABILITIES[name], model)
    return _results[key]


def failure(check: Check, model: nn.Module) -> str | None:
    """Run ``check`` on ``model``: ``None`` if it passes, else a one-line reason."""
    try:
        check(model)
    except Exception as error:  # whatever the plain model raises is the upstream reason
        lines = str(error).strip().splitlines()
        said = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        return f"the plain {type(model).__name__} fails {check.__name__}: {said}"[:400]
    return None


def _config_key(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return repr(model)
    # the attention implementation is not part of the serialised config
    attention = getattr(config, "_attn_implementation", None)
    return f"{config.to_json_string(use_diff=False)}|attn={attention}"


def _batch(model: nn.Module, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences, the first left-padded by two tokens (token ids from 3 on)."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def _compiled_training(model: nn.Module, checkpointing: bool) -> None:
    """One training step (forward and backward) of ``model`` compiled with ``fullgraph=True``
    and ``aot_eager`` gives the eager gradients; with ``checkpointing``, under transformers'
    non-reentrant activation checkpointing (as the tests use it)."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "_require_grads_hook"):  # transformers 5 installs it, 4.57 does not
            model.disable_input_require_grads()  # its hook calls requires_grad_ in the graph
    model.train()
    ids, mask = _batch(model)
    twin = copy.deepcopy(model)

    def grads(call: nn.Module, module: nn.Module) -> dict[str, torch.Tensor]:
        loss = call(ids, attention_mask=mask, labels=ids, use_cache=False).loss
        loss.backward()
        return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    try:
        eager = grads(model, model)
        fast = grads(torch.compile(twin, fullgraph=True, backend="aot_eager"), twin)
    finally:
        torch._dynamo.reset()  # leave no compiled frame behind for the test that follows
    assert sorted(fast) == sorted(eager) and eager, "compiled and eager train other parameters"
    for name, grad in eager.items():
        torch.testing.assert_close(
            fast[name], grad, atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
        )


@capability("compiled_training")
def compiled_training_step(model: nn.Module) -> None:
    _compiled_training(model, checkpointing=False)


@capability("compiled_checkpointed_training")
def compiled_training_step_with_checkpointing(model: nn.Module) -> None:
    _compiled_training(model, checkpointing=True)


@capability("cached_generation")
@torch.no_grad()
def cached_generation(model: nn.Module) -> None:
    """Greedy ``generate`` with the KV cache and without gives, at every step, the logits of
    one uncached forward over the generated sequence (left-padded batch; encoder-decoder
    models: the decoder's inputs)."""
    model.eval()
    ids, mask = _batch(model, length=6)
    steps = 4
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    encoder_decoder = model.config.is_encoder_decoder
    if encoder_decoder:
        mask = torch.ones_like(ids)  # the tests' encoder-decoder batches are not padded
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1)
    kwargs.update(pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
    if encoder_decoder and getattr(model.config, "decoder_start_token_id", None) is None:
        kwargs["decoder_start_token_id"] = pad  # as the tests pass it for T5
    for use_cache in (True, False):
        out = model.generate(ids, attention_mask=mask, use_cache=use_cache, **kwargs)
        got = torch.stack(out.logits, 1)
        if encoder_decoder:
            decoder_ids = out.sequences[:, :-1]
            expected = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        else:
            tokens = out.sequences[:, :-1]
            full = torch.cat([mask, torch.ones_like(mask[:, :1]).expand(-1, steps - 1)], 1)
            positions = (full.cumsum(-1) - 1).clamp(min=0)
            expected = model(
                tokens, attention_mask=full, position_ids=positions, use_cache=False
            ).logits
        torch.testing.assert_close(
            got,
            expected[:, -steps:],
            atol=1e-4,
            rtol=1e-4,
            msg=lambda m, use_cache=use_cache: f"use_cache={use_cache}: {m}",
        )


@capability("sdpa")
@torch.no_grad()
def sdpa_equals_eager_attention(model: nn.Module) -> None:
    """The model with SDPA attention gives its eager attention's logits at the real tokens of a
    left-padded batch, alone and after a pre-filled KV cache (transformers' own prefix path)
    with the mask extended over it."""
    from transformers import DynamicCache

    model.eval()
    eager = copy.deepcopy(model)
    model.config._attn_implementation = "sdpa"
    eager.config._attn_implementation = "eager"
    ids, mask = _batch(model, length=6)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    prefix = torch.randn(2, 2, heads, 3, head_dim, generator=torch.Generator().manual_seed(1))
    cache_arg = (
        "cache"
        if "cache" in inspect.signature(type(model).forward).parameters
        else "past_key_values"
    )

    def logits(m: nn.Module, cached: bool) -> torch.Tensor:
        if not cached:
            return m(ids, attention_mask=mask, position_ids=positions).logits
        cache = DynamicCache()
        for layer in range(config.num_hidden_layers):
            cache.update(prefix[0].expand(2, -1, -1, -1), prefix[1].expand(2, -1, -1, -1), layer)
        full = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1)
        return m(ids, attention_mask=full, position_ids=positions, **{cache_arg: cache}).logits

    real = mask.bool()  # padded queries attend to nothing: their outputs are arbitrary
    for cached in (False, True):
        torch.testing.assert_close(
            logits(model, cached)[real],
            logits(eager, cached)[real],
            atol=1e-5,
            rtol=0,
            msg=lambda m, cached=cached: f"cache={cached}: {m}",
        )
