"""Virtual input tokens with other libraries and methods: the in-test prompt-tuning plugin
against PEFT's prompt tuning (same prompt → same logits, loss and greedy generation), and
ReFT stacked with it editing the real tokens, not the virtual ones."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import AdapterModelInterface, Stack, plugins
from tests.core.toy_prompt import METHOD, N, ToyPromptConfig, ToyPromptPlugin, set_prompt
from tests.models import SEED_INTERFACE, llama


@pytest.fixture
def plugin():
    registry = plugins.get_registry()
    registry.register(ToyPromptPlugin(), METHOD)
    yield
    registry.unregister(METHOD)


def prompted(methods=(METHOD,)):
    model = llama(seed=2)
    adapters.init(
        model, interface=AdapterModelInterface(**{**SEED_INTERFACE, "adapter_methods": methods})
    )
    model.add_adapter("p", ToyPromptConfig(), set_active=True)
    return model, set_prompt(model, "p", seed=5)


def test_equals_peft_prompt_tuning(plugin):
    peft = pytest.importorskip("peft")
    model, prompt = prompted()
    reference = peft.get_peft_model(
        llama(seed=2),
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    ).eval()
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(prompt)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, labels=ids)
        theirs = reference(input_ids=ids, attention_mask=mask, labels=ids)
        kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        generated = model.generate(ids, attention_mask=mask, **kwargs)
        # PEFT 0.21.2's own cached generation disagrees with its forward on transformers 5
        # (docs/writing-a-plugin.md); its uncached generation is the reference
        peft_generated = reference.generate(
            input_ids=ids, attention_mask=mask, use_cache=False, **kwargs
        )
    assert theirs.logits.shape == (2, N + 7, 100) and ours.logits.shape == (2, 7, 100)
    torch.testing.assert_close(ours.logits, theirs.logits[:, N:], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-6)
    assert torch.equal(generated, peft_generated)


@pytest.mark.skipif("reft" not in set(adapters.AdapterMethod), reason="needs adapters-reft")
def test_reft_stacked_with_virtual_tokens_edits_the_real_tokens(plugin, monkeypatch):
    from adapters_reft import LoReftConfig
    from adapters_reft.layer import ReftIntervention

    model, _ = prompted(methods=[METHOD, "reft"])
    model.add_adapter("r", LoReftConfig(r=2, prefix_positions=1, suffix_positions=1))
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    edited = []
    original = ReftIntervention.edit

    def spy(self, hidden, positions):
        edited.append(positions.pairs())
        return original(self, hidden, positions)

    monkeypatch.setattr(ReftIntervention, "edit", spy)
    with torch.no_grad():
        model.set_active_adapters(Stack("p", "r"))
        stacked = model(ids, attention_mask=mask).logits
        model.set_active_adapters("p")
        prompt_only = model(ids, attention_mask=mask).logits
    assert edited, "ReFT did not run"
    rows, columns = edited[0]
    # first and last real token of each example, in the coordinates of the extended sequence
    assert sorted(zip(rows.tolist(), columns.tolist())) == [
        (0, N + 2),
        (0, N + 5),
        (1, N),
        (1, N + 5),
    ]
    assert stacked.shape == (2, 6, 100)
    assert (stacked - prompt_only).abs().max() > 1e-4
