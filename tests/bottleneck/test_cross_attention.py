"""Cross-attention bottleneck adapters on encoder-decoder models (pitfall 14: AdapterHub's
cross-attention container overwrote the self-attention one, so self-attention adapters vanished).

On a tiny T5 (pre-LN; the decoder's sub-paths differ from the encoder's, ``stack_paths``) and a
tiny BART (post-LN; each decoder layer has its own ``encoder_attn_layer_norm``):
``cross_adapter=True`` puts an adapter beside each *decoder* layer's cross-attention, next to
the self-attention and FFN adapters, reads that sub-block's own residual and norm, changes the
output only while active, generates the same with and without the KV cache, and reloads to
identical outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapters
from adapters import AdapterSetup
from tests import models

from .conftest import randomize

T5_INTERFACE = dict(models.T5_INTERFACE, adapter_methods=["bottleneck"])
BART_INTERFACE = dict(models.BART_SUBBLOCK_INTERFACE, adapter_methods=["bottleneck"])


def t5():
    model = models.t5()
    adapters.init(model, interface=adapters.AdapterModelInterface(**T5_INTERFACE))
    return model


def bart():
    model = models.bart(dropout=0.0)
    with torch.no_grad():  # each layer's norms different, so that a wrong norm shows
        gen = torch.Generator().manual_seed(7)
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    adapters.init(model, interface=adapters.AdapterModelInterface(**BART_INTERFACE))
    return model


def decoder_layers(model):
    if hasattr(model, "decoder"):  # T5
        return list(model.decoder.block)
    return list(model.model.decoder.layers)


def encoder_layers(model):
    if hasattr(model, "encoder") and hasattr(model.encoder, "block"):
        return list(model.encoder.block)
    return list(model.model.encoder.layers)


def inputs():
    gen = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(3, 100, (2, 6), generator=gen),
        "attention_mask": torch.ones(2, 6, dtype=torch.long),
        "decoder_input_ids": torch.randint(3, 100, (2, 4), generator=gen),
    }


def logits(model, batch, setup=None):
    with torch.no_grad(), AdapterSetup(setup):
        return model(**batch).logits


MAKERS = {"t5": t5, "bart": bart}


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_cross_adapters_sit_beside_each_decoder_cross_attention(arch):
    model = MAKERS[arch]()
    model.add_adapter("a", config="double_seq_bn[cross_adapter=True]")
    for layer in encoder_layers(model):
        assert not hasattr(layer, "bottleneck_cross_attention")
        assert list(layer.bottleneck_attention.adapters) == ["a"]
        assert list(layer.bottleneck_output.adapters) == ["a"]
    for layer in decoder_layers(model):
        # the self-attention adapter is still there beside the cross-attention one
        assert list(layer.bottleneck_attention.adapters) == ["a"]
        assert list(layer.bottleneck_cross_attention.adapters) == ["a"]
        assert list(layer.bottleneck_output.adapters) == ["a"]
        cross = layer.bottleneck_cross_attention.site
        if arch == "t5":
            assert cross.output.module is layer.layer[1].EncDecAttention.o
            assert cross.residual.module is layer.layer[1].layer_norm
            assert layer.bottleneck_attention.site.output.module is layer.layer[0].SelfAttention.o
            assert layer.bottleneck_cross_attention.norm is None  # pre-LN
        else:
            assert cross.output.module is layer.encoder_attn.out_proj
            assert cross.residual.module is layer.encoder_attn
            # that sub-block's own norm, of this layer
            assert layer.bottleneck_cross_attention.norm is layer.encoder_attn_layer_norm
            assert layer.bottleneck_attention.norm is layer.self_attn_layer_norm
    keys = list(model.get_adapter("a"))
    n_dec = len(decoder_layers(model))
    assert sum(k.endswith("bottleneck.cross_adapter") for k in keys) == n_dec
    assert sum(k.endswith("bottleneck.mh_adapter") for k in keys) == 2 * n_dec


def cross_reference(model, batch, arch):
    """Run the model with a hand-computed seq_bn on each decoder layer's cross-attention
    sub-block (no adapter hooks: the adapter is inactive), using the adapter's own ``delta``:
    pre-LN (T5): ``r + h + delta(h + r)``; post-LN (BART): ``LN(h + delta(LN(h + r)) + r)``
    with that layer's ``encoder_attn_layer_norm``."""
    handles = []
    for layer in decoder_layers(model):
        adapter = layer.bottleneck_cross_attention.adapters["a"]
        if arch == "t5":
            sub = layer.layer[1]

            def hook(module, args, output, adapter=adapter, sub=sub):
                r = args[0]
                h = sub.EncDecAttention.o.last_output
                return (r + h + adapter.delta(h + r), *output[1:])

            handles.append(sub.EncDecAttention.o.register_forward_hook(_remember))
            handles.append(sub.register_forward_hook(hook))
        else:
            norm = layer.encoder_attn_layer_norm
            state = {}

            def capture(module, args, kwargs, state=state):
                state["r"] = args[0] if args else kwargs["hidden_states"]

            def keep(module, args, output, state=state):
                state["h"] = output[0]

            def replace(module, args, output, adapter=adapter, norm=norm, state=state):
                h, r = state["h"], state["r"]

                def ln(x):  # the layer's own norm (not called: we are inside its hook)
                    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

                return ln(h + adapter.delta(ln(h + r)) + r)

            handles.append(layer.encoder_attn.register_forward_pre_hook(capture, with_kwargs=True))
            handles.append(layer.encoder_attn.register_forward_hook(keep))
            handles.append(norm.register_forward_hook(replace))
    try:
        return logits(model, batch, None)
    finally:
        for handle in handles:
            handle.remove()


