"""Neuron declarations (ir/neurons.py) and the code generated from them (compiler/neuron_gen.py).

For every built-in and the user-declared QIF of models/fmnist_qif.py: the generated Triton kernel (interpreted)
== the generated torch twin == an independent numpy update written by hand below, over awkward shapes. Spikes
compare exactly; the inputs are drawn and then kept only where every step's spike argument lhs - rhs stays at
least MARGIN from 0 in float64, so that float32 rounding (relative 6e-8 per operation, a few dozen operations
over T <= 12 steps: < 1e-5 here) cannot flip a spike. Threshold ties (lhs == rhs exactly) are tested apart.
"""

from __future__ import annotations

import ast

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import bsdgraph
from bsdgraph import BSDConfig, GraphBuilder, GraphError, derive_feedback
from bsdgraph.compiler.neuron_gen import adjoint, step_ir, triton_source, twin_source
from bsdgraph.compiler.program import compile_graph
from bsdgraph.ir.neurons import NEURONS, NeuronError, declare_neuron, neuron_of
from bsdgraph.ir.params import init_params
from bsdgraph.runtime.cpu import cpu_runtime
from bsdgraph.runtime.neurons import triton_backward, triton_forward, twin_backward, twin_forward, twin_scan
from bsdgraph.runtime.reference import ReferenceRuntime
from kernels.ref.lif import lif_recurrence

MARGIN = 1e-3

QIF = dict(params={"tau": 2.0, "v_c": 0.1, "v_th": 0.3}, states=["v"],
           update={"v": "v + (v * (v - v_c) + x) / tau"}, spike="v >= v_th", reset={"v": "v * (1 - s)"},
           checks={"tau > 0": "time constant"})
declare_neuron("qif_test", **QIF)


# ---------------------------------------------------------------------------------------------------- numpy oracle
# One hand-written float64 update per neuron, from the equations in the docs, not from the declarations' text:
# (value, h, margin of the spike argument) over x [T, M].


def _np_run(name: str, p: dict, x: np.ndarray):
    T = x.shape[0]
    v = np.zeros(x.shape[1:])
    i = np.zeros(x.shape[1:])
    a = np.zeros(x.shape[1:])
    outs, hs, margin = [], [], np.inf
    for t in range(T):
        if name == "if":
            v = v + x[t]
            h, thr = v, p["v_th"]
        elif name in ("li", "lif", "lif_soft", "alif"):
            target = p["v_leak"] if name == "li" else p["v_reset"]
            v = v + (x[t] - (v - target)) / p["tau"]
            h = v
            thr = p["v_th"] + p["beta"] * a if name == "alif" else p.get("v_th")
        elif name in ("cuba_lif", "cuba_li"):
            i = i + (x[t] - i) / p["tau_syn"]
            v = v + (i - (v - p["v_leak"])) / p["tau"]
            h, thr = v, p.get("v_th")
        elif name == "qif_test":
            v = v + (v * (v - p["v_c"]) + x[t]) / p["tau"]
            h, thr = v, p["v_th"]
        hs.append(h.copy())
        if thr is None:        # leaky integrators: no spike, the value is the membrane
            outs.append(h.copy())
            continue
        margin = min(margin, float(np.abs(h - thr).min()))
        s = (h >= thr).astype(np.float64)
        outs.append(s)
        if name == "lif_soft":
            v = v - p["v_th"] * s
        elif name == "qif_test":
            v = np.where(s > 0, 0.0, v)
        else:
            v = np.where(s > 0, p["v_reset"], v)
        if name == "alif":
            a = a + (s - a) / p["tau_a"]
    return np.stack(outs), np.stack(hs), margin


NAMES = ["if", "li", "lif", "lif_soft", "cuba_lif", "cuba_li", "alif", "qif_test"]
# parameters away from the defaults where that exercises more of the update (a nonzero reset, a leak target)
PARAMS = {"if": {"v_th": 0.7, "v_reset": -0.1}, "li": {"tau": 3.0, "v_leak": 0.05},
          "lif": {"tau": 2.5, "v_reset": -0.05}, "lif_soft": {"tau": 1.5}, "cuba_lif": {"tau_syn": 1.7},
          "cuba_li": {"tau_syn": 3.0, "tau": 1.25}, "alif": {"beta": 0.5, "tau_a": 4.0}, "qif_test": {}}
