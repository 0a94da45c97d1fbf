"""Switchable input embeddings for new vocabularies (AdapterHub's embeddings API).

``model.add_embeddings(name, tokenizer)`` creates an embedding matrix for ``tokenizer``'s
vocabulary (copying the rows of tokens it shares with a reference embedding), and
``set_active_embeddings(name)`` makes the model use it. The embedding that was there at
``adapters.init`` is called ``"default"``.

Switching swaps the ``weight`` parameter of the model's input ``nn.Embedding`` (the
interface's ``model_embeddings`` site, or ``get_input_embeddings()`` when that site is a larger
module) rather than replacing the module, so hooks that plugins put on the embedding module
keep working. An output embedding (LM head) tied to the input embedding is switched with it,
so a causal LM predicts over the new vocabulary; ``config.vocab_size`` follows the active
embedding, as in AdapterHub. Embeddings that are not active are kept outside the model's
parameters (not in ``state_dict``, not moved by ``model.to``): they follow the model's
device and dtype when activated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checkpoint.manifest import check_links, write_directory_atomically
from ..checkpoint.readers import checked_tensors, load_safetensors
from ..errors import AdapterNotFoundError, CheckpointError, ConfigError, InterfaceError
from .state import get_state

DEFAULT = "default"
EMBEDDING_FILE = "embedding.safetensors"
ADAPTERHUB_EMBEDDING_FILE = "embedding.pt"
TOKENIZER_DIR = "tokenizer"
_STD = 0.02  # AdapterHub's (and BERT's / Llama's) initialisation of new rows


@dataclass
class StoredEmbedding:
    """One embedding matrix and the ``padding_idx`` the embedding module uses with it."""

    weight: nn.Parameter
    padding_idx: int | None


@dataclass
class EmbeddingsState:
    """The embeddings a model has (``"default"`` is added on first use) and the active one."""

    stored: dict[str, StoredEmbedding] = field(default_factory=dict)
    active: str = DEFAULT


def _embeddings_state(model: nn.Module) -> EmbeddingsState:
    state = get_state(model)
    if state.embeddings is None:
        state.embeddings = EmbeddingsState()
    return state.embeddings


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The model's input ``nn.Embedding``: the interface's ``model_embeddings`` site when it is
    one, else ``model.get_input_embeddings()``."""
    site = get_state(model).sites.embeddings
    if site is not None and isinstance(site.module, nn.Embedding):
        return site.module
    getter = getattr(model, "get_input_embeddings", None)
    module = None
    if callable(getter):
        try:
            module = getter()
        except (AttributeError, NotImplementedError):
            module = None
    if isinstance(module, nn.Embedding):
        return module
    raise InterfaceError(
        "the embeddings API needs the model's input nn.Embedding: set model_embeddings in the "
        "interface to it (e.g. 'embed_tokens' or 'embeddings.word_embeddings')"
    )


def _tied_heads(model: nn.Module, embedding: nn.Embedding) -> list[nn.Module]:
    heads = []
    site = get_state(model).sites.lm_head
    candidates = [site.module] if site is not None else []
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            candidates.append(getter())
        except (AttributeError, NotImplementedError):
            pass
    for head in candidates:
        if isinstance(head, nn.Module) and getattr(head, "weight", None) is embedding.weight:
            if all(head is not h for h in heads):
                heads.append(head)
    return heads


def _names(model: nn.Module) -> list[str]:
    names = list(_embeddings_state(model).stored)
    return names if DEFAULT in names else [DEFAULT, *names]


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"an embedding name must be a non-empty string, got {name!r}")
    if name == DEFAULT or name in _embeddings_state(model).stored:
        raise ConfigError(
            f"an embedding named {name!r} already exists; delete_embeddings({name!r}) first or "
            "choose another name"
        )


def _check_known(model: nn.Module, name: str) -> None:
    if name != DEFAULT and name not in _embeddings_state(model).stored:
        raise AdapterNotFoundError(
            f"no embedding named {name!r}; embeddings: {', '.join(_names(model))}"
        )


def _weight_of(model: nn.Module, name: str) -> torch.Tensor:
    emb_state = _embeddings_state(model)
    if name == emb_state.active:
        return input_embedding(model).weight
    return emb_state.stored[name].weight


def _check_width(model: nn.Module, dim: int, what: str) -> None:
    width = input_embedding(model).embedding_dim
    if dim != width:
        raise ConfigError(
            f"{what} has width {dim} but the model's embeddings have width {width}; an "
            "embedding of another width cannot run in this model"
        )


