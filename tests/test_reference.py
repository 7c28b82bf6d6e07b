"""The reference runtime (the executable spec): C1, C2, neuron and loss formulas, errors naming the node, learning."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bsdgraph import BSDConfig, GraphBuilder, Op, Stream, derive_feedback
from bsdgraph.train.data import make_synthetic
from bsdgraph.compiler.feedback import local_params, mirrors_of
from bsdgraph.ir.graph import GroupOp
from bsdgraph.runtime.losses import band_split, reco_loss
from bsdgraph.ir.neuron import lif_scan
from bsdgraph.runtime import ExecutionError, OptimConfig
from bsdgraph.runtime.reference import ReferenceRuntime
from tests.strategies import any_graph


def batch_for(g, B=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(B, *g.by_op(Op.INPUT)[0].shape, generator=gen)
    y = torch.arange(B) % g.by_op(Op.OUTPUT)[0].attrs["n_classes"]
    return x, y


@given(any_graph)
@settings(max_examples=10)
def test_c1_backward_weights_are_independent_tensors(f):
    bsd = derive_feedback(f)
    rt = ReferenceRuntime(bsd, seed=1)
    for n in bsd.nodes:
        if n.stream == Stream.F and n.op in GroupOp.SYNAPSE:
            copies = mirrors_of(bsd, n.name)
            assert copies, f"{n.name} has no mirror in B"
            for m in copies:
                w, theta = rt.params[f"{n.name}.weight"], rt.params[f"{m}.weight"]
                assert w.untyped_storage().data_ptr() != theta.untyped_storage().data_ptr()
                flat_t = theta.transpose(0, 1) if theta.dim() == 2 else theta
                assert flat_t.shape != w.shape or not torch.equal(flat_t, w), f"{m} is tied to {n.name}"


@given(any_graph, st.sampled_from(["current", "membrane"]))
@settings(max_examples=10)
def test_c2_each_loss_has_zero_gradient_for_every_weight_outside_its_layer(f, distill_on):
    bsd = derive_feedback(f, BSDConfig(distill_on=distill_on))
    rt = ReferenceRuntime(bsd, seed=2)
    losses, _ = rt.losses(*batch_for(bsd))
    names = list(rt.params)
    for loss_name, loss in losses.items():
        grads = torch.autograd.grad(loss, [rt.params[k] for k in names], retain_graph=True, allow_unused=True)
        owned = set(local_params(bsd, loss_name))
        for k, gr in zip(names, grads):
            if k.rsplit(".", 1)[0] not in owned:
                assert gr is None or torch.count_nonzero(gr) == 0, f"{loss_name} leaks gradient into {k}"


def test_c2_holds_with_nonzero_local_gradients():
    g = GraphBuilder("m", T=3)
    h = g.lif(g.linear(g.input((5,)), 6))
    g.output(g.linear(h, 3))
    rt = ReferenceRuntime(derive_feedback(g.build()), seed=0)
    grads, _, _ = rt.gradients(torch.rand(8, 5) * 3, torch.arange(8) % 3)
    assert all(torch.count_nonzero(v) > 0 for k, v in grads.items() if k.endswith("weight")), \
        {k: float(v.abs().sum()) for k, v in grads.items()}


def test_lif_scan_follows_the_spec_equations():
    # tau 2, v_th 0.3: h0 = 0.4/2 = 0.2 (no spike); h1 = 0.2 + (0.5 - 0.2)/2 = 0.35 (spike, reset to 0);
    # h2 = 0 + (0.1 - 0)/2 = 0.05
    I = torch.tensor([[0.4], [0.5], [0.1]])
    s, h = lif_scan(I, 2.0, 0.3, 0.0, soft_reset=False)
    assert s.flatten().tolist() == [0, 1, 0]
    assert torch.allclose(h.flatten(), torch.tensor([0.2, 0.35, 0.05]))
    s, h = lif_scan(I, 2.0, 0.3, 0.0, soft_reset=True)  # soft: v = 0.35 - 0.3 = 0.05; h2 = 0.05 + 0.05/2
    assert torch.allclose(h.flatten(), torch.tensor([0.2, 0.35, 0.075]))


def test_lif_surrogate_gradient_is_not_zero():
    I = torch.full((4, 3), 0.5, requires_grad=True)
    s, _ = lif_scan(I, 2.0, 0.3, 0.0, False)
    s.sum().backward()
    assert I.grad.abs().sum() > 0


def naive_reco(v, vh, labels, lam, negatives, eps):
    B = v.shape[0]
    total = 0.0
    for k in range(B):
        for j in range(B):
            c = float(v[k] @ vh[j]) / (float(v[k].norm() * vh[j].norm()) + eps)
            if j == k:
                total += (1 - c) ** 2
            elif negatives == "all" or labels[j] != labels[k]:
                total += lam * max(0.0, c) ** 2
    return total / B


@given(st.integers(1, 7), st.integers(1, 9), st.floats(0, 1), st.sampled_from(["all", "other_class"]), st.data())
def test_reco_matches_the_papers_formula_written_as_loops(B, D, lam, negatives, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    v, vh = torch.randn(B, D, generator=gen, dtype=torch.float64), torch.randn(B, D, generator=gen,
                                                                                 dtype=torch.float64)
    labels = torch.randint(0, 3, (B,), generator=gen)
    got = float(reco_loss(v, vh, labels, lam, negatives, 1e-8))
    assert math.isclose(got, naive_reco(v, vh, labels, lam, negatives, 1e-8), rel_tol=1e-9, abs_tol=1e-12)


def test_band_split_sums_back_and_separates_frequencies():
    x = torch.randn(2, 3, 1, 12, 10, dtype=torch.float64)
    low, high = band_split(x, 0.25)
    assert torch.allclose(low + high, x, atol=1e-12)
    const = torch.ones(1, 8, 8, dtype=torch.float64)
    low, high = band_split(const, 0.25)
    assert torch.allclose(low, const) and high.abs().max() < 1e-12  # DC is in the low band
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1  # Nyquist pattern
    low, high = band_split(checker.double(), 0.25)
    assert low.abs().max() < 1e-12 and torch.allclose(high, checker.double())


def test_errors_name_the_node_being_executed():
    g = GraphBuilder("m", T=2)
    g.output(g.linear(g.input((4,)), 3))
    rt = ReferenceRuntime(derive_feedback(g.build()))
    rt.params["fc1.weight"] = torch.zeros(3, 5)  # a weight of the wrong shape
    with pytest.raises(ExecutionError, match=r"while executing node 'fc1' \(linear\): RuntimeError"):
        rt.step(torch.rand(2, 4), torch.tensor([0, 1]))


def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_in_eval():
    g = GraphBuilder("c", T=2)
    h = g.lif(g.batchnorm(g.conv2d(g.input((1, 5, 5)), 2, kernel=3)))
    g.output(g.linear(g.flatten(h), 2))
    rt = ReferenceRuntime(derive_feedback(g.build()))
    x, y = torch.rand(4, 1, 5, 5) + 2, torch.tensor([0, 1, 0, 1])
    before = rt.state["bn1.running_mean"].clone()
    rt.step(x, y)
    assert not torch.equal(before, rt.state["bn1.running_mean"])  # training updated the running mean
    frozen = {k: v.clone() for k, v in rt.state.items()}
    a, b = rt.predict(x), rt.predict(x[:1])
    assert torch.allclose(a[:1], b)  # eval: a sample's output does not depend on the rest of the batch
    assert all(torch.equal(frozen[k], v) for k, v in rt.state.items())


def test_one_step_updates_every_weight_of_f_and_b():
    g = GraphBuilder("m", T=3)
    h = g.lif(g.linear(g.flatten(g.input((1, 3, 3))), 8))
    g.output(g.linear(h, 3))
    rt = ReferenceRuntime(derive_feedback(g.build()), seed=3)
    before = {k: v.detach().clone() for k, v in rt.params.items()}
    result = rt.step(torch.rand(6, 1, 3, 3) * 2, torch.arange(6) % 3)
    assert set(result.losses) == {"mse0", "reco1", "ce2"} and set(result.rates) == {"h1", "h1_b"}
    changed = [k for k in rt.params if not torch.equal(before[k], rt.params[k])]
    assert sorted(changed) == sorted(rt.params), f"unchanged: {set(rt.params) - set(changed)}"


def test_bsd_learns_a_small_synthetic_task():
    """A real learning test: fails if local learning breaks (chance is 25 %)."""
    ds = make_synthetic(400, 200, (16,), 4, seed=0)
    g = GraphBuilder("syn", T=4)
    h = g.lif(g.linear(g.input((16,)), 64))
    g.output(g.linear(h, 4))
    rt = ReferenceRuntime(derive_feedback(g.build()), opt=OptimConfig(lr=1e-2), seed=0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        order = torch.randperm(400, generator=gen)
        for i in range(0, 400, 40):
            idx = order[i:i + 40]
            rt.step(ds.x_train[idx], ds.y_train[idx])
    acc = float((rt.predict(ds.x_test).argmax(1) == ds.y_test).float().mean())
    assert acc > 0.88, f"test accuracy {acc:.3f} (measured 0.94 when this test was written)"
