import pytest
import torch
from torch import nn

from adapters import AdapterSetup
from adapters.context import ForwardContext, context_for, current_context, positions_from_mask

from .conftest import init_toy, randomize


class Spy(nn.Module):
    """Records the forward context seen inside a layer."""

    def __init__(self):
        super().__init__()
        self.seen: list[ForwardContext] = []

    def hook(self, module, args, output):
        ctx = current_context()
        self.seen.append(ctx)


def spy_on(model):
    spy = Spy()
    model.model.layers[0].register_forward_hook(spy.hook)
    return spy


def test_starts_and_lengths_handle_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    starts, lengths = positions_from_mask(mask, 3, 4, torch.device("cpu"))
    assert starts.tolist() == [2, 0, 0]
    assert lengths.tolist() == [2, 3, 4]


def test_layers_see_the_mask_given_to_the_model(toy_plugins):
    model = init_toy()
    spy = spy_on(model)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    model(torch.ones(2, 3, dtype=torch.long), attention_mask=mask)
    [ctx] = spy.seen
    assert ctx.model is model
    assert torch.equal(ctx.attention_mask, mask)
    assert ctx.starts.tolist() == [1, 0] and ctx.lengths.tolist() == [2, 3]
    assert ctx.past_length == 0 and ctx.input_length == 3
    assert current_context() is None  # closed after the call


def test_context_is_closed_even_when_the_forward_raises(toy_plugins):
    model = init_toy()
    with pytest.raises(IndexError):
        model(torch.full((1, 3), 10_000))  # index out of range in the embedding
    assert current_context() is None


def test_cached_generation_reports_past_length_and_prompt_length(toy_plugins):
    model = init_toy()
    spy = spy_on(model)
    prompt = torch.randint(0, 100, (1, 4))
    model.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=True)
    assert [c.past_length for c in spy.seen] == [0, 4, 5]
    assert [c.input_length for c in spy.seen] == [4, 1, 1]
    assert {c.prompt_length for c in spy.seen} == {4}


def test_context_for_outside_the_models_forward_uses_the_active_setup(toy_plugins):
    model = init_toy()
    model.add_adapter("a", config="toy_lora", set_active=True)
    ctx = context_for(model)
    assert ctx.setup == model.active_adapters and ctx.starts is None
    with AdapterSetup(None):
        assert context_for(model).setup is None


def test_submodule_called_directly_still_applies_active_adapters(toy_plugins):
    model = init_toy()
    ids = torch.randint(0, 100, (1, 5))
    base = model.model(ids).last_hidden_state
    model.add_adapter("a", config="toy_lora", set_active=True)
    randomize(model, "a")
    assert not torch.allclose(model.model(ids).last_hidden_state, base)


def test_a_mask_passed_positionally_is_seen(toy_plugins):
    model = init_toy()
    spy = spy_on(model)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    model(torch.ones(2, 3, dtype=torch.long), mask)
    assert spy.seen[0].starts.tolist() == [1, 0]


def _shift_grads(model, ids, mask):
    from adapters import AdapterSetup

    model.zero_grad()
    with AdapterSetup("s"):
        loss = model(ids, attention_mask=mask, labels=ids).logits.pow(2).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_recomputes_with_the_same_context(toy_plugins):
    """Recomputed layers (during backward, outside the model call) must see the setup, mask
    and positions of the forward they recompute, or the gradients are wrong."""
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    model = init_toy()
    model.add_adapter("s", config="toy_shift[prefix=2]")
    randomize(model, "s")
    model.train_adapter("s")
    model.set_active_adapters(None)  # only the AdapterSetup block activates "s"
    plain = _shift_grads(model, ids, mask)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    checkpointed = _shift_grads(model, ids, mask)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_with_two_calls_before_one_backward_recomputes_each_call(
    toy_plugins, reentrant
):
    """Two training calls with different masks and setups, then one backward (as pairwise
    preference losses do): each re-run layer must get the context of its own call."""
    from adapters import AdapterSetup

    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 100, (2, 6), generator=gen)
    first_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    second_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    model = init_toy()
    for name, prefix in (("s", 2), ("t", 1)):
        model.add_adapter(name, config=f"toy_shift[prefix={prefix}]")
        randomize(model, name, seed=prefix)
    model.train_adapter(["s", "t"])

    def grads():
        model.zero_grad()
        with AdapterSetup("s"):
            first = model(ids, attention_mask=first_mask).logits.pow(2).mean()
        with AdapterSetup("t"):
            second = model(ids, attention_mask=second_mask).logits.pow(3).mean()
        (first + second).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    if reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs a grad-requiring input
    checkpointed = grads()
    assert sorted(plain) == sorted(checkpointed) and len(plain) == 4
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_layer_pre_hooks_exist_only_in_train_mode(toy_plugins):
    model = init_toy()
    layer = model.model.layers[0]
    assert not layer._forward_pre_hooks  # eval: inference pays nothing
    model.train()
    assert len(layer._forward_pre_hooks) == 1
    model.train()
    assert len(layer._forward_pre_hooks) == 1
    model.eval()
    assert not layer._forward_pre_hooks


def test_a_deep_copy_manages_its_own_layer_hooks(toy_plugins):
    import copy

    model = init_toy()
    model.train()
    twin = copy.deepcopy(model)
    twin.eval()
    assert not twin.model.layers[0]._forward_pre_hooks
    assert len(model.model.layers[0]._forward_pre_hooks) == 1
