"""reco_rows='each_step' (one ReCo per step over the batch's rows at that step, with per-step classes as
negatives' labels), backward_recurrence=False (B's recurrent layer without its own recurrence) and
backward_membrane=False (B's LIF neurons without memory): the closed form against autograd of the reference loss,
every runtime against the reference, and what the derivation builds."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bsdgraph import BSDConfig, GraphError, Stream, derive_feedback
from bsdgraph.compiler.feedback import check_locality
from bsdgraph.compiler.lower import can_dedup
from bsdgraph.ir.params import init_params
from bsdgraph.runtime.cpu import cpu_runtime
from bsdgraph.runtime.losses import reco_each_step, reco_loss
from bsdgraph.runtime.reference import ReferenceRuntime
from bsdgraph.runtime.triton import triton_runtime
from kernels.ref.reco import reco_loss_grad_each_step
from tests.test_cpu_backend import ATOL, RTOL, well_conditioned
from tests.test_recurrent import assert_cpu_equals_reference, data, rnn
from tests.test_through_time import _declared_rnn

EACH_STEP = BSDConfig(reco_rows="each_step", negatives="other_class")
PREDICTIVE = BSDConfig(reco_rows="each_step", negatives="other_class", backward_recurrence=False,
                       backward_membrane=False, recurrent_credit="through_time")


def seq_net(T=5, recurrent=(True, False)):
    """Sequence in, a class per step out (the character model's shape, small)."""
    return rnn(T=T, encoding="sequence", task="classification", recurrent=recurrent, target="sequence")


# ---------------------------------------------------------------------------------------------------- the loss


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 4), B=st.integers(1, 5), D=st.integers(1, 4), lam=st.sampled_from([0.0, 0.6, 2.0]),
       labels=st.sampled_from(["none", "per_sample", "per_step"]), silent=st.booleans(), seed=st.integers(0, 999))
