"""NIR for every neuron NIR has (IF, LI, LIF, CubaLI, CubaLIF, Threshold), recurrent loops and nested subgraphs:
snnTorch's own networks and simulations as peers, graphs in the shapes Norse and Sinabs write checked against NIR's
equations stepped independently in float64, round trips, and every refusal pinned by its message.

Spikes compare exactly, on samples whose pre-reset membranes stay MARGIN away from every threshold at every step.
Two simulations of the same neuron differ by rounding only: folding r·w_in = 1/((1-α)(1-β)) or a window size into
a weight, dividing by τ instead of multiplying by β, float32 against float64, each moves a membrane by a few float32
ulps per step. The largest difference measured between bsdgraph and the float64 references here is 6.7e-6, on IF
membranes that drift to ±50 without a leak (8e-7 on the CubaLIF loop, whose membranes stay below 8), so MARGIN =
1e-4 leaves a factor of 15 or more; each comparison asserts that most samples survive and that every layer really
fires, so it is never vacuous. A sample is dropped as a whole, since one flipped spike changes its future.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from bsdgraph import GraphBuilder, GraphError, Op, declare_neuron
from bsdgraph.compiler.passes import set_attrs
from bsdgraph.interop.nir import simulate, write_nir
from bsdgraph.ir.params import init_params
from tests.strategies import rnn_graphs

nir = pytest.importorskip("nir", reason="the `nir` package is not installed (pip install -e '.[test]')")

from bsdgraph.interop.nir_export import export_nir  # noqa: E402
from bsdgraph.interop.nir_import import import_nir  # noqa: E402

MARGIN = 1e-4
SNN_DT = 1e-4   # snnTorch's export and import hard-code this step


def away(*pairs, min_kept: float = 0.5) -> np.ndarray:
    """Samples (axis 1 of [T, B, ...] membranes) that stay MARGIN away from the threshold at every step and neuron,
    over (membrane, threshold) pairs."""
    ok = None
    for mem, thr in pairs:
        mem = np.asarray(mem, np.float64)
        keep = (np.abs(mem - thr) > MARGIN).reshape(mem.shape[0], mem.shape[1], -1).all(axis=(0, 2))
        ok = keep if ok is None else ok & keep
    assert ok.mean() >= min_kept, f"only {ok.sum()} of {ok.size} samples kept: the test would prove little"
    return ok


def lively(rate: torch.Tensor | np.ndarray, name: str) -> None:
    rate = float(np.asarray(rate, np.float64).mean())
    assert 0.02 < rate < 0.8, f"{name} fires {rate:.3f}: a weak comparison"


def full(shape, v):
    return np.full(shape, v, np.float64)


# ---------------------------------------------------------------------------------------------------- snnTorch


snn = pytest.importorskip("snntorch", reason="snnTorch is not installed (pip install -e '.[test]')")


def quiet(fn, *args):
    """snnTorch 1.0 calls nirtorch's deprecated API and prints on import: neither is ours to fix."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn(*args)


def export_snn(net, sample):
    from snntorch.export_nir import export_to_nir

    return quiet(export_to_nir, net, sample)  # an unbatched sample: a batched one fails (docs/nir.md)


def leaky(n, beta, thr):
    # per-neuron tensors (scalars fail snnTorch's export), reset to zero right after the spike: the hard reset NIR's
    # LIF states (reset_delay=True would keep the membrane one step longer; "subtract" is written as zero anyway)
    return snn.Leaky(beta=torch.full((n,), beta), threshold=torch.full((n,), thr), init_hidden=True,
                     reset_mechanism="zero", reset_delay=False)


def synaptic(n, alpha, beta, thr):
    return snn.Synaptic(alpha=torch.full((n,), alpha), beta=torch.full((n,), beta), threshold=torch.full((n,), thr),
                        init_hidden=True, reset_mechanism="zero", reset_delay=False)


def run_modules(net, x, spiking):
    """Step a Sequential over x [T, B, ...]; the output of the modules at indices ``spiking``, by index."""
    from snntorch import utils

    utils.reset(net)
    out = {i: [] for i in spiking}
    with torch.no_grad():
        for x_t in x:
            h = x_t
            for i, m in enumerate(net):
                h = m(h)
                if i in out:
                    out[i].append(h.clone())
    return {i: torch.stack(v) for i, v in out.items()}


def run_peer(peer, x, names):
    """Step a GraphModule from snnTorch's ``import_from_nir``; the outputs of its submodules ``names``."""
    out = {n: [] for n in names}
    hooks = [peer.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: out[n].append(y.clone()))
             for n in names]
    state = None
    with torch.no_grad():
        for x_t in x:
            _, state = peer(x_t, state)
    for h in hooks:
        h.remove()
    return {n: torch.stack(v) for n, v in out.items()}


