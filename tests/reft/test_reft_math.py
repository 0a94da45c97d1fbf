"""The intervention's math at the layer output, parameters and gradients."""

from __future__ import annotations

import pytest
import torch

from adapters_reft.layer import ReftHost, orthonormal_rows, select_positions

from .reft_helpers import Capture, batch, randomise, tiny_llama


def _edited(model, name, config, layer=0):
    """Layer ``layer``'s output before and after the ReFT hook, the intervention, positions."""
    module = model.adapter_sites.layers[layer].layer.module
    before = Capture()
    module.register_forward_hook(before)  # registered before ReFT's hook: sees the input to it
    model.add_adapter(name, config=config)
    randomise(model, name)
    after = Capture()
    module.register_forward_hook(after)
    model.set_active_adapters(name)
    inputs = batch()
    with torch.no_grad():
        model(**inputs)
    intervention = module.adapters_reft.interventions[name]
    positions = select_positions(
        inputs["attention_mask"],
        3,
        0,
        7,
        None,
        intervention.prefix_positions,
        intervention.suffix_positions,
        torch.device("cpu"),
    )
    return before.value, after.value, intervention, positions


def test_loreft_edit_sets_the_subspace_to_the_learned_source(llama):
    h, new, intervention, positions = _edited(llama, "a", "loreft[prefix_positions=2, r=3]")
    unit = intervention.units[0]
    rotation = unit.rotation()
    x, x_new = h[positions.pairs()], new[positions.pairs()]
    source = x @ unit.learned_source.weight.t() + unit.learned_source.bias
    torch.testing.assert_close(x_new @ rotation.t(), source, atol=1e-5, rtol=1e-5)


def test_loreft_leaves_the_orthogonal_complement_unchanged(llama):
    h, new, intervention, positions = _edited(llama, "a", "loreft[prefix_positions=2, r=3]")
    rotation = intervention.units[0].rotation()
    complement = torch.eye(32) - rotation.t() @ rotation
    delta = (new - h)[positions.pairs()]
    assert delta.abs().max() > 1e-2
    torch.testing.assert_close(delta @ complement, torch.zeros_like(delta), atol=1e-5, rtol=0)


def test_untouched_positions_are_bit_identical(llama):
    h, new, _, positions = _edited(llama, "a", "loreft[prefix_positions=1, suffix_positions=1]")
    touched = torch.zeros(3, 7, dtype=torch.bool)
    touched[positions.pairs()] = True
    assert torch.equal(h[~touched], new[~touched])
    assert (h[touched] - new[touched]).abs().amax(-1).min() > 1e-3
    assert int(touched.sum()) == 6  # two per example, pads never


def test_direft_adds_the_source_without_subtracting(llama):
    h, new, intervention, positions = _edited(llama, "a", "direft[prefix_positions=2]")
    unit = intervention.units[0]
    x = h[positions.pairs()]
    source = x @ unit.learned_source.weight.t() + unit.learned_source.bias
    torch.testing.assert_close(
        new[positions.pairs()], x + source @ unit.projection.weight, atol=1e-5, rtol=1e-5
    )


def test_noreft_uses_the_projection_unconstrained(llama):
    _h, _new, intervention, _positions = _edited(llama, "a", "noreft[prefix_positions=2]")
    unit = intervention.units[0]
    with torch.no_grad():
        unit.projection.weight.mul_(3.0)
    assert torch.equal(unit.rotation(), unit.projection.weight)


def test_non_linearity_is_applied_to_the_source(llama):
    h, new, intervention, positions = _edited(
        llama, "a", "direft[prefix_positions=2, non_linearity='relu']"
    )
    unit = intervention.units[0]
    x = h[positions.pairs()]
    source = torch.relu(x @ unit.learned_source.weight.t() + unit.learned_source.bias)
    torch.testing.assert_close(
        new[positions.pairs()], x + source @ unit.projection.weight, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("config", "units"),
    [
        ("loreft[prefix_positions=3]", 1),
        ("loreft[prefix_positions=0, suffix_positions=3]", 1),
        ("loreft[prefix_positions=2, suffix_positions=2]", 2),
        ("loreft[prefix_positions=2, suffix_positions=2, tied_weights=True]", 1),
    ],
)
def test_parameter_count_is_2dr_plus_r_per_unit_and_layer(llama, config, units):
    llama.add_adapter("a", config=config.replace("]", ", r=4]"))
    row = next(r for r in llama.adapter_summary(as_dict=True) if r["name"] == "a")
    d, r, layers = 32, 4, 2
    assert row["#param"] == layers * units * (2 * d * r + r)


def test_only_listed_layers_get_an_intervention(llama):
    llama.add_adapter("a", config="loreft[layers=[1]]")
    hosts = [getattr(s.layer.module, "adapters_reft", None) for s in llama.adapter_sites]
    assert hosts[0] is None and isinstance(hosts[1], ReftHost)
    assert list(llama.adapter_state_dict("a")) == [
        "model.layers.1.reft.prefix.learned_source.weight",
        "model.layers.1.reft.prefix.learned_source.bias",
        "model.layers.1.reft.prefix.projection.weight",
    ]


