"""The structure of a NIR graph before any node is mapped: nested subgraphs inlined (``flatten``), then edges, the
one Input and Output, fan-in and loops checked, and the recurrent layers found (``structure``): a neuron whose second
input is an Affine/Linear that reads only that neuron (how snnTorch writes RLeaky and RSynaptic, and how bsdgraph
exports a recurrent layer). ``nir_import.py`` maps the nodes afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from bsdgraph.interop.nir import NEURONS_FROM_NIR
from bsdgraph.interop.nir import node_metadata as _meta
from bsdgraph.ir.diagnostics import Diagnostic

SYNAPSES = ("Affine", "Linear", "Conv2d")


def kind(node) -> str:
    return type(node).__name__


def is_synapse(node) -> bool:
    return kind(node) in SYNAPSES and _meta(node).get("op") != "batchnorm"


# ---------------------------------------------------------------------------------------------------- subgraphs


@dataclass
class Flat:
    """A NIR graph with its subgraphs inlined: what the rules read."""

    nodes: dict[str, Any]
    edges: list[tuple[str, str]]
    layers: dict[str, str] = field(default_factory=dict)   # neuron of a one-layer subgraph -> the subgraph's name


def flatten(g) -> tuple[Flat, list[Diagnostic]]:
    """``g`` with every nested subgraph inlined: inner node ``n`` of subgraph ``S`` becomes ``S.n``; an edge into
    ``S`` goes to what its Input feeds, an edge out of ``S`` leaves from what feeds its Output (NIR sums a node's
    inputs, so a port with several connections passes each of them on: the sums stay the same)."""
    nodes, edges, layers, diags = {}, [], {}, []
    ports: dict[str, tuple[str, str]] = {}   # subgraph -> its Input and Output, flattened names
    for name, node in g.nodes.items():
        if kind(node) != "NIRGraph":
            nodes[name] = node
            continue
        inner, inner_diags = flatten(node)
        diags += [Diagnostic(f"{name}.{d.node}" if d.node else name, d.op, d.message, d.hint) for d in inner_diags]
        io = [[k for k, v in inner.nodes.items() if kind(v) == t] for t in ("Input", "Output")]
        if len(io[0]) != 1 or len(io[1]) != 1:
            diags.append(Diagnostic(name, None, f"(NIR NIRGraph) is a subgraph with {len(io[0])} Input and "
                                    f"{len(io[1])} Output nodes; NIR connects a subgraph through one of each",
                                    "give the subgraph exactly one Input and one Output node"))
            continue
        for k, v in inner.nodes.items():
            joined = f"{name}.{k}"
            if joined in g.nodes or joined in nodes:
                diags.append(Diagnostic(joined, None, f"(NIR {kind(v)}) node {k!r} of subgraph {name!r} would be "
                                        f"named {joined!r}, the name of another node", "rename one of them"))
            nodes[joined] = v
        ports[name] = (f"{name}.{io[0][0]}", f"{name}.{io[1][0]}")
        edges += [(f"{name}.{a}", f"{name}.{b}") for a, b in inner.edges]
        layers.update({f"{name}.{k}": f"{name}.{v}" for k, v in inner.layers.items()})
        neuron = one_layer(inner, *io[0], *io[1])
        if neuron:
            layers[f"{name}.{neuron}"] = name
    edges += [(ports[a][1] if a in ports else a, ports[b][0] if b in ports else b) for a, b in g.edges]
    for port in (p for pair in ports.values() for p in pair):
        ins, outs = [a for a, b in edges if b == port], [b for a, b in edges if a == port]
        edges = [e for e in edges if port not in e] + [(a, b) for a in ins for b in outs]
        del nodes[port]
    return Flat(nodes, edges, layers), diags


def one_layer(g: Flat, inp: str, out: str) -> str | None:
    """The neuron of a subgraph that is exactly one recurrent layer (Input -> neuron <-> Affine/Linear, neuron ->
    Output: snnTorch's RLeaky and RSynaptic, and bsdgraph's export), else None. Its layer takes the subgraph's
    name, as a feed-forward neuron takes its node's name."""
    inner = {k: v for k, v in g.nodes.items() if k not in (inp, out)}
    neurons = [k for k, v in inner.items() if kind(v) in NEURONS_FROM_NIR]
    recs = [k for k, v in inner.items() if is_synapse(v) and kind(v) != "Conv2d"]
    if len(inner) != 2 or len(neurons) != 1 or len(recs) != 1:
        return None
    n, r = neurons[0], recs[0]
    return n if sorted(g.edges) == sorted([(inp, n), (n, r), (r, n), (n, out)]) else None