def test_leaky_and_synaptic_networks_match_snntorchs_simulation_of_their_nir_graph(tmp_path):
    """Linear -> Synaptic -> Linear -> Leaky -> Linear -> Synaptic (the readout): snnTorch's export, imported through
    a file, gives the spikes of snnTorch's own import of that file, layer for layer, and of the network itself.
    Fails if CubaLIF's r·w_in fold, its τs/τ mapping or the current-before-membrane order is wrong."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 10), synaptic(10, 0.6, 0.8, 1.0), torch.nn.Linear(10, 8),
                              leaky(8, 0.7, 1.0), torch.nn.Linear(8, 4), synaptic(4, 0.5, 0.9, 1.0))
    with torch.no_grad():
        net[2].weight.mul_(2.5)
        net[4].weight.mul_(3)
    graph = export_snn(net, torch.rand(6))
    write_nir(tmp_path / "peer.nir", graph)
    x = torch.rand(10, 96, 6)
    imp = import_nir(tmp_path / "peer.nir", dt=SNN_DT, T=10)
    assert imp.graph["1"].attrs["model"] == "cuba_lif" and imp.graph["3"].op == Op.LIF
    assert imp.readout["name"] == "5" and imp.readout["model"] == "cuba_lif"
    # snnTorch writes tau_syn = dt/(1-α), tau_mem = dt/(1-β), r = tau_mem/dt, w_in = tau_syn/dt
    assert imp.graph["1"].attrs["params"]["tau_syn"] == pytest.approx(2.5, rel=1e-6)
    assert torch.allclose(imp.params["0.weight"], net[0].weight * 2.5 * 5, rtol=1e-6)
    sim = simulate(imp.graph, imp.params, imp.state, x, imp.readout)
    from snntorch.import_nir import import_from_nir

    peer = run_peer(quiet(import_from_nir, nir.read(tmp_path / "peer.nir")), x, ["1", "3", "5"])
    native = run_modules(net, x, [1, 3, 5])
    ok = away(*((sim.membranes[k], 1.0) for k in ("1", "3", "5")))
    for name in ("1", "3", "5"):
        lively(sim.spikes[name], name)
        ours = sim.spikes[name][:, ok].float()
        assert torch.equal(ours, peer[name][:, ok]), f"layer {name} differs from snnTorch's import"
        assert torch.equal(ours, native[int(name)][:, ok]), f"layer {name} differs from the network"


def rsynaptic_reference(layer, x_current, alpha, beta, thr):
    """What NIR's recurrent CubaLIF says, computed by snnTorch's own neuron: a Synaptic (hard reset right after the
    spike) fed the current plus RSynaptic's recurrent Linear of the previous step's spikes. RSynaptic itself cannot
    be the reference: its reset_delay=False path reads the `spk` argument, None with init_hidden, and fails; its
    default zeroes the membrane of the step after a spike, input included, which NIR's CubaLIF does not say."""
    cell = synaptic(x_current.shape[-1], alpha, beta, thr)
    cell.reset_mem()
    s, out = torch.zeros_like(x_current[0]), []
    with torch.no_grad():
        for i_t in x_current:
            s = cell(i_t + layer.recurrent(s))
            out.append(s)
    return torch.stack(out)


def test_rleaky_and_rsynaptic_layers_import_as_recurrent_layers_with_snntorchs_spikes(cli, tmp_path):
    """snnTorch writes RLeaky and RSynaptic as a flat loop, neuron <-> w_rec (an Affine: its recurrent Linear has a
    bias). Import makes each a recurrent layer named after the module, w_rec's bias in the feedforward bias, and
    `bsdgraph run` on the file gives snnTorch's spikes. Fails if the loop's delay is off by a step, if w_rec's bias
    is lost or counted twice, or if the neuron's factor (r, r·w_in) misses the recurrent weight."""
    torch.manual_seed(1)
    rleaky = snn.RLeaky(beta=torch.full((8,), 0.8), threshold=torch.full((8,), 1.0), linear_features=8,
                        init_hidden=True, reset_mechanism="zero", reset_delay=False)
    rsyn = snn.RSynaptic(alpha=torch.full((6,), 0.6), beta=torch.full((6,), 0.8), threshold=torch.full((6,), 1.0),
                         linear_features=6, init_hidden=True, reset_mechanism="zero")
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), rleaky, torch.nn.Linear(8, 6), rsyn, torch.nn.Linear(6, 3))
    with torch.no_grad():
        net[0].weight.mul_(3)
        rleaky.recurrent.weight.mul_(2)
        rsyn.recurrent.weight.mul_(0.5)
    graph = export_snn(net, torch.rand(5))
    assert {("1.lif", "1.w_rec"), ("1.w_rec", "1.lif"), ("3.lif", "3.w_rec")} <= set(graph.edges)
    write_nir(tmp_path / "rnn.nir", graph)
    imp = import_nir(tmp_path / "rnn.nir", dt=SNN_DT, T=10)
    g = imp.graph
    assert [e for e in g.edges if e.delay] == [e for e in g.edges if e.dst in ("1_rec", "3_rec")]
    assert {e.src for e in g.edges if e.delay} == {"1", "3"} and g["1"].op == Op.LIF and g["3_in"].op == Op.ADD
    assert imp.readout is None  # the top neuron is recurrent: it stays a layer

    x = torch.rand(10, 96, 5) * 1.5
    np.savez(tmp_path / "x.npz", x=x.numpy())
    code, _, err = cli("run", tmp_path / "rnn.nir", "--dt", SNN_DT, "--input", tmp_path / "x.npz",
                       "-o", tmp_path / "out.npz")
    assert code == 0, err
    run = np.load(tmp_path / "out.npz")
    sim = simulate(g, imp.params, imp.state, x)
    assert np.array_equal(run["spikes.1"], sim.spikes["1"].numpy())

    with torch.no_grad():
        s1 = run_modules(net, x, [1])[1]
        s3 = rsynaptic_reference(rsyn, torch.stack([net[2](s) for s in s1]), 0.6, 0.8, 1.0)
    ok = away((sim.membranes["1"], 1.0), (sim.membranes["3"], 1.0))
    for name, theirs in (("1", s1), ("3", s3)):
        lively(sim.spikes[name], name)
        assert torch.equal(sim.spikes[name][:, ok].float(), theirs[:, ok]), f"layer {name} differs"


def test_snntorch_import_rewires_a_flat_loop_but_runs_a_subgraph_as_written():
    """Why the recurrent comparisons above use snnTorch's modules, and why export writes a subgraph: snnTorch 1.0's
    import_from_nir wraps a top-level loop neuron <-> w_rec into a subgraph whose Input feeds w_rec, not the neuron,
    so it computes lif(w_rec(x + s[t-1])). If this fails, snnTorch fixed its import: compare against it too."""
    from snntorch.import_nir import import_from_nir

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), snn.RLeaky(beta=torch.full((4,), 0.8), linear_features=4,
                                                                init_hidden=True))
    layer = quiet(import_from_nir, export_snn(net, torch.rand(3))).get_submodule("1")
    call = next(n for n in layer.graph.nodes if n.op == "call_module" and n.target == "1_w_rec")
    summed = call.args[0]
    assert summed.target is torch.add and any(getattr(a, "op", None) == "placeholder" for a in summed.args)