def add_embeddings(
    model: nn.Module,
    name: str,
    tokenizer: Any,
    reference_embedding: str | None = None,
    reference_tokenizer: Any = None,
    embedding_dim: int | None = None,
) -> None:
    """See `ModelAdaptersMixin.add_embeddings`."""
    _check_new_name(model, name)
    if (reference_embedding is None) != (reference_tokenizer is None):
        raise ConfigError(
            "add_embeddings needs both reference_embedding and reference_tokenizer (to copy the "
            "rows of shared tokens), or neither"
        )
    if reference_embedding is not None:
        _check_known(model, reference_embedding)
    module = input_embedding(model)
    dim = module.embedding_dim if embedding_dim is None else int(embedding_dim)
    _check_width(model, dim, f"embedding_dim={embedding_dim}")
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    weight = torch.empty(size, dim, device=module.weight.device, dtype=module.weight.dtype)
    weight.normal_(mean=0.0, std=_STD)
    if reference_embedding is not None:
        reference = _weight_of(model, reference_embedding)
        reference_vocab = reference_tokenizer.get_vocab()
        shared = sorted(set(vocab) & set(reference_vocab))
        if shared:
            rows = torch.tensor([vocab[t] for t in shared], device=weight.device)
            source = torch.tensor([reference_vocab[t] for t in shared], device=reference.device)
            with torch.no_grad():
                weight[rows] = reference.index_select(0, source).to(weight)
    parameter = nn.Parameter(weight, requires_grad=False)
    _embeddings_state(model).stored[name] = StoredEmbedding(parameter, None)
    set_active_embeddings(model, name)


def set_active_embeddings(model: nn.Module, name: str) -> None:
    """See `ModelAdaptersMixin.set_active_embeddings`."""
    _check_known(model, name)
    emb_state = _embeddings_state(model)
    module = input_embedding(model)
    if DEFAULT not in emb_state.stored:
        emb_state.stored[DEFAULT] = StoredEmbedding(module.weight, module.padding_idx)
    if name == emb_state.active:
        return
    heads = _tied_heads(model, module)
    # keep what training did to the active one (its parameter object is the stored one)
    emb_state.stored[emb_state.active] = StoredEmbedding(module.weight, module.padding_idx)
    target = emb_state.stored[name]
    weight = target.weight
    if weight.device != module.weight.device or weight.dtype != module.weight.dtype:
        weight.data = weight.data.to(device=module.weight.device, dtype=module.weight.dtype)
    module.weight = weight
    module.num_embeddings = int(weight.shape[0])
    module.padding_idx = target.padding_idx
    for head in heads:
        head.weight = weight
        if hasattr(head, "out_features"):
            head.out_features = int(weight.shape[0])
        if hasattr(head, "num_embeddings"):
            head.num_embeddings = int(weight.shape[0])
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        config.vocab_size = int(weight.shape[0])
    emb_state.active = name


def active_embeddings(model: nn.Module) -> str:
    """See `ModelAdaptersMixin.active_embeddings`."""
    return _embeddings_state(model).active


def delete_embeddings(model: nn.Module, name: str) -> None:
    """See `ModelAdaptersMixin.delete_embeddings`."""
    if name == DEFAULT:
        raise ConfigError("the 'default' embedding (the model's own) cannot be deleted")
    _check_known(model, name)
    if active_embeddings(model) == name:
        set_active_embeddings(model, DEFAULT)
    del _embeddings_state(model).stored[name]


def save_embeddings(model: nn.Module, path: str, name: str, tokenizer: Any = None) -> None:
    """See `ModelAdaptersMixin.save_embeddings`."""
    from safetensors.torch import save_file

    _check_known(model, name)
    weight = _weight_of(model, name).detach().to("cpu").contiguous()

    def write(tmp: str) -> None:
        save_file({"weight": weight}, os.path.join(tmp, EMBEDDING_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))

    write_directory_atomically(path, write)


def load_embeddings(model: nn.Module, path: str, name: str) -> Any:
    """See `ModelAdaptersMixin.load_embeddings`."""
    _check_new_name(model, name)
    ours = os.path.join(path, EMBEDDING_FILE)
    theirs = os.path.join(path, ADAPTERHUB_EMBEDDING_FILE)
    if os.path.isdir(path):
        check_links(path)
    if os.path.isfile(ours):
        tensors = checked_tensors(load_safetensors(ours), ours)
        if set(tensors) != {"weight"}:
            raise CheckpointError(f"{ours} must hold one tensor 'weight', has {sorted(tensors)}")
        weight = tensors["weight"]
    elif os.path.isfile(theirs):
        try:
            weight = torch.load(theirs, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for unsafe or corrupt files
            raise CheckpointError(
                f"{theirs!r} cannot be read as a tensor (weights_only=True): "
                f"{type(error).__name__}: {error}"
            ) from None
        if isinstance(weight, torch.Tensor):
            weight = checked_tensors({"weight": weight}, theirs)["weight"]
    else:
        raise CheckpointError(
            f"no embedding in {path!r}: expected {EMBEDDING_FILE} (save_embeddings) or "
            f"{ADAPTERHUB_EMBEDDING_FILE} (AdapterHub)"
        )
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise CheckpointError(f"the embedding in {path!r} is not a 2-D floating-point tensor")
    _check_width(model, int(weight.shape[1]), f"the embedding in {path!r}")
    tokenizer = None
    tokenizer_path = os.path.join(path, TOKENIZER_DIR)
    if os.path.isdir(tokenizer_path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    module = input_embedding(model)
    weight = weight.to(device=module.weight.device, dtype=module.weight.dtype)
    parameter = nn.Parameter(weight, requires_grad=False)
    _embeddings_state(model).stored[name] = StoredEmbedding(parameter, None)
    set_active_embeddings(model, name)
    return tokenizer
