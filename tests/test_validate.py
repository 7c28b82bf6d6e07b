"""Validation: pinned diagnostics for every check, and random corruptions always give a GraphError naming the node."""

import dataclasses
import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from bsdgraph import Graph, GraphBuilder, GraphError, Op, validate
from bsdgraph.ir.graph import Edge, GroupOp
from tests.strategies import any_graph


def mlp(**lif):
    g = GraphBuilder("m", T=2)
    h = g.lif(g.linear(g.flatten(g.input((1, 4, 4))), 8), **lif)
    g.output(g.linear(h, 3))
    return g


def edit(g: Graph, name: str, **attrs) -> Graph:
    nodes = [n.replace(attrs={**n.attrs, **attrs}) if n.name == name else n for n in g.nodes]
    return g.replace(nodes=nodes)


def diags(g: Graph, **kw) -> list[str]:
    with pytest.raises(GraphError) as info:
        validate(g, **kw)
    return [str(d) for d in info.value.diagnostics]


@pytest.mark.parametrize("attrs, match", [
    (dict(tau=0.0), r"node 'h1' \(lif\): tau must be > 0, got 0.0"),
    (dict(tau=-1.0), r"node 'h1' \(lif\): tau must be > 0"),
    (dict(v_th=0.0, v_reset=0.0), r"node 'h1' \(lif\): v_th=0.0 must be above v_reset=0.0 -- fix:"),
    (dict(v_th=math.nan), r"node 'h1' \(lif\): v_th must be finite"),
    (dict(reset="sometimes"), r"node 'h1' \(lif\): reset='sometimes' is not one of 'hard', 'soft'"),
    (dict(tau="2"), r"node 'h1' \(lif\): tau must be int or float, got str"),
    (dict(colour=1), r"node 'h1' \(lif\): unknown attribute 'colour'"),
])
def test_lif_parameter_diagnostics(attrs, match):
    g = edit(mlp().build(), "h1", **attrs)
    with pytest.raises(GraphError, match=match):
        validate(g)


def test_builder_validates_bad_parameters_at_build():
    with pytest.raises(GraphError, match=r"node 'h1' \(lif\): v_th=0.0 must be above v_reset=0.1"):
        mlp(v_th=0.0, v_reset=0.1).build()


def test_shape_mismatch_between_producer_and_consumer():
    g = edit(mlp().build(), "fc2", in_features=7)
    with pytest.raises(GraphError, match=r"node 'fc2' \(linear\): in_features=7 but its input has width 8 -- fix: "
                                         r"set in_features=8"):
        validate(g)


def test_declared_shape_is_recomputed_not_trusted():
    g = mlp().build()
    g = g.replace(nodes=[n.replace(shape=(9,)) if n.name == "h1" else n for n in g.nodes])
    with pytest.raises(GraphError, match=r"node 'h1' \(lif\): declares shape \[9\] but its operands give \[8\]"):
        validate(g)


def test_cycle_without_delay_edge_and_with_delay():
    g = mlp().build()
    cyc = g.replace(edges=g.edges + [Edge("h1", "fc1", 1)])
    found = diags(cyc)
    assert any("cycle" in d and "has no delay edge" in d for d in found), found
    assert any("node 'fc1' (linear): takes 1 operand(s), got 2" in d for d in found), found
    delayed = g.replace(edges=g.edges + [Edge("h1", "fc1", 1, delay=1)])
    assert not any("cycle" in d for d in diags(delayed))  # the delay makes the loop legal; arity still fails


def test_dangling_and_unreachable_nodes():
    g = mlp()
    g.lif(g.linear("flat1", 5), name="spare")  # reads the network but feeds nothing
    found = diags(g.build(validate=False))
    assert any("node 'spare' (lif): is dangling" in d for d in found), found
    g2 = mlp().build()
    lonely = dataclasses.replace(g2["h1"], name="lonely")
    found = diags(g2.replace(nodes=g2.nodes + [lonely]))
    assert any("node 'lonely' (lif): is unreachable from the input" in d for d in found), found


def test_missing_input_and_output():
    g = mlp().build()
    no_out = g.replace(nodes=[n for n in g.nodes if n.op != Op.OUTPUT],
                       edges=[e for e in g.edges if e.dst != "out"])
    assert any("expected exactly one output node, got 0" in d for d in diags(no_out))
    no_in = g.replace(nodes=[n for n in g.nodes if n.op != Op.INPUT], edges=[e for e in g.edges if e.src != "x"])
    found = diags(no_in)
    assert any("graph: no input node -- fix: start the model with g.input(shape)" in d for d in found), found


