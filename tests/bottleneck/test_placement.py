"""Where each bottleneck config sits and what it computes, against closed-form references on
toy post-LN (BERT-like) and pre-LN (Llama-like) models (AdapterHub's built-in semantics)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapters
from adapters import AdapterSetup
from adapters.errors import ConfigError

from .conftest import WIDTH, randomize, toy

ACT = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu}


def delta(model, name, layer, location, x):
    """The adapter's output for input x, from its weights (explicit matrices)."""
    ad = model.get_adapter(name)[f"layers.{layer}.bottleneck.{location}"]
    down, up = ad.adapter_down[0], ad.adapter_up
    hidden = ACT[ad.config.non_linearity](x @ down.weight.T + down.bias)
    out = hidden @ up.weight.T + up.bias
    return out * ad.scaling


def reference(model, ids, name, attn_fn=None, ffn_fn=None):
    """The toy model's logits with ``attn_fn(i, h, r, ln)`` / ``ffn_fn`` giving each adapted
    sub-block's final output (after the residual add and norm), computed without adapters."""
    with AdapterSetup(None), torch.no_grad():
        x = model.embed(ids)
        for i, layer in enumerate(model.layers):
            if layer.post_ln:
                h = layer.attn(x)
                x = attn_fn(i, h, x, layer.ln1) if attn_fn else layer.ln1(x + h)
                h = layer.ffn(x)
                x = ffn_fn(i, h, x, layer.ln2) if ffn_fn else layer.ln2(x + h)
            else:
                h = layer.attn(layer.ln1(x))
                x = attn_fn(i, h, x, None) if attn_fn else x + h
                h = layer.ffn(layer.ln2(x))
                x = ffn_fn(i, h, x, None) if ffn_fn else x + h
        return model.head(x)


def norm_or_id(ln):
    return ln if ln is not None else (lambda t: t)


