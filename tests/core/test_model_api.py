import copy
import threading

import pytest
import torch

import adapters
from adapters import AdapterNotFoundError, AdapterSetup, ConfigError, Stack

from .conftest import init_toy, llama, randomize


def test_add_adapter_then_output_changes_once_weights_are_nonzero(toy_plugins, ids):
    model = init_toy()
    base = model(ids).logits
    model.add_adapter("a", config="toy_lora", set_active=True)
    assert torch.equal(model(ids).logits, base)  # B starts at zero
    randomize(model, "a")
    assert (model(ids).logits - base).abs().max() > 1e-3


def test_added_but_inactive_adapters_leave_outputs_bit_identical(toy_plugins, ids):
    model = init_toy()
    base = model(ids).logits
    model.add_adapter("a", config="toy_lora")
    randomize(model, "a")
    assert torch.equal(model(ids).logits, base)


def test_add_existing_name_needs_overwrite_ok(toy_plugins):
    model = init_toy()
    model.add_adapter("a", config="toy_lora")
    with pytest.raises(ConfigError, match="overwrite_ok=True"):
        model.add_adapter("a", config="toy_lora")
    model.add_adapter("a", config="toy_lora[r=4]", overwrite_ok=True)
    assert model.adapters_config["a"].r == 4
    assert model.get_adapter("a")["model.layers.0.self_attn.q_proj"].A.shape[0] == 4


def test_delete_adapter_removes_modules_hooks_and_activation(toy_plugins, ids):
    model = init_toy()
    keys = set(model.state_dict())
    hooks = len(model.model.layers[0].self_attn.q_proj._forward_hooks)
    model.add_adapter("a", config="toy_lora", set_active=True)
    model.delete_adapter("a")
    assert set(model.state_dict()) == keys
    assert len(model.model.layers[0].self_attn.q_proj._forward_hooks) == hooks
    assert model.active_adapters is None
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'a'"):
        model.delete_adapter("a")


def test_set_active_adapters_accepts_name_list_block_none(toy_plugins):
    model = init_toy()
    model.add_adapter("a", config="toy_lora")
    model.add_adapter("s", config="toy_shift")
    model.set_active_adapters("a")
    assert model.active_adapters == Stack("a")
    model.set_active_adapters(["a", "s"])
    assert model.active_adapters == Stack("a", "s")
    model.active_adapters = None
    assert model.active_adapters is None


def test_adapter_setup_applies_per_block_and_per_thread(toy_plugins, ids):
    model = init_toy()
    base = model(ids).logits
    model.add_adapter("a", config="toy_lora")
    randomize(model, "a")
    with AdapterSetup("a"):
        adapted = model(ids).logits
        results = {}
        thread = threading.Thread(target=lambda: results.setdefault("other", model(ids).logits))
        thread.start()
        thread.join()
    assert not torch.equal(adapted, base)
    assert torch.equal(results["other"], base)  # another thread does not see the block
    assert torch.equal(model(ids).logits, base)
    assert model.active_adapters is None


def test_train_adapter_freezes_everything_else_including_heads(toy_plugins):
    model = init_toy()
    model.add_adapter("a", config="toy_lora")
    model.add_adapter("b", config="toy_lora")
    model.train_adapter("a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".units.a." in n for n in trainable)
    assert not model.lm_head.weight.requires_grad
    assert model.training
    assert model.active_adapters == Stack("a")


def test_train_adapter_train_embeddings(toy_plugins):
    model = init_toy()
    model.add_adapter("a", config="toy_lora")
    model.train_adapter("a", train_embeddings=True)
    assert model.model.embed_tokens.weight.requires_grad


def test_training_changes_only_adapter_parameters(toy_plugins, ids):
    model = init_toy()
    model.add_adapter("a", config="toy_lora")
    model.train_adapter("a")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".units.a." in n for n in changed)


def test_freeze_model_leaves_adapter_parameters_alone(toy_plugins):
    model = init_toy()
    model.add_adapter("a", config="toy_lora")
    model.freeze_model()
    assert not model.lm_head.weight.requires_grad
    assert all(p.requires_grad for m in model.get_adapter("a").values() for p in m.parameters())
    model.freeze_model(False)
    assert model.lm_head.weight.requires_grad


def test_merge_equals_unmerged_and_reset_equals_base(toy_plugins, ids):
    model = init_toy()
    base = model(ids).logits
    model.add_adapter("a", config="toy_lora", set_active=True)
    randomize(model, "a")
    adapted = model(ids).logits
    model.merge_adapter("a")
    assert model.is_merged("a")
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=0)
    model.reset_adapter("a")
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=0)
    model.set_active_adapters(None)
    torch.testing.assert_close(model(ids).logits, base, atol=1e-5, rtol=0)