def test_snntorch_reads_our_recurrent_and_current_based_layers():
    """The other direction: a recurrent LIF layer, a recurrent cuba_lif layer and a cuba_lif layer exported by
    bsdgraph (at snnTorch's dt) run in snnTorch's import_from_nir to the same output current. Fails if export writes
    the loop in a form snnTorch rewires, or a CubaLIF whose r it refuses (it wants r = tau_mem/dt)."""
    from snntorch.import_nir import import_from_nir

    g = GraphBuilder("rnn", T=10, dt=SNN_DT)
    h = g.recurrent_lif(g.linear(g.input((5,)), 8), tau=3.0, v_th=0.3)
    h = g.recurrent_neuron("cuba_lif", g.linear(h, 7), tau=3.0, tau_syn=2.0, v_th=0.3)
    h = g.neuron("cuba_lif", g.linear(h, 6), tau=2.0, tau_syn=1.5, v_th=0.3)
    g.output(g.linear(h, 3))
    g = g.build()
    params = {k: v * 3 for k, v in init_params(g, 0).items()}
    # in memory: nir.read lists nodes alphabetically, and nirtorch 2.6 then fails on a subgraph whose input comes
    # later in that order ("'GraphModule' object has no attribute 'items'"; docs/nir.md)
    peer = quiet(import_from_nir, export_nir(g, params))
    x = torch.rand(10, 48, 5)
    state, out = None, []
    with torch.no_grad():
        for x_t in x:
            y, state = peer(x_t, state)
            out.append(y)
    sim = simulate(g, params, {}, x)
    for name in ("h1", "h2", "h3"):
        lively(sim.spikes[name], name)
    # equal spikes make equal currents; 1e-6 allows the peer's threshold rescaling (v_th·τ·τs instead of 1/τ)
    assert torch.allclose(torch.stack(out), sim.current, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- NIR equations


def if_euler(current, r, thr, v_reset, dt):
    """NIR's IF, dv/dt = r I, Forward Euler in float64: spike when v > thr, then v = v_reset."""
    v, spikes, pre = np.zeros(current.shape[1:]), [], []
    for i_t in current:
        v = v + dt * r * i_t
        s = v > thr
        spikes.append(s)
        pre.append(v.copy())
        v = np.where(s, v_reset, v)
    return np.stack(spikes).astype(np.float64), np.stack(pre)


def sum_pool(x, k):
    """[T, B, C, H, W] -> sums over k x k windows (stride k)."""
    T, B, C, H, W = x.shape
    return x.reshape(T, B, C, H // k, k, W // k, k).sum(axis=(4, 6))


def conv(x, w, b, pad):
    y = F.conv2d(torch.from_numpy(x.reshape(-1, *x.shape[2:])), torch.from_numpy(w), torch.from_numpy(b), 1, pad)
    return y.numpy().reshape(*x.shape[:2], *y.shape[1:])


def test_sinabs_shaped_if_cnn_matches_nir_euler():
    """Sinabs writes IF (r = 1, v_reset = 0) and SumPool2d without a Threshold: Conv2d -> IF -> SumPool2d ->
    Conv2d -> IF -> SumPool2d -> Flatten -> Affine -> IF. Sinabs steps an IF as v += I (its dt is a step), so the
    file imports at dt = 1. Fails if a sum pool's window size is lost or taken twice, or a flatten drops it."""
    rng = np.random.default_rng(3)
    w1, b1 = rng.normal(0, 0.6, (4, 1, 3, 3)), rng.normal(0, 0.1, 4)
    w2, b2 = rng.normal(0, 0.35, (4, 4, 3, 3)), np.zeros(4)
    wa, ba = rng.normal(0, 0.4, (5, 16)), rng.normal(0, 0.1, 5)

    def iaf(shape):
        return nir.IF(r=full(shape, 1.0), v_threshold=full(shape, 1.0))

    nodes = {"input": nir.Input(input_type={"input": np.array([1, 8, 8])}),
             "0": nir.Conv2d(input_shape=None, weight=w1, stride=1, padding=1, dilation=1, groups=1, bias=b1),
             "1": iaf((4, 8, 8)), "2": nir.SumPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]),
                                                     padding=np.array([0, 0])),
             "3": nir.Conv2d(input_shape=None, weight=w2, stride=1, padding=1, dilation=1, groups=1, bias=b2),
             "4": iaf((4, 4, 4)), "5": nir.SumPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]),
                                                     padding=np.array([0, 0])),
             "6": nir.Flatten(input_type={"input": np.array([4, 2, 2])}, start_dim=0, end_dim=-1),
             "7": nir.Affine(wa, ba), "8": iaf((5,)), "output": nir.Output(output_type={"output": np.array([5])})}
    names = list(nodes)
    graph = nir.NIRGraph(nodes=nodes, edges=list(zip(names, names[1:])), type_check=False)
    imp = import_nir(graph, dt=1.0, T=8)
    g = imp.graph
    assert g["2"].op == g["5"].op == Op.AVGPOOL2D and g["1"].attrs["model"] == "if" and imp.readout["name"] == "8"
    assert torch.allclose(imp.params["3.weight"], torch.tensor(w2 * 4, dtype=torch.float32))  # 2x2 window
    assert torch.allclose(imp.params["7.weight"], torch.tensor(wa * 4, dtype=torch.float32))  # through Flatten

    x = rng.uniform(0, 1, (8, 64, 1, 8, 8))
    s1, v1 = if_euler(conv(x, w1, b1, 1), 1.0, 1.0, 0.0, 1.0)
    s4, v4 = if_euler(conv(sum_pool(s1, 2), w2, b2, 1), 1.0, 1.0, 0.0, 1.0)
    s8, v8 = if_euler(sum_pool(s4, 2).reshape(8, 64, -1) @ wa.T + ba, 1.0, 1.0, 0.0, 1.0)
    sim = simulate(g, imp.params, imp.state, torch.tensor(x, dtype=torch.float32), imp.readout)
    ok = away((v1, 1.0), (v4, 1.0), (v8, 1.0))
    for name, ref in (("1", s1), ("4", s4), ("8", s8)):
        lively(ref, name)
        assert np.array_equal(sim.spikes[name].numpy()[:, ok], ref[:, ok]), f"IF {name} differs"


