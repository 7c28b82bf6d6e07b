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
