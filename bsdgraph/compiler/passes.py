"""Pure ``Graph -> Graph`` edits used by the command line's overrides (each result is validated)."""

from __future__ import annotations

from typing import Any

from bsdgraph.ir.graph import ATTRS, Graph, Op
from bsdgraph.ir.diagnostics import Diagnostic, GraphError
from bsdgraph.ir.validate import validate


def set_attrs(g: Graph, op: Op, **attrs: Any) -> Graph:
    """Set hyper-parameters on every node of ``op`` (e.g. ``v_th`` on every LIF)."""
    known = {a.name for a in ATTRS[op]}
    unknown = sorted(set(attrs) - known)
    if unknown:
        raise GraphError([Diagnostic(None, op, f"{op.value} has no attribute(s) {unknown}",
                                     f"known: {', '.join(sorted(known))}")])
    nodes = [n.replace(attrs={**n.attrs, **attrs}) if n.op == op else n for n in g.nodes]
    return validate(g.replace(nodes=nodes))


def set_hidden_width(g: Graph, width: int) -> Graph:
    """Every Linear synapse but the top one gets ``width`` outputs; inputs and shapes follow (MLP sweeps)."""
    from bsdgraph.ir.infer import SHAPE_RULES

    top = {e.src for e in g.edges if g[e.dst].op == Op.OUTPUT}
    shapes: dict[str, tuple[int, ...]] = {}
    nodes = []
    for n in g.topo_order():
        ins = [shapes[i.name] for i in g.inputs(n.name)]
        attrs = dict(n.attrs)
        if n.op == Op.LINEAR:
            attrs["in_features"] = ins[0][-1]
            attrs["out_features"] = attrs["out_features"] if n.name in top else width
        node = n.replace(attrs=attrs)
        shapes[n.name] = node.shape if not ins else SHAPE_RULES[n.op](node, ins)
        nodes.append(node.replace(shape=shapes[n.name]))
    order = {n.name: i for i, n in enumerate(g.nodes)}
    return validate(g.replace(nodes=sorted(nodes, key=lambda n: order[n.name])))


def insert_batchnorm(g: Graph) -> Graph:
    """A batchnorm between every synapse and the neurons it feeds directly (``--batchnorm``; the paper's CNN and
    RNN place one after each synapse): ``linear -> lif`` becomes ``linear -> bn_<linear> -> lif``, and B mirrors
    each. A layer that already has one, a recurrent layer's sum and the top synapse (it feeds the output, not
    neurons) are left alone."""
    from bsdgraph.ir.graph import Edge, FrozenAttrs, GroupOp, Node, default_attrs

    names = {n.name for n in g.nodes}
    inserted: dict[str, Node] = {}
    edges = []
    for e in g.edges:
        src, dst = g[e.src], g[e.dst]
        if src.op in GroupOp.SYNAPSE and dst.op in (Op.LIF, Op.NEURON) and e.delay == 0 and src.name in inserted:
            edges.append(Edge(inserted[src.name].name, e.dst, e.port, e.delay, e.detach))  # a second reader
        elif src.op in GroupOp.SYNAPSE and dst.op in (Op.LIF, Op.NEURON) and e.delay == 0:
            name = f"bn_{src.name}"
            while name in names:
                name += "_"
            names.add(name)
            attrs = default_attrs(Op.BATCHNORM, num_features=src.shape[0] if src.shape else 0)
            inserted[src.name] = Node(name, Op.BATCHNORM, FrozenAttrs(attrs), src.shape, src.stream)
            edges += [Edge(src.name, name), Edge(name, e.dst, e.port, e.delay, e.detach)]
        else:
            edges.append(e)
    nodes = [m for n in g.nodes for m in ((n, inserted[n.name]) if n.name in inserted else (n,))]
    return validate(g.replace(nodes=nodes, edges=edges))


def use_class_code(g: Graph, active: int, width: int, seed: int = 0) -> Graph:
    """The classifier's one-hot (or population) target replaced by a distributed code (``--class-code K:N``): the
    top Linear gets ``width`` outputs, each class a fixed random pattern of ``active`` of them (drawn by ``seed``),
    read out by the cosine to each pattern. The classes stay the output's."""
    out = g.by_op(Op.OUTPUT)[0]
    top = g.inputs(out.name)[0]
    if out.attrs["task"] != "classification" or out.attrs["target"] == "sequence":
        raise GraphError([Diagnostic(out.name, out.op, "a class code replaces the code of one class per sample",
                                     "use it on a classifier (not regression, not a class per step)")])
    if top.op != Op.LINEAR:
        raise GraphError([Diagnostic(top.name, top.op, "a class code widens the top synapse, which must be a "
                                     "Linear", "end build() with g.output(g.linear(h, classes), ...)")])
    attrs = {**top.attrs, "out_features": width}
    code = {**out.attrs, "target": "code", "population": 1, "code_active": active, "code_seed": seed}
    nodes = [top.replace(attrs=attrs, shape=(width,)) if n.name == top.name else
             out.replace(attrs=code, shape=(width,)) if n.name == out.name else n for n in g.nodes]
    return validate(g.replace(nodes=nodes))
