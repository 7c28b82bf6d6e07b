"""Recurrent synapses: a Linear from a layer's own spikes through a delay-1 edge.

IR and validation (a cycle must pass through a delay), the derived backward network (B gets its own recurrent
synapse), the reference runtime's step-by-step semantics against a hand-written loop, the cpu and triton backends
against the reference, the fused Triton kernel against its twin, and BPTT through the recurrence.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bsdgraph import BSDConfig, GraphBuilder, GraphError, Op, Stream, derive_feedback, format_graph, validate
from bsdgraph.compiler.feedback import local_params
from bsdgraph.compiler.lower import RECURRENT_FUSION, lower
from bsdgraph.runtime.bptt import BPTTRuntime
from bsdgraph.runtime.cpu import cpu_runtime
from bsdgraph.runtime.reference import Ctx, ReferenceRuntime, run_graph
from bsdgraph.runtime.triton import triton_runtime
from kernels.linear_lif import linear_lif_rec_forward
from kernels.ref import linear_lif as twin
from tests.test_cpu_backend import ATOL, RTOL, well_conditioned


def rnn(T=5, widths=(9, 7), n_in=3, encoding="direct", task="regression", recurrent=(True, True), v_th=0.3,
        reset="hard", target=None):
    g = GraphBuilder("rnn", T=T)
    h = g.input((n_in,), encoding=encoding)
    for w, rec in zip(widths, recurrent):
        h = (g.recurrent_lif if rec else g.lif)(g.linear(h, w), v_th=v_th, reset=reset)
    g.output(g.linear(h, 2 if task == "regression" else 4), task=task, target=target)
    return g.build()


def data(f, B=6, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    inp, out = f.by_op(Op.INPUT)[0], f.by_op(Op.OUTPUT)[0]
    lead = (B, f.T) if inp.attrs["encoding"] == "sequence" else (B,)
    x = torch.rand(*lead, *inp.shape, generator=gen) * scale
    if out.attrs["task"] == "regression":
        y = torch.rand(B, *out.shape, generator=gen)
    elif out.attrs["target"] == "sequence":  # a class per step
        y = torch.randint(0, out.attrs["n_classes"], (B, f.T), generator=gen)
    else:
        y = torch.arange(B) % out.attrs["n_classes"]
    return x, y


# ---------------------------------------------------------------------------------------------------- IR


def test_builder_makes_a_delay_1_loop_through_a_bias_free_linear():
    f = rnn()
    (e,) = f.in_edges("h1_rec")
    assert (e.src, e.delay) == ("h1", 1) and f["h1_rec"].attrs["bias"] is False
    assert [x.src for x in f.in_edges("h1_in")] == ["fc1", "h1_rec"]
    assert "%h1[t-1]" in format_graph(f)


def test_a_loop_without_delay_is_refused_naming_it():
    g = GraphBuilder("bad", T=3)
    h = g.recurrent_lif(g.linear(g.input((3,)), 4))
    g.output(g.linear(h, 2), task="regression")
    f = g.build()
    edges = [dataclasses.replace(e, delay=0) if e.dst == "h1_rec" else e for e in f.edges]
    with pytest.raises(GraphError, match=r"cycle .*h1.* has no delay edge"):
        validate(f.replace(edges=edges))


@pytest.mark.parametrize("mutate, message", [
    ("other", "it must read 'h1' through a delay-1 edge"),
    ("bias", "a recurrent synapse has no bias"),
    ("delay2", "through a delay-1 edge"),
])
def test_unsupported_recurrent_layers_get_a_diagnostic(mutate, message):
    f = rnn(widths=(4, 4), recurrent=(True, False))
    if mutate == "other":  # the recurrent synapse reads the layer above instead of its own layer
        edges = [dataclasses.replace(e, src="h2") if e.dst == "h1_rec" else e for e in f.edges]
        f = f.replace(edges=edges)
    elif mutate == "bias":
        nodes = [n.replace(attrs={**n.attrs, "bias": True}) if n.name == "h1_rec" else n for n in f.nodes]
        f = f.replace(nodes=nodes)
    else:
        edges = [dataclasses.replace(e, delay=2) if e.dst == "h1_rec" else e for e in f.edges]
        f = f.replace(edges=edges)
    with pytest.raises(GraphError, match=message):
        derive_feedback(f)


def test_backward_network_gets_its_own_recurrent_synapse_and_losses_stay_local():
    bsd = derive_feedback(rnn())
    for layer in ("h1", "h2"):
        rec_b = bsd[f"{layer}_rec_b"]
        assert rec_b.stream == Stream.B and rec_b.op == Op.LINEAR
        (e,) = bsd.in_edges(rec_b.name)
        assert (e.src, e.delay, e.detach) == (f"{layer}_b", 1, True)  # B's own spikes, one step late
        assert bsd.in_edges(f"{layer}_rec")[0].detach  # no gradient through time in BSD
    # V_1 pairs F's recurrent sum with B's; the loss owns both feedforward and both recurrent synapses
    assert [n.name for n in bsd.inputs("reco1")] == ["h1_in", "h1_in_b"]
    assert local_params(bsd, "reco1") == ["fc1", "h1_rec", "fc2_b", "h1_rec_b"]
    assert local_params(bsd, "reco2") == ["fc2", "h2_rec", "fc3_b", "h2_rec_b"]


def test_the_plan_fuses_each_recurrent_layer_into_one_launch():
    plan = lower(derive_feedback(rnn()))
    fused = [la for la in plan.launches if la.kernel == RECURRENT_FUSION]
    assert [la.nodes for la in fused] == [("fc3_b", "h2_rec_b", "h2_in_b", "h2_b"),
                                         ("fc2_b", "h1_rec_b", "h1_in_b", "h1_b"),
                                         ("fc1", "h1_rec", "h1_in", "h1"), ("fc2", "h2_rec", "h2_in", "h2")]


# ---------------------------------------------------------------------------------------------------- semantics


def test_reference_runs_the_loop_step_by_step_as_the_spec_writes_it():
    f = rnn(widths=(9,), recurrent=(True,), encoding="sequence")
    rt = ReferenceRuntime(f)
    x, _ = data(f)
    env = run_graph(f, Ctx(rt.params, rt.state, f.T, x, None, False, 0), frozenset({Stream.F}))
    p = rt.params
    v, s = torch.zeros(6, 9), torch.zeros(6, 9)
    for t in range(f.T):  # I[t] = W x[t] + b + U s[t-1]; LIF with tau 2, v_th 0.3, hard reset to 0
        current = F.linear(x[:, t], p["fc1.weight"], p["fc1.bias"]) + F.linear(s, p["h1_rec.weight"])
        h = v + (current - v) / 2.0
        s = (h >= 0.3).float()
        v = h * (1 - s)
        assert torch.equal(env["h1"][t], s), f"spikes differ at step {t}"
        assert torch.allclose(env["h1_in"][t], current, atol=1e-6)
    assert env["h1"].sum() > 0 and env["h1"].mean() < 1  # the check above was not vacuous


def test_the_recurrent_term_changes_the_spikes():
    f = rnn(widths=(9,), recurrent=(True,))
    rt = ReferenceRuntime(f)
    x, _ = data(f)
    ctx = lambda: Ctx(rt.params, rt.state, f.T, x, None, False, 0)  # noqa: E731
    with_rec = run_graph(f, ctx())["h1"]
    rt.params["h1_rec.weight"].data.zero_()
    assert not torch.equal(with_rec, run_graph(f, ctx())["h1"])


@settings(max_examples=12)
@given(seed=st.integers(0, 10_000), encoding=st.sampled_from(["direct", "sequence"]),
       task=st.sampled_from(["regression", "classification"]), distill_on=st.sampled_from(["current", "membrane"]),
       recurrent=st.sampled_from([(True, True), (True, False), (False, True)]), T=st.integers(1, 5))
def test_cpu_backend_equals_reference(seed, encoding, task, distill_on, recurrent, T):
    f = rnn(T=T, encoding=encoding, task=task, recurrent=recurrent)
    g_ref, env = assert_cpu_equals_reference(derive_feedback(f, BSDConfig(distill_on=distill_on)),
                                             *data(f, seed=seed), seed)
    # dU = sum_t dV[t]ᵀ s[t-1]: non-zero once a recurrent layer of F has fired before the last step (with one step,
    # s[t-1] is always the zero initial state, and a layer silent until then has nothing to credit)
    if any(float(env[n][:-1].sum()) > 0 for n, rec in zip(("h1", "h2"), recurrent) if rec):
        assert any(float(g_ref[f"{n}.weight"].abs().max()) > 0 for n in ("h1_rec", "h2_rec") if f"{n}.weight" in g_ref)


def assert_cpu_equals_reference(bsd, x, y, seed: int) -> dict:
    """One step's losses and gradients, cpu backend against the reference (examples with a membrane near the
    threshold are discarded: house rule); returns the reference's gradients and node values."""
    ref, cpu = ReferenceRuntime(bsd, seed=seed), cpu_runtime(bsd, seed=seed)
    g_ref, l_ref, env = ref.gradients(x, y)
    assume(well_conditioned(bsd, env))
    g_cpu, l_cpu = cpu.gradients(x, y)
    assert set(g_ref) == set(g_cpu)
    for k in l_ref:
        assert abs(float(l_ref[k].detach()) - l_cpu[k]) <= 1e-5 * max(1.0, abs(float(l_ref[k].detach()))), k
    for k, g in g_ref.items():
        tol = RTOL * float(g.abs().max()) + ATOL
        assert float((g - g_cpu[k]).abs().max()) <= tol, f"{k}: {float((g - g_cpu[k]).abs().max()):.3g} > {tol:.3g}"
    return g_ref, env


