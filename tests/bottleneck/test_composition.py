"""Composition of bottleneck adapters: Stack, Parallel, BatchSplit, Average, Split."""

from __future__ import annotations

import pytest
import torch

from adapters import AdapterSetup, Average, BatchSplit, Fuse, Parallel, Split, Stack
from adapters.errors import CompositionError

from .conftest import randomize, toy


def run(model, setup, ids):
    with AdapterSetup(setup), torch.no_grad():
        return model(ids)


@pytest.fixture
def model():
    model = toy(True)
    model.add_adapter("a", config="seq_bn[reduction_factor=4]")
    model.add_adapter("b", config="seq_bn[reduction_factor=2]")
    model.add_adapter("c", config="par_bn[reduction_factor=4]")
    for seed, name in enumerate("abc"):
        randomize(model, name, seed=seed + 1)
    return model


def step_outputs(model, layer, ids, setup_fn):
    """Capture (h, r) at layer ``layer``'s FFN sub-block of the base model."""
    seen = {}
    block = model.layers[layer]
    hooks = [
        block.ffn.register_forward_pre_hook(lambda m, a: seen.setdefault("r", a[0])),
        block.ffn.register_forward_hook(lambda m, a, o: seen.setdefault("h", o)),
    ]
    run(model, None, ids)
    for hook in hooks:
        hook.remove()
    return seen


def test_stack_chains_adapters_with_the_model_norm_between_reads(model, ids):
    """Stack(a, b) at a sub-block: b reads LN(a's output + r); one final residual + norm."""
    host = model.layers[0].bottleneck_output
    h = torch.randn(2, 3, 16)
    r = torch.randn(2, 3, 16)
    ln = model.layers[0].ln2
    with torch.no_grad():
        a, b = host.adapters["a"], host.adapters["b"]
        out_a = a.delta(ln(h + r)) + h
        out_b = b.delta(ln(out_a + r)) + out_a
        torch.testing.assert_close(host.compose(Stack("a", "b"), h, r), out_b)
    assert not torch.allclose(run(model, Stack("a", "b"), ids), run(model, Stack("b", "a"), ids))


def test_average_applies_weights_once(model, ids):
    """Pitfall 7: h + sum w_i delta_i, never (1/n) sum w_i h_i."""
    host = model.layers[0].bottleneck_output
    h, r = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        da = host.compose("a", h, r) - h
        db = host.compose("b", h, r) - h
        got = host.compose(Average("a", "b", weights=[0.25, 0.75]), h, r)
        torch.testing.assert_close(got, h + 0.25 * da + 0.75 * db)
    single = run(model, "a", ids)
    torch.testing.assert_close(run(model, Average("a", "a"), ids), single, atol=1e-5, rtol=0)


