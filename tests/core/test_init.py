import inspect
import warnings

import pytest
import torch

import adapters
from adapters import AdapterModelInterface, InterfaceError, MethodNotInstalledError

from .conftest import SEED_INTERFACE, SEED_INTERFACE_2, gemma2, init_toy, llama, toy_interface


def test_seed_interface_initialises_gemma2(core_alone):
    model = gemma2()
    with pytest.warns(UserWarning, match="pip install adapters-lora"):
        adapters.init(model, interface=AdapterModelInterface(**SEED_INTERFACE))
    assert adapters.is_initialized(model)
    assert isinstance(model.adapter_summary(), str)


def test_second_seed_interface_spelled_with_adapter_types_initialises_gemma2(core_alone):
    model = gemma2()
    with pytest.warns(UserWarning) as record:
        adapters.init(model, interface=AdapterModelInterface(**SEED_INTERFACE_2))
    messages = " ".join(str(w.message) for w in record)
    for dist in ("adapters-bottleneck", "adapters-lora", "adapters-reft"):
        assert f"pip install {dist}" in messages
    assert (
        model.adapter_sites.layers[0].ln_2.module
        is model.model.layers[0].post_feedforward_layernorm
    )


def test_core_alone_names_the_package_a_config_needs(core_alone):
    model = gemma2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapters.init(model, interface=AdapterModelInterface(**SEED_INTERFACE))
    with pytest.raises(MethodNotInstalledError, match="pip install adapters-lora"):
        model.add_adapter("my_adapter", config="lora")
    with pytest.raises(MethodNotInstalledError, match="adapters-reft"):
        model.add_adapter("r", config="loreft[r=2]")
    with pytest.raises(ImportError, match="adapters-lora"):
        adapters.LoRAConfig  # noqa: B018


def test_init_keeps_state_dict_keys_and_forward_signature(toy_plugins, ids):
    model = llama()
    keys = list(model.state_dict())
    signature = inspect.signature(model.forward)
    before = model(ids).logits
    init_toy(model)
    assert list(model.state_dict()) == keys
    assert inspect.signature(model.forward) == signature
    assert isinstance(model, type(llama()))
    assert torch.equal(model(ids).logits, before)


def test_init_is_idempotent(toy_plugins):
    model = init_toy()
    hooks = len(model._forward_pre_hooks)
    assert adapters.init(model) is model
    assert adapters.init(model, interface=toy_interface()) is model
    assert len(model._forward_pre_hooks) == hooks


def test_init_with_another_interface_on_an_initialised_model_is_refused(toy_plugins):
    model = init_toy()
    with pytest.raises(InterfaceError, match="different interface"):
        adapters.init(model, interface=toy_interface(methods=["toy_lora"]))


def test_failed_init_leaves_the_model_exactly_as_before(toy_plugins):
    model = llama()
    cls, keys = type(model), list(model.state_dict())
    modules = [n for n, _ in model.named_modules()]
    # toy_bottleneck refuses models without layer_pre_ffn in its init hook
    with pytest.raises(InterfaceError, match="layer_pre_ffn"):
        adapters.init(model, interface=toy_interface(layer_pre_ffn=None))
    assert type(model) is cls
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_modules()] == modules
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not adapters.is_initialized(model)


def test_bad_path_fails_before_touching_the_model(toy_plugins):
    model = llama()
    cls = type(model)
    with pytest.raises(adapters.InterfacePathError, match="did you mean 'q_proj'"):
        adapters.init(model, interface=toy_interface(attn_q_proj="q_prj"))
    assert type(model) is cls and not adapters.is_initialized(model)


def test_init_adds_adapters_from_adapters_config(toy_plugins):
    model = llama()
    adapters.init(model, interface=toy_interface(), adapters_config={"a": "toy_lora[r=3]"})
    assert model.adapters_config["a"].r == 3


def test_adding_a_method_the_interface_does_not_enable_is_refused(toy_plugins):
    model = init_toy(methods=["toy_lora"])
    with pytest.raises(adapters.ConfigError, match="add 'toy_shift' to adapter_methods"):
        model.add_adapter("s", config="toy_shift")


def test_uninitialised_model_gets_a_clear_error():
    from adapters._runtime.api import ModelAdaptersMixin

    with pytest.raises(adapters.NotInitializedError, match="adapters.init"):
        ModelAdaptersMixin.adapter_summary(llama())


def test_plain_module_without_config_works(toy_plugins):
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.q, self.attn.k, self.attn.v, self.attn.o = (nn.Linear(8, 8) for _ in range(4))
            self.norm = nn.LayerNorm(8)
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            a = self.attn.o(self.attn.q(x) + self.attn.k(x) + self.attn.v(x))
            return x + self.down(torch.relu(self.up(self.norm(x + a))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = Net()
    adapters.init(
        model,
        interface=AdapterModelInterface(
            adapter_methods=["toy_lora", "toy_bottleneck"],
            model_layers="blocks",
            layer_self_attn="attn",
            attn_q_proj="q",
            attn_k_proj="k",
            attn_v_proj="v",
            attn_o_proj="o",
            layer_intermediate_proj="up",
            layer_output_proj="down",
            layer_pre_ffn="norm",
        ),
    )
    x = torch.randn(3, 5, 8)
    base = model(x)
    model.add_adapter("a", config="toy_lora", set_active=True)
    for m in model.get_adapter("a").values():
        torch.nn.init.normal_(m.B)
    assert not torch.allclose(model(x), base)
    assert not hasattr(model, "generate")


def test_init_that_fails_adding_its_adapters_leaves_the_model_as_before(toy_plugins):
    model = llama()
    cls, keys = type(model), list(model.state_dict())
    hooks = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    with pytest.raises(adapters.ConfigError):
        adapters.init(
            model,
            interface=toy_interface(),
            adapters_config={"ok": "toy_lora", "bad": "toy_lora[rank=3]"},
        )
    assert type(model) is cls and not adapters.is_initialized(model)
    assert list(model.state_dict()) == keys
    assert {n: len(m._forward_hooks) for n, m in model.named_modules()} == hooks
    assert not model._forward_pre_hooks
