"""The seed examples and LoRA + ReFT together, with every first-party plugin installed."""

import os
import warnings

import pytest
import torch

if os.environ.get("ADAPTERS_REQUIRE_ALL_PLUGINS") == "1":
    import adapters_lora  # noqa: F401  (the all-together environments must have them)
    import adapters_reft  # noqa: F401
else:
    pytest.importorskip("adapters_lora")
    pytest.importorskip("adapters_reft")

import adapters
from adapters import AdapterModelInterface, AdapterSetup, Parallel, Stack
from adapters.registry.loading import reload_plugins

from ..core.conftest import randomize
from ..models import SEED_INTERFACE, SEED_INTERFACE_2, gemma2, llama


@pytest.fixture(autouse=True)
def installed_plugins():
    reload_plugins()
    yield


def test_seed_example_runs_as_written(capsys):
    model = gemma2()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both methods installed: no warning at all
        adapters.init(model, interface=AdapterModelInterface(**SEED_INTERFACE))
    model.add_adapter("my_adapter", config="lora")
    print(model.adapter_summary())
    out = capsys.readouterr().out
    assert "my_adapter" in out and "lora" in out and "Full model" in out


def _bottleneck_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "bottleneck" for ep in entry_points(group="adapters.methods"))


@pytest.mark.skipif(_bottleneck_installed(), reason="adapters-bottleneck is installed")
def test_second_seed_example_warns_only_about_bottleneck():
    model = gemma2()
    with pytest.warns(UserWarning, match="pip install adapters-bottleneck") as record:
        adapters.init(model, interface=AdapterModelInterface(**SEED_INTERFACE_2))
    assert len(record) == 1
    model.add_adapter("l", config="lora")
    model.add_adapter("r", config="loreft")
    with pytest.raises(adapters.MethodNotInstalledError, match="adapters-bottleneck"):
        model.add_adapter("b", config="seq_bn")


@pytest.mark.skipif(not _bottleneck_installed(), reason="adapters-bottleneck not installed")
def test_second_seed_example_runs_all_three_methods():
    model = gemma2()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapters.init(model, interface=AdapterModelInterface(**SEED_INTERFACE_2))
    model.add_adapter("l", config="lora")
    model.add_adapter("r", config="loreft")
    model.add_adapter("b", config="seq_bn")
    randomize(model, "b", seed=3, scale=0.3)
    with torch.no_grad():
        base = model(IDS).logits
        with AdapterSetup(Stack("l", "r", "b")):
            assert (model(IDS).logits - base).abs().max() > 1e-3


@pytest.fixture
def both():
    model = gemma2()
    adapters.init(model, interface=AdapterModelInterface(**SEED_INTERFACE))
    model.add_adapter("l", config="lora[r=4, attn_matrices=['q','k','v','o']]")
    model.add_adapter("r", config="loreft[r=2, prefix_positions=2, suffix_positions=1]")
    model.add_adapter("d", config="direft[r=2, prefix_positions=1]")
    for i, name in enumerate(("l", "r", "d")):
        randomize(model, name, seed=i + 1, scale=0.3)
    return model


IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])


def logits(model, setup):
    with AdapterSetup(setup):
        return model(IDS, attention_mask=MASK).logits


def test_lora_and_reft_stack_and_each_changes_the_output(both):
    base = logits(both, None)
    lora, reft, stacked = logits(both, "l"), logits(both, "r"), logits(both, Stack("l", "r"))
    for out in (lora, reft, stacked):
        assert (out - base).abs().max() > 1e-4
    assert not torch.allclose(stacked, lora) and not torch.allclose(stacked, reft)


def test_parallel_of_lora_and_reft_equals_separate_runs(both):
    both.set_active_adapters(Parallel("l", Stack("r", "d")))
    out = both(IDS, attention_mask=MASK).logits
    torch.testing.assert_close(out[:2], logits(both, "l"), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2:], logits(both, Stack("r", "d")), atol=1e-5, rtol=0)


def test_union_config_of_lora_and_reft(both):
    both.add_adapter("u", config="lora|loreft")
    assert {k.split("/")[0] for k in both.get_adapter("u")} == {"lora", "reft"}


def test_save_pretrained_and_load_model_with_both_methods(both, tmp_path):
    from transformers import AutoModelForCausalLM

    both.set_active_adapters(Stack("l", "r"))
    expected = both(IDS, attention_mask=MASK).logits
    both.save_pretrained(str(tmp_path))
    loaded = adapters.load_model(str(tmp_path), AutoModelForCausalLM)
    assert loaded.active_adapters == Stack("l", "r")
    torch.testing.assert_close(loaded(IDS, attention_mask=MASK).logits, expected)


def test_trainer_trains_an_adapter_and_saves_it(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = llama()
    adapters.init(model, interface=AdapterModelInterface(**{**SEED_INTERFACE}))
    model.add_adapter("l", config="lora[r=4, alpha=16]")
    model.train_adapter("l")
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(32):
        start = int(torch.randint(0, 100, (1,), generator=gen))
        ids = (torch.arange(8) + start) % 100
        data.append({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]
    trainer.save_model(str(tmp_path / "saved"))
    assert os.path.isfile(tmp_path / "saved" / "adapters" / "l" / "adapter_model.safetensors")


def test_threads_with_different_adapter_setups_do_not_mix(both):
    import threading

    expected = {name: logits(both, name) for name in ("l", "r", None)}
    errors = []

    def worker(name):
        for _ in range(15):
            if not torch.equal(logits(both, name), expected[name]):
                errors.append(name)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("l", "r", None) * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