def test_triton_backend_equals_reference_on_a_recurrent_net():
    bsd = derive_feedback(rnn(encoding="sequence", task="classification"))
    x, y = data(bsd)
    ref, tri = ReferenceRuntime(bsd, seed=3), triton_runtime(bsd, seed=3)
    g_ref, l_ref, env = ref.gradients(x, y)
    assert well_conditioned(bsd, env)
    g_tri, l_tri = tri.gradients(x, y)
    assert any(la.kernel == RECURRENT_FUSION for la in tri.plan.launches)
    for k, g in g_ref.items():
        assert float((g - g_tri[k]).abs().max()) <= RTOL * float(g.abs().max()) + ATOL, k


def test_bptt_backpropagates_through_the_recurrent_synapse():
    f = rnn(widths=(9,), recurrent=(True,), encoding="sequence")
    x, y = data(f)
    bptt = BPTTRuntime(f, seed=0)
    env = run_graph(f, bptt._ctx(x, y, True), frozenset({Stream.F}))
    bptt.loss(env["out"], y).backward()
    grad = bptt.params["h1_rec.weight"].grad
    assert grad is not None and float(grad.abs().max()) > 0


# ---------------------------------------------------------------------------------------------------- kernel


@settings(max_examples=15)
@given(T=st.integers(1, 4), B=st.sampled_from([1, 3, 17, 65]), K=st.sampled_from([1, 5, 33]),
       N=st.sampled_from([1, 7, 16, 70]), tau=st.sampled_from([2.0, 4.0]), v_th=st.sampled_from([0.25, 0.5]),
       soft=st.booleans(), spikes_in=st.booleans(), with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_recurrent_kernel_equals_twin_exactly(T, B, K, N, tau, v_th, soft, spikes_in, with_bias, seed):
    # Exact arithmetic by construction: 0/1 or quarter-step inputs, weights in multiples of 2^-6 within ±0.5,
    # tau a power of two. Every current, h and v is then a dyadic rational of at most 23 significant bits (|I| <
    # 2^7, resolution 2^-(8 + 2T)), so float32 computes it exactly in any summation order, and the kernel's
    # spikes, currents and membranes must equal the twin's bit for bit, through the recurrence, at every step.
    gen = torch.Generator().manual_seed(seed)
    s_in = ((torch.rand(T, B, K, generator=gen) < 0.4).to(torch.uint8) if spikes_in
            else torch.randint(0, 5, (T, B, K), generator=gen).float() / 4)
    w = torch.randint(-32, 33, (N, K), generator=gen).float() / 64
    u = torch.randint(-32, 33, (N, N), generator=gen).float() / 64
    b = torch.randint(-16, 17, (N,), generator=gen).float() / 64 if with_bias else None
    got = linear_lif_rec_forward(s_in, w, b, u, None, tau, v_th, 0.0, soft, True, True)
    want = twin.linear_lif_rec_forward(s_in, w, b, u, None, tau, v_th, 0.0, soft, True, True)
    for name, a, e in zip(("spikes", "V", "h"), got, want):
        assert torch.equal(a, e), f"{name} differs at {(a != e).nonzero()[:3].tolist()}"


def test_recurrent_kernel_validates_its_recurrent_weight():
    s_in, w = torch.zeros(2, 3, 4, dtype=torch.uint8), torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"rec_weight must be \[N, N\] = \[5, 5\], got \(5, 4\)"):
        linear_lif_rec_forward(s_in, w, None, torch.zeros(5, 4), None, 2.0, 0.3, 0.0, False)