SHAPES = [(1,), (7,), (3, 13), (1031,), (2, 5, 3)]   # one, primes, larger than a 1024 block, 3-d


def _inputs(seed: int, T: int, shape, scale: float = 0.6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((T, *shape), generator=g, dtype=torch.float64) * 2 - 0.7) * scale


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=6)
@given(seed=st.integers(0, 2**31), T=st.integers(1, 12), shape=st.sampled_from(SHAPES))
def test_kernel_twin_and_numpy_agree(name, seed, T, shape):
    neuron = NEURONS[name]
    p = neuron.param_values(PARAMS[name])
    x64 = _inputs(seed, T, shape)
    # parameters are float32 scalars in twin and kernel (a documented contract): the oracle takes them so too
    ref_out, ref_h, margin = _np_run(name, {k: float(np.float32(v)) for k, v in p.items()}, x64.numpy())
    assume(margin > MARGIN)
    x = x64.float().contiguous()
    out_k, h_k = triton_forward(neuron, p, x, return_h=True)
    out_t, h_t = twin_forward(neuron, p, x, return_h=True)
    # kernel == twin bitwise: same expressions, same order, IEEE division in both
    assert torch.equal(out_k, out_t) and torch.equal(h_k, h_t)
    assert out_k.dtype == (torch.uint8 if neuron.spiking else torch.float32)
    # twin in float64 == numpy: spikes exact, membranes to float64 rounding
    out64, h64 = twin_scan(neuron, p, x64, grad=False)
    np.testing.assert_allclose(h64.numpy(), ref_h, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out64.numpy(), ref_out, rtol=0, atol=1e-12 if not neuron.spiking else 0)
    # float32 against float64: the margin keeps spikes equal; states within accumulated fp32 rounding
    assert np.array_equal(out_k.double().numpy(), ref_out) if neuron.spiking else True
    np.testing.assert_allclose(h_k.double().numpy(), ref_h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["if", "lif", "lif_soft", "cuba_lif", "alif", "qif_test"])
def test_a_threshold_tie_spikes_in_kernel_and_twin(name):
    """lhs == rhs exactly must spike (>=) in both: one step whose h lands exactly on v_th."""
    neuron = NEURONS[name]
    p = neuron.param_values({"tau": 1.0, "tau_syn": 1.0, "v_th": 0.5, "v_reset": 0.0, "v_c": 0.0})
    if name == "qif_test":   # v = 0 + (0 * (0 - 0) + x) / 1 = x
        p["v_c"] = 0.0
    x = torch.tensor([[0.5, 0.25, 0.75]], dtype=torch.float32)
    out_k, h_k = triton_forward(neuron, p, x, return_h=True)
    out_t, h_t = twin_forward(neuron, p, x, return_h=True)
    assert h_t[0, 0].item() == 0.5
    assert out_k.tolist() == out_t.tolist() == [[1, 0, 1]]


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=4)
@given(seed=st.integers(0, 2**31), T=st.integers(1, 9), shape=st.sampled_from(SHAPES[:4]),
       which=st.sampled_from(["out", "h", "both"]))