def test_if_folds_dt_times_r_into_its_synapse():
    """An IF at dt != 1 with r != 1 integrates dt·r·I per step. Fails if either factor is dropped."""
    rng = np.random.default_rng(4)
    w = rng.normal(0, 1.0, (6, 4))
    r = rng.uniform(0.5, 2.0, 6)
    nodes = {"in": nir.Input(input_type={"input": np.array([4])}), "a": nir.Linear(w),
             "if": nir.IF(r=r, v_threshold=full(6, 0.8), v_reset=full(6, -0.2)),
             "b": nir.Linear(rng.normal(0, 1, (3, 6))), "out": nir.Output(output_type={"output": np.array([3])})}
    imp = import_nir(nir.NIRGraph(nodes=nodes, edges=[("in", "a"), ("a", "if"), ("if", "b"), ("b", "out")],
                                  type_check=False), dt=0.25, T=12)
    assert imp.graph["if"].attrs["params"] == {"v_th": 0.8, "v_reset": -0.2} and not imp.graph["a"].attrs["bias"]
    x = rng.uniform(0, 2, (12, 128, 4))
    ref, pre = if_euler(x @ w.T, r, 0.8, -0.2, 0.25)
    sim = simulate(imp.graph, imp.params, imp.state, torch.tensor(x, dtype=torch.float32))
    ok = away((pre, 0.8))
    lively(ref, "if")
    assert np.array_equal(sim.spikes["if"].numpy()[:, ok], ref[:, ok])


def norse_graph(rng, with_subgraph=True):
    """Affine -> a CubaLIF with an Affine w_rec looping back, inside a subgraph "rnn" (the form Norse and snnTorch's
    import use) -> Affine -> LI, the readout Norse networks end with. r = w_in = 1 as Norse writes them; v_leak != 0."""
    p = dict(ff=(rng.normal(0, 1.2, (6, 5)), rng.normal(0, 0.2, 6)), rec=(rng.normal(0, 0.6, (6, 6)),
                                                                          rng.normal(0, 0.2, 6)),
             out=(rng.normal(0, 0.5, (3, 6)), rng.normal(0, 0.1, 3)))
    cuba = nir.CubaLIF(tau_syn=full(6, 2e-3), tau_mem=full(6, 4e-3), r=full(6, 1.5), v_leak=full(6, 0.1),
                       v_threshold=full(6, 0.5), v_reset=full(6, 0.0), w_in=full(6, 1.0))
    li = nir.LI(tau=full(3, 3e-3), r=full(3, 1.0), v_leak=full(3, 0.0))
    rnn = {"input": nir.Input(input_type={"input": np.array([6])}), "lif": cuba, "w_rec": nir.Affine(*p["rec"]),
           "output": nir.Output(output_type={"output": np.array([6])})}
    inner = [("input", "lif"), ("lif", "w_rec"), ("w_rec", "lif"), ("lif", "output")]
    outer = {"in": nir.Input(input_type={"input": np.array([5])}), "ff": nir.Affine(*p["ff"]),
             "read": nir.Affine(*p["out"]), "li": li, "out": nir.Output(output_type={"output": np.array([3])})}
    if with_subgraph:
        nodes = {**outer, "rnn": nir.NIRGraph(nodes=rnn, edges=inner, type_check=False)}
        edges = [("in", "ff"), ("ff", "rnn"), ("rnn", "read"), ("read", "li"), ("li", "out")]
    else:
        nodes = {**outer, "lif": cuba, "w_rec": rnn["w_rec"]}
        edges = [("in", "ff"), ("ff", "lif"), ("lif", "w_rec"), ("w_rec", "lif"), ("lif", "read"), ("read", "li"),
                 ("li", "out")]
    return nir.NIRGraph(nodes=nodes, edges=edges, type_check=False), p, cuba, li


def norse_euler(x, p, cuba, li, dt):
    """The NIR equations in float64: the CubaLIF current first, then the membrane reading it; the loop carries
    w_rec's response to the previous step's spikes (zero spikes before the first step: w_rec(0) = its bias)."""
    n = p["ff"][0].shape[0]
    i = v = s = np.zeros((x.shape[1], n))
    u = np.zeros((x.shape[1], 3))
    spikes, pre, out = [], [], []
    for x_t in x:
        inp = x_t @ p["ff"][0].T + p["ff"][1] + s @ p["rec"][0].T + p["rec"][1]
        i = i + dt / cuba.tau_syn * (cuba.w_in * inp - i)
        v = v + dt / cuba.tau_mem * (cuba.v_leak - v + cuba.r * i)
        s = (v > cuba.v_threshold).astype(np.float64)
        spikes.append(s)
        pre.append(v.copy())
        v = np.where(s > 0, cuba.v_reset, v)
        u = u + dt / li.tau * (li.v_leak - u + li.r * (s @ p["out"][0].T + p["out"][1]))
        out.append(u)
    return np.stack(spikes), np.stack(pre), np.stack(out)


@pytest.mark.parametrize("form", ["subgraph", "flat loop"])
def test_norse_shaped_recurrent_cubalif_with_li_readout_matches_nir_euler(form):
    """Fails if the loop contract (one-step delay, w_rec's bias from the first step), the r·w_in fold on both the
    feedforward and the recurrent weight, v_leak, or the LI readout is wrong, or if a subgraph is not inlined."""
    rng = np.random.default_rng(5)
    graph, p, cuba, li = norse_graph(rng, with_subgraph=form == "subgraph")
    imp = import_nir(graph, dt=1e-3, T=12)
    layer = "rnn" if form == "subgraph" else "lif"  # a one-layer subgraph names the layer
    g = imp.graph
    assert g[layer].attrs == {"model": "cuba_lif", "params": {"tau_syn": 2.0, "tau": 4.0, "v_leak": 0.1,
                                                                "v_th": 0.5, "v_reset": 0.0},
                              "surrogate": "atan", "alpha": 2.0}
    assert g[f"{layer}_rec"].op == Op.LINEAR and not g[f"{layer}_rec"].attrs["bias"]
    assert imp.readout == {"name": "li", "model": "li", "params": {"tau": 3.0, "v_leak": 0.0}}
    x = rng.uniform(0, 1.5, (12, 128, 5))
    ref_s, ref_v, ref_u = norse_euler(x, p, cuba, li, 1e-3)
    sim = simulate(g, imp.params, imp.state, torch.tensor(x, dtype=torch.float32), imp.readout)
    ok = away((ref_v, 0.5))
    lively(ref_s, layer)
    assert np.array_equal(sim.spikes[layer].numpy()[:, ok], ref_s[:, ok])
    assert np.allclose(sim.readout.numpy()[:, ok], ref_u[:, ok], atol=1e-5)
    # the readout goes back where it was: Affine -> LI -> Output
    again = export_nir(g, imp.params, readout=imp.readout)
    assert ("read", "li") in again.edges and ("li", "out") in again.edges and type(again.nodes["li"]).__name__ == "LI"