# ---------------------------------------------------------------------------------------------------- sequence targets


def test_sequence_targets_compare_every_step_on_every_runtime():
    f = rnn(encoding="sequence")
    g = GraphBuilder("s", T=f.T)
    h = g.recurrent_lif(g.linear(g.input((3,), encoding="sequence"), 9))
    g.output(g.linear(h, 2), task="regression", target="sequence")
    bsd = derive_feedback(g.build())
    assert bsd["mse2"].attrs["per_step"] and bsd["target"].attrs["encoding"] == "sequence"
    x, _ = data(bsd)
    y = torch.rand(6, bsd.T, 2, generator=torch.Generator().manual_seed(9))
    ref, cpu = ReferenceRuntime(bsd), cpu_runtime(bsd)
    losses, env = ref.losses(x, y)
    v = env["fc2"].detach()  # [T, B, 2]: step t's prediction is compared with y[:, t]
    assert torch.allclose(losses["mse2"], ((v - y.transpose(0, 1)) ** 2).mean())
    assert torch.equal(ref.predict(x), v.transpose(0, 1))
    g_ref, _, _ = ref.gradients(x, y)
    g_cpu, _ = cpu.gradients(x, y)
    for k, gr in g_ref.items():
        assert float((gr - g_cpu[k]).abs().max()) <= RTOL * float(gr.abs().max()) + ATOL, k
    bptt = BPTTRuntime(g.build())
    assert abs(bptt.step(x, y).losses["bptt"] - float(((v - y.transpose(0, 1)) ** 2).mean())) < 1e-6


