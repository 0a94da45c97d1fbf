"""AdapterTrainer: adapter-only checkpoints, exact resume, best adapter at the end."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("adapters_lora")

import adapters
from adapters import AdapterModelInterface, CheckpointError, NotInitializedError
from adapters.tools.trainer import AdapterTrainer, load_training_checkpoint
from tests.models import LLAMA_INTERFACE, TINY_DECODER, llama


def _data(n: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, 100, (1,), generator=gen))
        ids = (torch.arange(8) + start) % 100
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def _model(config: str = "lora[r=4, alpha=16]"):
    model = llama()
    adapters.init(model, interface=AdapterModelInterface(**LLAMA_INTERFACE))
    model.add_adapter("l", config=config)
    model.train_adapter("l")
    return model


def _args(tmp_path, **overrides):
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        report_to=[],
        logging_steps=1,
        save_strategy="steps",
        save_steps=4,
        use_cpu=True,
        seed=7,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def _adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.adapter_state_dict("l").items()}


def test_checkpoints_hold_the_adapter_and_not_the_base_model(tmp_path):
    model = _model()
    trainer = AdapterTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=_data())
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-4"
    files = set(os.listdir(checkpoint))
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    assert {"adapters", "adapters_checkpoint.json", "optimizer.pt", "trainer_state.json"} <= files
    assert sorted(os.listdir(checkpoint / "adapters")) == ["adapters_manifest.json", "l"]
    index = json.loads((checkpoint / "adapters_checkpoint.json").read_text())
    assert index["adapters"] == ["l"] and index["trainable_weights"] == []
    saved = sum(f.stat().st_size for f in (checkpoint / "adapters").rglob("*") if f.is_file())
    base = sum(p.numel() * p.element_size() for p in model.parameters())
    assert saved < base / 10


def test_resuming_from_a_checkpoint_equals_training_without_interruption(tmp_path):
    straight = _model()
    AdapterTrainer(model=straight, args=_args(tmp_path / "a"), train_dataset=_data()).train()
    expected = _adapter_tensors(straight)

    # a fresh process would start from a fresh model: resume it from the same run's step 4
    resumed = _model()
    before = dict(resumed.named_parameters())
    trainer = AdapterTrainer(model=resumed, args=_args(tmp_path / "b"), train_dataset=_data())
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert trainer.state.global_step == 8
    assert dict(resumed.named_parameters()).keys() == before.keys()
    for key, value in _adapter_tensors(resumed).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tmp_path):
    model = _model()
    args = _args(
        tmp_path / "run",
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        # "best" = the highest eval loss: an early checkpoint, so loading it changes the model
        greater_is_better=True,
    )
    trainer = AdapterTrainer(
        model=model, args=args, train_dataset=_data(), eval_dataset=_data(8, seed=1)
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-8")
    reference = _model()
    load_training_checkpoint(reference, best)
    for key, value in _adapter_tensors(model).items():
        torch.testing.assert_close(value, _adapter_tensors(reference)[key])


def _classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        LlamaConfig(**TINY_DECODER, num_labels=2, pad_token_id=0)
    )
    adapters.init(model, interface=AdapterModelInterface(**LLAMA_INTERFACE))
    return model


def test_an_unfrozen_head_is_saved_and_restored(tmp_path):
    model = _classifier()
    model.add_adapter("l", config="lora[r=4]")
    model.train_adapter("l")
    model.score.weight.requires_grad_(True)
    initial_head = model.score.weight.detach().clone()
    rows = [{"input_ids": r["input_ids"], "labels": int(r["input_ids"][0]) % 2} for r in _data()]
    AdapterTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=rows).train()
    checkpoint = tmp_path / "run" / "checkpoint-8"
    index = json.loads((checkpoint / "adapters_checkpoint.json").read_text())
    assert index["trainable_weights"] == ["score.weight"]
    assert not torch.equal(model.score.weight, initial_head)

    fresh = _classifier()  # same seed: the same frozen base and the initial head
    load_training_checkpoint(fresh, str(checkpoint))
    assert torch.equal(fresh.score.weight, model.score.weight)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(fresh.eval()(ids).logits, model.eval()(ids).logits)


def test_resuming_with_another_config_is_refused(tmp_path):
    first = _model()
    AdapterTrainer(
        model=first, args=_args(tmp_path / "run", max_steps=4), train_dataset=_data()
    ).train()
    other = _model("lora[r=2]")
    before = _adapter_tensors(other)
    with pytest.raises(CheckpointError, match="resume with the same configs"):
        load_training_checkpoint(other, str(tmp_path / "run" / "checkpoint-4"))
    assert list(other.adapters_config) == ["l"]
    for key, value in _adapter_tensors(other).items():
        assert torch.equal(value, before[key])


def test_a_plain_trainer_checkpoint_is_refused_with_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="not written by AdapterTrainer"):
        load_training_checkpoint(_model(), str(tmp_path))


def test_a_model_without_adapters_init_is_refused(tmp_path):
    with pytest.raises(NotInitializedError, match="adapters.init"):
        AdapterTrainer(model=llama(), args=_args(tmp_path))


def test_training_a_fusion_adds_its_regularization_to_the_loss(tmp_path):
    from adapters import Fuse, plugins
    from tests.core.conftest import init_toy
    from tests.core.toy_fusion import ToyFusablePlugin

    registry = plugins.get_registry()
    registry.register(ToyFusablePlugin(), "toy_fusable")
    try:
        model = init_toy(llama(), methods=["toy_fusable"])
        model.add_adapter("a", config="toy_fusable")
        model.add_adapter("b", config="toy_fusable")
        model.add_adapter_fusion(Fuse("a", "b"))
        with torch.no_grad():
            for layer in model.get_adapter_fusion("a,b").values():
                layer.logits.copy_(torch.tensor([3.0, -1.0]))
        model.train_adapter_fusion(Fuse("a", "b"))
        trainer = AdapterTrainer(model=model, args=_args(tmp_path, max_steps=1))
        batch = trainer._prepare_inputs({"input_ids": _data(2)[0]["input_ids"][None]})
        batch["labels"] = batch["input_ids"]
        plain = model(**batch).loss
        with_reg = trainer.compute_loss(model, batch)
        expected = 0.01 * 2 * (9.0 + 1.0)  # the toy's term: 0.01 * sum of squared logits
        torch.testing.assert_close(with_reg - plain, torch.tensor(expected), rtol=1e-4, atol=1e-6)
        model.eval()
        torch.testing.assert_close(trainer.compute_loss(model, batch), plain)
    finally:
        registry.unregister("toy_fusable")


def _fusion_model():
    from tests.models import SEED_INTERFACE

    interface = dict(
        SEED_INTERFACE,
        adapter_methods=["bottleneck"],
        layer_pre_self_attn="input_layernorm",
        layer_pre_ffn="post_attention_layernorm",
    )
    model = llama()
    adapters.init(model, interface=AdapterModelInterface(**interface))
    model.add_adapter("a", config="seq_bn")
    model.add_adapter("b", config="seq_bn")
    model.add_adapter_fusion(["a", "b"])
    model.train_adapter_fusion(["a", "b"])
    return model


def _fusion_tensors(model) -> dict[str, torch.Tensor]:
    return {
        f"{key}.{p}": v.detach().clone()
        for key, module in model.get_adapter_fusion("a,b").items()
        for p, v in module.state_dict().items()
    }


def test_fusion_layers_are_checkpointed_and_resumed(tmp_path):
    if "bottleneck" not in adapters.AdapterMethod:
        pytest.skip("needs adapters-bottleneck (the method that owns Fuse)")
    straight = _fusion_model()
    AdapterTrainer(model=straight, args=_args(tmp_path / "a"), train_dataset=_data()).train()
    checkpoint = tmp_path / "a" / "checkpoint-4"
    index = json.loads((checkpoint / "adapters_checkpoint.json").read_text())
    assert index["fusions"] == ["a,b"] and index["trainable_weights"] == []
    assert (checkpoint / "fusions" / "a,b").is_dir()

    resumed = _fusion_model()
    trainer = AdapterTrainer(model=resumed, args=_args(tmp_path / "b"), train_dataset=_data())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    expected = _fusion_tensors(straight)
    assert any(not torch.equal(v, _fusion_tensors(_fusion_model())[k]) for k, v in expected.items())
    for key, value in _fusion_tensors(resumed).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)

    # a model with the adapters but without the fusion layer gets it from the checkpoint
    fresh = _fusion_model()
    fresh.delete_adapter_fusion("a,b")
    load_training_checkpoint(fresh, str(tmp_path / "a" / "checkpoint-8"))
    for key, value in _fusion_tensors(fresh).items():
        assert torch.equal(value, expected[key])