def test_generated_backward_matches_autograd_of_the_twin(name, seed, T, shape, which):
    """The kernel's reverse-mode code (derived symbolically) against autograd through the twin, with the
    surrogate in. Tolerance: fp32 sums over <= 9 steps of terms <= ~10 in size, 1e-5 relative."""
    neuron = NEURONS[name]
    p = neuron.param_values(PARAMS[name])
    x64 = _inputs(seed, T, shape)
    assume(_np_run(name, p, x64.numpy())[2] > MARGIN)
    x = x64.float().contiguous()
    g = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(x.shape, generator=g) if which in ("out", "both") else None
    gh = torch.randn(x.shape, generator=g) if which in ("h", "both") else None
    got = triton_backward(neuron, p, 1.5, x, go, gh)
    want = twin_backward(neuron, p, 1.5, x.double(), None if go is None else go.double(),
                         None if gh is None else gh.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_the_twin_backward_is_the_lif_oracles():
    """The lif declaration's twin with the surrogate == kernels/ref/lif.py's recurrence, values and gradients."""
    x = _inputs(3, 6, (40,)).float().requires_grad_(True)   # float32: the twin's parameters are fp32 scalars
    s, h = twin_scan(NEURONS["lif"], {"tau": 2.0, "v_th": 0.3, "v_reset": 0.0}, x, alpha=2.0)
    from kernels.ref.lif import SpikeFn
    x2 = x.detach().clone().requires_grad_(True)
    s2, h2 = lif_recurrence(x2, 2.0, 0.3, 0.0, False, None, lambda v: SpikeFn.apply(v, 0.3, 2.0))
    assert torch.equal(s, s2) and torch.equal(h, h2)
    w = torch.randn_like(h)
    (g1,) = torch.autograd.grad((h * w).sum() + s.sum(), x)
    (g2,) = torch.autograd.grad((h2 * w).sum() + s2.sum(), x2)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("soft", [False, True])
def test_the_generated_lif_kernel_equals_the_hand_written_one(soft):
    """The triton backend's LIF forward is now generated; kernels/lif.py stays as the oracle: bitwise equal."""
    from bsdgraph.runtime.triton import _generated_lif
    from kernels.lif import lif_forward

    x = _inputs(5, 8, (4, 300)).float().contiguous()
    s1, h1 = _generated_lif(x, 2.0, 0.3, 0.0, soft, return_h=True)
    s2, h2 = lif_forward(x, 2.0, 0.3, 0.0, soft, return_h=True)
    assert torch.equal(s1, s2) and torch.equal(h1, h2)


# ---------------------------------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("kw, message", [
    (dict(update={"v": "v + y"}), r"reads \['y'\], which are neither"),
    (dict(update={"v": "v + x"}, spike="v > 1"), "one comparison 'lhs >= rhs'"),
    (dict(update={"v": "v + x"}, spike="v >= 1", reset={}), "needs a reset"),
    (dict(update={"v": "v + x"}, spike="v >= 1", reset={"v": "0 * v"}), "no reset expression reads the spike"),
    (dict(update={"v": "__import__('os').system('x')"}), "not arithmetic"),
    (dict(update={"v": "v ** 0.5 + x"}), "integer exponent"),
    (dict(update={"w": "x"}), "not a declared state"),
    (dict(states=["v", "u"], update={"v": "v + x"}), "state 'u' is never assigned"),
    (dict(update={"v": "v"}), "no update reads the input current x"),
    (dict(update={"v": "v + x"}, checks={"tau < 0": "neg"}), "defaults break the declaration's own check"),
    (dict(update={"v": "v + x"}, spike="v >= 1", reset={"v": "v * (1 - s)"}, reset_only=True), None),
])
def test_a_bad_declaration_is_refused_with_what_is_wrong(kw, message):
    base = dict(params={"tau": 2.0}, states=["v"], update={"v": "v + x"})
    if kw.pop("reset_only", False):
        declare_neuron("fine_one", **{**base, **kw})   # the well-formed control case
        return
    with pytest.raises(NeuronError, match=message):
        declare_neuron("bad_one", **{**base, **kw})


def test_redeclaring_is_idempotent_but_a_change_or_a_builtin_is_refused():
    declare_neuron("qif_test", **QIF)
    with pytest.raises(NeuronError, match="already declared differently"):
        declare_neuron("qif_test", **{**QIF, "params": {"tau": 3.0, "v_c": 0.1, "v_th": 0.3}})
    with pytest.raises(NeuronError, match="built in"):
        declare_neuron("lif", params={"tau": 1.0}, states=["v"], update={"v": "v + x"})


