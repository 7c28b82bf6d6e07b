"""Text printer and JSON (de)serialisation of graphs.

The text form is stable (node order, attribute order from ``ir.ATTRS``) so that it can be diffed and pinned in
tests; one line per node:

    %h1 : f32[T,B,1024] = lif[tau=2.0, v_th=0.3, ...](%fc1)

``sg(%a)`` marks a stop-gradient edge (BSD's detach) and ``%a[t-1]`` a delayed operand. JSON round-trips exactly.
"""

from __future__ import annotations

import json
from typing import Any

from bsdgraph.ir.graph import ATTRS, Edge, FrozenAttrs, Graph, Node, Op, Stream, default_attrs

_SECTION = {
    Stream.F: "feedforward network F (stimulus -> concept)",
    Stream.B: "backward network B (concept -> stimulus), independent weights",
    Stream.LOSS: "layer-local losses (each weight learns from exactly one)",
}


def _fmt_value(v: Any) -> str:
    if isinstance(v, FrozenAttrs):
        return "{" + ",".join(f"{k}={_fmt_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, tuple):
        return "(" + ",".join(_fmt_value(x) for x in v) + ")"
    return str(v)


def format_node(g: Graph, n: Node) -> str:
    attrs = ", ".join(f"{a.name}={_fmt_value(n.attrs[a.name])}" for a in ATTRS[n.op] if a.name in n.attrs)
    operands = ", ".join(_fmt_operand(e) for e in g.in_edges(n.name))
    dims = ",".join(["T", "B", *map(str, n.shape)]) if n.op not in _SCALAR_OPS else ""
    return f"%{n.name} : f32[{dims}] = {n.op.value}{f'[{attrs}]' if attrs else ''}({operands})"


_SCALAR_OPS = frozenset({Op.RECO, Op.CE, Op.MSE})


def _fmt_operand(e: Edge) -> str:
    s = f"%{e.src}" + (f"[t-{e.delay}]" if e.delay else "")
    return f"sg({s})" if e.detach else s


def format_graph(g: Graph) -> str:
    lines = [f"graph {g.name}(T={g.T}, dt={g.dt}) {{"]
    streams = {n.stream for n in g.nodes}
    current = None
    for n in g.nodes:
        if len(streams) > 1 and n.stream != current:
            current = n.stream
            lines.append(f"  # {_SECTION[current]}")
        lines.append("  " + format_node(g, n))
    lines.append("}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- JSON

FORMAT = "bsdgraph.graph"
VERSION = 1


def _jsonable(v: Any) -> Any:
    if isinstance(v, FrozenAttrs):  # a mapping value (validate refuses one, but to_json must not crash on it)
        return {k: _jsonable(x) for k, x in v.items()}
    return [_jsonable(x) for x in v] if isinstance(v, tuple) else v


def to_dict(g: Graph) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": VERSION, "name": g.name, "T": g.T, "dt": g.dt,
        "nodes": [
            {"name": n.name, "op": n.op.value, "stream": n.stream.value, "shape": list(n.shape),
             "attrs": {k: _jsonable(v) for k, v in n.attrs.items()}}
            for n in g.nodes
        ],
        "edges": [
            {"src": e.src, "dst": e.dst, "port": e.port, "delay": e.delay, "detach": e.detach} for e in g.edges
        ],
    }


def to_json(g: Graph, indent: int | None = 1) -> str:
    return json.dumps(to_dict(g), indent=indent)


def from_dict(d: dict[str, Any]) -> Graph:
    """Rebuild a graph from ``to_dict`` output; malformed documents raise ``GraphError`` (not KeyError)."""
    from bsdgraph.ir.diagnostics import Diagnostic, GraphError

    try:
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} document (format={d.get('format')!r}, "
                             f"version={d.get('version')!r})")
        # attributes a later version added take their defaults: a graph saved before keeps loading
        nodes = [
            Node(n["name"], Op(n["op"]), FrozenAttrs(default_attrs(Op(n["op"]), **n["attrs"])), tuple(n["shape"]),
                 Stream(n["stream"]))
            for n in d["nodes"]
        ]
        edges = [Edge(e["src"], e["dst"], e["port"], e["delay"], e["detach"]) for e in d["edges"]]
        names = {n.name for n in nodes}
        for e in edges:
            if e.src not in names or e.dst not in names:
                raise ValueError(f"edge {e.src!r} -> {e.dst!r} names a node that does not exist")
        return Graph(d["name"], nodes, edges, d["T"], d["dt"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        msg = f"missing field {err}" if isinstance(err, KeyError) else str(err)
        raise GraphError([Diagnostic(None, None, f"malformed graph JSON: {msg}", "write it with to_json")]) from None


def from_json(text: str) -> Graph:
    from bsdgraph.ir.diagnostics import Diagnostic, GraphError

    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise GraphError([Diagnostic(None, None, f"graph JSON does not parse: {err}", "")]) from None
    if not isinstance(doc, dict):
        raise GraphError([Diagnostic(None, None, "graph JSON must be an object", "")])
    return from_dict(doc)