def adapted(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("post_ln", [True, False], ids=["post_ln", "pre_ln"])
def test_seq_bn_reads_normed_sum_and_keeps_model_residual_and_norm(post_ln, ids):
    model = toy(post_ln)
    model.add_adapter("a", config="seq_bn[reduction_factor=4]", set_active=True)
    randomize(model, "a")

    def ffn(i, h, r, ln):
        x = norm_or_id(ln)(h + r)
        out = delta(model, "a", i, "output_adapter", x) + h
        return norm_or_id(ln)(out + r)

    expected = reference(model, ids, "a", ffn_fn=ffn)
    assert not torch.allclose(expected, reference(model, ids, "a"), atol=1e-3)
    torch.testing.assert_close(adapted(model, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("post_ln", [True, False], ids=["post_ln", "pre_ln"])
def test_double_seq_bn_adapts_both_sub_block_outputs(post_ln, ids):
    model = toy(post_ln)
    model.add_adapter("a", config="double_seq_bn[reduction_factor=4]", set_active=True)
    randomize(model, "a")

    def make(location):
        def fn(i, h, r, ln):
            return norm_or_id(ln)(h + delta(model, "a", i, location, h) + r)

        return fn

    expected = reference(model, ids, "a", make("mh_adapter"), make("output_adapter"))
    torch.testing.assert_close(adapted(model, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("post_ln", [True, False], ids=["post_ln", "pre_ln"])
def test_par_bn_reads_the_residual_input(post_ln, ids):
    model = toy(post_ln)
    model.add_adapter("a", config="par_bn", set_active=True)
    randomize(model, "a")

    def ffn(i, h, r, ln):
        return norm_or_id(ln)(h + delta(model, "a", i, "output_adapter", r) + r)

    expected = reference(model, ids, "a", ffn_fn=ffn)
    torch.testing.assert_close(adapted(model, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("post_ln", [True, False], ids=["post_ln", "pre_ln"])
def test_original_ln_after_false_replaces_residual_add_and_norm(post_ln, ids):
    """AdapterPlus-style (pitfall 16): the adapter's output is the sub-block's final output."""
    model = toy(post_ln)
    config = "adapterplus[reduction_factor=4, stochastic_depth=0.0]"
    model.add_adapter("a", config=config, set_active=True)
    randomize(model, "a")

    def ffn(i, h, r, ln):
        x = norm_or_id(ln)(h + r)
        return delta(model, "a", i, "output_adapter", x) + x

    expected = reference(model, ids, "a", ffn_fn=ffn)
    torch.testing.assert_close(adapted(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_residual_before_ln_post_add_takes_the_sum_as_residual(ids):
    model = toy(True)
    model.add_adapter("a", config="seq_bn[reduction_factor=4, residual_before_ln='post_add']")
    model.set_active_adapters("a")
    randomize(model, "a")

    def ffn(i, h, r, ln):
        out = delta(model, "a", i, "output_adapter", ln(h + r)) + h + r
        return ln(out + r)

    torch.testing.assert_close(
        adapted(model, ids), reference(model, ids, "a", ffn_fn=ffn), atol=1e-5, rtol=1e-5
    )


def test_each_layer_uses_its_own_norm(ids):
    """Pitfall 13: layer 0's adapter must use layer 0's norm, not the last layer's."""
    model = toy(True, layers=3)
    model.add_adapter("a", config="seq_bn[reduction_factor=4]", set_active=True)
    randomize(model, "a")
    assert not torch.allclose(model.layers[0].ln2.weight, model.layers[2].ln2.weight)
    last = model.layers[2].ln2

    def wrong(i, h, r, ln):  # AdapterHub's plugin path: the last layer's norm everywhere
        return last(delta(model, "a", i, "output_adapter", last(h + r)) + h + r)

    def right(i, h, r, ln):
        return ln(delta(model, "a", i, "output_adapter", ln(h + r)) + h + r)

    out = adapted(model, ids)
    torch.testing.assert_close(out, reference(model, ids, "a", ffn_fn=right), atol=1e-5, rtol=0)
    assert (out - reference(model, ids, "a", ffn_fn=wrong)).abs().max() > 1e-2


def test_ln_before_ln_after_gating_and_channel_scaling_are_applied(ids):
    model = toy(False)
    config = (
        "double_seq_bn[reduction_factor=4, ln_before=True, ln_after=True, use_gating=True, "
        "scaling='channel', mh_adapter=False]"
    )
    model.add_adapter("a", config=config, set_active=True)
    randomize(model, "a")

    def ffn(i, h, r, ln):
        ad = model.get_adapter("a")[f"layers.{i}.bottleneck.output_adapter"]
        normed = F.layer_norm(h, (WIDTH,), ad.adapter_down[0].weight, ad.adapter_down[0].bias)
        down = ad.adapter_down[1]
        up = F.silu(normed @ down.weight.T + down.bias) @ ad.adapter_up.weight.T
        up = (up + ad.adapter_up.bias) * ad.scaling
        gate = torch.sigmoid(h @ ad.gate.weight.T + ad.gate.bias).mean(dim=1, keepdim=True)
        after = ad.adapter_norm_after
        out = F.layer_norm(up * gate, (WIDTH,), after.weight, after.bias) + h
        return out + r

    assert model.get_adapter("a")["layers.0.bottleneck.output_adapter"].scaling.shape == (WIDTH,)
    torch.testing.assert_close(
        adapted(model, ids), reference(model, ids, "a", ffn_fn=ffn), atol=1e-5, rtol=1e-5
    )


def test_leave_out_and_per_layer_reduction_factor():
    model = toy(False, layers=3)
    config = "seq_bn[reduction_factor={'0': 2, 'default': 8}, leave_out=[1]]"
    model.add_adapter("a", config=config)
    modules = model.get_adapter("a")
    assert sorted(modules) == [
        "layers.0.bottleneck.output_adapter",
        "layers.2.bottleneck.output_adapter",
    ]
    assert modules["layers.0.bottleneck.output_adapter"].bottleneck == WIDTH // 2
    assert modules["layers.2.bottleneck.output_adapter"].bottleneck == WIDTH // 8


def test_per_layer_reduction_factor_without_default_is_refused():
    model = toy(False)
    with pytest.raises(ConfigError, match="no entry for layer 1"):
        model.add_adapter("a", config="seq_bn[reduction_factor={'0': 2}]")
    assert "a" not in model.adapters_config


def test_parallel_without_residual_site_is_refused_at_add_time():
    """Pitfall 15: no layer_pre_ffn means no residual input: a clear error, no crash later."""
    model = toy(False, layer_pre_ffn=None)
    with pytest.raises(ConfigError, match="layer_pre_ffn"):
        model.add_adapter("a", config="par_bn")
    assert not hasattr(model.layers[0], "bottleneck_output")
    model.add_adapter("b", config="double_seq_bn[mh_adapter=False]")  # needs no residual


def test_inactive_and_deleted_adapters_leave_the_model_as_it_was(ids):
    model = toy(True)
    base = adapted(model, ids)
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    model.add_adapter("a", config="double_seq_bn_inv[reduction_factor=4]")
    randomize(model, "a")
    torch.testing.assert_close(adapted(model, ids), base, atol=0, rtol=0)
    model.set_active_adapters("a")
    assert (adapted(model, ids) - base).abs().max() > 1e-2
    model.delete_adapter("a")
    torch.testing.assert_close(adapted(model, ids), base, atol=0, rtol=0)
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == hooks
    assert not any("bottleneck" in k for k in model.state_dict())


@pytest.mark.parametrize("kind", ["nice", "glow"])
def test_invertible_adapter_is_inverted_before_the_head(kind):
    model = toy(False)
    model.add_adapter("a", config=f"seq_bn_inv[inv_adapter={kind!r}]", set_active=True)
    randomize(model, "a", scale=0.2)
    block = model.get_adapter("a")["embed.bottleneck_invertible"]
    x = torch.randn(2, 4, WIDTH)
    with torch.no_grad():
        y = block(x)
        assert (y - x).abs().max() > 1e-2
        torch.testing.assert_close(block(y, rev=True), x, atol=1e-5, rtol=1e-5)
    seen = {}
    model.embed.register_forward_hook(lambda m, a, out: seen.setdefault("embed", out))
    model.head.register_forward_pre_hook(lambda m, a: seen.setdefault("head_in", a[0]))
    with torch.no_grad():
        ids = torch.randint(0, 50, (2, 4))
        model(ids)
        raw = model.embed.weight[ids]
    torch.testing.assert_close(seen["embed"], block(raw))  # hooks run in order: ours first


def test_only_adapter_parameters_train():
    model = toy(False)
    model.add_adapter("a", config="compacter[reduction_factor=2]")
    model.train_adapter("a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("bottleneck" in n for n in trainable)
    assert any("bottleneck_shared.a.phm_rule" in n for n in trainable)


def test_no_hidden_size_config_needed():
    """Pitfall 19: sizes come from the modules (the toy model has no config)."""
    model = toy(True)
    assert not hasattr(model, "config")
    model.add_adapter("a", config="seq_bn")
    assert model.get_adapter("a")["layers.0.bottleneck.output_adapter"].hidden == WIDTH


def test_stochastic_depth_drops_whole_examples_in_training_only(ids):
    model = toy(False, layers=1)
    model.add_adapter("a", config="adapterplus[reduction_factor=4, stochastic_depth=0.5]")
    ad = model.get_adapter("a")["layers.0.bottleneck.output_adapter"]
    randomize(model, "a")
    x = torch.randn(64, 3, WIDTH)
    ad.eval()
    torch.testing.assert_close(ad.delta(x), ad.delta(x))
    ad.train()
    torch.manual_seed(0)
    out = ad.delta(x)
    ad.eval()
    full = ad.delta(x)
    dropped = (out.abs().sum(dim=(1, 2)) == 0).sum().item()
    assert 10 < dropped < 54
    kept = out.abs().sum(dim=(1, 2)) != 0
    torch.testing.assert_close(out[kept], full[kept] * 2)


def test_dropout_only_in_training(ids):
    model = toy(False)
    model.add_adapter("a", config="seq_bn[reduction_factor=4, dropout=0.5]", set_active=True)
    randomize(model, "a")
    first, second = adapted(model, ids), adapted(model, ids)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    model.train()
    assert not torch.equal(adapted(model, ids), adapted(model, ids))


def test_llama_real_model_seq_bn_changes_and_trains():
    from tests.models import SEED_INTERFACE, llama

    model = llama()
    interface = adapters.AdapterModelInterface(
        **dict(
            SEED_INTERFACE,
            adapter_methods=["bottleneck"],
            layer_pre_self_attn="input_layernorm",
            layer_pre_ffn="post_attention_layernorm",
        )
    )
    adapters.init(model, interface=interface)
    model.add_adapter("a", config="double_seq_bn[reduction_factor=4]")
    model.train_adapter("a")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_sandwich_norm_model_edits_before_the_norm_and_refuses_replacing_the_add():
    from tests.models import SEED_INTERFACE_2, gemma2

    model = gemma2()
    fields = {k: v for k, v in SEED_INTERFACE_2.items() if k != "adapter_types"}
    interface = adapters.AdapterModelInterface(
        **fields, adapter_methods=["bottleneck"], layer_norm_placement="sandwich"
    )
    adapters.init(model, interface=interface)
    with pytest.raises(ConfigError, match="sandwich"):
        model.add_adapter("plus", config="adapterplus[reduction_factor=4]")
    model.add_adapter("a", config="seq_bn[reduction_factor=4]", set_active=True)
    randomize(model, "a")
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    layer = model.model.layers[0]
    seen = {}
    layer.post_feedforward_layernorm.register_forward_pre_hook(
        lambda m, a: seen.setdefault("normed_input", a[0])
    )
    layer.pre_feedforward_layernorm.register_forward_pre_hook(
        lambda m, a: seen.setdefault("r", a[0])
    )
    layer.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.setdefault("h", o), prepend=True)
    with torch.no_grad():
        model(ids)
        h, r = seen["h"], seen["r"]
        expected = model.get_adapter("a")["model.layers.0.bottleneck.output_adapter"].step(
            h, r, None
        )
    torch.testing.assert_close(seen["normed_input"], expected)