def test_a_neuron_node_is_validated_against_its_declaration():
    g = GraphBuilder("bad", T=2)
    x = g.input((4,))
    h = g.neuron("lif", g.linear(x, 3), tau=-1.0, w=2.0)
    h = g.neuron("nope", g.linear(h, 3))
    h = g.neuron("cuba_lif", g.linear(h, 3), tau_syn=0.0)
    g.output(g.linear(h, 2))
    with pytest.raises(GraphError) as err:
        g.build()
    text = str(err.value)
    assert "node 'h1' (neuron): lif has no parameter 'w'" in text
    assert "node 'h2' (neuron): no neuron called 'nope'" in text
    assert "node 'h3' (neuron): cuba_lif needs tau_syn > 0, got tau_syn=0.0" in text


def test_generated_source_carries_no_declared_text():
    """Declared names reach the source only as repr() in comments; the code is generated names and numbers."""
    for neuron in NEURONS.values():
        for src in (twin_source(neuron), triton_source(neuron)):
            code = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith("#"))
            idents = {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)}
            declared = {p for p, _ in neuron.params} | set(neuron.states)
            assert not (idents & declared) - {"x"}, (neuron.name, idents & declared)


def test_the_adjoint_of_a_linear_update_is_its_coefficient():
    """Reverse mode on li: v' = v + (x - (v - v_leak)) / tau -> dv'/dx = 1/tau, dv'/dv = 1 - 1/tau."""
    ir = step_ir(NEURONS["li"])
    _, results = adjoint(ir)
    env = {"G_out": 0.0, "G_h": 1.0, "A0": 0.0, "P0": 4.0, "P1": 0.0}
    code = [(t, e) for t, e in adjoint(ir)[0]]
    for name, expr in code:
        env[name] = eval(compile(ast.Expression(ast.fix_missing_locations(expr)), "", "eval"), {}, dict(env))
    gx = eval(compile(ast.Expression(ast.fix_missing_locations(results["x"])), "", "eval"), {}, env)
    gv = eval(compile(ast.Expression(ast.fix_missing_locations(results["S0_0"])), "", "eval"), {}, env)
    assert (gx, gv) == (0.25, 0.75)


# ---------------------------------------------------------------------------------------------------- the engine


def _mlp(model: str, recurrent: bool = False, **params) -> bsdgraph.Graph:
    g = GraphBuilder(f"mlp_{model}", T=4)
    h = g.neuron(model, g.linear(g.input((12,)), 24), **params)
    h = (g.recurrent_neuron if recurrent else g.neuron)(model, g.linear(h, 16), **params)
    g.output(g.linear(h, 3))
    return g.build()


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 12, generator=g)
    y = (x[:, :4].sum(1) * 3 / 4).long().clamp(0, 2)   # a learnable rule
    return x, y


@pytest.mark.parametrize("model, params", [
    ("if", {"v_th": 0.6}), ("li", {}), ("lif", {}), ("cuba_lif", {}), ("alif", {}), ("qif_test", {}),
    ("cuba_li", {}), ("lif_soft", {})])
@pytest.mark.parametrize("distill_on", ["current", "membrane"])
def test_every_neuron_runs_on_the_cpu_backend_as_on_the_reference(model, params, distill_on):
    """One BSD step of an MLP (feedforward and recurrent layer) on the cpu backend == the reference runtime."""
    bsd = derive_feedback(_mlp(model, recurrent=True, **params), BSDConfig(distill_on=distill_on))
    p = init_params(bsd, 0)
    ref = ReferenceRuntime(bsd, p)
    cpu = cpu_runtime(compile_graph(bsd), params=p)
    x, y = _data(16)
    r1, r2 = ref.step(x, y), cpu.step(x, y)
    for k in r1.losses:
        assert abs(r1.losses[k] - r2.losses[k]) <= 1e-5 * max(1.0, abs(r1.losses[k])), k
    assert r1.rates.keys() == r2.rates.keys()
    for k, w in ref.params.items():
        torch.testing.assert_close(cpu.params[k], w.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model, params", [("if", {"v_th": 0.6}), ("li", {}), ("lif", {}), ("lif_soft", {}),
                                           ("cuba_lif", {}), ("cuba_li", {}), ("alif", {}), ("qif_test", {})])