def test_cli_trains_a_sequence_model_on_user_npz_and_refuses_the_wrong_length(tmp_path, capsys):
    import numpy as np

    from bsdgraph.cli.main import main
    from bsdgraph.train.series import mackey_glass_dataset

    ds = mackey_glass_dataset(8, n_train=96, n_test=32)  # [N, 8, 1] windows, [N, 1] next values
    good, bad = tmp_path / "seq.npz", tmp_path / "short.npz"
    np.savez(good, x_train=ds.x_train.numpy(), y_train=ds.y_train.numpy(), x_test=ds.x_test.numpy(),
             y_test=ds.y_test.numpy())
    np.savez(bad, x_train=ds.x_train[:, :7].numpy(), y_train=ds.y_train.numpy(), x_test=ds.x_test[:, :7].numpy(),
             y_test=ds.y_test.numpy())
    model = "models/mackey_glass_rnn.py"
    assert main(["train", model, "--npz", str(good), "--epochs", "1", "--out", str(tmp_path / "run"), "--json"]) == 0
    assert "test_mse" in capsys.readouterr().out
    assert main(["train", model, "--npz", str(bad), "--epochs", "1", "--out", str(tmp_path / "run2")]) == 1
    assert "model expects (8, 1) per sample, data has (7, 1)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- conv layers


