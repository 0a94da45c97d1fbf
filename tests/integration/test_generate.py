"""``generate()`` with every method: KV cache on and off, left padding, beam search.

For methods whose edit of a token does not depend on where the prompt ends (LoRA family,
bottleneck adapters), generation must equal a plain loop that re-runs the whole sequence and
takes the arg-max. ReFT edits prompt positions only, so its reference is generation without a
cache (core tells the method the prompt length in both cases).
"""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import AdapterModelInterface
from tests.models import SEED_INTERFACE, llama
from tests.upstream import relies_on

if not {"lora", "reft", "bottleneck"} <= set(adapters.AdapterMethod):
    pytest.skip(
        "needs adapters-lora, adapters-reft and adapters-bottleneck", allow_module_level=True
    )

INTERFACE = dict(
    SEED_INTERFACE,
    adapter_methods=["lora", "reft", "bottleneck"],
    layer_pre_self_attn="input_layernorm",
    layer_pre_ffn="post_attention_layernorm",
)
PAD = 0
# two prompts of different lengths, left-padded as generation expects
PROMPTS = torch.tensor([[PAD, PAD, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26]])
MASK = (PROMPTS != PAD).long()
NEW_TOKENS = 5

POSITION_INDEPENDENT = [
    "lora[r=4, init_weights='bert']",
    "ia3",
    "dora[r=4, init_weights='bert']",
    "seq_bn",
    "double_seq_bn",
    "par_bn",
]
PROMPT_ONLY = ["loreft[r=2]", "noreft[r=2]", "direft[r=2]"]


def _randomize(model: torch.nn.Module, name: str) -> None:
    # adapters start as (or close to) the identity: make them change the outputs clearly
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.get_adapter(name).values():
            for p in module.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _plain() -> torch.nn.Module:
    return llama(pad_token_id=PAD)


def _adapted(config: str) -> torch.nn.Module:
    model = _plain()
    adapters.init(model, interface=AdapterModelInterface(**INTERFACE))
    model.add_adapter("a", config=config, set_active=True)
    _randomize(model, "a")
    return model.eval()


def _generate(model, **kwargs) -> torch.Tensor:
    return model.generate(
        input_ids=PROMPTS,
        attention_mask=MASK,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=PAD,
        **kwargs,
    )


@torch.no_grad()
def _greedy_loop(model) -> torch.Tensor:
    ids, mask = PROMPTS, MASK
    for _ in range(NEW_TOKENS):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("config", POSITION_INDEPENDENT)
def test_generation_equals_the_plain_loop_with_and_without_cache(config):
    model = _adapted(config)
    expected = _greedy_loop(model)
    with adapters.AdapterSetup(None):
        base = _greedy_loop(model)
    assert not torch.equal(expected, base), "the adapter must change what is generated"
    with relies_on("cached_generation", _plain):  # skips only if the plain model fails too
        assert torch.equal(_generate(model, use_cache=True), expected)
        assert torch.equal(_generate(model, use_cache=False), expected)


@pytest.mark.parametrize("config", PROMPT_ONLY)
def test_reft_generation_with_cache_equals_without(config):
    model = _adapted(config)
    with relies_on("cached_generation", _plain):
        cached = _generate(model, use_cache=True)
        assert torch.equal(cached, _generate(model, use_cache=False))
    with adapters.AdapterSetup(None):
        assert not torch.equal(cached, _generate(model, use_cache=True))


@pytest.mark.parametrize("config", [POSITION_INDEPENDENT[0], "seq_bn", PROMPT_ONLY[0]])
def test_beam_search_with_cache_equals_without(config):
    model = _adapted(config)
    with relies_on("cached_generation", _plain):
        cached = _generate(model, use_cache=True, num_beams=3)
        assert torch.equal(cached, _generate(model, use_cache=False, num_beams=3))