def test_nested_subgraphs_are_inlined_with_joined_names():
    """Affine -> LIF -> Affine, the last two wrapped in a subgraph "blk" that wraps the LIF in a subgraph "inner":
    the same network as the flat one, nodes named blk.a and blk.inner.l. Fails if a subgraph's Input or Output
    drops or doubles a connection, or if names are not joined level by level."""
    rng = np.random.default_rng(7)
    w1, w2, w3 = rng.normal(0, 1, (6, 4)), rng.normal(0.3, 1, (5, 6)), rng.normal(0, 1, (3, 5))
    lif = _lif(5, tau=full(5, 3e-3), v_threshold=full(5, 0.5))

    ports = {"i": nir.Input(input_type={"input": np.array([5])}),
             "o": nir.Output(output_type={"output": np.array([5])})}
    inner = nir.NIRGraph(nodes={**ports, "l": lif}, edges=[("i", "l"), ("l", "o")], type_check=False)
    blk = nir.NIRGraph(nodes={"i": nir.Input(input_type={"input": np.array([6])}), "a": nir.Linear(w2), "inner": inner,
                              "o": nir.Output(output_type={"output": np.array([5])})},
                       edges=[("i", "a"), ("a", "inner"), ("inner", "o")], type_check=False)
    ends = {"in": nir.Input(input_type={"input": np.array([4])}), "l0": _lif(6, v_threshold=full(6, 0.5)),
            "f": nir.Linear(w1), "z": nir.Linear(w3), "out": nir.Output(output_type={"output": np.array([3])})}
    nested = nir.NIRGraph(nodes={**ends, "blk": blk}, edges=[("in", "f"), ("f", "l0"), ("l0", "blk"), ("blk", "z"),
                                                            ("z", "out")], type_check=False)
    flat = nir.NIRGraph(nodes={**ends, "a": nir.Linear(w2), "l": lif},
                        edges=[("in", "f"), ("f", "l0"), ("l0", "a"), ("a", "l"), ("l", "z"), ("z", "out")],
                        type_check=False)
    a, b = import_nir(nested, dt=1e-3, T=6), import_nir(flat, dt=1e-3, T=6)
    assert [n.name for n in a.graph.nodes] == ["in", "f", "l0", "blk.a", "blk.inner.l", "z", "out"]
    # a fixed draw (l fires 4.0 %): an unseeded one depends on which tests ran before in the process, and gave 1.9 %
    x = torch.rand(6, 32, 4, generator=torch.Generator().manual_seed(1)) * 2
    sa, sb = simulate(a.graph, a.params, a.state, x), simulate(b.graph, b.params, b.state, x)
    assert torch.equal(sa.current, sb.current) and torch.equal(sa.spikes["blk.inner.l"], sb.spikes["l"])
    lively(sb.spikes["l"].float(), "l")


def test_scale_is_folded_into_the_synapse_after_or_before_it():
    """Input -> Scale -> Affine -> Scale -> LIF -> Affine -> Threshold: the first Scale multiplies the Affine's
    columns, the second its rows, and the Threshold is a neuron without memory. Fails if a Scale is dropped or
    applied on the wrong side, or if the Threshold keeps a membrane."""
    rng = np.random.default_rng(6)
    s_in, s_out = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 6)
    w1, b1, w2 = rng.normal(0, 0.8, (6, 4)), rng.normal(0, 0.2, 6), rng.normal(0, 1, (3, 6))
    lif = nir.LIF(tau=full(6, 2.0), r=full(6, 1.0), v_leak=full(6, 0.0), v_threshold=full(6, 0.5),
                  v_reset=full(6, 0.0))
    nodes = {"in": nir.Input(input_type={"input": np.array([4])}), "s1": nir.Scale(s_in), "a": nir.Affine(w1, b1),
             "s2": nir.Scale(s_out), "lif": lif, "b": nir.Linear(w2), "thr": nir.Threshold(full(3, 0.7)),
             "c": nir.Linear(np.eye(3)), "out": nir.Output(output_type={"output": np.array([3])})}
    names = list(nodes)
    imp = import_nir(nir.NIRGraph(nodes=nodes, edges=list(zip(names, names[1:])), type_check=False), dt=1.0, T=8)
    assert "s1" not in imp.graph and "s2" not in imp.graph and imp.graph["thr"].attrs["tau"] == 1.0
    x = rng.uniform(0, 1, (8, 128, 4))
    from tests.test_nir import nir_lif_euler

    s, pre = nir_lif_euler(lif, s_out * ((s_in * x) @ w1.T + b1), 1.0)
    z = s @ w2.T
    sim = simulate(imp.graph, imp.params, imp.state, torch.tensor(x, dtype=torch.float32))
    ok = away((pre, 0.5), (z, 0.7))
    lively(s, "lif")
    assert np.array_equal(sim.spikes["lif"].numpy()[:, ok], s[:, ok])
    assert np.array_equal(sim.spikes["thr"].numpy()[:, ok], (z > 0.7)[:, ok])


# ---------------------------------------------------------------------------------------------------- round trips


NEURONS = {"if": dict(v_th=0.5), "li": dict(tau=3.0), "lif": dict(tau=3.0, v_th=0.4, v_reset=-0.1),
           "cuba_lif": dict(tau_syn=1.5, tau=3.0, v_leak=0.05, v_th=0.3), "cuba_li": dict(tau_syn=2.0, v_leak=0.1)}


