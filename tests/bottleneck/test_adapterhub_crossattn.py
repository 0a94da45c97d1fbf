"""AdapterHub 1.3.0 built-in BART adapters with ``cross_adapter=True`` load with AdapterHub's
outputs (fixtures made by tests/fixtures/bottleneck/make_crossattn_fixtures.py): the
cross-attention adapters land beside each decoder layer's cross-attention, next to the
self-attention and FFN adapters, each with its layer's own norms."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import adapters
from adapters_bottleneck import interop
from tests import models

HERE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "bottleneck")
EXPECTED = load_file(os.path.join(HERE, "bart_expected.safetensors"))
NAMES = ["seq_bn_cross", "double_seq_bn_cross", "par_bn_cross", "cross_only"]

#: A ``BartModel`` (no LM head): paths relative to it; post-LN norms of every sub-block.
BART = dict(models.BART_SUBBLOCK_INTERFACE, adapter_methods=["bottleneck"])


def bart():
    from transformers import BartModel

    model = BartModel.from_pretrained(os.path.join(HERE, "bart", "base")).eval()
    adapters.init(model, interface=adapters.AdapterModelInterface(**BART))
    return model


def output(model):
    with torch.no_grad():
        return model(
            input_ids=EXPECTED["input_ids"], decoder_input_ids=EXPECTED["decoder_input_ids"]
        ).last_hidden_state


def test_base_model_matches():
    torch.testing.assert_close(output(bart()), EXPECTED["base"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_builtin_bart_cross_adapters_load_with_adapterhubs_outputs(name):
    model = bart()
    loaded = model.load_adapter(os.path.join(HERE, "bart", name), set_active=True)
    assert loaded == name
    config = model.adapters_config[name]
    assert config.cross_adapter
    got = output(model)
    assert (got - EXPECTED["base"]).abs().max() > 1e-2
    torch.testing.assert_close(got, EXPECTED[name], atol=1e-4, rtol=1e-4)
    for layer in model.decoder.layers:
        assert list(layer.bottleneck_cross_attention.adapters) == [name]
        assert hasattr(layer, "bottleneck_output") == config.output_adapter
    for layer in model.encoder.layers:
        assert not hasattr(layer, "bottleneck_cross_attention")


def test_saved_in_adapterhubs_format_round_trips(tmp_path):
    model = bart()
    model.load_adapter(os.path.join(HERE, "bart", "seq_bn_cross"), set_active=True)
    fmt = interop.ADAPTERHUB_FORMAT.name
    model.save_adapter(str(tmp_path / "ah"), "seq_bn_cross", format=fmt)
    keys = torch.load(str(tmp_path / "ah" / "pytorch_adapter.bin"), weights_only=True)
    assert any(".cross_attention_adapters.adapters.seq_bn_cross." in k for k in keys)
    other = bart()
    other.load_adapter(str(tmp_path / "ah"), load_as="again", set_active=True)
    torch.testing.assert_close(output(other), EXPECTED["seq_bn_cross"], atol=1e-4, rtol=1e-4)