def _remember(module, args, output):
    module.last_output = output


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_cross_adapter_matches_the_hand_computed_sub_block(arch):
    model = MAKERS[arch]()
    model.add_adapter(
        "a", config="seq_bn[mh_adapter=False,output_adapter=False,cross_adapter=True]"
    )
    randomize(model, "a", scale=0.3)
    batch = inputs()
    base = logits(model, batch)
    adapted = logits(model, batch, "a")
    assert (adapted - base).abs().max() > 1e-2
    torch.testing.assert_close(adapted, cross_reference(model, batch, arch), atol=1e-5, rtol=1e-5)
    # the encoder is untouched: only the decoder's cross-attention sub-blocks are adapted
    with torch.no_grad():
        enc = model.get_encoder()(batch["input_ids"], attention_mask=batch["attention_mask"])
        with AdapterSetup("a"):
            enc_a = model.get_encoder()(batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(enc_a.last_hidden_state, enc.last_hidden_state, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_output_changes_only_while_active_and_delete_restores(arch):
    model = MAKERS[arch]()
    batch = inputs()
    base = logits(model, batch)
    model.add_adapter("a", config="seq_bn[cross_adapter=True]")
    model.add_adapter(
        "c", config="par_bn[mh_adapter=False,output_adapter=False,cross_adapter=True]"
    )
    randomize(model, "a")
    randomize(model, "c", seed=5)
    torch.testing.assert_close(logits(model, batch), base, atol=0, rtol=0)
    assert (logits(model, batch, "c") - logits(model, batch, "a")).abs().max() > 1e-2
    assert (logits(model, batch, "a") - base).abs().max() > 1e-2
    assert (logits(model, batch, "c") - base).abs().max() > 1e-2
    # a Stack runs both at the cross-attention sub-block
    stacked = logits(model, batch, adapters.Stack("a", "c"))
    assert (stacked - logits(model, batch, "a")).abs().max() > 1e-3
    model.delete_adapter("a")
    model.delete_adapter("c")
    for layer in decoder_layers(model):
        assert not hasattr(layer, "bottleneck_cross_attention")
    torch.testing.assert_close(logits(model, batch), base, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_generate_with_and_without_kv_cache(arch):
    model = MAKERS[arch]()
    model.add_adapter("a", config="seq_bn[cross_adapter=True]", set_active=True)
    randomize(model, "a", scale=0.5)
    batch = {k: v for k, v in inputs().items() if not k.startswith("decoder")}
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True)
    kwargs.update(decoder_start_token_id=0, pad_token_id=0)
    kwargs["return_dict_in_generate"] = True
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kwargs)
        uncached = model.generate(**batch, use_cache=False, **kwargs)
        with AdapterSetup(None):
            plain = model.generate(**batch, use_cache=True, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    differs = [  # -inf where min_new_tokens masks the end token
        (a - b)[torch.isfinite(a)].abs().max() for a, b in zip(cached.scores, plain.scores)
    ]
    assert max(differs) > 1e-3  # the adapter is applied while generating


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_save_and_load_round_trip(arch, tmp_path):
    model = MAKERS[arch]()
    model.add_adapter("a", config="double_seq_bn[cross_adapter=True]")
    randomize(model, "a")
    batch = inputs()
    expected = logits(model, batch, "a")
    model.save_adapter(str(tmp_path / "a"), "a")
    other = MAKERS[arch]()
    other.load_adapter(str(tmp_path / "a"), load_as="b")
    torch.testing.assert_close(logits(other, batch, "b"), expected, atol=0, rtol=0)
    assert all(
        list(layer.bottleneck_cross_attention.adapters) == ["b"] for layer in decoder_layers(other)
    )


def test_cross_adapter_without_cross_attention_in_the_interface_is_refused():
    model = models.t5()
    decoder = dict(T5_INTERFACE["stack_paths"]["decoder.block"])
    del decoder["layer_cross_attn"], decoder["layer_pre_cross_attn"]
    fields = {**T5_INTERFACE, "stack_paths": {"decoder.block": decoder}}
    adapters.init(model, interface=adapters.AdapterModelInterface(**fields))
    with pytest.raises(adapters.errors.ConfigError, match="layer_cross_attn"):
        model.add_adapter("a", config="seq_bn[cross_adapter=True]")
    assert "a" not in model.adapters_config
