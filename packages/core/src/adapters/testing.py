"""A conformance kit for adapter method plugins: the behaviour every method must have.

Subclass `AdapterMethodConformance` in a test module of your plugin, tell it which configs to
check, and pytest runs one test per behaviour and config::

    # tests/test_conformance.py of adapters-mymethod
    from adapters.testing import AdapterMethodConformance


    class TestMyMethodConformance(AdapterMethodConformance):
        method_config = ["mymethod", "mymethod[rank=2]"]  # presets, config objects or dicts
        bad_configs = ["mymethod[rank=-1]", lambda: MyMethodConfig(rank=0)]

The checks use only the public model API (``add_adapter``, ``set_active_adapters``,
``train_adapter``, ``save_adapter`` / ``load_adapter``, ...), on a tiny seeded
``LlamaForCausalLM`` by default. Override `AdapterMethodConformance.make_model` (and, for models
that are not decoders, `make_inputs` / `outputs_of`) to run them on another model.

The kit needs pytest and transformers (for the default model); both are imported only by this
module, never by ``import adapters``.
"""

from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import torch
from torch import nn

import adapters
from adapters.composition import (
    AdapterCompositionBlock,
    Average,
    BatchSplit,
    Fuse,
    Parallel,
    PerExample,
    Split,
    Stack,
)
from adapters.configs import AdapterConfig, config_parts, resolve_config
from adapters.errors import AdapterNotFoundError, CompositionError, ConfigError
from adapters.interface import AdapterModelInterface

__all__ = ["TINY_LLAMA", "AdapterMethodConformance", "llama_interface", "model_fingerprint"]

#: The default model's size: width 32, 2 layers, grouped-query attention (4 heads, 2 kv heads).
TINY_LLAMA: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    max_position_embeddings=64,
    pad_token_id=0,
)

# Adapter names used by the checks. Long and distinctive, so that a name that leaks into a
# checkpoint key cannot go unnoticed.
FIRST, SECOND = "kit_first", "kit_second"
SAVED_AS, LOADED_AS = "saved_under_one_name", "loaded_under_another"

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def llama_interface(methods: Sequence[str]) -> AdapterModelInterface:
    """The interface of a transformers Llama (also Qwen2, Mistral) enabling ``methods``."""
    return AdapterModelInterface(
        adapter_methods=list(methods),
        model_embeddings="embed_tokens",
        model_layers="layers",
        layer_self_attn="self_attn",
        layer_cross_attn=None,
        attn_q_proj="q_proj",
        attn_k_proj="k_proj",
        attn_v_proj="v_proj",
        attn_o_proj="o_proj",
        layer_intermediate_proj="mlp.up_proj",
        layer_output_proj="mlp.down_proj",
        layer_pre_self_attn="input_layernorm",
        layer_pre_ffn="post_attention_layernorm",
    )


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything an added and then deleted adapter must leave as it was: the class, the module
    tree (names and classes), the hooks on every module, the ``state_dict`` (keys and values),
    which parameters require grad, and the train/eval mode of every module."""
    hooks = {
        name: tuple(len(getattr(module, attr, None) or {}) for attr in _HOOK_DICTS)
        for name, module in model.named_modules()
    }
    return {
        "class": type(model),
        "modules": [(name, type(module)) for name, module in model.named_modules()],
        "hooks": hooks,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {name: module.training for name, module in model.named_modules()},
    }


def assert_same_fingerprint(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Assert two `model_fingerprint` results are equal, naming the first difference."""
    assert after["class"] is before["class"], (
        f"the model's class changed: {before['class']} -> {after['class']}"
    )
    old_modules, new_modules = dict(before["modules"]), dict(after["modules"])
    added = sorted(set(new_modules) - set(old_modules))
    removed = sorted(set(old_modules) - set(new_modules))
    assert not added and not removed, f"modules added: {added}; removed: {removed}"
    swapped = {n: (old_modules[n], new_modules[n]) for n in old_modules}
    swapped = {n: pair for n, pair in swapped.items() if pair[0] is not pair[1]}
    assert not swapped, f"module classes changed: {swapped}"
    changed_hooks = {
        n: (before["hooks"][n], after["hooks"].get(n))
        for n in before["hooks"]
        if before["hooks"][n] != after["hooks"].get(n)
    }
    assert not changed_hooks, f"hook counts {_HOOK_DICTS} changed: {changed_hooks}"
    old_sd, new_sd = before["state_dict"], after["state_dict"]
    assert list(new_sd) == list(old_sd), (
        f"state_dict keys changed: added {sorted(set(new_sd) - set(old_sd))}, "
        f"removed {sorted(set(old_sd) - set(new_sd))}"
    )
    differing = [k for k in old_sd if not torch.equal(old_sd[k], new_sd[k])]
    assert not differing, f"state_dict values changed: {differing}"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
    assert after["training"] == before["training"], "train/eval modes changed"