@pytest.mark.parametrize("recurrent", [False, True], ids=["feedforward", "recurrent"])
@pytest.mark.parametrize("model", sorted(NEURONS))
def test_every_builtin_neuron_round_trips_through_a_file(tmp_path, model, recurrent):
    """bsdgraph -> NIR file -> bsdgraph gives the same graph (neuron nodes with the parameters the model gave, the
    lif declaration as a neuron node, not the lif op), the same weights bit for bit and the same simulation. Fails
    if a mapping is not the inverse of its import, or a recurrent layer comes back with other nodes or edges."""
    g = GraphBuilder("m", T=6, dt=1e-3)
    h = g.linear(g.input((5,)), 7)
    h = (g.recurrent_neuron if recurrent else g.neuron)(model, h, alpha=3.0, **NEURONS[model])
    h = g.neuron("cuba_lif", g.linear(h, 6), tau=2.0)
    g.output(g.linear(h, 3))
    g = g.build()
    params = {k: v * 2 for k, v in init_params(g, 0).items()}
    write_nir(tmp_path / "m.nir", export_nir(g, params))
    imp = import_nir(tmp_path / "m.nir")
    assert imp.graph == g and imp.readout is None and not imp.notes
    assert imp.params.keys() == params.keys() and all(torch.equal(imp.params[k], params[k]) for k in params)
    x = torch.rand(6, 16, 5, generator=torch.Generator().manual_seed(2)) * 2
    a, b = simulate(g, params, {}, x), simulate(imp.graph, imp.params, imp.state, x)
    assert torch.equal(a.current, b.current) and a.spikes.keys() == b.spikes.keys()
    assert all(torch.equal(a.spikes[k], b.spikes[k]) for k in a.spikes)
    assert a.spikes["h2"].any()


@given(rnn_graphs())
@settings(max_examples=15, deadline=None)
def test_any_recurrent_graph_round_trips_and_soft_reset_is_refused_by_name(g):
    soft = sorted(n.name for n in g.by_op(Op.LIF) if n.attrs["reset"] == "soft")
    params = init_params(g, 0)
    if soft:
        with pytest.raises(GraphError) as err:
            export_nir(g, params)
        assert sorted(d.node for d in err.value.diagnostics) == soft
        assert all("reset='soft'" in d.message for d in err.value.diagnostics)
        g = set_attrs(g, Op.LIF, reset="hard")
    imp = import_nir(export_nir(g, params))
    assert imp.graph == g
    x = torch.rand(3, *g.by_op(Op.INPUT)[0].shape)
    assert torch.equal(simulate(g, params, {}, x).current, simulate(imp.graph, imp.params, imp.state, x).current)


def test_backward_export_of_a_recurrent_model_names_the_terms_of_its_sums():
    """B of a recurrent model has recurrent layers too: written as subgraphs, and a loss that compares a layer's sum
    points at the two NIR nodes NIR adds (no node holds the sum). Fails if B's layers are refused or b_nir lies."""
    import json

    from bsdgraph import derive_feedback
    from bsdgraph.interop.nir_export import export_backward

    g = GraphBuilder("m", T=4)
    h = g.recurrent_lif(g.linear(g.input((3,)), 6))
    g.output(g.linear(g.lif(g.linear(h, 5)), 2))
    bsd = derive_feedback(g.build())
    graph = export_backward(bsd, init_params(bsd, 0))
    assert type(graph.nodes["h1_b"]).__name__ == "NIRGraph"
    rows = {row["b_side"]: row for row in json.loads(graph.metadata["pairing"])}
    assert rows["h1_in_b"]["b_nir"] is None and rows["h1_in_b"]["b_sum"] == ["fc2_b", "h1_b.w_rec"]


def test_import_nir_writes_a_model_file_for_neurons_and_recurrent_layers(cli, tmp_path):
    """The model file import-nir writes rebuilds declared neurons (their params) and a recurrent layer (its rec
    synapse added before the neurons it reads, then its delay-1 edge), equal to the exported graph."""
    from bsdgraph.compiler.model_file import load_model

    g = GraphBuilder("m", T=4, dt=1e-3)
    h = g.recurrent_neuron("cuba_lif", g.linear(g.input((4,)), 5), tau=3.0)
    g.output(g.linear(g.neuron("if", g.linear(h, 4)), 3))
    g = g.build()
    write_nir(tmp_path / "m.nir", export_nir(g, init_params(g, 0)))
    code, _, err = cli("import-nir", tmp_path / "m.nir", "-o", tmp_path / "m.py")
    assert code == 0, err
    assert load_model(tmp_path / "m.py").graph == g


# ---------------------------------------------------------------------------------------------------- refusals


declare_neuron("nir_test_quadratic", params={"tau": 2.0, "v_th": 1.0}, states=["v"],
               update={"v": "v + (v * v + x) / tau"}, spike="v >= v_th", reset={"v": "v * (1 - s)"})


@pytest.mark.parametrize("model, pattern", [
    ("alif", r"node 'h1' \(neuron\): NIR 1.0 has no adaptive-threshold neuron"),
    ("lif_soft", r"node 'h1' \(neuron\): reset='soft' \(v = h - v_th·s\) cannot be expressed by NIR's LIF"),
    ("nir_test_quadratic", r"node 'h1' \(neuron\): uses the neuron 'nir_test_quadratic' declared by its model file; "
                           r"NIR has a fixed set of neuron types.* -- fix: export a model built from NIR's neurons: "
                           r"cuba_li, cuba_lif, if, li, lif"),
])
def test_export_refuses_neurons_nir_cannot_express(model, pattern):
    g = GraphBuilder("m", T=2)
    g.output(g.linear(g.recurrent_neuron(model, g.linear(g.input((4,)), 5)), 3))
    g = g.build()
    with pytest.raises(GraphError, match=pattern):
        export_nir(g, init_params(g, 0))