def recurrent_synapses(g: Flat, preds: dict, succs: dict) -> dict[str, str]:
    """neuron -> its recurrent synapse: the one of the neuron's two inputs that is an Affine/Linear reading only
    that neuron and feeding only it (snnTorch's RLeaky / RSynaptic, bsdgraph's recurrent layers)."""
    loops = {}
    for n, node in g.nodes.items():
        if kind(node) not in NEURONS_FROM_NIR or len(preds[n]) != 2:
            continue
        recs = [r for r in preds[n] if is_synapse(g.nodes[r]) and kind(g.nodes[r]) != "Conv2d"
                and preds[r] == [n] and succs[r] == [n]]
        if len(recs) == 1:
            loops[n] = recs[0]
    return loops


def flattened_layers(g: Flat, loops: dict[str, str]) -> dict[str, str]:
    """Names for recurrent layers a writer flattened itself: nirtorch writes snnTorch's RLeaky at index 1 as
    ``1.lif`` and ``1.w_rec``, the names ``_flatten`` gives its subgraph form, and both import as the layer ``1``
    (when no other node shares the prefix and no node is called ``1``)."""
    out = {}
    for n, r in loops.items():
        prefix = n.rpartition(".")[0]
        if (n not in g.layers and prefix and r.rpartition(".")[0] == prefix and prefix not in g.nodes
                and sum(k.startswith(f"{prefix}.") for k in g.nodes) == 2):
            out[n] = prefix
    return out


def structure(g: Flat, written: list[str] | None = None) -> tuple[list[Diagnostic], list[str], dict, dict, dict]:
    """Edges, inputs, outputs, fan-in and loops checked before any rule runs; returns (diagnostics, order, preds,
    succs, loops). A recurrent layer's loop edge (rec -> neuron) is left out of preds and of the order. Where
    branches allow several orders, the order follows ``written`` (the exporter's node order, from the file's
    metadata; a subgraph's inner nodes by their subgraph's place), then the file's."""
    diags = [Diagnostic(None, None, f"edge {a!r} -> {b!r} names {[x for x in (a, b) if x not in g.nodes]}, "
                        "which is not a node of the graph", "add the missing node or remove the edge")
             for a, b in g.edges if a not in g.nodes or b not in g.nodes]
    edges = [(a, b) for a, b in g.edges if a in g.nodes and b in g.nodes]
    preds = {n: [a for a, b in edges if b == n] for n in g.nodes}
    succs = {n: [b for a, b in edges if a == n] for n in g.nodes}
    for io in ("Input", "Output"):
        found = [n for n, node in g.nodes.items() if kind(node) == io]
        if len(found) != 1:
            diags.append(Diagnostic(None, None, f"expected exactly one {io} node, got {len(found)} "
                                    f"{found or ''}".rstrip(),
                                    "bsdgraph imports one stimulus -> one output networks"))
    loops = recurrent_synapses(g, preds, succs)
    for n, r in loops.items():
        preds[n].remove(r)
    for n, node in g.nodes.items():
        k = len(preds[n])
        if kind(node) == "Input" or k == 1 or (k > 1 and kind(node) == "Scale"):  # a Scale of several: a sum
            continue
        if k == 0:
            diags.append(Diagnostic(n, None, f"({kind(node)}) has 0 incoming edges; bsdgraph nodes take exactly "
                                    "one input", "connect it to exactly one producer"))
        else:
            inputs = ", ".join(map(repr, preds[n]))
            diags.append(Diagnostic(n, None, f"({kind(node)}) has {k} incoming edges ({inputs}), which NIR sums; "
                                    "bsdgraph reads a sum of several inputs as a Scale of ones (what its export "
                                    "writes for an add), or as a recurrent layer (a neuron's input plus an "
                                    "Affine/Linear from the neuron back to itself)",
                                    "put a Scale of ones where the inputs meet, or merge them into one synapse"))
    dag = nx.DiGraph([(a, b) for a, b in edges if loops.get(b) != a])
    dag.add_nodes_from(g.nodes)
    try:
        cycle = nx.find_cycle(dag)
        diags.append(Diagnostic(cycle[0][0], None, "is on a recurrent loop " + " -> ".join(a for a, _ in cycle) +
                                f" -> {cycle[0][0]} that is not a recurrent layer",
                                "a loop bsdgraph imports is neuron -> Affine/Linear -> the same neuron"))
        order = list(g.nodes)
    except nx.NetworkXNoCycle:
        rank = {n: i for i, n in enumerate(written or [])}
        place = {n: i for i, n in enumerate(g.nodes)}
        key = lambda n: (rank.get(n, rank.get(n.partition(".")[0], len(rank))), place[n])  # noqa: E731
        order = list(nx.lexicographical_topological_sort(dag, key=key))
    return diags, order, preds, succs, loops
