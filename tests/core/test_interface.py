import json

import pytest

from adapters import AdapterModelInterface, InterfaceError

from .conftest import SEED_INTERFACE, SEED_INTERFACE_2


def test_adapter_types_is_an_alias_of_adapter_methods():
    interface = AdapterModelInterface(**SEED_INTERFACE_2)
    assert interface.adapter_methods == ["bottleneck", "lora", "reft"]


def test_giving_both_spellings_is_rejected():
    with pytest.raises(InterfaceError, match="not both"):
        AdapterModelInterface(**SEED_INTERFACE, adapter_types=["lora"])


def test_methods_are_required():
    fields = {k: v for k, v in SEED_INTERFACE.items() if k != "adapter_methods"}
    with pytest.raises(InterfaceError, match="adapter_methods"):
        AdapterModelInterface(**fields)


def test_separate_and_fused_projections_are_exclusive():
    with pytest.raises(InterfaceError, match="attn_qkv_proj"):
        AdapterModelInterface(**SEED_INTERFACE, attn_qkv_proj="qkv")


def test_separate_projections_need_all_three():
    fields = dict(SEED_INTERFACE, attn_k_proj=None)
    with pytest.raises(InterfaceError, match="attn_k_proj"):
        AdapterModelInterface(**fields)


def test_to_dict_from_dict_round_trip():
    interface = AdapterModelInterface(**SEED_INTERFACE_2)
    again = AdapterModelInterface.from_dict(json.loads(json.dumps(interface.to_dict())))
    assert again == interface
    assert again.to_dict()["layer_ln_2"] == "post_feedforward_layernorm"


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(InterfaceError, match="layer_norm_9"):
        AdapterModelInterface.from_dict({**SEED_INTERFACE, "layer_norm_9": "x"})


def test_save_writes_adapter_interface_json(tmp_path):
    interface = AdapterModelInterface(**SEED_INTERFACE)
    path = interface.save(tmp_path)
    assert path.endswith("adapter_interface.json")
    assert AdapterModelInterface.load(tmp_path) == interface


def test_model_layers_may_be_a_list_of_stacks():
    interface = AdapterModelInterface(
        **{**SEED_INTERFACE, "model_layers": ["encoder.layers", "decoder.layers"]}
    )
    assert interface.layer_stacks == ["encoder.layers", "decoder.layers"]
