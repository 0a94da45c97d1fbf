"""Training: LoReFT stays orthonormal under AdamW with weight decay; train/eval mode."""

from __future__ import annotations

import pytest
import torch

from .reft_helpers import batch


def test_loreft_learns_and_stays_orthonormal_under_default_adamw(llama):
    llama.add_adapter("a", config="loreft[prefix_positions=2, suffix_positions=2, r=2]")
    llama.train_adapter("a")
    params = [p for p in llama.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)  # torch's default weight_decay=0.01
    assert optimizer.defaults["weight_decay"] == 0.01
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    host = llama.adapter_sites.layers[1].layer.module.adapters_reft
    start_rotation = host.interventions["a"].units[0].rotation().detach().clone()
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = llama(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for unit in host.interventions["a"].units:
        rotation = unit.rotation()
        torch.testing.assert_close(rotation @ rotation.t(), torch.eye(2), atol=1e-5, rtol=0)
    moved = host.interventions["a"].units[0].rotation() - start_rotation
    assert moved.abs().max() > 1e-3  # R itself is learned, not frozen at zero or its start


def test_new_adapter_follows_the_model_mode(llama):
    llama.add_adapter("in_eval", config="loreft")
    assert not any(m.training for m in llama.get_adapter("in_eval").values())
    llama.train()
    llama.add_adapter("in_train", config="loreft")
    assert all(m.training for m in llama.get_adapter("in_train").values())


def test_loaded_adapter_in_eval_model_gives_repeatable_outputs(llama, tmp_path):
    llama.add_adapter("a", config="loreft[dropout=0.5, suffix_positions=2]")
    llama.save_adapter(str(tmp_path / "a"), "a")
    llama.delete_adapter("a")
    llama.eval()
    name = llama.load_adapter(str(tmp_path / "a"), set_active=True)
    inputs = batch()
    with torch.no_grad():
        first, second = llama(**inputs).logits, llama(**inputs).logits
    assert name == "a" and torch.equal(first, second)


def test_dropout_is_active_in_train_mode(llama):
    llama.add_adapter("a", config="loreft[dropout=0.5, suffix_positions=2]", set_active=True)
    llama.train()
    inputs = batch()
    with torch.no_grad():
        first, second = llama(**inputs).logits, llama(**inputs).logits
    assert not torch.equal(first, second)


def test_adapter_name_clashing_with_module_attributes_is_refused(llama):
    from adapters import ConfigError

    with pytest.raises(ConfigError, match="'training' is not allowed"):
        llama.add_adapter("training", config="loreft")


def test_layer_recomputed_after_the_forward_repeats_the_forward_edit(llama):
    # What activation checkpointing does: re-run a layer during backward, after the model's
    # forward context has closed. The edit must be the forward's (same padded positions).
    from .reft_helpers import Capture

    llama.add_adapter("a", config="loreft[dropout=0.0, prefix_positions=2, suffix_positions=1]")
    llama.train_adapter("a")
    layer = llama.adapter_sites.layers[1].layer.module
    inputs_seen, output = [], Capture()
    layer.register_forward_pre_hook(
        lambda m, args, kwargs: inputs_seen.append((args, kwargs)), with_kwargs=True
    )
    llama(**batch(), use_cache=False)
    layer.register_forward_hook(output)
    args, kwargs = inputs_seen[-1]
    recomputed = layer(*args, **kwargs)
    recomputed = recomputed[0] if isinstance(recomputed, tuple) else recomputed
    llama(**batch(), use_cache=False)
    torch.testing.assert_close(recomputed, output.value, atol=1e-6, rtol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(llama):
    llama.add_adapter("a", config="loreft[dropout=0.0, prefix_positions=2, suffix_positions=2]")
    inputs = batch()

    def gradients(checkpointing):
        llama.train_adapter("a")
        if checkpointing:
            enable = (
                getattr(llama, "activation_checkpointing_enable", None)
                or llama.gradient_checkpointing_enable
            )
            enable({"use_reentrant": False})
        llama.zero_grad()
        llama(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
        return [p.grad.clone() for p in llama.parameters() if p.grad is not None]

    plain, checkpointed = gradients(False), gradients(True)
    assert len(plain) == len(checkpointed) == 12
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
