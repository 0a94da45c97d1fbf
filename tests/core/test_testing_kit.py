"""The conformance kit itself: each check passes for a correct plugin and fails for a plugin
with the fault it exists to catch (an in-test plugin whose config picks one fault)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import adapters
from adapters import (
    AdapterConfig,
    Average,
    BatchSplit,
    ConfigError,
    MethodSpec,
    Stack,
    hookimpl,
    plugins,
)
from adapters.composition import apply_setup
from adapters.context import context_for
from adapters.testing import AdapterMethodConformance, model_fingerprint

from ..conformance import CORE_GAPS
from .toy_fusion import ToyFusableConfig, ToyFusablePlugin

FAULTS = (
    "none",
    "leaks_hook",
    "keeps_base_edit",
    "always_on",
    "ignores_batch_split",
    "name_in_keys",
)
KIT_FAILURE = (AssertionError, pytest.fail.Exception)


@dataclass(frozen=True)
class FaultyConfig(AdapterConfig):
    """A per-layer output scale (like the example plugin) with one deliberate ``fault``."""

    method: ClassVar[str] = "faulty"
    fault: str = "none"

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ConfigError(f"fault={self.fault!r}; expected one of {FAULTS}")


class FaultyHost(nn.Module):
    def __init__(self, model: nn.Module, fault: str) -> None:
        super().__init__()
        self.units = nn.ParameterDict()
        self.fault = fault
        self.__dict__["model"] = model

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        setup = context_for(self.model).setup
        if setup is None:
            if self.fault != "always_on" or not len(self.units):
                return None
            setup = Stack(*self.units.keys())
        if self.fault == "ignores_batch_split" and isinstance(setup, BatchSplit):
            setup = setup.children[0]
        hidden = output[0] if isinstance(output, tuple) else output
        new = apply_setup(
            setup,
            hidden,
            lambda name, h, rows: h * (1 + self.units[name]),
            owns=lambda name: name in self.units,
        )
        return (new, *output[1:]) if isinstance(output, tuple) else new


class Scale(nn.Module):
    """Holds one adapter's vector (what the plugin returns to core)."""

    def __init__(self, host: FaultyHost, name: str) -> None:
        super().__init__()
        self.__dict__["host"] = host
        self.name = name


class FaultyPlugin:
    ADAPTERS_CONTRACT = "1.0"

    @hookimpl
    def adapters_register_methods(self, register):
        register(
            MethodSpec(
                name="faulty",
                config_classes=(FaultyConfig,),
                presets={"faulty": FaultyConfig()},
                compositions=(Stack, BatchSplit, Average),
            )
        )

    @hookimpl
    def adapters_add_adapter(self, model, sites, name, config):
        if not isinstance(config, FaultyConfig):
            return None
        created = {}
        for layer in sites.layers:
            module = layer.layer.module
            if not hasattr(module, "faulty"):
                module.faulty = FaultyHost(model, config.fault)
                module.faulty.handle = module.register_forward_hook(module.faulty.hook)
            unit = nn.Module()
            unit.scale = nn.Parameter(torch.zeros(layer.hidden_size))
            module.faulty.units[name] = unit.scale
            module.faulty.add_module(f"unit_{name}", unit)
            key = (
                f"{layer.layer.path}.{name}" if config.fault == "name_in_keys" else layer.layer.path
            )
            created[key] = unit
        if config.fault == "keeps_base_edit":
            with torch.no_grad():
                sites.layers[0].layer.module.self_attn.q_proj.weight.mul_(1.5)
        return created

    @hookimpl
    def adapters_delete_adapter(self, model, sites, name, config):
        if not isinstance(config, FaultyConfig):
            return None
        for layer in sites.layers:
            module = layer.layer.module
            host = module.faulty
            del host.units[name]
            delattr(host, f"unit_{name}")
            if not len(host.units):
                if config.fault != "leaks_hook":
                    host.handle.remove()
                del module.faulty
        return True


class Kit(AdapterMethodConformance):
    """Not collected (no ``Test`` prefix): the tests below call its checks directly."""

    method_config = "faulty"


@pytest.fixture
def kit():
    registry = plugins.get_registry()
    registry.register(FaultyPlugin(), "faulty")
    yield Kit()
    registry.unregister("faulty")


def test_a_correct_plugin_passes_the_checks_the_faults_break(kit, tmp_path):
    config = FaultyConfig()
    kit.test_add_then_delete_restores_the_model(config)
    kit.test_inactive_adapter_leaves_outputs_bit_identical(config)
    kit.test_active_adapter_changes_outputs_and_deactivating_restores_them(config)
    kit.test_batch_split_composition(config)
    kit.test_save_and_load_give_identical_adapters_under_any_name(config, tmp_path)
    kit.test_train_adapter_trains_only_its_parameters(config)


@pytest.mark.parametrize("fault", ["leaks_hook", "keeps_base_edit"])
def test_add_delete_check_catches_what_delete_leaves_behind(kit, fault):
    with pytest.raises(KIT_FAILURE):
        kit.test_add_then_delete_restores_the_model(FaultyConfig(fault=fault))


def test_inactive_check_catches_an_adapter_that_is_always_on(kit):
    with pytest.raises(KIT_FAILURE, match="inactive adapter changed"):
        kit.test_inactive_adapter_leaves_outputs_bit_identical(FaultyConfig(fault="always_on"))


def test_batch_split_check_catches_rows_given_to_the_wrong_adapter(kit):
    with pytest.raises(KIT_FAILURE, match="BatchSplit rows of b"):
        kit.test_batch_split_composition(FaultyConfig(fault="ignores_batch_split"))


def test_save_check_catches_keys_that_contain_the_adapter_name(kit, tmp_path):
    with pytest.raises(KIT_FAILURE, match="contain the adapter's name"):
        kit.test_save_and_load_give_identical_adapters_under_any_name(
            FaultyConfig(fault="name_in_keys"), tmp_path
        )


def test_bad_config_check_fails_for_a_config_that_is_accepted(kit):
    kit.test_bad_configs_raise_config_error("faulty[fault='bogus']")
    with pytest.raises(KIT_FAILURE):
        kit.test_bad_configs_raise_config_error("faulty")


def test_fingerprint_sees_a_new_hook(kit):
    model = kit.initialised_model()
    before = model_fingerprint(model)
    handle = model.model.layers[0].register_forward_hook(lambda *a: None)
    after = model_fingerprint(model)
    handle.remove()
    assert after["hooks"] != before["hooks"]
    assert model_fingerprint(model)["hooks"] == before["hooks"]


def test_importing_the_kit_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, adapters, adapters.testing; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_configs_of_a_kit_without_method_config_raise_config_error():
    with pytest.raises(ConfigError, match="method_config"):
        AdapterMethodConformance().configs()


def test_the_default_model_is_a_tiny_llama_with_the_methods_of_the_configs(kit):
    model, interface = kit.make_model()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert interface.adapter_methods == ["faulty"]
    assert not adapters.is_initialized(model)


class TestToyFusableConformance(AdapterMethodConformance):
    """The whole kit on core's in-test ``toy_fusable`` plugin, the one method here that
    declares ``Fuse`` and ``Split`` (so the kit's Fuse and Split checks run)."""

    method_config = [ToyFusableConfig()]
    bad_configs = [{"method": "toy_fusable", "size": 3}]
    known_failures = CORE_GAPS

    @pytest.fixture(autouse=True)
    def _registered(self):
        registry = plugins.get_registry()
        registry.register(ToyFusablePlugin(), "toy_fusable")
        yield
        registry.unregister("toy_fusable")
