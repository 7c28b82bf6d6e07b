"""recurrent_credit='through_time': a recurrent layer's own loss reaches back through its recurrent synapse and its
LIF (BPTT confined to the layer), on every runtime.

The closed-form step (kernels/ref/linear_lif.rec_lif_backward) is checked against autograd through the LIF step with
the forward's h pinned (an independent derivation of the same gradient), and the whole BSD step of the cpu and
triton backends against the reference runtime, which gets the credit by plain autograd through the twin."""

import dataclasses

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bsdgraph import BSDConfig, GraphBuilder, GraphError, Stream, derive_feedback
from bsdgraph.compiler.feedback import local_params
from bsdgraph.compiler.lower import RECURRENT_TIME_GRAD, lower
from bsdgraph.ir.graph import GroupOp
from bsdgraph.runtime.cpu import cpu_runtime
from bsdgraph.runtime.reference import ReferenceRuntime
from bsdgraph.runtime.triton import triton_runtime
from kernels.ref.lif import SpikeFn, lif_step
from kernels.ref.linear_lif import rec_lif_backward
from tests.test_cpu_backend import ATOL, RTOL, well_conditioned
from tests.test_recurrent import assert_cpu_equals_reference, conv_rnn, data, rnn

THROUGH_TIME = BSDConfig(recurrent_credit="through_time")


def autograd_oracle(grad_v, h, rec_weight, tau, v_th, v_reset, soft_reset, alpha):
    """dL/dV by autograd: V[t] = c[t] + s[t-1] Uᵀ drives ``lif_step`` with h pinned to the forward's values (so the
    spikes and surrogates are the forward's), and L = sum_t <grad_v[t], V[t]>."""
    c = torch.zeros_like(h, requires_grad=True)
    v, s, total = torch.zeros_like(h[0]), torch.zeros_like(h[0]), 0
    for t in range(h.shape[0]):
        current = c[t] + s @ rec_weight.T
        total = total + (grad_v[t] * current).sum()
        s, _, v = lif_step(v, current, tau, v_th, v_reset, soft_reset, lambda x: SpikeFn.apply(x, v_th, alpha), h[t])
    (g,) = torch.autograd.grad(total, c)
    return g


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 6), B=st.integers(1, 4), N=st.integers(1, 6), tau=st.floats(1.0, 4.0),
       v_th=st.floats(0.1, 1.0), v_reset=st.floats(-0.5, 0.05), soft=st.booleans(), alpha=st.floats(0.5, 4.0),
       seed=st.integers(0, 10_000))
# a case with ties the autograd twin once flipped (its pinned h was one ulp off: kernels/ref/lif.py, lif_step)
@example(T=4, B=2, N=4, tau=3.0, v_th=0.1, v_reset=0.0, soft=False, alpha=1.0, seed=0)
def test_the_closed_form_step_equals_autograd_through_the_lif(T, B, N, tau, v_th, v_reset, soft, alpha, seed):
    """In float64, to 1e-10: the two differ only in the order of their roundings. Spikes are read from h (h >= v_th),
    so h values at the threshold exactly are part of the property (h is drawn on a grid that contains v_th)."""
    gen = torch.Generator().manual_seed(seed)
    h = v_th + torch.randint(-8, 9, (T, B, N), generator=gen).double() / 8 * 0.6  # steps of 0.075: ties included
    grad_v = torch.randn(T, B, N, generator=gen, dtype=torch.float64)
    w = torch.randn(N, N, generator=gen, dtype=torch.float64)
    got = rec_lif_backward(grad_v, h, w, tau, v_th, v_reset, soft, alpha)
    want = autograd_oracle(grad_v, h, w, tau, v_th, v_reset, soft, alpha)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_the_last_step_gets_only_its_own_gradient_and_earlier_steps_more():
    """The credit flows backwards only: step T-1 has no later step, and a step whose neuron is far below threshold
    (surrogate ~0) still passes the leak's share (1 - 1/tau) of the next step's membrane gradient."""
    grad_v = torch.zeros(3, 1, 1, dtype=torch.float64)
    grad_v[2] = 1.0
    h = torch.full((3, 1, 1), -50.0, dtype=torch.float64)  # silent: ds/dh ~ 4e-5, no spike, no reset
    g = rec_lif_backward(grad_v, h, torch.zeros(1, 1, dtype=torch.float64), 2.0, 0.3, 0.0, False)
    # dL/dh[2] = 0 (V[2] feeds nothing later), so V[2] keeps its own 1; earlier steps get nothing from the loss
    assert g.flatten().tolist() == [0.0, 0.0, 1.0]
    grad_v = torch.zeros(3, 1, 1, dtype=torch.float64)
    grad_v[2] = 1.0
    h[1] = 0.3  # step 1 sits at the threshold: its spike reaches V[2] through the recurrent weight 2
    g = rec_lif_backward(grad_v, h, torch.full((1, 1), 2.0, dtype=torch.float64), 2.0, 0.3, 0.0, False)
    # dL/dh[1] = (g[2] * 2) * ds/dh (alpha / 2 = 1 at h = v_th) = 2, so V[1] gets 2 / tau = 1; V[0] gets the leak's
    # share of dL/dh[1] through v[0] -> h[1] (1 - 1/tau = 0.5), times dv/dh[0] ~ 1, over tau: ~0.5 (the silent
    # neuron's surrogate adds ~2e-3 through its reset term and its spike)
    assert g.flatten().tolist()[1:] == [1.0, 1.0]
    assert g[0].item() == pytest.approx(0.5, abs=3e-3)