def test_layer_index_out_of_range_raises(llama):
    from adapters import ConfigError

    with pytest.raises(ConfigError, match=r"names layers \[5\].*0\.\.1"):
        llama.add_adapter("a", config="loreft[layers=[0, 5]]")
    assert "a" not in llama.adapters_config


def test_gradients_reach_only_reft_parameters(llama):
    llama.add_adapter("a", config="loreft[prefix_positions=2, suffix_positions=1]")
    llama.train_adapter("a")
    inputs = batch()
    llama(**inputs, labels=inputs["input_ids"]).loss.backward()
    adapter_ids = {id(p) for m in llama.get_adapter("a").values() for p in m.parameters()}
    for name, param in llama.named_parameters():
        if id(param) in adapter_ids:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_seeded_units_start_identical_without_touching_global_rng(llama):
    state = torch.random.get_rng_state()
    llama.add_adapter("a", config="loreft[init_weights_seed=7, suffix_positions=1]")
    assert torch.equal(torch.random.get_rng_state(), state)
    tensors = llama.adapter_state_dict("a")
    first = tensors["model.layers.0.reft.prefix.learned_source.weight"]
    for key in (
        "model.layers.0.reft.suffix.learned_source.weight",
        "model.layers.1.reft.prefix.learned_source.weight",
    ):
        assert torch.equal(tensors[key], first)


def test_fresh_orthogonal_projection_is_stored_orthonormal(llama):
    llama.add_adapter("a", config="loreft[r=4]")
    weight = llama.adapter_state_dict("a")["model.layers.0.reft.prefix.projection.weight"]
    torch.testing.assert_close(weight @ weight.t(), torch.eye(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(orthonormal_rows(weight), weight, atol=1e-6, rtol=0)


def test_bf16_model_forward_keeps_r_in_float32():
    model = tiny_llama()
    model.add_adapter(
        "a", config="loreft[prefix_positions=2, suffix_positions=2, r=2]", set_active=True
    )
    randomise(model, "a")
    inputs = batch()
    with torch.no_grad():
        reference = model(**inputs).logits
        model.to(torch.bfloat16)
        logits = model(**inputs).logits
    unit = model.adapter_sites.layers[0].layer.module.adapters_reft.interventions["a"].units[0]
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert unit.rotation().dtype == torch.float32
    mask = inputs["attention_mask"].bool()
    assert (logits.float() - reference)[mask].abs().max() < 0.1


def test_inactive_adapter_costs_nothing_and_changes_nothing(llama):
    inputs = batch()
    with torch.no_grad():
        base = llama(**inputs).logits
    llama.add_adapter("a", config="loreft[prefix_positions=2]")
    randomise(llama, "a")
    host = llama.adapter_sites.layers[0].layer.module.adapters_reft
    calls = []
    host._apply_one = lambda *a: calls.append(a)  # would be called for an active adapter
    with torch.no_grad():
        out = llama(**inputs).logits
    assert torch.equal(out, base) and calls == []


def test_dtype_option_sets_the_parameter_dtype(llama):
    llama.add_adapter("a", config="loreft[dtype='bfloat16', suffix_positions=1]", set_active=True)
    assert {t.dtype for t in llama.adapter_state_dict("a").values()} == {torch.bfloat16}
    with torch.no_grad():
        logits = llama(**batch()).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_float64_model_keeps_the_loreft_invariant_to_float64_precision(llama):
    llama.to(torch.float64)
    h, new, intervention, positions = _edited(llama, "a", "loreft[prefix_positions=2, r=3]")
    unit = intervention.units[0]
    rotation = unit.rotation()
    assert new.dtype == rotation.dtype == torch.float64
    torch.testing.assert_close(
        rotation @ rotation.t(), torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0
    )
    x, x_new = h[positions.pairs()], new[positions.pairs()]
    source = x @ unit.learned_source.weight.t() + unit.learned_source.bias
    torch.testing.assert_close(x_new @ rotation.t(), source, atol=1e-10, rtol=0)


def test_float64_adapter_parameters_start_orthonormal_in_float64(llama):
    llama.add_adapter("a", config="loreft[dtype='float64', r=4]")
    weight = llama.adapter_state_dict("a")["model.layers.0.reft.prefix.projection.weight"]
    assert weight.dtype == torch.float64
    torch.testing.assert_close(
        weight @ weight.t(), torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_adapter_parameters_default_to_float32_in_a_bf16_model():
    model = tiny_llama().to(torch.bfloat16)
    model.add_adapter("a", config="loreft[suffix_positions=1]")
    assert {t.dtype for t in model.adapter_state_dict("a").values()} == {torch.float32}


def test_fp16_model_forward_matches_float32_on_real_tokens():
    model = tiny_llama()
    model.add_adapter(
        "a", config="loreft[prefix_positions=2, suffix_positions=2, r=2]", set_active=True
    )
    randomise(model, "a")
    inputs = batch()
    with torch.no_grad():
        reference = model(**inputs).logits
        model.to(torch.float16)
        logits = model(**inputs).logits
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    mask = inputs["attention_mask"].bool()
    assert (logits.float() - reference)[mask].abs().max() < 0.01