def test_batch_split_and_parallel_equal_per_example_runs(model):
    ids = torch.randint(0, 50, (4, 5), generator=torch.Generator().manual_seed(3))
    split = run(model, BatchSplit("a", "c", batch_sizes=[1, 3]), ids)
    torch.testing.assert_close(split[:1], run(model, "a", ids[:1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(split[1:], run(model, "c", ids[1:]), atol=1e-5, rtol=0)
    both = run(model, Parallel("a", "b"), ids)
    assert both.shape[0] == 8
    torch.testing.assert_close(both[:4], run(model, "a", ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(both[4:], run(model, "b", ids), atol=1e-5, rtol=0)


def test_split_gives_each_adapter_its_positions(model, ids):
    host = model.layers[0].bottleneck_output
    h, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        got = host.compose(Split("a", "b", splits=[2, 3]), h, r)
        torch.testing.assert_close(got[:, :2], host.compose("a", h[:, :2], r[:, :2]))
        torch.testing.assert_close(got[:, 2:], host.compose("b", h[:, 2:], r[:, 2:]))
    out = run(model, Split("a", "b", splits=[2, 3]), ids)
    assert out.shape == (3, 5, 50)
    with pytest.raises(CompositionError, match="sum to 4"):
        run(model, Split("a", "b", splits=[2, 2]), ids)


def test_average_adapter_linear_combines_parameters(model, ids):
    model.average_adapter("avg", ["a", "a"], weights=[0.5, 0.5])
    torch.testing.assert_close(run(model, "avg", ids), run(model, "a", ids), atol=1e-6, rtol=0)


def test_merge_is_refused(model):
    with pytest.raises(Exception, match="merge"):
        model.merge_adapter("a")


def test_fuse_attends_over_the_adapters_up_projections(ids):
    model = toy(True)
    model.add_adapter("a", config="seq_bn[reduction_factor=4]")
    model.add_adapter("b", config="seq_bn[reduction_factor=2]")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    model.add_adapter_fusion(Fuse("a", "b"), config="dynamic")
    host = model.layers[0].bottleneck_output
    fusion = host.fusions["a,b"]
    with torch.no_grad():
        for p in fusion.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    h, r = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    ln = model.layers[0].ln2
    with torch.no_grad():
        x = ln(h + r)
        ups = [host.adapters[n].up(x) for n in ("a", "b")]
        q = fusion.query(x)
        scores = torch.stack([(q * fusion.key(u)).sum(-1) for u in ups], dim=-1)
        probs = scores.softmax(dim=-1)
        mixed = sum(probs[..., i : i + 1] * fusion.value(u) for i, u in enumerate(ups))
        torch.testing.assert_close(host.compose(Fuse("a", "b"), h, r), mixed + h)
    fused = run(model, Fuse("a", "b"), ids)
    assert not torch.allclose(fused, run(model, "a", ids))
    assert not torch.allclose(fused, run(model, "b", ids))


def test_train_adapter_fusion_trains_only_the_fusion_layer_and_saves_it(tmp_path, ids):
    model = toy(True)
    model.add_adapter("a", config="seq_bn[reduction_factor=4]")
    model.add_adapter("b", config="double_seq_bn[reduction_factor=4]")
    model.add_adapter_fusion(Fuse("a", "b"))
    model.train_adapter_fusion(Fuse("a", "b"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fusions.a,b." in n for n in trainable)
    loss = model.get_fusion_regularization_loss()
    assert loss is not None and 0 <= loss.item() < 1e-6  # value starts at identity
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    model.eval()
    expected = run(model, Fuse("a", "b"), ids)
    model.save_adapter_fusion(str(tmp_path / "fusion"), Fuse("a", "b"))
    model.delete_adapter_fusion(Fuse("a", "b"))
    model.load_adapter_fusion(str(tmp_path / "fusion"))
    torch.testing.assert_close(run(model, Fuse("a", "b"), ids), expected, atol=0, rtol=0)


@pytest.mark.parametrize("post_ln", [True, False])
@pytest.mark.parametrize(
    "setup",
    [
        "a",
        "c",
        Stack("a"),
        Stack("a", "b"),
        Stack("c", "a"),
        Fuse("a", "b"),
        Fuse("c", "a"),
        Fuse("a", "c"),
    ],
)
def test_direct_path_equals_the_packed_composition(post_ln, setup):
    """One adapter, a Stack or a Fuse runs without packing [h | r] (a speed path); inside a
    BatchSplit the same setup goes through the packed `apply_setup` path: same result."""
    model = toy(post_ln)
    model.add_adapter("a", config="seq_bn[reduction_factor=4]")
    model.add_adapter("b", config="seq_bn[reduction_factor=2]")
    model.add_adapter("c", config="par_bn[reduction_factor=4]")
    for seed, name in enumerate("abc"):
        randomize(model, name, seed=seed + 1)
    for fused in (Fuse("a", "b"), Fuse("c", "a"), Fuse("a", "c")):
        model.add_adapter_fusion(fused, config="dynamic")
        with torch.no_grad():
            for p in model.layers[0].bottleneck_output.fusions[fused.name].parameters():
                p.add_(torch.randn_like(p) * 0.1)
    host = model.layers[0].bottleneck_output
    h, r = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        direct = host._direct(setup, h, r)
        assert direct is not None
        packed = host.compose(BatchSplit(setup, setup, batch_sizes=[1, 1]), h, r)
        # the two paths add the same terms in another order: a few float32 ULPs of outputs
        # around 6 (measured 1.4e-6 with torch 2.13's CPU kernels), nothing more
        torch.testing.assert_close(direct, packed, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(direct, h)