@pytest.mark.parametrize("T", [0, -3, 2.5, True])
def test_bad_time_steps(T):
    g = mlp().build()
    with pytest.raises(GraphError, match=r"graph: T must be an integer >= 1"):
        validate(Graph(g.name, g.nodes, g.edges, T))


def test_conv_geometry_with_an_empty_output():
    g = GraphBuilder("c")
    x = g.input((1, 5, 5))
    with pytest.raises(GraphError, match=r"node 'conv1' \(conv2d\): kernel \[7, 7\] with stride \[1, 1\] and padding "
                                         r"\[0, 0\] on a 5x5 input gives an empty -1x-1 output"):
        g.conv2d(x, 4, kernel=7)


def test_pool_geometry_with_an_empty_output():
    g = GraphBuilder("c")
    h = g.lif(g.conv2d(g.input((1, 3, 3)), 2, kernel=3))
    with pytest.raises(GraphError, match=r"node 'pool1' \(maxpool2d\): kernel \[2, 2\] .* gives an empty 0x0"):
        g.maxpool2d(h, 2)


def test_missing_table_entry_is_a_diagnostic(monkeypatch):
    from bsdgraph.ir.validate import CHECKS

    monkeypatch.delitem(CHECKS, Op.LIF)
    with pytest.raises(GraphError, match=r"node 'h1' \(lif\): no validation rule for op 'lif'"):
        validate(mlp().build(validate=False))


def test_every_problem_is_listed_in_one_error():
    g = edit(edit(mlp().build(), "h1", tau=-1.0), "fc2", in_features=2)
    found = diags(g)
    assert len(found) == 2 and "tau" in found[0] and "in_features=2" in found[1]


def test_forward_graph_cannot_contain_backward_ops():
    b = GraphBuilder("f")
    t = b.add(Op.TARGET, [], name="t", shape=(4,), encoding="onehot", n_classes=4)
    b.output(b.linear(t, 2))
    with pytest.raises(GraphError, match=r"node 't' \(target\): op 'target' cannot be written in a forward network"):
        b.build()


# ---------------------------------------------------------------------------------------------------- corruptions

CORRUPTIONS = ["shape", "in_features", "tau", "v_th", "nan", "type", "extra_edge", "drop_edge", "cycle"]


def corrupt(g: Graph, kind: str, node) -> tuple[Graph, set[str]]:
    """Return a corrupted copy of ``g`` and the node names a correct diagnostic may name."""
    n = node
    if kind == "shape":
        return g.replace(nodes=[m.replace(shape=(*m.shape, 2)) if m is n else m for m in g.nodes]), {n.name}
    if kind in ("tau", "v_th", "nan", "type", "in_features"):
        key, value = {"tau": ("tau", -1.0), "v_th": ("v_th", -5.0), "nan": ("tau", math.nan),
                      "type": ("tau", "fast"), "in_features": ("in_features", 10_000)}[kind]
        return edit(g, n.name, **{key: value}), {n.name}
    if kind == "extra_edge":
        src = g.nodes[0].name
        return g.replace(edges=g.edges + [Edge(src, n.name, 5)]), {n.name}
    if kind == "drop_edge":
        kept = [e for e in g.edges if e.dst != n.name]
        return g.replace(edges=kept), {n.name} | {e.src for e in g.edges if e.dst == n.name} | {
            m.name for m in g.nodes}
    # cycle: feed a later node back into an earlier synapse without a delay
    return g.replace(edges=g.edges + [Edge("out", n.name, 1)]), {m.name for m in g.nodes}


@given(any_graph, st.sampled_from(CORRUPTIONS), st.data())
def test_corruptions_always_give_a_graph_error_naming_the_node(g, kind, data):
    wants = {"tau": Op.LIF, "v_th": Op.LIF, "nan": Op.LIF, "type": Op.LIF, "in_features": Op.LINEAR,
             "cycle": Op.LINEAR}
    pool = [n for n in g.nodes if n.op == wants[kind]] if kind in wants else [
        n for n in g.nodes if n.op not in GroupOp.SOURCE]
    assume(pool)  # e.g. an MLP without hidden layers has no LIF to corrupt
    node = data.draw(st.sampled_from(pool))
    bad, named = corrupt(g, kind, node)
    with pytest.raises(GraphError) as info:
        validate(bad)
    assert any(d.node in named for d in info.value.diagnostics), (kind, node.name, str(info.value))
    if kind not in ("drop_edge", "cycle"):
        assert any(d.node == node.name for d in info.value.diagnostics), str(info.value)