def test_the_closed_form_equals_autograd_of_the_reference_loss(T, B, D, lam, labels, silent, seed):
    """float64, so the only differences are summation order; ``silent`` zeroes one F row at one step (a layer
    that did not fire there), whose norm has no derivative: both sides take 0 for it."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(T, B, D, generator=gen, dtype=torch.float64)
    v_hat = torch.randn(T, B, D, generator=gen, dtype=torch.float64)
    if silent:
        v[-1, 0] = 0
    lab = {"none": None, "per_sample": torch.randint(0, 2, (B,), generator=gen),
           "per_step": torch.randint(0, 2, (B, T), generator=gen)}[labels]
    negatives = "all" if lab is None else "other_class"
    v.requires_grad_(True)
    v_hat.requires_grad_(True)
    want = reco_each_step(v, v_hat, lab, lam, negatives, 1e-8)
    g_v, g_hat = torch.autograd.grad(want, (v, v_hat))
    loss, d_v, d_hat = reco_loss_grad_each_step(v.detach(), v_hat.detach(), lab, lam, negatives)
    assert float(loss) == pytest.approx(float(want.detach()), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(d_v, g_v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_hat, g_hat, rtol=1e-10, atol=1e-12)


def test_it_is_the_mean_of_one_reco_per_step_with_that_steps_classes():
    """Hand-built: at step 0 every sample has the same class, so with other_class there are no negatives and only
    the positive terms count; at step 1 the classes differ, so the negative term appears. A per-sample form (one
    cosine over T*D) would mix the two steps."""
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 0.0]]])      # [T=2, B=2, D=2]
    v_hat = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    labels = torch.tensor([[3, 0], [3, 1]])                                       # [B, T]
    c = 2 ** -0.5
    step0 = ((1 - c) ** 2 + (1 - c) ** 2) / 2                                     # no negatives at step 0
    step1 = ((1 - c) ** 2 + 0 + 0.6 * (c ** 2 + 1.0)) / 2                          # C_01 = c, C_10 = 1
    want = (step0 + step1) / 2
    assert float(reco_each_step(v, v_hat, labels, 0.6, "other_class", 1e-8)) == pytest.approx(want, rel=1e-6)
    loss, _, _ = reco_loss_grad_each_step(v, v_hat, labels, 0.6, "other_class")
    assert float(loss) == pytest.approx(want, rel=1e-6)
    per_sample = reco_loss(v.transpose(0, 1).reshape(2, -1), v_hat.transpose(0, 1).reshape(2, -1), labels[:, 0],
                           0.6, "other_class", 1e-8)
    assert float(per_sample) != pytest.approx(want, rel=1e-3)


def test_mis_shaped_per_step_labels_are_refused():
    v = torch.randn(3, 4, 2)
    with pytest.raises(ValueError, match=r"per-step labels must have shape \[4, 3\]"):
        reco_loss_grad_each_step(v, v, torch.zeros(3, 4, dtype=torch.int64), 0.6, "other_class")
    with pytest.raises(ValueError, match="needs labels"):
        reco_loss_grad_each_step(v, v, None, 0.6, "other_class")


# ---------------------------------------------------------------------------------------------------- runtimes


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), cfg=st.sampled_from([EACH_STEP, PREDICTIVE,
                                                         BSDConfig(reco_rows="each_step", backward_recurrence=False),
                                                         BSDConfig(backward_membrane=False)]),
       recurrent=st.sampled_from([(True, False), (True, True)]), T=st.integers(1, 5))
def test_cpu_backend_equals_reference_with_per_step_classes(seed, cfg, recurrent, T):
    f = seq_net(T=T, recurrent=recurrent)
    assert_cpu_equals_reference(derive_feedback(f, cfg), *data(f, seed=seed), seed)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), task=st.sampled_from(["regression", "classification"]))
def test_cpu_backend_equals_reference_with_one_target_per_sample(seed, task):
    """A classifier or a regression over the whole sequence: every step's rows are contrasted against that
    step's B rows, with one label per sample; B then runs on every sample (no per-class form)."""
    f = rnn(encoding="sequence", task=task)
    cfg = BSDConfig(reco_rows="each_step", negatives="other_class" if task == "classification" else "all")
    bsd = derive_feedback(f, cfg)
    if task == "classification":
        assert can_dedup(derive_feedback(f)) and not can_dedup(bsd)
    assert_cpu_equals_reference(bsd, *data(f, seed=seed), seed)


def test_triton_backend_equals_reference():
    bsd = derive_feedback(seq_net(), PREDICTIVE)
    x, y = data(bsd, seed=1)
    g_ref, l_ref, env = ReferenceRuntime(bsd, seed=1).gradients(x, y)
    assert well_conditioned(bsd, env)
    g_tri, l_tri = triton_runtime(bsd, seed=1).gradients(x, y)
    for k in l_ref:
        assert l_tri[k] == pytest.approx(float(l_ref[k].detach()), rel=1e-5), k
    for k, g in g_ref.items():
        assert float((g - g_tri[k]).abs().max()) <= RTOL * float(g.abs().max()) + ATOL, k


def test_each_step_changes_the_hidden_losses_and_not_the_top_one():
    """Same forward: the CE is the same number; every hidden ReCo is another number (per step, not per sample)."""
    f = seq_net()
    x, y = data(f, seed=2)
    _, plain = cpu_runtime(derive_feedback(f, BSDConfig(recall=False)), seed=2).gradients(x, y)
    _, each = cpu_runtime(derive_feedback(f, BSDConfig(recall=False, reco_rows="each_step")), seed=2).gradients(x, y)
    assert plain["ce3"] == each["ce3"]
    for k in ("reco1", "reco2"):
        assert abs(plain[k] - each[k]) > 1e-4, k


# ---------------------------------------------------------------------------------------------------- derivation


