"""The spec's five criteria C1-C5, checked on the fast backends (cpu and triton) by instrumenting the executor."""

import pytest
import torch

from bsdgraph import BSDConfig, GraphBuilder, Op, Stream, derive_feedback
from bsdgraph.compiler.feedback import local_params
from bsdgraph.ir.graph import GroupOp
from bsdgraph.compiler.plan import Kind, Launch, value
from bsdgraph.runtime.cpu import cpu_runtime
from bsdgraph.runtime.triton import triton_runtime
from tests.test_cpu_backend import batch

BACKENDS = {"cpu": cpu_runtime, "triton": triton_runtime}


def graphs():
    g = GraphBuilder("m", T=3)
    h = g.lif(g.linear(g.flatten(g.input((1, 4, 4))), 12))
    h = g.lif(g.linear(h, 10))
    g.output(g.linear(h, 3))
    c = GraphBuilder("c", T=2)
    h = c.lif(c.batchnorm(c.conv2d(c.input((1, 6, 6)), 2, kernel=3, padding=1)))
    c.output(c.linear(c.flatten(c.avgpool2d(h, 2)), 3))
    r = GraphBuilder("r", T=4)
    h = r.recurrent_lif(r.linear(r.flatten(r.input((1, 4, 4))), 12))
    r.output(r.linear(r.lif(r.linear(h, 10)), 3))
    return {"mlp": g.build(), "cnn": c.build(), "rnn": r.build()}


@pytest.fixture(params=[(b, m, d) for b in BACKENDS for m in ("mlp", "cnn", "rnn") for d in ("current", "membrane")],
                ids=lambda p: "-".join(p))
def setup(request):
    backend, model, distill_on = request.param
    bsd = derive_feedback(graphs()[model], BSDConfig(distill_on=distill_on))
    rt = BACKENDS[backend](bsd, seed=1)
    trace: list[tuple[Launch, dict]] = []
    rt.observe(lambda la, ins, outs: trace.append((la, dict(zip(la.writes, outs)))))  # what every launch wrote
    return bsd, rt, trace


def test_c1_backward_weights_are_their_own_tensors(setup):
    bsd, rt, _ = setup
    for n in bsd.nodes:
        if n.stream == Stream.F and n.op in GroupOp.SYNAPSE:
            w, theta = rt.params[f"{n.name}.weight"], rt.params[f"{n.name}_b.weight"]
            assert w.untyped_storage().data_ptr() != theta.untyped_storage().data_ptr()


def test_c2_each_loss_writes_only_the_gradients_of_its_own_layer(setup):
    bsd, rt, trace = setup
    rt.gradients(*batch(bsd, B=5, scale=2.0))
    current, written = None, {}
    for la, _ in trace:
        if la.phase == "loss":
            current = la.nodes[0]
        for w in la.writes:
            if w.kind == Kind.PARAM_GRAD:
                written.setdefault(current, set()).add(w.node)
    for loss in bsd.by_op(*GroupOp.LOSS):
        assert written.get(loss.name, set()) == set(local_params(bsd, loss.name)), loss.name


def test_c3_one_pass_updates_f_and_b_in_the_same_step(setup):
    bsd, rt, trace = setup
    before = {k: v.clone() for k, v in rt.params.items()}
    rt.step(*batch(bsd, B=5, scale=2.0))
    forwards = [n for la, _ in trace if la.phase.startswith("forward") for n in la.nodes]
    assert len(forwards) == len(set(forwards)), "a node ran forward twice: two phases"
    changed = {k.split(".")[0] for k in rt.params if not torch.equal(before[k], rt.params[k])}
    assert any(bsd[n].stream == Stream.F for n in changed) and any(bsd[n].stream == Stream.B for n in changed)


@pytest.mark.parametrize("mode", ["train", "predict"])
def test_c4_neurons_emit_binary_spikes_and_synapses_read_spikes(setup, mode):
    bsd, rt, trace = setup
    x, y = batch(bsd, B=5, scale=2.0)
    rt.step(x, y) if mode == "train" else rt.predict(x)
    lif_out = {la.nodes[-1]: out[value(la.nodes[-1])] for la, out in trace
               if la.phase.startswith("forward") and bsd[la.nodes[-1]].op == Op.LIF}
    assert lif_out, "no LIF launch was traced"
    for name, s in lif_out.items():
        assert s.dtype == torch.uint8 and set(s.unique().tolist()) <= {0, 1}, name
    for la, _ in trace:  # every synapse reads spikes (pooled), the direct stimulus or the target code
        if la.phase.startswith("forward") and la.nodes and bsd[la.nodes[0]].op in GroupOp.SYNAPSE:
            src = bsd.inputs(la.nodes[0])[0]
            while src.op in GroupOp.TRANSFORM:
                src = bsd.inputs(src.name)[0]
            assert src.op in (Op.LIF, Op.INPUT, Op.TARGET), (la.nodes, src.name)


def test_c5_no_error_signal_crosses_a_layer(setup):
    """Gradient buffers exist only between a loss and the weights it owns; nothing signed flows between layers:
    every launch that reads a gradient belongs to the same loss's layer."""
    bsd, rt, trace = setup
    rt.step(*batch(bsd, B=5, scale=2.0))
    current = None
    for la, _ in trace:
        if la.phase == "loss":
            current = la.nodes[0]
            assert bsd[current].op in (Op.RECO, Op.CE, Op.MSE)  # sums of squares / CE on the top current
        reads_grad = any(r.kind in (Kind.GRAD, Kind.PARAM_GRAD) for r in la.reads)
        if reads_grad:
            own = set(local_params(bsd, current)) | {n.name for n in bsd.nodes if _feeds(bsd, n.name, current)}
            assert la.nodes and set(la.nodes) <= own, (la.kernel, la.nodes, current)


def _feeds(bsd, node: str, loss: str) -> bool:
    """``node`` reaches ``loss`` through non-detached edges only (it is inside the loss's layer)."""
    frontier, seen = [loss], set()
    while frontier:
        for e in bsd.in_edges(frontier.pop()):
            if not e.detach and e.src not in seen:
                seen.add(e.src)
                frontier.append(e.src)
    return node in seen