def test_a_sum_of_currents_travels_as_a_scale_of_ones_and_round_trips():
    g = GraphBuilder("m", T=2)
    x = g.input((4,))
    total = g.sum(g.linear(x, 5), g.linear(x, 5), name="sum")
    g.output(g.linear(g.lif(total, v_th=0.1), 3))
    g = g.build()
    params = init_params(g, 0)
    ng = export_nir(g, params)
    # NIR sums a node's incoming edges: the sum is a Scale of ones reading both synapses
    assert type(ng.nodes["sum"]).__name__ == "Scale" and np.all(np.asarray(ng.nodes["sum"].scale) == 1.0)
    assert sorted(a for a, b in ng.edges if b == "sum") == ["fc1", "fc2"]
    imp = import_nir(ng)
    assert imp.graph == g
    x = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(0)) * 2
    a, b = simulate(g, params, {}, x), simulate(imp.graph, imp.params, imp.state, x)
    assert torch.equal(a.current, b.current) and a.spikes["h1"].any()


def test_a_scale_summing_inputs_by_other_than_one_is_refused_by_name():
    graph = _chain(_dense(3, 4), _lif(3), nir.Scale(full(3, 2.0)), _dense(),
                   extra_edges=[("n0", "n2")])  # n2 sums the neurons and the synapse before them, then doubles
    with pytest.raises(GraphError, match=r"node 'n2': \(NIR Scale\) sums several inputs and scales the sum"):
        import_nir(graph, dt=1e-3)


def _lif(n, **kw):
    p = dict(tau=full(n, 2e-3), r=full(n, 1.0), v_leak=full(n, 0.0), v_threshold=full(n, 1.0), v_reset=full(n, 0.0))
    return nir.LIF(**{**p, **kw})


def _chain(*nodes, extra_edges=()):
    """in [4] -> nodes (named n0, n1, ...) -> out, the last node a synapse whose rows give the output's width."""
    named = {"in": nir.Input(input_type={"input": np.array([4])}), **{f"n{i}": v for i, v in enumerate(nodes)}}
    named["out"] = nir.Output(output_type={"output": np.array([np.asarray(nodes[-1].weight).shape[0]])})
    names = list(named)
    return nir.NIRGraph(nodes=named, edges=list(zip(names, names[1:])) + list(extra_edges), type_check=False)


def _dense(rows=3, cols=3):
    return nir.Linear(np.ones((rows, cols)))


def _nested_conv_loop():
    nodes = {"in": nir.Input(input_type={"input": np.array([1, 3, 3])}),
             "n0": nir.Conv2d(input_shape=(3, 3), weight=np.ones((2, 1, 1, 1)), stride=1, padding=0, dilation=1,
                              groups=1, bias=np.zeros(2)),
             "n1": _lif((2, 3, 3)), "w": nir.Affine(np.ones((2, 2)), np.zeros(2)),
             "f": nir.Flatten(input_type={"input": np.array([2, 3, 3])}, start_dim=0),
             "out": nir.Output(output_type={"output": np.array([18])})}
    return nir.NIRGraph(nodes=nodes, edges=[("in", "n0"), ("n0", "n1"), ("n1", "w"), ("w", "n1"), ("n1", "f"),
                                            ("f", "out")], type_check=False)


def _bias_loop_on_input():
    nodes = {"in": nir.Input(input_type={"input": np.array([4])}), "n0": _lif(4),
             "w": nir.Affine(np.eye(4), full(4, 0.5)), "n1": nir.Linear(np.ones((3, 4))),
             "out": nir.Output(output_type={"output": np.array([3])})}
    return nir.NIRGraph(nodes=nodes, edges=[("in", "n0"), ("n0", "w"), ("w", "n0"), ("n0", "n1"), ("n1", "out")],
                        type_check=False)


def _if_after_batchnorm():
    from bsdgraph.interop.nir import META

    bn = nir.Affine(np.eye(4), np.zeros(4), metadata={META: dict(op="batchnorm", weight=np.ones(4), bias=np.zeros(4),
                                                                 running_mean=np.zeros(4), running_var=np.ones(4),
                                                                 eps=0.0)})
    return _chain(bn, nir.IF(r=full(4, 1.0), v_threshold=full(4, 1.0)), nir.Linear(np.ones((3, 4))))


def _sumpool_into_lif():
    nodes = {"in": nir.Input(input_type={"input": np.array([1, 4, 4])}),
             "n0": nir.SumPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]), padding=np.array([0, 0])),
             "n1": _lif((1, 2, 2)), "f": nir.Flatten(input_type={"input": np.array([1, 2, 2])}, start_dim=0),
             "a": nir.Linear(np.ones((3, 4))), "out": nir.Output(output_type={"output": np.array([3])})}
    names = list(nodes)
    return nir.NIRGraph(nodes=nodes, edges=list(zip(names, names[1:])), type_check=False)


def _scale_before_conv():
    s = np.ones((1, 4, 4))
    s[0, 0, 0] = 2.0
    nodes = {"in": nir.Input(input_type={"input": np.array([1, 4, 4])}), "n0": nir.Scale(s),
             "n1": nir.Conv2d(input_shape=(4, 4), weight=np.ones((2, 1, 3, 3)), stride=1, padding=1, dilation=1,
                              groups=1, bias=np.zeros(2)),
             "f": nir.Flatten(input_type={"input": np.array([2, 4, 4])}, start_dim=0),
             "a": nir.Linear(np.ones((3, 32))), "out": nir.Output(output_type={"output": np.array([3])})}
    names = list(nodes)
    return nir.NIRGraph(nodes=nodes, edges=list(zip(names, names[1:])), type_check=False)


def _two_input_subgraph():
    nodes = {"i1": nir.Input(input_type={"input": np.array([4])}), "i2": nir.Input(input_type={"input": np.array([4])}),
             "a": _dense(3, 4), "o": nir.Output(output_type={"output": np.array([3])})}
    inner = nir.NIRGraph(nodes=nodes, edges=[("i1", "a"), ("i2", "a"), ("a", "o")], type_check=False)
    return _chain(inner, _dense())


def _name_clash():
    inner = nir.NIRGraph(nodes={"i": nir.Input(input_type={"input": np.array([4])}), "a": _dense(3, 4),
                                "o": nir.Output(output_type={"output": np.array([3])})},
                         edges=[("i", "a"), ("a", "o")], type_check=False)
    graph = _chain(inner, _dense())
    graph.nodes["n0.a"] = _dense()
    return graph