def test_derivation_keeps_every_weight_with_its_own_loss():
    """Only the delayed edges lose their stop-gradient (in F and B), so each loss still owns exactly the weights
    it owned with step credit: the credit goes back in time, never down a layer."""
    f = rnn(encoding="sequence", task="classification")
    step, tt = derive_feedback(f), derive_feedback(f, THROUGH_TIME)
    changed = [(a, b) for a, b in zip(step.edges, tt.edges) if a != b]
    assert changed and all(a.delay and a.detach and not b.detach and dataclasses.replace(a, detach=False) == b
                           for a, b in changed)
    assert {step[a.dst].stream for a, _ in changed} == {Stream.F, Stream.B}
    for loss in step.by_op(*GroupOp.LOSS):
        assert local_params(tt, loss.name) == local_params(step, loss.name)


def test_the_plan_adds_one_credit_launch_per_recurrent_layer_and_stream():
    f = rnn(encoding="sequence", task="classification", recurrent=(True, False))
    plan = lower(derive_feedback(f, THROUGH_TIME))
    launches = [la for la in plan.launches if la.kernel == RECURRENT_TIME_GRAD]
    assert sorted(la.nodes[1] for la in launches) == ["h1_rec", "h1_rec_b"]
    assert not any(la.kernel == RECURRENT_TIME_GRAD for la in lower(derive_feedback(f)).launches)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), encoding=st.sampled_from(["direct", "sequence"]),
       task=st.sampled_from(["regression", "classification"]),
       recurrent=st.sampled_from([(True, True), (True, False), (False, True)]), T=st.integers(1, 5),
       soft=st.booleans())
def test_cpu_backend_equals_reference(seed, encoding, task, recurrent, T, soft):
    f = rnn(T=T, encoding=encoding, task=task, recurrent=recurrent, reset="soft" if soft else "hard")
    assert_cpu_equals_reference(derive_feedback(f, THROUGH_TIME), *data(f, seed=seed), seed)


def test_through_time_changes_the_recurrent_layers_gradients_and_nothing_else():
    """Same losses (the forward is untouched); the recurrent layer's weights (F's and B's) get other gradients; a
    layer without recurrence gets exactly the step-credit gradients."""
    f = rnn(T=5, encoding="sequence", task="classification", recurrent=(True, False))
    x, y = data(f, seed=4)
    bsd = derive_feedback(f, THROUGH_TIME)
    step, tt = cpu_runtime(derive_feedback(f), seed=4), cpu_runtime(bsd, seed=4)
    (g_step, l_step), (g_tt, l_tt) = step.gradients(x, y), tt.gradients(x, y)
    assert l_step == l_tt
    recurrent = set(local_params(bsd, "reco1"))  # F's fc1 and h1_rec, B's fc2_b and h1_rec_b
    assert {"h1_rec", "h1_rec_b"} < recurrent
    for k in g_step:
        if k.split(".")[0] in recurrent:
            assert float((g_step[k] - g_tt[k]).abs().max()) > 1e-3 * float(g_step[k].abs().max()), k
        else:
            assert torch.equal(g_step[k], g_tt[k]), k


def test_with_one_step_there_is_no_later_step_to_credit():
    f = rnn(T=1, encoding="sequence", task="classification")
    x, y = data(f, seed=2)
    (g_step, _), (g_tt, _) = (cpu_runtime(derive_feedback(f, cfg), seed=2).gradients(x, y)
                              for cfg in (BSDConfig(), THROUGH_TIME))
    for k in g_step:
        assert torch.equal(g_step[k], g_tt[k]), k


def test_triton_backend_equals_reference():
    bsd = derive_feedback(rnn(encoding="sequence", task="classification"), THROUGH_TIME)
    x, y = data(bsd, seed=1)
    g_ref, _, env = ReferenceRuntime(bsd, seed=1).gradients(x, y)
    assert well_conditioned(bsd, env)
    tri = triton_runtime(bsd, seed=1)
    assert sum(la.kernel == RECURRENT_TIME_GRAD for la in tri.plan.launches) == 4  # 2 layers x (F, B)
    g_tri, _ = tri.gradients(x, y)
    for k, g in g_ref.items():
        assert float((g - g_tri[k]).abs().max()) <= RTOL * float(g.abs().max()) + ATOL, k


def _declared_rnn():
    g = GraphBuilder("d", T=3)
    g.output(g.linear(g.recurrent_neuron("alif", g.linear(g.input((4,)), 5)), 3))
    return g.build()


def _mlp():
    g = GraphBuilder("m", T=3)
    g.output(g.linear(g.lif(g.linear(g.input((4,)), 5)), 3))
    return g.build()


@pytest.mark.parametrize("build, cfg, message", [
    (_mlp, THROUGH_TIME, "this network has no recurrent layer"),
    (conv_rnn, THROUGH_TIME, "supports recurrent LIF layers with a linear recurrence; this one is conv2d -> lif"),
    (_declared_rnn, THROUGH_TIME, "this one is linear -> neuron"),
    (lambda: rnn(), BSDConfig(recurrent_credit="through_time", distill_on="membrane"),
     "does not combine with distill_on='membrane'"),
    (lambda: rnn(), BSDConfig(recurrent_credit="later"), "recurrent_credit='later' is not one of"),
])
def test_what_it_cannot_mean_is_refused_by_name(build, cfg, message):
    with pytest.raises(GraphError, match=message.replace("(", r"\(").replace(")", r"\)")):
        derive_feedback(build(), cfg)