def test_without_backward_recurrence_b_has_no_loop_and_f_is_unchanged():
    f = seq_net(recurrent=(True, True))
    with_rec, without = derive_feedback(f, BSDConfig()), derive_feedback(f, BSDConfig(backward_recurrence=False))
    b_delayed = [e for e in with_rec.edges if e.delay and with_rec[e.dst].stream == Stream.B]
    assert len(b_delayed) == 2                     # B's own recurrent synapses, one per recurrent layer
    assert not [e for e in without.edges if e.delay and without[e.dst].stream == Stream.B]
    assert not [n for n in without.nodes if n.stream == Stream.B and n.name.endswith("_rec_b")]
    f_part = lambda g: ({n.name for n in g.nodes if n.stream == Stream.F},           # noqa: E731
                        {e for e in g.edges if g[e.dst].stream == Stream.F})
    assert f_part(with_rec) == f_part(without)
    check_locality(without)
    # B's layer keeps its neurons, now driven by the synapse from above alone, and its loss pairs it with F's
    assert [e.src for e in without.in_edges("h1_b")] == ["fc2_b"]
    assert [e.src for e in with_rec.in_edges("h1_b")] == ["h1_in_b"]
    reco = lambda g: {n.name for n in g.nodes if n.op.value == "reco"}     # noqa: E731
    assert reco(with_rec) == reco(without) == {"reco1", "reco2"}


def test_without_backward_membrane_only_bs_neurons_forget():
    f = seq_net(recurrent=(True, True))
    bsd = derive_feedback(f, BSDConfig(backward_membrane=False))
    taus = {n.name: n.attrs["tau"] for n in bsd.nodes if n.op.value == "lif"}
    assert taus == {"h1": 2.0, "h2": 2.0, "h1_b": 1.0, "h2_b": 1.0}
    assert {n.attrs["tau"] for n in derive_feedback(f).nodes if n.op.value == "lif"} == {2.0}


@pytest.mark.parametrize("recurrence, membrane, later_steps_move", [
    (True, True, True), (False, True, True), (True, False, True), (False, False, False)])
def test_b_at_step_t_reads_the_target_of_step_t_alone_only_without_both_memories(recurrence, membrane,
                                                                                  later_steps_move):
    """Change every sample's target at step 0 only: B's values at steps 1.. stay exactly as they were when B has
    neither its recurrent synapse nor its membranes, and move when it keeps either (its recurrence or a membrane
    carries step 0 on). B's weights are scaled x3 so that its layers fire (with the default init its bottom layer's
    spikes at step 0 do not change, and its recurrence would carry nothing)."""
    f = seq_net(recurrent=(True, False))
    x, y = data(f, B=16, seed=3)
    y2 = y.clone()
    y2[:, 0] = (y[:, 0] + 1) % 4
    bsd = derive_feedback(f, BSDConfig(backward_recurrence=recurrence, backward_membrane=membrane))
    b_weights = {f"{n.name}.weight" for n in bsd.nodes if n.stream == Stream.B}
    params = {k: w * 3 if k in b_weights else w for k, w in init_params(bsd, 3).items()}
    rt = ReferenceRuntime(bsd, params)
    (_, _, env), (_, _, env2) = rt.gradients(x, y), rt.gradients(x, y2)
    assert float((env["h1_b"][0] - env2["h1_b"][0]).abs().max()) > 0       # the change reached B's bottom layer
    b_nodes = [n.name for n in bsd.nodes if n.stream == Stream.B and n.op.value != "target"]
    moved = max(float((env[n][1:] - env2[n][1:]).detach().abs().max()) for n in b_nodes)
    assert (moved > 0) == later_steps_move, moved


@pytest.mark.parametrize("build, cfg, message", [
    (seq_net, BSDConfig(reco_rows="each_step", freq=True), "reco_rows='each_step' compares single steps"),
    (seq_net, BSDConfig(negatives="other_class"), "use reco_rows='each_step'"),
    (lambda: rnn(recurrent=(False, False)), BSDConfig(backward_recurrence=False), "has no recurrent layer"),
    (seq_net, BSDConfig(backward_recurrence="no"), "backward_recurrence must be True or False"),
    (_declared_rnn, BSDConfig(backward_membrane=False), "backward_membrane=False supports LIF layers"),
])
def test_what_it_cannot_mean_is_refused_by_name(build, cfg, message):
    with pytest.raises(GraphError, match=message):
        derive_feedback(build(), cfg)

