"""Which tokens ReFT edits: real tokens only, left/right padding, KV cache, generate()."""

from __future__ import annotations

import torch

from adapters_reft.layer import select_positions
from tests.upstream import relies_on

from .reft_helpers import Capture, plain_tiny_llama, randomise

CPU = torch.device("cpu")


def _chosen(mask, prefix, suffix, past=0, length=None, prompt=None):
    mask = torch.tensor(mask)
    length = mask.shape[1] - past if length is None else length
    found = select_positions(mask, mask.shape[0], past, length, prompt, prefix, suffix, CPU)
    as_list = lambda pair: list(zip(pair[0].tolist(), pair[1].tolist()))  # noqa: E731
    return as_list(found.pairs("prefix")), as_list(found.pairs("suffix"))


def test_prefix_and_suffix_are_the_first_and_last_real_tokens_with_right_padding():
    prefix, suffix = _chosen([[1, 1, 1, 1, 1, 0, 0]], 2, 2)
    assert prefix == [(0, 0), (0, 1)] and suffix == [(0, 3), (0, 4)]


def test_left_padding_picks_the_same_real_tokens():
    prefix, suffix = _chosen([[0, 0, 1, 1, 1, 1, 1]], 2, 2)
    assert prefix == [(0, 2), (0, 3)] and suffix == [(0, 5), (0, 6)]


def test_overlapping_prefix_and_suffix_edit_each_token_once_suffix_first():
    prefix, suffix = _chosen([[1, 1, 1, 0]], 2, 2)
    assert prefix == [(0, 0)] and suffix == [(0, 1), (0, 2)]


def test_short_example_has_fewer_edits_and_pads_are_never_edited():
    prefix, suffix = _chosen([[0, 0, 0, 1], [1, 1, 1, 1]], 3, 0)
    assert prefix == [(0, 3), (1, 0), (1, 1), (1, 2)] and suffix == []


def test_without_mask_every_token_is_real():
    found = select_positions(None, 2, 0, 5, None, 1, 1, CPU)
    assert found.pairs("prefix")[1].tolist() == [0, 0]
    assert found.pairs("suffix")[1].tolist() == [4, 4]


def test_cached_chunk_only_edits_its_own_tokens():
    # 6 tokens, 4 already in the cache: the prefix was edited then; the suffix is in this chunk.
    prefix, suffix = _chosen([[1, 1, 1, 1, 1, 1]], 2, 1, past=4)
    assert prefix == [] and suffix == [(0, 1)]


def test_generated_tokens_are_never_edited_during_generate():
    # prompt of 4 tokens, third decoding step (past 6): nothing to edit, not even as "prefix".
    prefix, suffix = _chosen([[1] * 7], 3, 2, past=6, prompt=4)
    assert prefix == [] and suffix == []


def test_uncached_generate_step_edits_the_prompt_positions():
    prefix, suffix = _chosen([[0, 1, 1, 1, 1, 1, 1]], 1, 2, prompt=5)
    assert prefix == [(0, 1)] and suffix == [(0, 3), (0, 4)]


def test_left_and_right_padded_batches_give_the_same_outputs_on_real_tokens(llama):
    llama.add_adapter("a", config="loreft[prefix_positions=2, suffix_positions=2]", set_active=True)
    randomise(llama, "a")
    tokens = torch.tensor([11, 12, 13, 14, 15])
    right_ids = torch.tensor([[*tokens, 0, 0]])
    left_ids = torch.tensor([[0, 0, *tokens]])
    right_mask = (right_ids != 0).long()
    left_mask = (left_ids != 0).long()
    positions = torch.arange(5)
    with torch.no_grad():
        right = llama(
            input_ids=right_ids,
            attention_mask=right_mask,
            position_ids=torch.tensor([[*positions, 0, 0]]),
        ).logits[0, :5]
        left = llama(
            input_ids=left_ids,
            attention_mask=left_mask,
            position_ids=torch.tensor([[0, 0, *positions]]),
        ).logits[0, 2:]
        alone = llama(input_ids=tokens[None]).logits[0]
    torch.testing.assert_close(right, left, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)


def test_positions_come_from_the_model_input_mask_not_the_layer(llama):
    # The layer receives a 4-D mask (or None under SDPA); ReFT must still skip the pads.
    module = llama.adapter_sites.layers[0].layer.module
    before, after = Capture(), Capture()
    module.register_forward_hook(before)
    llama.add_adapter(
        "a", config="loreft[prefix_positions=1, suffix_positions=1, layers=[0]]", set_active=True
    )
    randomise(llama, "a")
    module.register_forward_hook(after)
    ids = torch.tensor([[0, 0, 21, 22, 23]])
    with torch.no_grad():
        llama(input_ids=ids, attention_mask=(ids != 0).long())
    changed = (after.value != before.value).any(-1)[0].tolist()
    assert changed == [False, False, True, False, True]


def _generate(model, use_cache):
    ids = torch.tensor([[0, 0, 31, 32, 33, 34], [41, 42, 43, 44, 45, 46]])
    mask = (ids != 0).long()
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )


def test_generation_with_and_without_cache_agree(llama):
    base = _generate(llama, True)
    llama.add_adapter(
        "a", config="loreft[prefix_positions=2, suffix_positions=2, r=2]", set_active=True
    )
    randomise(llama, "a", scale=2.0)
    with relies_on("cached_generation", plain_tiny_llama):
        cached, uncached = _generate(llama, True), _generate(llama, False)
        assert torch.equal(cached, uncached)
    assert not torch.equal(cached, base)  # the adapter does change the greedy continuation


def test_cached_decoding_steps_are_not_intervened(llama):
    llama.add_adapter("a", config="loreft[prefix_positions=3]", set_active=True)
    randomise(llama, "a")
    host = llama.adapter_sites.layers[0].layer.module.adapters_reft
    counts = []
    original = host.interventions["a"].edit

    def counting(hidden, positions):
        counts.append((hidden.shape[1], positions.count))
        return original(hidden, positions)

    host.interventions["a"].edit = counting
    _generate(llama, True)
    assert counts == [(6, 6)]  # the prompt once (3 real tokens per row), no decoding step