def conv_rnn(T=4, rec_kernel=3):
    g = GraphBuilder("cr", T=T)
    h = g.recurrent_lif(g.conv2d(g.input((1, 5, 5)), 2, kernel=3, padding=1), v_th=0.2, rec_kernel=rec_kernel)
    h = g.lif(g.conv2d(h, 3, kernel=3, stride=2, padding=1), v_th=0.2)
    g.output(g.linear(g.flatten(h), 3))
    return g.build()


def test_a_conv_layer_recurs_through_a_size_keeping_conv_in_f_and_in_b():
    f = conv_rnn()
    rec = f["h1_rec"]
    assert rec.op == Op.CONV2D and rec.attrs["padding"] == (1, 1) and not rec.attrs["bias"] and rec.shape == (2, 5, 5)
    assert [(e.src, e.delay) for e in f.in_edges("h1_rec")] == [("h1", 1)]
    bsd = derive_feedback(f)
    rec_b = bsd["h1_rec_b"]
    assert rec_b.op == Op.CONV2D and rec_b.stream == Stream.B and rec_b.attrs == rec.attrs
    assert [(e.src, e.delay, e.detach) for e in bsd.in_edges("h1_rec_b")] == [("h1_b", 1, True)]
    assert local_params(bsd, "reco1") == ["conv1", "h1_rec", "conv2_b", "h1_rec_b"]
    # one launch per recurrent layer, in F and in B (B's feedforward synapse is the mirror of conv2)
    fused = [la.nodes for la in lower(bsd).launches if la.kernel == "rec_conv_forward"]
    assert fused == [("conv2_b", "h1_rec_b", "h1_in_b", "h1_b"), ("conv1", "h1_rec", "h1_in", "h1")]


def test_the_reference_runs_a_recurrent_conv_layer_as_written():
    f = conv_rnn()
    rt = ReferenceRuntime(f, seed=2)
    x = torch.rand(4, 1, 5, 5, generator=torch.Generator().manual_seed(0)) * 2
    env = run_graph(f, Ctx(rt.params, rt.state, f.T, x, None, False, 0), frozenset({Stream.F}))
    p = {k: v.detach() for k, v in rt.params.items()}
    v, s = torch.zeros(4, 2, 5, 5), torch.zeros(4, 2, 5, 5)
    for t in range(f.T):  # I[t] = conv1(x) + U * s[t-1] (3x3, padding 1); LIF tau 2, v_th 0.2, hard reset
        current = F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1) + F.conv2d(s, p["h1_rec.weight"],
                                                                                      padding=1)
        h = v + (current - v) / 2.0
        assert float((h - 0.2).abs().min()) > 1e-5  # away from the threshold: the spikes below are exact
        s = (h >= 0.2).float()
        v = h * (1 - s)
        assert torch.equal(env["h1"][t], s), f"spikes differ at step {t}"
    assert env["h1"].sum() > 0 and env["h1"].mean() < 1


@pytest.mark.parametrize("build, message", [
    (lambda g, c: g.recurrent_lif(c, rec_kernel=2), "rec_kernel must be an odd whole number >= 1"),
    (lambda g, c: g.output(g.linear(g.flatten(g.recurrent_lif(c)), 3)),
     r"node 'flat1' \(flatten\): reads the recurrent layer 'h1'; a recurrent layer must feed exactly one synapse"),
])
def test_conv_recurrence_it_cannot_run_is_diagnosed(build, message):
    g = GraphBuilder("cr", T=2)
    c = g.conv2d(g.input((1, 5, 5)), 2, kernel=3, padding=1)
    with pytest.raises(GraphError, match=message):
        build(g, c)
        derive_feedback(g.build())