class _NoBadConfigs:
    def __repr__(self) -> str:
        return "no-bad-configs"


_NO_BAD_CONFIGS = _NoBadConfigs()


class AdapterMethodConformance:
    """Base class of a method's conformance tests (pytest collects subclasses named ``Test*``).

    Set on the subclass:
        method_config: the config to check (a config object, preset string such as
            ``"lora[r=4]"``, or dict), or a list of them: every check runs once per config.
        bad_configs: configs that must be refused with `adapters.ConfigError` by
            ``add_adapter``, leaving the model as it was. Give a callable (``lambda:
            MyConfig(rank=-1)``) for configs whose constructor raises.
        atol: tolerance of comparisons that are not expected to be bit-identical.
        compile_backend: the ``torch.compile`` backend of the fullgraph check; ``"eager"``
            tests tracing (graph breaks, guards) in well under a second, ``"inductor"`` also
            code generation.
        known_failures: ``{test_name: reason}`` of checks the method is known to fail; they are
            marked ``xfail(strict=True)``, so a check that starts passing is reported.

    Override when the default tiny Llama does not suit the method:
        `make_model`, `make_inputs`, `outputs_of`, `randomize_adapter`, `randomize_fusion`,
        `generation_kwargs`.

    Composition checks run for the blocks the method's `adapters.MethodSpec` declares
    (``Parallel`` and ``adapter_names=`` come with ``BatchSplit``) and are skipped otherwise;
    `test_undeclared_compositions_are_refused` checks the rest are refused.
    """

    method_config: Any = None
    bad_configs: Sequence[Any] = ()
    atol: float = 1e-5
    compile_backend: str = "eager"
    known_failures: Mapping[str, str] = {}

    # -- parametrisation -----------------------------------------------------------------------
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Run each check once per config of `method_config` (and per bad config)."""
        if "adapter_config" in metafunc.fixturenames:
            configs = self.configs()
            metafunc.parametrize(
                "adapter_config", configs, ids=[_config_id(c, i) for i, c in enumerate(configs)]
            )
        if "bad_config" in metafunc.fixturenames:
            bad = list(self.bad_configs) or [_NO_BAD_CONFIGS]
            metafunc.parametrize(
                "bad_config", bad, ids=[f"bad{i}" for i in range(len(bad))] if bad else None
            )

    @pytest.fixture(autouse=True)
    def _mark_known_failures(self, request: pytest.FixtureRequest) -> None:
        name = getattr(request.node, "originalname", request.node.name)
        reason = self.known_failures.get(name)
        if reason:
            request.applymarker(pytest.mark.xfail(reason=reason, strict=True))

    def configs(self) -> list[Any]:
        """The configs every check runs with (from `method_config`)."""
        if self.method_config is None:
            raise ConfigError(
                f"{type(self).__name__} must set method_config = <config, preset string or list>"
            )
        value = self.method_config
        return list(value) if isinstance(value, list | tuple) else [value]

    def methods(self) -> list[str]:
        """The method names of the configs, in order (what the interface must enable)."""
        names: list[str] = []
        for config in self.configs():
            for part in config_parts(resolve_config(config)):
                if part.method not in names:
                    names.append(part.method)
        return names

    # -- what a plugin author may override -----------------------------------------------------
    def make_model(self) -> tuple[nn.Module, AdapterModelInterface]:
        """A fresh, seeded, *uninitialised* model in eval mode and its interface.

        Default: a tiny ``LlamaForCausalLM`` (`TINY_LLAMA`) and `llama_interface` enabling the
        methods of `method_config`. Must build the same weights on every call.
        """
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
        return model, llama_interface(self.methods())

    def make_inputs(self, model: nn.Module, batch_size: int = 2) -> dict[str, Any]:
        """Keyword arguments of one forward call: ``batch_size`` rows of token ids (no padding)."""
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 100))
        generator = torch.Generator().manual_seed(1234)
        ids = torch.randint(3, vocab, (batch_size, 6), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def outputs_of(self, output: Any) -> torch.Tensor:
        """The tensor the checks compare: ``logits``, else ``last_hidden_state``, else the first
        element of a tuple, else the output itself."""
        for field in ("logits", "last_hidden_state"):
            value = getattr(output, field, None)
            if isinstance(value, torch.Tensor):
                return value
        if isinstance(output, tuple | list):
            return output[0]
        return output

    def randomize_adapter(self, model: nn.Module, name: str, seed: int = 1) -> None:
        """Give adapter ``name`` non-trivial weights, so that it changes the outputs (most
        methods start as the identity). Default: add Gaussian noise (std 0.2) to every floating
        parameter of ``model.get_adapter(name)``."""
        generator = torch.Generator().manual_seed(seed)
        seen: set[int] = set()
        with torch.no_grad():
            for module in model.get_adapter(name).values():
                for parameter in module.parameters():
                    if id(parameter) in seen or not parameter.is_floating_point():
                        continue
                    seen.add(id(parameter))
                    noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                    parameter.add_(0.2 * noise.to(parameter.dtype))

    def generation_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """Keyword arguments of the ``generate`` check (greedy, a few tokens)."""
        return {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}

    # -- helpers -----------------------------------------------------------------------------
    def initialised_model(self) -> nn.Module:
        """`make_model`, then ``adapters.init`` with its interface."""
        model, interface = self.make_model()
        return adapters.init(model, interface=interface)

    def run(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        """One forward call without gradients; the compared tensor."""
        with torch.no_grad():
            return self.outputs_of(model(**inputs))

    def with_adapters(self, config: Any, names: Sequence[str] = (FIRST,)) -> nn.Module:
        """An initialised model with adapters ``names`` of ``config``, randomised (seed 1, 2,
        ...), none active."""
        model = self.initialised_model()
        for seed, name in enumerate(names, start=1):
            model.add_adapter(name, config=config)
            self.randomize_adapter(model, name, seed=seed)
        return model

    def method_specs(self, config: Any) -> list[Any]:
        """The `adapters.MethodSpec` of every method of ``config``."""
        from .registry.loading import get_registry

        methods = get_registry().methods
        return [methods[part.method] for part in config_parts(resolve_config(config))]

    def declared_blocks(self, config: Any) -> set[type]:
        """The composition blocks every method of ``config`` declares (``Parallel`` and
        ``PerExample``, i.e. ``adapter_names=``, come with ``BatchSplit``)."""
        supported: set[type] | None = None
        for spec in self.method_specs(config):
            blocks = set(spec.compositions)
            if BatchSplit in blocks:
                blocks.update((Parallel, PerExample))
            supported = blocks if supported is None else supported & blocks
        return supported or set()

    def _outputs_with(self, model: nn.Module, setup: Any, inputs: Mapping[str, Any]):
        model.set_active_adapters(setup)
        return self.run(model, inputs)

    def _close(self, actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        torch.testing.assert_close(actual, expected, atol=self.atol, rtol=0, msg=lambda m: what + m)

    def _differ(self, a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        gap = (a.float() - b.float()).abs().max().item()
        assert gap > 100 * self.atol, f"{what}: outputs differ by only {gap:.3g}"

    # -- add / delete ----------------------------------------------------------------------------
    def test_add_then_delete_restores_the_model(self, adapter_config: Any) -> None:
        """Adding, running and deleting an adapter leaves the model exactly as ``init`` left it:
        class, module tree, hooks, ``state_dict`` and outputs."""
        model = self.initialised_model()
        inputs = self.make_inputs(model)
        base = self.run(model, inputs)
        before = model_fingerprint(model)
        model.add_adapter(FIRST, config=adapter_config)
        self.randomize_adapter(model, FIRST)
        model.set_active_adapters(FIRST)
        self.run(model, inputs)
        model.delete_adapter(FIRST)
        assert_same_fingerprint(before, model_fingerprint(model))
        assert model.active_adapters is None
        assert FIRST not in model.adapters_config
        assert torch.equal(self.run(model, inputs), base)

    # -- activity --------------------------------------------------------------------------------
    def test_inactive_adapter_leaves_outputs_bit_identical(self, adapter_config: Any) -> None:
        """``init`` and an added (even trained) but inactive adapter change no output bit."""
        model, interface = self.make_model()
        inputs = self.make_inputs(model)
        base = self.run(model, inputs)
        adapters.init(model, interface=interface)
        assert torch.equal(self.run(model, inputs), base), "adapters.init changed the outputs"
        model.add_adapter(FIRST, config=adapter_config)
        self.randomize_adapter(model, FIRST)
        assert torch.equal(self.run(model, inputs), base), "an inactive adapter changed outputs"

    def test_active_adapter_changes_outputs_and_deactivating_restores_them(
        self, adapter_config: Any
    ) -> None:
        """Active: outputs differ from the base model; ``set_active_adapters(None)``: equal to
        it again, bit for bit; ``AdapterSetup`` activates for its block only."""
        model = self.with_adapters(adapter_config)
        inputs = self.make_inputs(model)
        base = self.run(model, inputs)
        active = self._outputs_with(model, FIRST, inputs)
        self._differ(active, base, "the active adapter does not change the outputs")
        assert torch.equal(self._outputs_with(model, None, inputs), base)
        with adapters.AdapterSetup(FIRST):
            self._close(self.run(model, inputs), active, "inside AdapterSetup: ")
        assert torch.equal(self.run(model, inputs), base), "AdapterSetup leaked out of its block"

    def test_other_inactive_adapters_do_not_change_the_active_one(
        self, adapter_config: Any
    ) -> None:
        """A second adapter, added but inactive, leaves the active adapter's outputs as they
        were without it."""
        model = self.with_adapters(adapter_config)
        inputs = self.make_inputs(model)
        alone = self._outputs_with(model, FIRST, inputs)
        model.add_adapter(SECOND, config=adapter_config)
        self.randomize_adapter(model, SECOND, seed=2)
        assert torch.equal(self._outputs_with(model, FIRST, inputs), alone)

    def test_new_adapter_modules_follow_the_model_mode(
        self, adapter_config: Any, tmp_path: Any
    ) -> None:
        """Modules created by ``add_adapter`` and ``load_adapter`` take the model's train/eval
        mode (a model loaded for inference stays deterministic), and follow ``train()`` /
        ``eval()`` afterwards."""
        model = self.initialised_model()
        inputs = self.make_inputs(model)
        model.add_adapter(FIRST, config=adapter_config)
        self.randomize_adapter(model, FIRST)
        training = sorted(n for n, m in model.named_modules() if m.training)
        assert not training, f"modules in train mode in an eval model: {training}"
        model.set_active_adapters(FIRST)
        assert torch.equal(self.run(model, inputs), self.run(model, inputs))
        directory = os.path.join(str(tmp_path), "adapter")
        model.save_adapter(directory, FIRST)
        model.load_adapter(directory, load_as=SECOND)
        training = sorted(n for n, m in model.named_modules() if m.training)
        assert not training, f"modules in train mode after load_adapter: {training}"
        model.train()
        evaluating = sorted(n for n, m in model.named_modules() if not m.training)
        assert not evaluating, f"modules left in eval mode by model.train(): {evaluating}"

    def test_merge_gives_the_unmerged_outputs_and_reset_restores_the_base(
        self, adapter_config: Any
    ) -> None:
        """For methods that declare ``can_merge``: merged outputs equal the active unmerged
        adapter's, with no adapter compute left; ``reset_adapter`` restores the base weights."""
        if not all(spec.can_merge for spec in self.method_specs(adapter_config)):
            pytest.skip("the method does not declare can_merge")
        model = self.with_adapters(adapter_config)
        inputs = self.make_inputs(model)
        base = self.run(model, inputs)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        active = self._outputs_with(model, FIRST, inputs)
        model.merge_adapter(FIRST)
        assert model.is_merged(FIRST)
        self._close(self.run(model, inputs), active, "merged, still active: ")
        self._close(self._outputs_with(model, None, inputs), active, "merged, inactive: ")
        model.reset_adapter(FIRST)
        assert not model.is_merged(FIRST)
        self._close(self.run(model, inputs), base, "after reset_adapter: ")
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, base_state[key], atol=self.atol, rtol=0)
        self._close(self._outputs_with(model, FIRST, inputs), active, "unmerged again: ")

    # -- training ----------------------------------------------------------------------------
    def test_train_adapter_trains_only_its_parameters(self, adapter_config: Any) -> None:
        """After ``train_adapter(a)`` exactly ``a``'s parameters require grad, every one of them
        gets a gradient, the base model and other adapters get none, and an optimizer step
        changes nothing else."""
        model = self.with_adapters(adapter_config, (FIRST, SECOND))
        inputs = self.make_inputs(model)
        model.train_adapter(FIRST)
        assert model.training
        own = {id(p): p for m in model.get_adapter(FIRST).values() for p in m.parameters()}
        assert own, f"adapter {FIRST!r} has no parameters"
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        expected = {n for n, p in model.named_parameters() if id(p) in own}
        assert trainable == expected, (
            f"trainable but not the adapter's: {sorted(trainable - expected)}; the adapter's but "
            f"frozen: {sorted(expected - trainable)}"
        )
        torch.manual_seed(0)
        self.outputs_of(model(**inputs)).float().pow(2).mean().backward()
        with_grad = sorted(n for n, p in model.named_parameters() if p.grad is not None)
        assert set(with_grad) <= expected, (
            f"parameters outside the adapter got gradients: {sorted(set(with_grad) - expected)}"
        )
        assert set(with_grad) == expected, (
            f"adapter parameters without a gradient: {sorted(expected - set(with_grad))}"
        )
        assert any(p.grad.abs().sum() > 0 for p in own.values()), "all gradients are zero"
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and changed <= expected, (
            f"an optimizer step changed parameters outside the adapter: {changed - expected}"
        )

    # -- saving --------------------------------------------------------------------------------
    def test_save_and_load_give_identical_adapters_under_any_name(
        self, adapter_config: Any, tmp_path: Any
    ) -> None:
        """Saved as one name and loaded as another (into a fresh model and into the same
        model): the same tensors under the same name-independent keys, the same config and
        identical outputs."""
        model = self.initialised_model()
        inputs = self.make_inputs(model)
        model.add_adapter(SAVED_AS, config=adapter_config)
        self.randomize_adapter(model, SAVED_AS)
        saved = model.adapter_state_dict(SAVED_AS)
        leaking = [k for k in saved if SAVED_AS in k]
        assert not leaking, f"adapter_state_dict keys contain the adapter's name: {leaking}"
        expected = self._outputs_with(model, SAVED_AS, inputs)
        directory = os.path.join(str(tmp_path), "adapter")
        model.save_adapter(directory, SAVED_AS)
        in_files = _tensor_file_keys(directory)
        assert in_files, f"save_adapter wrote no .safetensors file into {directory}"
        leaking = [k for k in in_files if SAVED_AS in k]
        assert not leaking, f"saved tensor keys contain the adapter's name: {leaking}"

        fresh = self.initialised_model()
        assert fresh.load_adapter(directory, load_as=LOADED_AS) == LOADED_AS
        same = model.load_adapter(directory, load_as=LOADED_AS)
        assert same == LOADED_AS
        for target in (fresh, model):
            loaded = target.adapter_state_dict(LOADED_AS)
            assert list(loaded) == list(saved), "loaded keys differ from the saved adapter's"
            differing = [k for k in saved if not torch.equal(loaded[k], saved[k])]
            assert not differing, f"loaded tensors differ: {differing}"
            assert target.adapters_config[LOADED_AS] == model.adapters_config[SAVED_AS]
            assert torch.equal(self._outputs_with(target, LOADED_AS, inputs), expected)

    # -- composition ---------------------------------------------------------------------------
    def _composition_model(self, config: Any, block: type) -> nn.Module:
        if block not in self.declared_blocks(config):
            pytest.skip(f"the method does not declare {block.__name__}")
        return self.with_adapters(config, (FIRST, SECOND))

    def test_stack_composition(self, adapter_config: Any) -> None:
        """``Stack(a)`` is ``a``; ``Stack(a, b)`` runs both: it differs from each alone."""
        model = self._composition_model(adapter_config, Stack)
        inputs = self.make_inputs(model)
        first = self._outputs_with(model, FIRST, inputs)
        second = self._outputs_with(model, SECOND, inputs)
        self._close(self._outputs_with(model, Stack(FIRST), inputs), first, "Stack(a) vs a: ")
        both = self._outputs_with(model, Stack(FIRST, SECOND), inputs)
        assert torch.isfinite(both).all()
        self._differ(both, first, "Stack(a, b) ignores b")
        self._differ(both, second, "Stack(a, b) ignores a")

    def test_batch_split_composition(self, adapter_config: Any) -> None:
        """``BatchSplit(a, b)``: each slice of the batch equals a run of its adapter alone."""
        model = self._composition_model(adapter_config, BatchSplit)
        inputs = self.make_inputs(model, batch_size=3)
        first = self._outputs_with(model, FIRST, inputs)
        second = self._outputs_with(model, SECOND, inputs)
        split = self._outputs_with(model, BatchSplit(FIRST, SECOND, batch_sizes=[1, 2]), inputs)
        self._close(split[:1], first[:1], "BatchSplit rows of a: ")
        self._close(split[1:], second[1:], "BatchSplit rows of b: ")

    def test_parallel_composition(self, adapter_config: Any) -> None:
        """``Parallel(a, b)``: the batch is run once per branch, branch outputs concatenated."""
        model = self._composition_model(adapter_config, Parallel)
        inputs = self.make_inputs(model)
        first = self._outputs_with(model, FIRST, inputs)
        second = self._outputs_with(model, SECOND, inputs)
        both = self._outputs_with(model, Parallel(FIRST, SECOND), inputs)
        rows = first.shape[0]
        assert both.shape[0] == 2 * rows, f"Parallel of 2 gave {both.shape[0]} rows, not {2 * rows}"
        self._close(both[:rows], first, "Parallel branch a: ")
        self._close(both[rows:], second, "Parallel branch b: ")

    def test_per_example_adapter_names(self, adapter_config: Any) -> None:
        """``model(**inputs, adapter_names=[a, None, b])``: each example equals a run of its
        adapter alone (``None``: the base model); an unknown name raises
        `AdapterNotFoundError`."""
        model = self._composition_model(adapter_config, PerExample)
        inputs = self.make_inputs(model, batch_size=3)
        base = self.run(model, inputs)
        first = self._outputs_with(model, FIRST, inputs)
        second = self._outputs_with(model, SECOND, inputs)
        model.set_active_adapters(None)
        mixed = self.run(model, {**inputs, "adapter_names": [FIRST, None, SECOND]})
        self._close(mixed[0], first[0], "adapter_names example 0 (a): ")
        self._close(mixed[1], base[1], "adapter_names example 1 (None): ")
        self._close(mixed[2], second[2], "adapter_names example 2 (b): ")
        with pytest.raises(AdapterNotFoundError):
            self.run(model, {**inputs, "adapter_names": [FIRST, "no_such_adapter", None]})

    def test_average_composition(self, adapter_config: Any) -> None:
        """``Average(a, b, weights=w)`` is ``h + sum w_i delta_i``: weights (1, 0) give ``a``,
        (0, 1) give ``b``, ``Average(a, a)`` gives ``a``; equal weights differ from both."""
        model = self._composition_model(adapter_config, Average)
        inputs = self.make_inputs(model)
        first = self._outputs_with(model, FIRST, inputs)
        second = self._outputs_with(model, SECOND, inputs)
        only_first = Average(FIRST, SECOND, weights=[1.0, 0.0])
        only_second = Average(FIRST, SECOND, weights=[0.0, 1.0])
        self._close(self._outputs_with(model, only_first, inputs), first, "weights (1, 0): ")
        self._close(self._outputs_with(model, only_second, inputs), second, "weights (0, 1): ")
        twice = Average(FIRST, FIRST)
        self._close(self._outputs_with(model, twice, inputs), first, "Average(a, a): ")
        mean = self._outputs_with(model, Average(FIRST, SECOND), inputs)
        self._differ(mean, first, "Average(a, b) equals a")
        self._differ(mean, second, "Average(a, b) equals b")

    def test_split_composition(self, adapter_config: Any) -> None:
        """``Split(a, b, splits=[k, n - k])`` on a causal model: the first ``k`` positions see
        only positions ``a`` edits, so they equal ``a``'s outputs; the others carry ``b``'s
        edit. (Skipped for models that do not generate, taken as not causal.)"""
        model = self._composition_model(adapter_config, Split)
        if not _can_generate(model):
            pytest.skip("the Split check needs a causal model (one that generates)")
        inputs = self.make_inputs(model)
        length = int(inputs["input_ids"].shape[1])
        head = length // 2
        first = self._outputs_with(model, FIRST, inputs)
        split = self._outputs_with(
            model, Split(FIRST, SECOND, splits=[head, length - head]), inputs
        )
        self._close(split[:, :head], first[:, :head], "Split positions of a: ")
        self._differ(split[:, head:], first[:, head:], "Split ignores b on its positions")

    def test_fuse_composition(self, adapter_config: Any, tmp_path: Any) -> None:
        """For methods that declare ``Fuse``: a fusion layer (``add_adapter_fusion``) changes
        the outputs with ``Fuse(a, b)`` active and is removed without a trace;
        ``train_adapter_fusion`` trains the fusion layer only; a saved fusion reloads to
        identical outputs. A config the method cannot fuse must be refused with `ConfigError`
        by ``add_adapter_fusion``, leaving the model as it was (the check is then skipped)."""
        model = self._composition_model(adapter_config, Fuse)
        inputs = self.make_inputs(model)
        base = self.run(model, inputs)
        block = Fuse(FIRST, SECOND)
        before = model_fingerprint(model)
        try:
            model.add_adapter_fusion(block)
        except ConfigError as error:  # declared for the method, refused for this config
            assert_same_fingerprint(before, model_fingerprint(model))
            pytest.skip(f"add_adapter_fusion refuses this config: {error}")
        fused = self._outputs_with(model, block, inputs)
        assert torch.isfinite(fused).all()
        self._differ(fused, base, "the active fusion does not change the outputs")
        model.set_active_adapters(None)
        model.delete_adapter_fusion(block)
        assert_same_fingerprint(before, model_fingerprint(model))

        model.add_adapter_fusion(block)
        self.randomize_fusion(model, block)
        fused = self._outputs_with(model, block, inputs)
        directory = str(tmp_path)
        for name in (FIRST, SECOND):
            model.save_adapter(os.path.join(directory, name), name)
        model.save_adapter_fusion(os.path.join(directory, "fusion"), block)
        fresh = self.initialised_model()
        for name in (FIRST, SECOND):
            fresh.load_adapter(os.path.join(directory, name), load_as=name)
        fresh.load_adapter_fusion(os.path.join(directory, "fusion"))
        assert torch.equal(self._outputs_with(fresh, block, inputs), fused)

        model.train_adapter_fusion(block)
        own = {id(p) for m in model.get_adapter_fusion(block).values() for p in m.parameters()}
        assert own, "the fusion layer has no parameters"
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        expected = {n for n, p in model.named_parameters() if id(p) in own}
        assert trainable == expected, (
            f"train_adapter_fusion: trainable {sorted(trainable)}, fusion {sorted(expected)}"
        )
        self.outputs_of(model(**inputs)).float().pow(2).mean().backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad and with_grad <= expected, f"gradients outside the fusion: {with_grad}"

    def randomize_fusion(self, model: nn.Module, block: Fuse, seed: int = 3) -> None:
        """Give the fusion layer of ``block`` non-trivial weights (noise, as
        `randomize_adapter`)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in model.get_adapter_fusion(block).values():
                for parameter in module.parameters():
                    if parameter.is_floating_point():
                        noise = torch.randn(parameter.shape, generator=generator)
                        parameter.add_(0.2 * noise.to(parameter.dtype))

    def test_undeclared_compositions_are_refused(self, adapter_config: Any) -> None:
        """Every block the method does not declare is refused with `CompositionError` by
        ``set_active_adapters`` and ``train_adapter``, and the active setup stays as it was."""
        model = self.with_adapters(adapter_config, (FIRST, SECOND))
        declared = self.declared_blocks(adapter_config)
        candidates: list[AdapterCompositionBlock] = [
            Stack(FIRST, SECOND),
            BatchSplit(FIRST, SECOND, batch_sizes=[1, 1]),
            Average(FIRST, SECOND),
            Parallel(FIRST, SECOND),
            Fuse(FIRST, SECOND),
            Split(FIRST, SECOND, splits=[2, 2]),
            PerExample([FIRST, SECOND]),
        ]
        model.set_active_adapters(FIRST)
        expected = model.active_adapters
        refused = [block for block in candidates if type(block) not in declared]
        for block in refused:
            with pytest.raises(CompositionError):
                model.set_active_adapters(block)
            with pytest.raises(CompositionError):
                model.train_adapter(block)
            assert model.active_adapters == expected, f"a refused {block!r} changed the setup"
        if PerExample not in declared:
            inputs = self.make_inputs(model, batch_size=2)
            with pytest.raises(CompositionError):
                self.run(model, {**inputs, "adapter_names": [FIRST, SECOND]})
        if not refused:
            pytest.skip("the method declares every composition block")

    # -- configs -------------------------------------------------------------------------------
    def test_bad_configs_raise_config_error(self, bad_config: Any) -> None:
        """Each of `bad_configs` is refused with `ConfigError` and leaves the model as it was."""
        if bad_config is _NO_BAD_CONFIGS:
            pytest.skip("set bad_configs = [...] to check that invalid configs are refused")
        model = self.initialised_model()
        before = model_fingerprint(model)
        with pytest.raises(ConfigError):
            config = bad_config() if callable(bad_config) else bad_config
            model.add_adapter(FIRST, config=config)
        assert FIRST not in model.adapters_config
        assert_same_fingerprint(before, model_fingerprint(model))

    # -- copies --------------------------------------------------------------------------------
    def test_deepcopy_gives_an_identical_independent_model(self, adapter_config: Any) -> None:
        """``copy.deepcopy``: identical outputs; changing the copy's setup or weights leaves the
        original as it was."""
        model = self.with_adapters(adapter_config)
        inputs = self.make_inputs(model)
        base = self.run(model, inputs)
        active = self._outputs_with(model, FIRST, inputs)
        twin = copy.deepcopy(model)
        assert torch.equal(self.run(twin, inputs), active)
        twin.set_active_adapters(None)
        assert torch.equal(self.run(twin, inputs), base)
        assert torch.equal(self.run(model, inputs), active)
        twin.set_active_adapters(FIRST)
        self.randomize_adapter(twin, FIRST, seed=7)
        self._differ(self.run(twin, inputs), active, "the copy's adapter weights are not its own")
        assert torch.equal(self.run(model, inputs), active)

    def test_pickle_round_trip_gives_identical_outputs(self, adapter_config: Any) -> None:
        """``pickle.loads(pickle.dumps(model))``: same adapters, same setup, identical outputs."""
        model = self.with_adapters(adapter_config)
        inputs = self.make_inputs(model)
        active = self._outputs_with(model, FIRST, inputs)
        twin = pickle.loads(pickle.dumps(model))
        assert twin.active_adapters == model.active_adapters
        assert twin.adapters_config == model.adapters_config
        assert torch.equal(self.run(twin, inputs), active)
        twin.set_active_adapters(None)
        twin.delete_adapter(FIRST)
        assert torch.equal(self.run(model, inputs), active)

    # -- compile -------------------------------------------------------------------------------
    def test_compile_fullgraph_matches_eager(self, adapter_config: Any) -> None:
        """``torch.compile(model, fullgraph=True)`` traces with the adapter active, equals
        eager, and follows ``set_active_adapters`` (no stale graph)."""
        model = self.with_adapters(adapter_config)
        inputs = self.make_inputs(model)
        base = self.run(model, inputs)
        active = self._outputs_with(model, FIRST, inputs)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=self.compile_backend)
        try:
            self._close(self.run(compiled, inputs), active, "compiled vs eager, active: ")
            model.set_active_adapters(None)
            self._close(self.run(compiled, inputs), base, "compiled vs eager, inactive: ")
            model.set_active_adapters(FIRST)
            self._close(self.run(compiled, inputs), active, "compiled vs eager, re-activated: ")
        finally:
            torch._dynamo.reset()

    def test_compile_fullgraph_training_step_matches_eager(self, adapter_config: Any) -> None:
        """A compiled (``fullgraph=True``) training step gives the eager loss and gradients."""
        model = self.with_adapters(adapter_config)
        inputs = self.make_inputs(model)
        model.train_adapter(FIRST)
        _disable_dropout(model)
        eager_loss, eager_grads = _loss_and_grads(self, model, model, inputs)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=self.compile_backend)
        try:
            loss, grads = _loss_and_grads(self, model, compiled, inputs)
        finally:
            torch._dynamo.reset()
        self._close(loss, eager_loss, "compiled loss: ")
        assert grads.keys() == eager_grads.keys()
        for name in grads:
            self._close(grads[name], eager_grads[name], f"compiled gradient of {name}: ")

    # -- gradient checkpointing -------------------------------------------------------------
    @pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
    def test_gradient_checkpointing_gives_the_same_gradients(
        self, adapter_config: Any, use_reentrant: bool
    ) -> None:
        """``gradient_checkpointing_enable()`` changes no gradient of the trained adapter
        (reentrant checkpointing also needs ``enable_input_require_grads()``, as with PEFT)."""
        model = self.with_adapters(adapter_config)
        if not getattr(model, "supports_gradient_checkpointing", False):
            pytest.skip("the model does not support gradient_checkpointing_enable()")
        inputs = self.make_inputs(model)
        if getattr(getattr(model, "config", None), "use_cache", None) is not None:
            model.config.use_cache = False
        model.train_adapter(FIRST)
        _, plain = _loss_and_grads(self, model, model, inputs)
        _enable_checkpointing(model, {"use_reentrant": use_reentrant})
        if use_reentrant:
            model.enable_input_require_grads()
        model.train()
        _, checkpointed = _loss_and_grads(self, model, model, inputs)
        assert plain and checkpointed.keys() == plain.keys()
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)

    # -- generate ------------------------------------------------------------------------------
    def test_generate_with_cache_equals_without(self, adapter_config: Any) -> None:
        """Greedy ``generate`` with the adapter active: the KV cache changes neither tokens nor
        scores, and the scores differ from the base model's."""
        model = self.with_adapters(adapter_config)
        if not (callable(getattr(model, "generate", None)) and _can_generate(model)):
            pytest.skip("the model does not generate")
        inputs = self.make_inputs(model)
        kwargs = {
            **inputs,
            **self.generation_kwargs(model),
            "return_dict_in_generate": True,
            "output_scores": True,
        }
        base = model.generate(**kwargs, use_cache=True)
        model.set_active_adapters(FIRST)
        cached = model.generate(**kwargs, use_cache=True)
        uncached = model.generate(**kwargs, use_cache=False)
        assert torch.equal(cached.sequences, uncached.sequences)
        torch.testing.assert_close(
            torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-4, rtol=1e-4
        )
        self._differ(
            torch.stack(cached.scores), torch.stack(base.scores), "generate ignores the adapter"
        )

    def test_generate_with_adapter_names_equals_each_adapter_alone(
        self, adapter_config: Any
    ) -> None:
        """``generate(..., adapter_names=[a, None])``: each example's tokens and scores equal
        those of generating with its adapter alone (``None``: the base model)."""
        model = self._composition_model(adapter_config, PerExample)
        if not (callable(getattr(model, "generate", None)) and _can_generate(model)):
            pytest.skip("the model does not generate")
        inputs = self.make_inputs(model)
        kwargs = {
            **inputs,
            **self.generation_kwargs(model),
            "return_dict_in_generate": True,
            "output_scores": True,
        }
        base = model.generate(**kwargs)
        with adapters.AdapterSetup(FIRST):
            first = model.generate(**kwargs)
        mixed = model.generate(**kwargs, adapter_names=[FIRST, None])
        assert torch.equal(mixed.sequences[0], first.sequences[0])
        assert torch.equal(mixed.sequences[1], base.sequences[1])
        scores = torch.stack(mixed.scores)
        torch.testing.assert_close(
            scores[:, 0], torch.stack(first.scores)[:, 0], atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            scores[:, 1], torch.stack(base.scores)[:, 1], atol=1e-4, rtol=1e-4
        )


def _config_id(config: Any, index: int) -> str:
    if isinstance(config, str):
        return config
    if isinstance(config, AdapterConfig):
        return f"{type(config).__name__}-{index}"
    return f"config{index}"


def _tensor_file_keys(directory: str) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for root, _dirs, files in os.walk(directory):
        for file in sorted(files):
            if file.endswith(".safetensors"):
                with safe_open(os.path.join(root, file), framework="pt") as handle:
                    keys.extend(handle.keys())
    return keys


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _loss_and_grads(
    kit: AdapterMethodConformance, model: nn.Module, call: Callable, inputs: Mapping[str, Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks in both runs
    loss = kit.outputs_of(call(**inputs)).float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _enable_checkpointing(model: nn.Module, kwargs: dict[str, Any]) -> None:
    # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias).
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _can_generate(model: nn.Module) -> bool:
    check = getattr(model, "can_generate", None)
    try:
        return bool(check()) if callable(check) else True
    except Exception:
        return False