def test_merge_and_unload_leaves_a_plain_merged_model(toy_plugins, ids):
    model = init_toy()
    keys = set(model.state_dict())
    model.add_adapter("a", config="toy_lora", set_active=True)
    randomize(model, "a")
    adapted = model(ids).logits
    assert model.merge_and_unload() is model
    assert set(model.state_dict()) == keys and not adapters.is_initialized(model)
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=0)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("how", ["same", "deepcopy", "pickle"])
@pytest.mark.parametrize("training", [False, True])
def test_unload_removes_every_hook_init_added_also_on_copies(toy_plugins, ids, how, training):
    import pickle

    plain = llama()
    hooks_before = _hook_count(plain)
    model = init_toy(plain)
    model.train(training)  # training adds the per-layer recompute hooks
    model.add_adapter("a", config="toy_lora", set_active=True)
    if how == "deepcopy":
        model = copy.deepcopy(model)
    elif how == "pickle":
        model = pickle.loads(pickle.dumps(model))
    assert _hook_count(model) > hooks_before
    model.delete_adapter("a")
    model.unload()
    assert _hook_count(model) == hooks_before
    assert not adapters.is_initialized(model)
    model.eval()
    assert model(ids).logits.shape[-1] == 100


def test_methods_that_cannot_merge_say_so(toy_plugins):
    model = init_toy()
    model.add_adapter("s", config="toy_shift")
    with pytest.raises(ConfigError, match="cannot be merged"):
        model.merge_adapter("s")


def test_adapter_to_changes_dtype_of_that_adapter_only(toy_plugins):
    model = init_toy()
    model.add_adapter("a", config="toy_lora")
    model.add_adapter("b", config="toy_lora")
    model.adapter_to("a", dtype=torch.float64)
    assert {p.dtype for m in model.get_adapter("a").values() for p in m.parameters()} == {
        torch.float64
    }
    assert {p.dtype for m in model.get_adapter("b").values() for p in m.parameters()} == {
        torch.float32
    }


def test_summary_as_dict_has_exact_counts_and_booleans(toy_plugins):
    model = init_toy()
    model.add_adapter("a", config="toy_lora[r=2]")
    model.add_adapter("s", config="toy_shift")
    model.set_active_adapters("s")
    rows = model.adapter_summary(as_dict=True)
    assert [r["name"] for r in rows] == ["a", "s", "Full model"]
    assert set(rows[0]) == {"name", "architecture", "#param", "%param", "active", "train"}
    # toy LoRA r=2 on q (32->32) and v (32->16) in 2 layers: A r*in + B out*r
    assert rows[0]["#param"] == 2 * (2 * 32 + 32 * 2 + 2 * 32 + 16 * 2)
    assert rows[1]["#param"] == 2 * 32
    base = sum(p.numel() for p in llama().parameters())
    assert rows[2]["#param"] == base
    assert rows[0]["%param"] == pytest.approx(100 * rows[0]["#param"] / base)
    assert rows[1]["active"] is True and rows[0]["active"] is False


def test_summary_table_prints_readable_booleans(toy_plugins):
    model = init_toy()
    model.add_adapter("a", config="toy_lora", set_active=True)
    text = model.adapter_summary()
    assert "Name" in text and "#Param" in text and "Full model" in text
    assert " yes" in text and " 0 " not in text.split("\n")[3]


def test_new_modules_follow_eval_mode(toy_plugins):
    model = init_toy()
    assert not model.training
    model.add_adapter("a", config="toy_lora")
    assert not any(m.training for m in model.modules())
    model.train()
    model.add_adapter("b", config="toy_lora")
    assert all(m.training for m in model.get_adapter("b").values())


def test_failed_add_leaves_model_unchanged(toy_plugins, monkeypatch):
    from .toy_plugins import ToyLoRAUnit

    model = init_toy()
    keys = list(model.state_dict())
    hooks = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    calls = {"n": 0}
    original = ToyLoRAUnit.__init__

    def fail_on_third(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        original(self, *args)

    monkeypatch.setattr(ToyLoRAUnit, "__init__", fail_on_third)
    with pytest.raises(RuntimeError, match="out of memory"):
        model.add_adapter("a", config="toy_lora")
    assert list(model.state_dict()) == keys
    assert {n: len(m._forward_hooks) for n, m in model.named_modules()} == hooks
    assert not model.has_adapters()


def test_deepcopy_of_an_initialised_model_is_independent(toy_plugins, ids):
    model = init_toy()
    model.add_adapter("a", config="toy_lora", set_active=True)
    randomize(model, "a")
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(ids).logits, model(ids).logits)
    twin.delete_adapter("a")
    assert model.has_adapters()
    assert not torch.equal(twin(ids).logits, model(ids).logits)


def test_union_config_adds_parts_of_several_methods(toy_plugins, ids):
    model = init_toy()
    model.add_adapter("u", config="toy_lora|toy_shift[prefix=2]", set_active=True)
    config = model.adapters_config["u"]
    assert isinstance(config, adapters.ConfigUnion)
    assert [c.method for c in config.configs] == ["toy_lora", "toy_shift"]
    assert any(k.startswith("toy_shift/") for k in model.get_adapter("u"))
    assert model.adapter_summary(as_dict=True)[0]["architecture"] == "union"
