import pytest
from torch import nn

from adapters import AdapterModelInterface, InterfaceError, InterfacePathError
from adapters._runtime.resolution import resolve_sites

from .. import models
from .conftest import SEED_INTERFACE, gemma2, llama


def test_seed_interface_resolves_every_layer_of_gemma2():
    model = gemma2()
    sites = resolve_sites(model, AdapterModelInterface(**SEED_INTERFACE))
    assert len(sites.layers) == 2
    layer = sites.layers[1]
    assert layer.self_attn.q.module is model.model.layers[1].self_attn.q_proj
    assert layer.self_attn.o.path == "model.layers.1.self_attn.o_proj"
    assert layer.output.module is model.model.layers[1].mlp.down_proj
    assert sites.embeddings.module is model.model.embed_tokens
    assert sites.hidden_size == 32


def test_bad_path_names_field_value_place_suggestion_and_children():
    model = llama()
    with pytest.raises(InterfacePathError) as info:
        resolve_sites(model, AdapterModelInterface(**{**SEED_INTERFACE, "attn_q_proj": "q_prj"}))
    message = str(info.value)
    assert "attn_q_proj='q_prj'" in message
    assert "model.layers.0.self_attn" in message
    assert "did you mean 'q_proj'?" in message
    assert "children: q_proj, k_proj, v_proj, o_proj" in message
    assert isinstance(info.value, ValueError)


def test_every_layer_is_checked_not_only_the_first():
    model = llama(num_hidden_layers=3)
    model.model.layers[2].mlp.up_proj = nn.Identity()
    del model.model.layers[2].mlp.up_proj
    with pytest.raises(InterfaceError, match=r"layers \[2\]"):
        resolve_sites(model, AdapterModelInterface(**SEED_INTERFACE))


def test_sizes_come_from_modules_when_config_has_no_hidden_size():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.q, self.attn.k, self.attn.v = (
                nn.Linear(6, 6),
                nn.Linear(6, 2),
                nn.Linear(6, 2),
            )
            self.attn.out = nn.Linear(6, 6)
            self.up, self.down = nn.Linear(6, 12), nn.Linear(12, 6)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

    interface = AdapterModelInterface(
        adapter_methods=["x"],
        model_layers="blocks",
        layer_self_attn="attn",
        attn_q_proj="q",
        attn_k_proj="k",
        attn_v_proj="v",
        attn_o_proj="out",
        layer_intermediate_proj="up",
        layer_output_proj="down",
    )
    sites = resolve_sites(Net(), interface)
    assert sites.base_model.path == ""
    assert sites.layers[0].hidden_size == 6
    assert (sites.layers[1].self_attn.k.in_features, sites.layers[1].self_attn.k.out_features) == (
        6,
        2,
    )


def test_gpt2_conv1d_widths_are_read_from_the_transposed_weight():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50))
    interface = AdapterModelInterface(**{**models.GPT2_INTERFACE, "adapter_methods": ["x"]})
    sites = resolve_sites(model, interface)
    qkv = sites.layers[0].self_attn.qkv
    assert (qkv.in_features, qkv.out_features) == (16, 48)
    assert sites.layers[0].hidden_size == 16


def bart():
    return models.bart()


BART_INTERFACE = {**models.BART_INTERFACE, "adapter_methods": ["x"]}


def test_layer_stacks_may_lack_a_part_that_other_stacks_have():
    sites = resolve_sites(bart(), AdapterModelInterface(**BART_INTERFACE))
    assert [s.stack for s in sites.layers] == ["encoder.layers"] * 2 + ["decoder.layers"] * 2
    assert [s.index for s in sites.layers] == [0, 1, 2, 3]
    assert sites.layers[0].cross_attn is None
    assert sites.layers[3].cross_attn.q.path == "model.decoder.layers.1.encoder_attn.q_proj"


def test_a_part_missing_from_every_stack_is_an_error():
    with pytest.raises(InterfacePathError, match="layer_cross_attn='cross'"):
        resolve_sites(
            bart(), AdapterModelInterface(**{**BART_INTERFACE, "layer_cross_attn": "cross"})
        )


def test_layer_list_must_be_a_module_list():
    with pytest.raises(InterfaceError, match="ModuleList"):
        resolve_sites(llama(), AdapterModelInterface(**{**SEED_INTERFACE, "model_layers": "norm"}))
