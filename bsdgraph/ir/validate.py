"""Validation: recompute everything, trust nothing, collect every problem, raise one ``GraphError``.

Order: graph-level facts, attribute schemas (``ir.ATTRS``), one semantic check per op (``CHECKS``), operands and
ports, cycles without a delay, reachability, then shapes recomputed with ``infer.SHAPE_RULES`` and compared with
the declared ones. Each ``Diagnostic`` names the node, says expected vs got and suggests the fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import networkx as nx

from bsdgraph.ir.diagnostics import Diagnostic, GraphError
from bsdgraph.ir.infer import ARITY, SHAPE_RULES, ShapeError, arity_text
from bsdgraph.ir.neurons import NEURONS
from bsdgraph.ir.graph import ATTRS, GroupOp, Graph, Node, Op, Stream
from bsdgraph.registry import registrar


Check = Callable[[Node, Graph], Iterable[tuple[str, str]]]
CHECKS: dict[Op, Check] = {}


check = registrar(CHECKS)  # @check(*ops): the semantic check of those ops


def validate(g: Graph, forward: bool | None = None) -> Graph:
    """Return ``g`` if it is valid, else raise ``GraphError`` listing every diagnostic.

    ``forward=True`` also demands a user-writable forward network F (only ``GroupOp.FORWARD`` ops, one input,
    one output); by default this is inferred: a graph without loss nodes is a forward network.
    """
    if forward is None:
        forward = not any(n.op in GroupOp.LOSS for n in g.nodes)
    diags: list[Diagnostic] = _graph_facts(g)
    dangling = _edge_ends(g)
    if dangling:  # every later check looks edges' ends up by name and sorts them by port
        raise GraphError(diags + dangling)
    schema_ok = set()
    for n in g.nodes:
        found = list(_tables(n)) or list(_schema(n))
        if not found:
            schema_ok.add(n.name)
            found = [Diagnostic(n.name, n.op, m, h) for m, h in CHECKS[n.op](n, g)]
        diags += found
    wiring = _operands(g) + _cycles(g)
    diags += wiring + _structure(g, forward)
    if not wiring:  # shapes are only meaningful on correctly wired, acyclic graphs
        diags += _shapes(g, schema_ok)
    if diags:
        raise GraphError(diags)
    return g


# ---------------------------------------------------------------------------------------------------- graph level


def _graph_facts(g: Graph) -> list[Diagnostic]:
    out = []
    if isinstance(g.T, bool) or not isinstance(g.T, int) or g.T < 1:
        out.append(Diagnostic(None, None, f"T must be an integer >= 1, got {g.T!r}", "e.g. GraphBuilder(name, T=4)"))
    if not isinstance(g.dt, (int, float)) or isinstance(g.dt, bool) or not math.isfinite(g.dt) or g.dt <= 0:
        out.append(Diagnostic(None, None, f"dt must be a positive finite number, got {g.dt!r}",
                              "dt is the length of one step (1.0 = tau counted in steps)"))
    if not isinstance(g.name, str):
        out.append(Diagnostic(None, None, f"the graph name must be a string, got {g.name!r}",
                              "e.g. GraphBuilder('mlp', T=4)"))
    for n in g.nodes:
        if not isinstance(n.name, str) or not n.name:
            out.append(Diagnostic(None, n.op, f"node names must be non-empty strings, got {n.name!r}",
                                  "pass name='...' or leave it out: the builder picks one"))
    return out


def _edge_ends(g: Graph) -> list[Diagnostic]:
    """Edges whose ends are not nodes of the graph, or whose port is not an integer >= 0."""
    names = {n.name for n in g.nodes}
    out = []
    for e in g.edges:
        missing = [x for x in (e.src, e.dst) if x not in names]
        if missing:
            out.append(Diagnostic(None, None, f"edge {e.src!r} -> {e.dst!r} names {missing!r}, which is not a node",
                                  "add the node before connecting it, or fix the name"))
        elif isinstance(e.port, bool) or not isinstance(e.port, int) or e.port < 0:
            out.append(Diagnostic(e.dst, g[e.dst].op, f"edge from '{e.src}' has port {e.port!r}",
                                  "a port is an operand index: an integer >= 0"))
    return out


def _tables(n: Node) -> Iterable[Diagnostic]:
    for table, name in ((ATTRS, "attribute schema"), (ARITY, "arity"), (CHECKS, "validation rule"),
                        (SHAPE_RULES, "shape rule")):
        if n.op not in table:
            yield Diagnostic(n.name, n.op, f"no {name} for op {n.op.value!r}",
                             "register one (CONTRIBUTING.md, 'How to add an op')")


def _schema(n: Node) -> Iterable[Diagnostic]:
    spec = {a.name: a for a in ATTRS[n.op]}
    for key in n.attrs:
        if key not in spec:
            yield Diagnostic(n.name, n.op, f"unknown attribute {key!r}", f"known: {', '.join(spec) or 'none'}")
    for a in spec.values():
        if a.name not in n.attrs:
            yield Diagnostic(n.name, n.op, f"missing attribute {a.name!r}", f"pass {a.name}=...")
            continue
        v = n.attrs[a.name]
        if v is None and a.default is None and not a.required:  # None means "unset" only where it is the default
            continue
        ok = isinstance(v, a.types) and not (isinstance(v, bool) and bool not in a.types)
        if not ok:
            want = " or ".join(t.__name__ for t in a.types)
            yield Diagnostic(n.name, n.op, f"{a.name} must be {want}, got {type(v).__name__} {v!r}", "")
        elif isinstance(v, float) and not math.isfinite(v):
            yield Diagnostic(n.name, n.op, f"{a.name} must be finite, got {v!r}", "")
        elif a.choices and v not in a.choices:
            yield Diagnostic(n.name, n.op, f"{a.name}={v!r} is not one of {', '.join(map(repr, a.choices))}", "")
        elif tuple in a.types and not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            yield Diagnostic(n.name, n.op, f"{a.name} must be a tuple of integers, got {v!r}", "")


def _operands(g: Graph) -> list[Diagnostic]:
    out = []
    for n in g.nodes:
        if n.op not in ARITY:
            continue  # reported by _tables
        edges = g.in_edges(n.name)
        ports = [e.port for e in edges]
        if len(edges) not in ARITY[n.op]:
            want = arity_text(ARITY[n.op])
            out.append(Diagnostic(n.name, n.op, f"takes {want} operand(s), got {len(edges)}",
                                  "connect exactly the operands this op needs"))
        elif sorted(ports) != list(range(len(ports))):
            out.append(Diagnostic(n.name, n.op, f"operand ports must be 0..{len(ports) - 1}, got {sorted(ports)}",
                                  "each port takes exactly one edge"))
        for e in edges:
            if isinstance(e.delay, bool) or not isinstance(e.delay, int) or e.delay < 0:
                out.append(Diagnostic(n.name, n.op, f"edge from '{e.src}' has delay {e.delay!r}",
                                      "a delay is an integer number of steps >= 0"))
    return out


def _cycles(g: Graph) -> list[Diagnostic]:
    dag = nx.DiGraph((e.src, e.dst) for e in g.edges if e.delay == 0)
    dag.add_nodes_from(n.name for n in g.nodes)
    for cyc in nx.simple_cycles(dag):
        first = g[cyc[0]]
        loop = " -> ".join([*cyc, cyc[0]])
        # one cycle is enough to report: more would repeat the same fix
        return [Diagnostic(first.name, first.op, f"cycle {loop} has no delay edge",
                           "a recurrent connection must go through an edge with delay >= 1")]
    return []


def _structure(g: Graph, forward: bool) -> list[Diagnostic]:
    out = []
    sources = [n.name for n in g.nodes if n.op in GroupOp.SOURCE]
    sinks = [n.name for n in g.nodes if n.op == Op.OUTPUT or n.op in GroupOp.LOSS]
    if not any(g[s].op == Op.INPUT for s in sources):
        out.append(Diagnostic(None, None, "no input node", "start the model with g.input(shape)"))
    outputs = [n for n in g.nodes if n.op == Op.OUTPUT]
    if len(outputs) != 1:
        out.append(Diagnostic(None, None, f"expected exactly one output node, got {len(outputs)}",
                              "end the model with g.output(top_linear)"))
    full = nx.DiGraph((e.src, e.dst) for e in g.edges)
    full.add_nodes_from(n.name for n in g.nodes)
    reach = set(sources).union(*(nx.descendants(full, s) for s in sources)) if sources else set()
    feeds = set(sinks).union(*(nx.ancestors(full, s) for s in sinks)) if sinks else set()
    for n in g.nodes:
        if sources and n.name not in reach:
            out.append(Diagnostic(n.name, n.op, "is unreachable from the input", "connect it or remove it"))
        elif sinks and n.name not in feeds:
            out.append(Diagnostic(n.name, n.op, "is dangling: its result never reaches the output or a loss",
                                  "connect it to the network or remove it"))
        if forward and n.op not in GroupOp.FORWARD:
            out.append(Diagnostic(n.name, n.op, f"op {n.op.value!r} cannot be written in a forward network",
                                  "it is produced by derive_feedback; use only forward ops in build()"))
    return out


def _shapes(g: Graph, schema_ok: set[str]) -> list[Diagnostic]:
    out, bad = [], set()
    for n in g.topo_order():
        ins = g.inputs(n.name)
        if n.name not in schema_ok or any(i.name in bad for i in ins):
            bad.add(n.name)  # an upstream problem is already reported; do not cascade
            continue
        try:
            want = SHAPE_RULES[n.op](n, [i.shape for i in ins])
        except ShapeError as err:
            out.append(Diagnostic(n.name, n.op, err.message, err.hint))
            # a delayed operand (a recurrent synapse's own layer) comes later in topological order: its problem
            # shows up here first, and marking this node bad would hide the operand's own diagnostic behind the
            # cycle. The declared shape of this node stays the basis for the rest of the check.
            if not any(e.delay for e in g.edges if e.dst == n.name):
                bad.add(n.name)
            continue
        if tuple(n.shape) != tuple(want):
            out.append(Diagnostic(n.name, n.op, f"declares shape {list(n.shape)} but its operands give {list(want)}",
                                  "let the builder infer shapes, or fix the declared shape"))
            bad.add(n.name)
    return out


# ---------------------------------------------------------------------------------------------------- per-op checks


def _positive(n: Node, *keys: str) -> Iterable[tuple[str, str]]:
    for k in keys:
        v = n.attrs[k]
        vals = v if isinstance(v, tuple) else (v,)
        if v is not None and any(x <= 0 for x in vals):
            yield f"{k} must be > 0, got {v!r}", f"use a positive {k}"


@check(Op.INPUT, Op.TARGET, Op.FLATTEN, Op.ADD, Op.MSE)
def _no_params(n: Node, g: Graph) -> Iterable[tuple[str, str]]:
    if n.op == Op.TARGET and n.attrs["population"] < 1:
        yield f"population must be >= 1, got {n.attrs['population']}", ""
    if n.op == Op.INPUT and n.stream != Stream.F:
        yield "an input node belongs to the forward network", ""


@check(Op.LINEAR)
def _linear(n: Node, g: Graph):
    yield from _positive(n, "in_features", "out_features")


@check(Op.CONV2D, Op.CONV_T2D)
def _conv(n: Node, g: Graph):
    yield from _positive(n, "in_channels", "out_channels", "kernel", "stride")
    for key in ("kernel", "stride", "padding") + (("output_padding",) if n.op == Op.CONV_T2D else ()):
        if len(n.attrs[key]) != 2:
            yield f"{key} must have 2 entries (height, width), got {n.attrs[key]!r}", ""
            return
    if min(n.attrs["padding"]) < 0:
        yield f"padding must be >= 0, got {n.attrs['padding']!r}", ""
    if n.op == Op.CONV_T2D and any(op >= s or op < 0 for op, s in zip(n.attrs["output_padding"], n.attrs["stride"])):
        yield f"output_padding {n.attrs['output_padding']!r} must be in [0, stride)", ""


@check(Op.AVGPOOL2D, Op.MAXPOOL2D)
def _pool(n: Node, g: Graph):
    yield from _positive(n, "kernel", "stride")
    if len(n.attrs["kernel"]) != 2 or (n.attrs["stride"] is not None and len(n.attrs["stride"]) != 2):
        yield "kernel and stride must have 2 entries (height, width)", ""


@check(Op.UPSAMPLE2D, Op.UNFLATTEN)
def _target_shape(n: Node, g: Graph):
    yield from _positive(n, "size" if n.op == Op.UPSAMPLE2D else "shape")


@check(Op.BATCHNORM)
def _batchnorm(n: Node, g: Graph):
    yield from _positive(n, "num_features", "eps")
    if not 0 <= n.attrs["momentum"] <= 1:
        yield f"momentum must be in [0, 1], got {n.attrs['momentum']!r}", "torch's default is 0.1"


@check(Op.LIF)
def _lif(n: Node, g: Graph):
    a = n.attrs
    if a["tau"] <= 0:
        yield f"tau must be > 0, got {a['tau']!r}", "tau is the membrane time constant in steps; default 2.0"
    if a["v_th"] <= a["v_reset"]:
        yield (f"v_th={a['v_th']!r} must be above v_reset={a['v_reset']!r}",
               "a threshold at or below the reset potential fires every step; e.g. v_th=0.3, v_reset=0")
    yield from _positive(n, "alpha")


@check(Op.NEURON)
def _neuron(n: Node, g: Graph):
    a = n.attrs
    neuron = NEURONS.get(a["model"])
    if neuron is None:
        yield (f"no neuron called {a['model']!r}", f"declared: {', '.join(sorted(NEURONS))}; declare a new one with "
               "bsdgraph.declare_neuron(...) in the model file before build()")
        return
    known = dict(neuron.params)
    ok = True
    for k, v in a["params"].items():
        if k not in known:
            ok = False
            yield f"{neuron.name} has no parameter {k!r}", f"its parameters: {', '.join(known) or 'none'}"
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            ok = False
            yield f"parameter {k} must be a finite number, got {v!r}", ""
    if ok:
        yield from neuron.check_params(neuron.param_values(a["params"]))
    yield from _positive(n, "alpha")


@check(Op.OUTPUT)
def _output(n: Node, g: Graph):
    a = n.attrs
    if a["task"] == "classification" and a["target"] == "code":
        yield from _code(a, math.prod(n.shape) if n.shape else 0)
    elif a["task"] == "classification":
        if a["target"] not in ("onehot", "population", "sequence"):
            yield f"classification needs target onehot, population, code or sequence, got {a['target']!r}", ""
        elif a["target"] == "sequence" and a["population"] != 1:
            yield (f"a per-step class (target='sequence') is one neuron per class, got population={a['population']}",
                   "drop population, or classify once per sample (target='onehot' or 'population')")
        elif (a["target"] == "population") != (a["population"] > 1):  # B's target code would not fit its width
            yield (f"target {a['target']!r} with population={a['population']}: a population code has more than one "
                   "neuron per class, a one-hot code exactly one",
                   "g.output(x, population=k) picks target='population' itself when k > 1")
        width = math.prod(n.shape) if n.shape else 0
        if a["population"] < 1 or a["n_classes"] < 2 or a["n_classes"] * a["population"] != width:
            yield (f"n_classes={a['n_classes']} x population={a['population']} must equal the top width {width} "
                   "(and n_classes >= 2)", "make the top linear n_classes * population wide")
    elif a["target"] not in ("analog", "sequence"):
        yield (f"regression needs target 'analog' or 'sequence', got {a['target']!r}",
               "use g.output(x, task='regression'), or target='sequence' for one target per step")


def _code(a, width: int):
    """A distributed class code: n_classes distinct patterns of code_active of the ``width`` top neurons."""
    k, classes = a["code_active"], a["n_classes"]
    if a["population"] != 1:
        yield f"a class code (target='code') has no population, got population={a['population']}", ""
    if classes < 2:
        yield f"a class code needs n_classes >= 2, got {classes}", "g.output(x, classes=10, code=k)"
    elif not 1 <= k < width:
        yield (f"code_active={k} must be between 1 and the top width {width} - 1",
               "a code is k active neurons of the top layer's n; make the top linear wider than k")
    elif math.comb(width, k) < classes:
        yield f"{width} neurons with {k} active give only {math.comb(width, k)} codes for {classes} classes", ""


@check(Op.CE)
def _ce(n: Node, g: Graph):
    if not 0 <= n.attrs["smoothing"] < 1:
        yield f"smoothing must be in [0, 1), got {n.attrs['smoothing']!r}", "0.1 is the usual label smoothing"


@check(Op.RECO)
def _reco(n: Node, g: Graph):
    a = n.attrs
    if a["lam"] < 0 or a["lam_low"] < 0 or a["lam_high"] < 0:
        yield "lam, lam_low and lam_high must be >= 0", "the paper's lam is 0.6"
    yield from _positive(n, "eps")
    if a["freq"]:
        if not 0 < a["freq_r"] < 1:
            yield f"freq_r must be in (0, 1), got {a['freq_r']!r}", "the spec's choice is 0.25"
        shapes = [i.shape for i in g.inputs(n.name)]
        if any(len(s) != 3 or s[1] * s[2] < 2 for s in shapes):
            yield (f"the frequency split needs spatial [C, H, W] layers of more than one pixel, got "
                   f"{[list(s) for s in shapes]}", "use freq only on conv layers or on an image-shaped bottom layer")