def _conv1d():
    nodes = {"in": nir.Input(input_type={"input": np.array([1, 6])}),
             "n0": nir.Conv1d(input_shape=6, weight=np.ones((2, 1, 3)), stride=1, padding=0, dilation=1, groups=1,
                              bias=np.zeros(2)),
             "f": nir.Flatten(input_type={"input": np.array([2, 4])}, start_dim=0),
             "a": nir.Linear(np.ones((3, 8))), "out": nir.Output(output_type={"output": np.array([3])})}
    names = list(nodes)
    return nir.NIRGraph(nodes=nodes, edges=list(zip(names, names[1:])), type_check=False)


REFUSED = {  # case -> (the graph, the diagnostic it must give)
    "two inputs summed": (
        lambda: _chain(nir.Affine(np.ones((3, 4)), np.zeros(3)), _lif(3), _dense(), extra_edges=[("in", "n1")]),
        r"node 'n1': \(LIF\) has 2 incoming edges \('n0', 'in'\), which NIR sums; bsdgraph reads a sum of several "
        r"inputs as a Scale of ones"),
    "loop through two synapses": (
        lambda: _chain(_dense(3, 4), _lif(3), _dense(), _dense(), extra_edges=[("n3", "n1")]),
        r"is on a recurrent loop (n\d -> ){3}n\d that is not a recurrent layer -- fix: a loop bsdgraph imports is "
        r"neuron -> Affine/Linear -> the same neuron"),
    "recurrent layer not flat": (
        _nested_conv_loop,
        r"node 'n1': \(NIR LIF\) its recurrent synapse 'w' has weight \[2, 2\] and bias \[2\] but the layer is "
        r"\[2, 3, 3\]"),
    "recurrent bias without synapse": (
        _bias_loop_on_input,
        r"node 'n0': \(NIR LIF\) has a recurrent synapse with a bias, which import folds into the synapse feeding the "
        r"neuron; 'in' \(input\) cannot take it"),
    "IF after batchnorm": (
        _if_after_batchnorm,
        r"node 'n1': \(NIR IF\) has dt·r != 1 \(Euler's step adds dt·r·I\), which import folds into the synapse "
        r"feeding the neuron; 'n0' \(batchnorm\) cannot take it"),
    "sum pool into a neuron": (
        _sumpool_into_lif, r"node 'n1': \(NIR LIF\) reads 'n0', which carries the window size of a SumPool2d"),
    "scale with no synapse": (
        lambda: _chain(nir.Scale(full(4, 2.0)), _lif(4), _dense(3, 4)),
        r"node 'n0': \(NIR Scale\) scales 'in' \(Input\) elementwise, and bsdgraph has no such op"),
    "scale varying in a channel": (
        _scale_before_conv, r"node 'n1': \(NIR Conv2d\) the Scale before it varies within a channel"),
    "threshold at zero": (
        lambda: _chain(_dense(3, 4), nir.Threshold(full(3, 0.0)), _dense()),
        r"node 'n1': \(NIR Threshold\) threshold 0 is not above 0"),
    "threshold below reset": (
        lambda: _chain(_dense(3, 4), nir.IF(r=full(3, 1.0), v_threshold=full(3, -0.5)), _dense()),
        r"node 'n1': \(NIR IF\) v_threshold -0.5 must be above v_reset 0"),
    "v_leak per neuron": (
        lambda: _chain(_dense(3, 4), nir.CubaLI(tau_syn=full(3, 1e-3), tau_mem=full(3, 1e-3), r=full(3, 1.0),
                                                v_leak=np.array([0.0, 0.1, 0.2])), _dense()),
        r"node 'n1': \(NIR CubaLI\) v_leak varies across neurons \(0 .. 0.2\); bsdgraph has one v_leak per layer"),
    "metadata names another neuron": (
        lambda: _chain(_dense(3, 4), _lif(3, metadata={"bsdgraph": {"op": "neuron", "model": "li"}}), _dense()),
        r"node 'n1': \(NIR LIF\) its metadata names the neuron 'li', but a NIR LIF maps to 'lif'"),
    "subgraph with two inputs": (
        _two_input_subgraph, r"node 'n0': \(NIR NIRGraph\) is a subgraph with 2 Input and 1 Output nodes"),
    "flattened name taken": (
        _name_clash,
        r"node 'n0.a': \(NIR Linear\) node 'a' of subgraph 'n0' would be named 'n0.a', the name of another node"),
    "integrator": (
        lambda: _chain(_dense(3, 4), nir.I(r=full(3, 1.0)), _dense()),
        r"node 'n1': \(NIR I\) bsdgraph has no integrator without leak or spikes"),
    "delay": (
        lambda: _chain(_dense(3, 4), nir.Delay(full(3, 1.0)), _dense()),
        r"node 'n1': \(NIR Delay\) bsdgraph has no delay node"),
    "conv1d": (_conv1d, r"node 'n0': \(NIR Conv1d\) bsdgraph has no 1-d convolution"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_import_refuses_what_it_cannot_map_naming_node_reason_and_fix(cli, tmp_path, case):
    make, pattern = REFUSED[case]
    graph = make()
    with pytest.raises(GraphError, match=pattern) as err:
        import_nir(graph, dt=1e-3)
    assert all(d.hint for d in err.value.diagnostics), "every refusal says what to do instead"
    path = tmp_path / "bad.nir"
    nir.write(path, graph)
    code, out, err_text = cli("import-nir", path, "--dt", "1e-3")
    assert code == 1 and out == "" and "Traceback" not in err_text


def test_export_refuses_a_recurrent_conv_layer_naming_the_loop_and_its_sum():
    g = GraphBuilder("cr", T=2)
    h = g.recurrent_lif(g.conv2d(g.input((1, 5, 5)), 2, kernel=3, padding=1))
    g.output(g.linear(g.flatten(g.lif(g.conv2d(h, 2, kernel=3))), 3))
    g = g.build()
    with pytest.raises(GraphError) as err:
        export_nir(g, init_params(g, 0))
    assert sorted(d.node for d in err.value.diagnostics) == ["h1_in", "h1_rec"]
    assert all("recurrent convolution" in d.message for d in err.value.diagnostics)
