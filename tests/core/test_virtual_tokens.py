"""Virtual input tokens (prompt tuning's primitive, `adapters.virtual`), proved by an in-test
prompt-tuning plugin against the model called by hand with the prompt prepended: outputs
stripped to the real tokens, mask / positions / labels / token types extended, the forward
context in the coordinates of the extended sequence, mixed batches, ``generate`` with and
without a KV cache, activation checkpointing, compile, copies and rollback."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import adapters
from adapters import AdapterModelInterface, InterfaceError, plugins
from adapters.context import context_for

from .. import models
from ..upstream import relies_on
from .conftest import SEED_INTERFACE, llama
from .toy_prompt import METHOD, N, ToyPromptConfig, ToyPromptPlugin, set_prompt


@pytest.fixture
def plugin():
    registry = plugins.get_registry()
    registry.register(ToyPromptPlugin(), METHOD)
    yield
    registry.unregister(METHOD)


def prompted_llama(seed=1, names=("p",), **overrides):
    model = llama(**overrides)
    adapters.init(
        model, interface=AdapterModelInterface(**{**SEED_INTERFACE, "adapter_methods": [METHOD]})
    )
    prompts = {}
    for i, name in enumerate(names):
        model.add_adapter(name, ToyPromptConfig())
        prompts[name] = set_prompt(model, name, seed=seed + i)
    model.set_active_adapters(names[0])
    return model, prompts


def batch():
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    return ids, mask


def by_hand(model, prompt, ids, mask=None, **kwargs):
    """The model called with the prompt prepended by hand (no adapter runs)."""
    embeds = model.get_input_embeddings()(ids)
    b = ids.shape[0]
    full = torch.cat([prompt[None].expand(b, -1, -1), embeds], dim=1)
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([torch.ones(b, N, dtype=mask.dtype), mask], dim=1)
    with adapters.AdapterSetup(None):
        return model(inputs_embeds=full, **kwargs)


def test_logits_equal_the_prompt_prepended_by_hand_and_are_stripped(plugin):
    model, prompts = prompted_llama()
    ids, mask = batch()
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        expected = by_hand(model, prompts["p"], ids, mask).logits
        with adapters.AdapterSetup(None):
            base = model(ids, attention_mask=mask).logits
    assert got.shape == base.shape == (2, 6, 100)
    torch.testing.assert_close(got, expected[:, N:], rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-2


def test_mask_derived_positions_are_shifted_past_the_virtual_tokens(plugin):
    model, prompts = prompted_llama()
    ids, mask = batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=positions).logits
        full_positions = torch.cat([torch.arange(N)[None].expand(2, -1), positions + N], 1)
        expected = by_hand(model, prompts["p"], ids, mask, position_ids=full_positions).logits
    torch.testing.assert_close(got, expected[:, N:], rtol=0, atol=1e-5)


def test_hidden_states_and_attentions_are_stripped_and_labels_prefixed(plugin):
    model, prompts = prompted_llama(attn_implementation="eager")
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(
            ids,
            attention_mask=mask,
            labels=labels,
            output_hidden_states=True,
            output_attentions=True,
        )
        full_labels = torch.cat([torch.full((2, N), -100), labels], dim=1)
        expected = by_hand(
            model,
            prompts["p"],
            ids,
            mask,
            labels=full_labels,
            output_hidden_states=True,
            output_attentions=True,
        )
    assert all(h.shape == (2, 6, 32) for h in out.hidden_states)
    for got, want in zip(out.hidden_states, expected.hidden_states):
        torch.testing.assert_close(got, want[:, N:], rtol=0, atol=1e-5)
    # query rows stripped, key columns kept (each row still sums to 1)
    assert all(a.shape == (2, 4, 6, 6 + N) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1)[:, :, 2:], torch.ones(2, 4, 4))
    # PEFT's prompt-tuning loss: virtual positions ignored, the last one predicts token 0
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=1e-6)


def test_the_context_counts_virtual_columns_and_real_tokens_apart(plugin):
    model, _ = prompted_llama()
    ids, mask = batch()
    seen = []

    def probe(module, args, output):
        ctx = context_for(model)
        seen.append(
            (
                ctx.virtual_length,
                ctx.input_length,
                ctx.past_length,
                ctx.starts.tolist(),
                ctx.lengths.tolist(),
                ctx.real_token_mask().tolist(),
                ctx.virtual_in_input,
            )
        )

    model.model.layers[0].register_forward_hook(probe)
    with torch.no_grad():
        model(ids, attention_mask=mask)
        model(ids)  # no mask: every non-virtual column is real
    virtual, length, past, starts, lengths, real, in_input = seen[0]
    assert (virtual, length, past, in_input) == (N, N + 6, 0, True)
    assert starts == [N + 2, N] and lengths == [4, 6]
    assert real[0] == [False] * (N + 2) + [True] * 4
    assert seen[1][3:6] == ([N, N], [6, 6], [[False] * N + [True] * 6] * 2)


def test_an_inactive_or_deleted_prompt_leaves_the_model_as_it_was(plugin):
    model, _ = prompted_llama()
    ids, mask = batch()
    with torch.no_grad():
        with adapters.AdapterSetup(None):
            base = model(ids, attention_mask=mask).logits
        model.set_active_adapters(None)
        inactive = model(ids, attention_mask=mask).logits
        model.set_active_adapters("p")
        model.delete_adapter("p")
        deleted = model(ids, attention_mask=mask).logits
    assert torch.equal(inactive, base) and torch.equal(deleted, base)
    assert adapters._runtime.state.get_state(model).virtual_providers == []
    assert METHOD not in model.get_input_embeddings()._modules


def test_a_mixed_batch_masks_the_slots_of_examples_without_the_prompt(plugin):
    model, _ = prompted_llama(names=("p", "q"))
    ids, mask = batch()
    with torch.no_grad():
        mixed = model(ids, attention_mask=mask, adapter_names=["p", None]).logits
        with adapters.AdapterSetup(None):
            base = model(ids, attention_mask=mask).logits
        alone = model(ids, attention_mask=mask).logits  # "p" for both
        both = model(ids, attention_mask=mask, adapter_names=["q", "p"]).logits
        with adapters.AdapterSetup("q"):
            q = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(mixed[0], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[0], q[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1], alone[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_generate_with_a_cache_equals_uncached_steps(plugin, padded):
    model, _ = prompted_llama(seed=3)
    ids, mask = batch()
    if not padded:
        mask = torch.ones_like(mask)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with relies_on("cached_generation", llama), torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, **kwargs)
        uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
        tokens = models.greedy_uncached(model, ids, mask, 5)
        with adapters.AdapterSetup(None):
            base = model.generate(ids, attention_mask=mask, **kwargs)
        assert torch.equal(cached, tokens) and torch.equal(uncached, tokens)
    assert cached.shape == (2, 11)
    assert not torch.equal(cached, base)


def test_generate_with_adapter_names_mixes_prompted_and_plain_examples(plugin):
    model, _ = prompted_llama(seed=3)
    ids, mask = batch()
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(ids, attention_mask=mask, adapter_names=[None, "p"], **kwargs)
        with adapters.AdapterSetup(None):
            base = model.generate(ids, attention_mask=mask, **kwargs)
        prompted = model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[1], prompted[1])


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_prompt_gradients(plugin, reentrant):
    model, _ = prompted_llama()
    model.train_adapter("p")
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    prompt = model.get_input_embeddings()._modules[METHOD].units["p"].prompt

    def grad():
        prompt.grad = None
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        return prompt.grad.clone()

    plain = grad()
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    checkpointed = grad()
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)


def test_compiled_fullgraph_equals_eager(plugin):
    model, _ = prompted_llama()
    ids, mask = batch()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        got = compiled(ids, attention_mask=mask).logits
        with adapters.AdapterSetup(None):
            base = compiled(ids, attention_mask=mask).logits
            eager_base = model(ids, attention_mask=mask).logits
    torch._dynamo.reset()
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
    torch.testing.assert_close(base, eager_base, rtol=0, atol=1e-5)


def test_copies_carry_the_prompt(plugin):
    model, _ = prompted_llama()
    ids, mask = batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            providers = adapters._runtime.state.get_state(twin).virtual_providers
            assert providers[0].__self__ is twin.get_input_embeddings()._modules[METHOD]
            torch.testing.assert_close(twin(ids, attention_mask=mask).logits, expected)


def test_save_and_load_round_trip(plugin, tmp_path):
    model, _ = prompted_llama()
    ids, mask = batch()
    model.save_adapter(str(tmp_path / "p"), "p")
    fresh, _ = prompted_llama(names=("other",))
    fresh.load_adapter(str(tmp_path / "p"), load_as="p", set_active=True)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )


def test_a_failed_add_takes_the_provider_off_again(plugin, monkeypatch):
    model = llama()
    adapters.init(
        model, interface=AdapterModelInterface(**{**SEED_INTERFACE, "adapter_methods": [METHOD]})
    )

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    from . import toy_prompt

    monkeypatch.setattr(toy_prompt.PromptUnit, "to", broken)
    with pytest.raises(RuntimeError, match="boom"):
        model.add_adapter("p", ToyPromptConfig())
    assert adapters._runtime.state.get_state(model).virtual_providers == []
    assert METHOD not in model.get_input_embeddings()._modules


def test_bert_token_types_and_classification_labels(plugin):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=100,
            num_labels=N + 6,
        )
    ).eval()
    interface = AdapterModelInterface(**{**models.BERT_INTERFACE, "adapter_methods": [METHOD]})
    adapters.init(model, interface=interface)
    model.add_adapter("p", ToyPromptConfig(), set_active=True)
    prompt = set_prompt(model, "p")
    ids, mask = batch()
    types = torch.ones_like(ids)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, token_type_ids=types, labels=labels)
        full_types = torch.cat([torch.zeros(2, N, dtype=types.dtype), types], 1)
        expected = by_hand(model, prompt, ids, mask, token_type_ids=full_types, labels=labels)
    # sequence-level logits (here as wide as the extended sequence) are not stripped
    assert out.logits.shape == (2, N + 6)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=1e-6)


def test_encoder_decoder_models_are_refused_with_the_alternative(plugin):
    model = models.bart()
    interface = AdapterModelInterface(**{**models.BART_INTERFACE, "adapter_methods": [METHOD]})
    adapters.init(model, interface=interface)
    with pytest.raises(InterfaceError, match="encoder-decoder.*register_kv_prefix"):
        model.add_adapter("p", ToyPromptConfig())
    assert adapters._runtime.state.get_state(model).virtual_providers == []


def test_parallel_runs_each_prompt_on_its_replica(plugin):
    model, _ = prompted_llama(names=("p", "q"))
    ids, mask = batch()
    with torch.no_grad():
        with adapters.AdapterSetup(adapters.Parallel("p", "q")):
            both = model(ids, attention_mask=mask).logits
        alone = {}
        for name in ("p", "q"):
            with adapters.AdapterSetup(name):
                alone[name] = model(ids, attention_mask=mask).logits
    assert both.shape == (4, 6, 100)
    torch.testing.assert_close(both[:2], alone["p"], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[2:], alone["q"], rtol=0, atol=1e-5)
