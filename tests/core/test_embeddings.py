"""The embeddings API for new vocabularies (AdapterHub's ``add_embeddings`` and friends)."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from adapters import AdapterNotFoundError, CheckpointError, ConfigError

from .conftest import init_toy, llama

BASE_WORDS = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(98)]  # the tiny Llama's 100 ids
NEW_WORDS = ["[UNK]", "[PAD]", "w5", "hello", "w7", "world", "w0", "again"]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture
def base_tok():
    return word_tokenizer(BASE_WORDS)


@pytest.fixture
def new_tok():
    return word_tokenizer(NEW_WORDS)


@pytest.fixture
def model(toy_plugins):
    return init_toy(llama(tie_word_embeddings=True))


def test_add_embeddings_copies_shared_tokens_and_switches_tied_head(model, base_tok, new_tok):
    ids = torch.tensor([[3, 9, 27, 4]])
    base_logits = model(ids).logits
    original = model.model.embed_tokens.weight.detach().clone()
    assert model.active_embeddings == "default"
    model.add_embeddings(
        "new", new_tok, reference_embedding="default", reference_tokenizer=base_tok
    )
    assert model.active_embeddings == "new"
    weight = model.model.embed_tokens.weight
    assert weight.shape == (len(NEW_WORDS), 32)
    assert model.lm_head.weight is weight  # tied head follows
    assert model.config.vocab_size == len(NEW_WORDS)
    base_vocab, new_vocab = base_tok.get_vocab(), new_tok.get_vocab()
    for token in ("[UNK]", "[PAD]", "w5", "w7", "w0"):
        torch.testing.assert_close(weight[new_vocab[token]], original[base_vocab[token]])
    for token in ("hello", "world", "again"):  # fresh rows, N(0, 0.02)
        row = weight[new_vocab[token]]
        assert not torch.equal(row, torch.zeros_like(row)) and row.abs().max() < 0.2
    encoded = new_tok("hello w5 world", return_tensors="pt")["input_ids"]
    assert model(encoded).logits.shape == (1, 3, len(NEW_WORDS))
    model.set_active_embeddings("default")
    assert model.model.embed_tokens.weight.shape == (100, 32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.vocab_size == 100
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)


def test_an_untied_head_stays_with_the_original_vocabulary(toy_plugins, new_tok):
    model = init_toy(llama(tie_word_embeddings=False))
    head = model.lm_head.weight
    model.add_embeddings("new", new_tok)
    assert model.lm_head.weight is head
    assert model(torch.tensor([[1, 2]])).logits.shape == (1, 2, 100)


def test_save_and_load_embeddings_with_tokenizer(model, new_tok, tmp_path):
    model.add_embeddings("new", new_tok)
    weight = model.model.embed_tokens.weight.detach().clone()
    model.save_embeddings(str(tmp_path / "emb"), "new", tokenizer=new_tok)
    assert sorted(os.listdir(tmp_path / "emb")) == ["embedding.safetensors", "tokenizer"]
    model.set_active_embeddings("default")
    model.save_embeddings(str(tmp_path / "default"), "default")  # the original is saved too
    other = init_toy(llama(tie_word_embeddings=True))
    tokenizer = other.load_embeddings(str(tmp_path / "emb"), "mine")
    assert other.active_embeddings == "mine"
    assert tokenizer.get_vocab() == new_tok.get_vocab()
    torch.testing.assert_close(other.model.embed_tokens.weight, weight, rtol=0, atol=0)


def test_load_embeddings_reads_adapterhubs_embedding_pt(model, tmp_path):
    weight = torch.nn.Parameter(torch.randn(12, 32))
    os.makedirs(tmp_path / "ah")
    torch.save(weight, tmp_path / "ah" / "embedding.pt")  # AdapterHub's save_embeddings
    assert model.load_embeddings(str(tmp_path / "ah"), "ah") is None
    torch.testing.assert_close(model.model.embed_tokens.weight, weight.detach())
    with pytest.raises(CheckpointError, match="no embedding"):
        model.load_embeddings(str(tmp_path), "nothing")


def test_train_embeddings_trains_the_active_new_embedding_only(model, new_tok):
    model.add_adapter("a", "toy_lora[r=2]")
    model.add_embeddings("new", new_tok)
    before = model.model.embed_tokens.weight.detach().clone()
    model.train_adapter("a", train_embeddings=True)
    assert model.model.embed_tokens.weight.requires_grad
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    trained = model.model.embed_tokens.weight.detach().clone()
    assert not torch.equal(trained, before)
    model.set_active_embeddings("default")
    model.set_active_embeddings("new")  # the trained rows are kept
    torch.testing.assert_close(model.model.embed_tokens.weight, trained, rtol=0, atol=0)


def test_delete_embeddings(model, new_tok):
    model.add_embeddings("new", new_tok)
    model.delete_embeddings("new")
    assert model.active_embeddings == "default"
    assert model.model.embed_tokens.weight.shape[0] == 100
    with pytest.raises(AdapterNotFoundError, match="no embedding named 'new'"):
        model.set_active_embeddings("new")
    with pytest.raises(ConfigError, match="cannot be deleted"):
        model.delete_embeddings("default")


def test_embeddings_errors_leave_the_model_unchanged(model, base_tok, new_tok, tmp_path):
    with pytest.raises(ConfigError, match="both reference_embedding and reference_tokenizer"):
        model.add_embeddings("x", new_tok, reference_embedding="default")
    with pytest.raises(AdapterNotFoundError, match="no embedding named 'nope'"):
        model.add_embeddings("x", new_tok, reference_embedding="nope", reference_tokenizer=base_tok)
    with pytest.raises(ConfigError, match="width 16"):
        model.add_embeddings("x", new_tok, embedding_dim=16)
    with pytest.raises(ConfigError, match="already exists"):
        model.add_embeddings("default", new_tok)
    assert model.active_embeddings == "default" and model.model.embed_tokens.weight.shape[0] == 100
    model.add_embeddings("new", new_tok)
    with pytest.raises(ConfigError, match="set_active_embeddings\\('default'\\)"):
        model.save_pretrained(str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()