def test_a_short_bsd_run_lowers_the_loss_for_each_neuron(model, params):
    prog = compile_graph(derive_feedback(_mlp(model, **params), BSDConfig()))
    rt = cpu_runtime(prog, seed=0)
    x, y = _data(128)
    first = sum(rt.step(x, y).losses.values())
    for _ in range(40):
        last = sum(rt.step(x, y).losses.values())
    assert last < 0.8 * first, (first, last)


def test_a_recurrent_cuba_lif_net_trains():
    prog = compile_graph(derive_feedback(_mlp("cuba_lif", recurrent=True), BSDConfig()))
    rt = cpu_runtime(prog, seed=1)
    x, y = _data(128)
    first = rt.step(x, y).losses
    for _ in range(60):
        last = rt.step(x, y).losses
    assert sum(last.values()) < 0.85 * sum(first.values())
    assert last["ce3"] < first["ce3"]


def test_the_triton_backend_runs_declared_neurons_as_the_reference():
    from bsdgraph.runtime.triton import triton_runtime

    bsd = derive_feedback(_mlp("cuba_lif"), BSDConfig(distill_on="membrane"))
    p = init_params(bsd, 0)
    ref = ReferenceRuntime(bsd, p)
    tri = triton_runtime(compile_graph(bsd), device="cpu", params=p)
    x, y = _data(16)
    r1, r2 = ref.step(x, y), tri.step(x, y)
    for k in r1.losses:
        assert abs(r1.losses[k] - r2.losses[k]) <= 1e-5 * max(1.0, abs(r1.losses[k])), k
    for k, w in ref.params.items():
        torch.testing.assert_close(tri.params[k], w.detach(), rtol=1e-5, atol=1e-6)


def test_bptt_trains_a_declared_neuron():
    from bsdgraph.runtime.bptt import BPTTRuntime

    rt = BPTTRuntime(_mlp("alif"), seed=0)
    x, y = _data(128)
    first = rt.step(x, y).losses["bptt"]
    for _ in range(60):
        last = rt.step(x, y).losses["bptt"]
    assert last < 0.85 * first


def test_lif_op_and_the_lif_declaration_are_one_neuron():
    """g.lif(...) and g.neuron('lif', ...) give the same spikes through the reference."""
    from bsdgraph.runtime.reference import Ctx, run_graph
    from bsdgraph.ir.graph import Stream

    def net(use_op):
        g = GraphBuilder("same", T=5)
        c = g.linear(g.input((6,)), 9)
        h = g.lif(c, tau=2.5, v_reset=-0.1) if use_op else g.neuron("lif", c, tau=2.5, v_reset=-0.1)
        g.output(g.linear(h, 2))
        return g.build()

    a, b = net(True), net(False)
    assert neuron_of(a["h1"]) == neuron_of(b["h1"])
    p = init_params(a, 0)
    x = torch.rand(4, 6) * 2
    env_a = run_graph(a, Ctx(p, {}, 5, x, None, False, 0), frozenset({Stream.F}))
    env_b = run_graph(b, Ctx(p, {}, 5, x, None, False, 0), frozenset({Stream.F}))
    assert torch.equal(env_a["h1"], env_b["h1"]) and env_a["h1"].sum() > 0


def test_compile_emits_the_generated_kernels(capsys):
    from bsdgraph.cli.main import main

    assert main(["compile", "models/fmnist_qif.py", "--emit", "kernels"]) == 0
    out = capsys.readouterr().out
    assert "== neuron 'qif' (nodes h1, h2, h2_b, h1_b): generated torch twin" in out
    assert "def forward_kernel(" in out and "def backward_kernel(" in out
    assert "S0_1 = S0_0 + tl.math.div_rn(S0_0 * (S0_0 - P1) + x, P0)" in out
