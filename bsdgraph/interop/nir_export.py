"""Export bsdgraph's forward network F (and optionally BSD's backward network B) as a NIR graph.

One rule per ``Op`` in ``EXPORT_RULES``: it returns the NIR nodes (a short chain, usually one) that compute the
bsdgraph node, or raises ``MappingError`` when NIR 1.0 cannot express it; every refusal is collected into one
``GraphError`` naming the nodes. What NIR has no field for (batchnorm statistics, the input encoding, the
surrogate, the output's task) goes into each node's ``metadata["bsdgraph"]``, so that ``import_nir`` restores the
exact graph while any other NIR reader still gets a network with the same spikes.

Non-obvious mappings (docs/nir.md):
- batchnorm (inference) -> a per-channel affine map: a 1x1 ``Conv2d`` with a diagonal weight on [C, H, W], a
  diagonal ``Affine`` on [D]; the exact statistics ride along in metadata.
- maxpool2d -> ``SumPool2d`` + ``Threshold(0.5)``: on 0/1 spikes, max = (sum > 0.5). Exact on spikes only, so a
  max-pool of anything but spikes is refused (NIR 1.0 has no MaxPool2d).
- LIF -> ``LIF(tau = τ·dt, r = 1, v_leak = v_reset, v_threshold = v_th, v_reset)``; the other built-in neurons NIR
  has (if, li, cuba_lif, cuba_li) likewise (``nir.NEURONS_TO_NIR``); soft reset, alif and user-declared neurons are
  refused.
- a recurrent layer (``add(current, rec(value[t-1])) -> neuron``) -> a subgraph named after the neuron: Input ->
  neuron <-> ``w_rec`` (a Linear) and neuron -> Output, the shape snnTorch writes for RLeaky/RSynaptic and the one its
  ``import_from_nir`` runs as written (a loop at the top level it rewires; docs/nir.md). The add node and rec have no
  NIR node of their own: NIR sums the neuron's two inputs, and the loop's delay is the one NIR's loop contract gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from bsdgraph.ir.graph import GroupOp, Graph, Node, Op, Stream
from bsdgraph.ir.neurons import is_spiking, neuron_of
from bsdgraph.interop.nir import META, SCHEME, MappingError, check_dt, neuron_to_nir, nir_module, readout_neuron
from bsdgraph.ir.params import param_shapes
from bsdgraph.ir.diagnostics import Diagnostic, GraphError
from bsdgraph.registry import registrar


@dataclass
class _Export:
    """The graph being exported, its weights, and the NIR nodes and edges produced so far."""

    graph: Graph
    params: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    dt: float
    readout: dict[str, Any] | None = None
    nodes: dict[str, Any] = field(default_factory=dict)
    ends: dict[str, tuple[str, str]] = field(default_factory=dict)   # bsdgraph node -> (first, last) NIR node

    def in_shape(self, n: Node) -> tuple[int, ...]:
        return self.graph.inputs(n.name)[0].shape

    def tensor(self, n: Node, key: str) -> np.ndarray:
        """A weight of ``n`` as float32 numpy, checked against the shape the node needs."""
        name, want = f"{n.name}.{key}", param_shapes(n)[key]
        if name not in self.params:
            raise MappingError(f"has no {key} {name!r} in the given weights",
                               "pass the checkpoint written by `bsdgraph train` for this model")
        got = tuple(self.params[name].shape)
        if got != tuple(want):
            raise MappingError(f"weight {name!r} has shape {list(got)} but the node needs {list(want)}",
                               "the checkpoint belongs to another model")
        return self.params[name].detach().to(torch.float32).cpu().numpy()

    def fresh(self, stem: str) -> str:
        name = stem
        while name in self.nodes or name in self.graph:
            name += "_"
        return name


Rule = Callable[[_Export, Node], list[tuple[str, Any]]]
EXPORT_RULES: dict[Op, Rule] = {}


export_rule = registrar(EXPORT_RULES)  # @export_rule(*ops): the NIR nodes of those ops


def _meta(**extra: Any) -> dict[str, Any]:
    return {"metadata": {META: extra}}


@export_rule(Op.INPUT, Op.TARGET)
def _input(ex: _Export, n: Node):
    nir = nir_module()
    extra = {k: n.attrs[k] for k in ("encoding", "n_classes", "population", "code_active", "code_seed")
             if k in n.attrs}
    return [(n.name, nir.Input(input_type={"input": np.array(n.shape)}, **_meta(op=n.op.value, **extra)))]


@export_rule(Op.LINEAR)
def _linear(ex: _Export, n: Node):
    nir = nir_module()
    if any(e.delay for e in ex.graph.in_edges(n.name)):
        layer = _layer_of_rec(ex.graph, n)
        if layer is None:
            raise MappingError("reads its input through a delayed edge outside a recurrent layer; NIR export writes a "
                               "delay only as a recurrent layer's loop (neuron -> bias-free linear -> add -> the same "
                               "neuron, delay 1)", "build the loop with g.recurrent_lif / g.recurrent_neuron")
        return []  # written inside its layer's subgraph (the neuron's rule)
    w = ex.tensor(n, "weight")
    if n.attrs["bias"]:
        return [(n.name, nir.Affine(weight=w, bias=ex.tensor(n, "bias")))]
    return [(n.name, nir.Linear(weight=w))]


@export_rule(Op.CONV2D)
def _conv2d(ex: _Export, n: Node):
    nir, a = nir_module(), n.attrs
    if any(e.delay for e in ex.graph.in_edges(n.name)):
        raise MappingError(_CONV_LOOP, "train a recurrent layer on a flat current (g.linear) to export it")
    # NIR's Conv2d always has a bias; a bias-free conv writes zeros and says so, so import restores bias=False
    bias = ex.tensor(n, "bias") if a["bias"] else np.zeros(a["out_channels"], np.float32)
    conv = nir.Conv2d(input_shape=tuple(ex.in_shape(n)[1:]), weight=ex.tensor(n, "weight"), stride=a["stride"],
                      padding=a["padding"], dilation=(1, 1), groups=1, bias=bias,
                      **(_meta(bias=False) if not a["bias"] else {}))
    return [(n.name, conv)]


@export_rule(Op.AVGPOOL2D)
def _avgpool(ex: _Export, n: Node):
    k = n.attrs["kernel"]
    return [(n.name, nir_module().AvgPool2d(kernel_size=np.array(k), stride=np.array(n.attrs["stride"] or k),
                                            padding=np.array([0, 0])))]


def _binary(g: Graph, name: str) -> bool:
    """Whether ``name`` carries 0/1 values: spiking neurons, Poisson input, or a max-pool or flatten of those (an
    average pool of spikes is a fraction)."""
    n = g[name]
    if (n.op in GroupOp.NEURON and is_spiking(n)) or (n.op == Op.INPUT and n.attrs["encoding"] == "poisson"):
        return True
    return n.op in (Op.MAXPOOL2D, Op.FLATTEN) and _binary(g, g.inputs(name)[0].name)


@export_rule(Op.MAXPOOL2D)
def _maxpool(ex: _Export, n: Node):
    nir = nir_module()
    src = ex.graph.inputs(n.name)[0].name
    if not _binary(ex.graph, src):
        raise MappingError(f"max-pools {src!r}, which is not spikes; NIR 1.0 has no MaxPool2d, and the exact "
                           "rewrite max = (sum > 0.5) holds for 0/1 inputs only",
                           "max-pool spikes (after a LIF) or use avgpool2d")
    k = n.attrs["kernel"]
    pool = nir.SumPool2d(kernel_size=np.array(k), stride=np.array(n.attrs["stride"] or k),
                         padding=np.array([0, 0]), **_meta(op="maxpool2d"))
    return [(n.name, pool), (ex.fresh(f"{n.name}_max"), nir.Threshold(threshold=np.full(n.shape, 0.5)))]


@export_rule(Op.FLATTEN)
def _flatten(ex: _Export, n: Node):
    # NIR shapes exclude the batch axis: dims 0..-1 are all of a sample's axes (snnTorch writes the same)
    return [(n.name, nir_module().Flatten(input_type={"input": np.array(ex.in_shape(n))}, start_dim=0,
                                          end_dim=-1))]


@export_rule(Op.BATCHNORM)
def _batchnorm(ex: _Export, n: Node):
    nir, a = nir_module(), n.attrs
    keys = [f"{n.name}.{k}" for k in ("running_mean", "running_var")]
    if any(k not in ex.state for k in keys):
        raise MappingError(f"has no running statistics {keys} in the given weights",
                           "pass the checkpoint written by `bsdgraph train` (it holds them under 'state')")
    stats = {k.rsplit(".", 1)[1]: ex.state[k].detach().double().cpu().numpy() for k in keys}
    gamma, beta = ex.tensor(n, "weight").astype(np.float64), ex.tensor(n, "bias").astype(np.float64)
    scale = gamma / np.sqrt(stats["running_var"] + a["eps"])
    shift = beta - stats["running_mean"] * scale
    meta = _meta(op="batchnorm", eps=a["eps"], momentum=a["momentum"], weight=gamma.astype(np.float32),
                 bias=beta.astype(np.float32), **{k: v.astype(np.float32) for k, v in stats.items()})
    if len(n.shape) == 3:  # [C, H, W]: per-channel scale and shift = a 1x1 convolution with a diagonal weight
        # (dense, not depthwise: nir 1.0.8 infers a conv's input channels as weight.shape[1], ignoring groups, so
        # a depthwise conv fails NIR's own type check)
        node = nir.Conv2d(input_shape=tuple(n.shape[1:]), weight=np.diag(scale)[:, :, None, None].astype(np.float32),
                          stride=1, padding=0, dilation=1, groups=1, bias=shift.astype(np.float32), **meta)
    else:                  # [D]: a diagonal affine map
        node = nir.Affine(weight=np.diag(scale).astype(np.float32), bias=shift.astype(np.float32), **meta)
    return [(n.name, node)]


def _neuron_node(neuron, values, shape: tuple[int, ...], dt: float, **meta):
    """The NIR node of bsdgraph neurons of declaration ``neuron``; ``MappingError`` when NIR has none."""
    nir_type, kwargs = neuron_to_nir(neuron, values, shape, dt)
    return getattr(nir_module(), nir_type)(**kwargs, **(_meta(**meta) if meta else {}))


@export_rule(Op.LIF, Op.NEURON)
def _neuron(ex: _Export, n: Node):
    neuron, values = neuron_of(n)
    meta = {"surrogate": n.attrs["surrogate"], "alpha": n.attrs["alpha"]}
    if n.op == Op.NEURON:  # import restores a neuron node (not the lif op) with the parameters the model gave
        meta.update(op="neuron", model=neuron.name, params=",".join(n.attrs["params"]))
    node = _neuron_node(neuron, values, n.shape, ex.dt, **meta)
    parts = _recurrent_parts(ex.graph, n)
    return [(n.name, node if parts is None else _layer_subgraph(ex, n, node, parts[1]))]


def _recurrent_parts(g: Graph, n: Node) -> tuple[Node, Node] | None:
    """(add, rec) when ``n`` is the neurons of a recurrent layer, ``add(current, rec) -> n`` with ``rec`` a bias-free
    linear reading ``n`` through one delay-1 edge and feeding only the add; else None."""
    ins = g.inputs(n.name)
    if len(ins) != 1 or ins[0].op != Op.ADD:
        return None
    add = ins[0]
    rec = g.inputs(add.name)[1]
    edges = g.in_edges(rec.name)
    if (rec.op != Op.LINEAR or rec.attrs["bias"] or len(edges) != 1 or edges[0].src != n.name
            or edges[0].delay != 1 or _users(g, rec) != [add.name] or _users(g, add) != [n.name]):
        return None
    return add, rec


def _users(g: Graph, n: Node) -> list[str]:
    # local losses read a layer's current too (BSD's B graph): they are no NIR node, so they do not count
    return [c.name for c in g.consumers(n.name) if c.op not in GroupOp.LOSS]


def _layer_of_rec(g: Graph, rec: Node) -> Node | None:
    """The neurons whose recurrent synapse ``rec`` is (``_recurrent_parts``), else None."""
    src = g.inputs(rec.name)[0]
    parts = _recurrent_parts(g, src) if src.op in GroupOp.NEURON else None
    return src if parts is not None and parts[1].name == rec.name else None


def _layer_subgraph(ex: _Export, n: Node, neuron, rec: Node):
    """A recurrent layer as the subgraph snnTorch writes: Input -> neuron <-> w_rec, neuron -> Output. NIR sums the
    neuron's two inputs (bsdgraph's add); the loop carries w_rec's value of the previous step, which for a
    bias-free w_rec is rec(value[t-1]) with 0 before the first step, as bsdgraph's delay-1 edge gives."""
    nir = nir_module()
    width = np.array(n.shape)
    nodes = {"input": nir.Input(input_type={"input": width}), "neuron": neuron,
             "w_rec": nir.Linear(weight=ex.tensor(rec, "weight")), "output": nir.Output(output_type={"output": width})}
    edges = [("input", "neuron"), ("neuron", "w_rec"), ("w_rec", "neuron"), ("neuron", "output")]
    return nir.NIRGraph(nodes=nodes, edges=edges, type_check=False)


@export_rule(Op.OUTPUT)
def _output(ex: _Export, n: Node):
    nir = nir_module()
    out = nir.Output(output_type={"output": np.array(n.shape)},
                     **_meta(**{k: n.attrs[k] for k in ("task", "target", "n_classes", "population", "code_active",
                                                        "code_seed")}))
    if not ex.readout:
        return [(n.name, out)]
    # an imported model keeps the NIR graph's last neuron as its readout (READOUT): write it back where it was
    neuron, values = readout_neuron(ex.readout)
    meta = {"op": "neuron", "model": neuron.name, "params": ",".join(ex.readout["params"])} if (
        "model" in ex.readout) else {}
    return [(ex.fresh(ex.readout["name"]), _neuron_node(neuron, values, n.shape, ex.dt, **meta)), (n.name, out)]


@export_rule(Op.UNFLATTEN)
def _unflatten(ex: _Export, n: Node):
    if not ex.graph.consumers(n.name) or all(c.op in GroupOp.LOSS for c in ex.graph.consumers(n.name)):
        return []  # B's bottom: a pure reshape of its last current; the output records the shape instead
    raise MappingError("NIR 1.0 has no unflatten (reshape) node, and this one is not B's last node",
                       "export F alone (without --with-backward)")


@export_rule(Op.CONV_T2D, Op.UPSAMPLE2D)
def _no_nir_node(ex: _Export, n: Node):
    what = {Op.CONV_T2D: "transposed convolution", Op.UPSAMPLE2D: "upsampling"}[n.op]
    if n.stream == Stream.F:  # a decoder layer written in F itself: no export of this model can carry it
        raise MappingError(f"NIR 1.0 has no {what} node, so a forward network that decodes with it cannot be "
                           "written as NIR", "keep the model as bsdgraph checkpoints (bsdgraph train / eval)")
    raise MappingError(f"NIR 1.0 has no {what} node, so this backward network cannot be written as NIR",
                       "export F alone (without --with-backward); B is derived again from F on import")


_CONV_LOOP = ("a recurrent convolution reads its layer's spikes of the previous step, and NIR export writes a loop "
              "only as a recurrent layer with an [n, n] Affine/Linear (the form snnTorch's RLeaky writes)")


def _is_recurrent_sum(g: Graph, n: Node) -> bool:
    consumers = _users(g, n)
    parts = _recurrent_parts(g, g[consumers[0]]) if len(consumers) == 1 else None
    return parts is not None and parts[0].name == n.name


@export_rule(Op.ADD)
def _sum(ex: _Export, n: Node):
    if _is_recurrent_sum(ex.graph, n):
        return []  # NIR sums the neuron's inputs: the add is the edges into the layer's subgraph
    if any(e.delay for i in ex.graph.inputs(n.name) for e in ex.graph.in_edges(i.name)):
        raise MappingError("is the sum of a recurrent layer of convolutions; " + _CONV_LOOP,
                           "train a recurrent layer on a flat current (g.linear) to export it")
    # NIR sums a node's incoming edges: a Scale of ones with one edge per operand is exactly the sum (an identity
    # on it), which any NIR reader computes as written; import reads it back as this add
    nir = nir_module()
    return [(n.name, nir.Scale(scale=np.ones(n.shape, np.float32), **_meta(op="add")))]


@export_rule(*GroupOp.LOSS)
def _loss(ex: _Export, n: Node):
    raise MappingError("a local loss is not a NIR node", "losses travel in the backward graph's 'pairing' metadata")


# ---------------------------------------------------------------------------------------------------- entry points


def _emit(ex: _Export, nodes: list[Node]) -> list[tuple[str, str]]:
    """Run the rules over ``nodes`` (topological order); returns the NIR edges, raises one GraphError."""
    diags, edges = [], []
    for n in nodes:
        try:
            chain = EXPORT_RULES[n.op](ex, n)
        except MappingError as err:
            diags.append(Diagnostic(n.name, n.op, err.message, err.hint))
            continue
        srcs = [ex.ends[e.src][1] for e in ex.graph.in_edges(n.name) if e.src in ex.ends]
        if not chain:  # pass-through: the node's consumers read its input
            src = ex.graph.inputs(n.name)[0].name
            if src in ex.ends:  # else its input was refused and is reported already (found by fuzzing the CLI)
                ex.ends[n.name] = ex.ends[src]
            continue
        for name, node in chain:
            ex.nodes[name] = node
        names = [name for name, _ in chain]
        edges += [(s, names[0]) for s in srcs] + list(zip(names, names[1:]))
        ex.ends[n.name] = (names[0], names[-1])
    if diags:
        raise GraphError(diags)
    return edges


def _b_nir(ex: _Export, b_side: str | None) -> dict[str, Any]:
    """Where a pairing row's B value lives in NIR: ``b_nir``, the node holding it; for a recurrent layer's sum, which
    no NIR node holds (NIR forms it at the input of the layer's subgraph), ``b_nir`` is None and ``b_sum`` names the
    two terms: the feedforward synapse and the subgraph's w_rec (its output of the previous step)."""
    if b_side is None:
        return {"b_nir": None, "b_sum": None}
    n = ex.graph[b_side]
    if n.op != Op.ADD or not _is_recurrent_sum(ex.graph, n):
        return {"b_nir": ex.ends[b_side][1], "b_sum": None}
    layer = next(c.name for c in ex.graph.consumers(b_side) if c.op in GroupOp.NEURON)
    return {"b_nir": None, "b_sum": [ex.ends[b_side][1], f"{ex.ends[layer][1]}.w_rec"]}


def _graph_meta(g: Graph, dt: float, network: str) -> dict[str, Any]:
    from bsdgraph.version import __version__

    return {"source": f"bsdgraph {__version__}", "network": network, "name": g.name, "T": g.T, "dt": dt,
            "scheme": SCHEME, "reset": "hard", "spike": "v >= v_threshold"}


def export_nir(graph: Graph, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor] | None = None,
               dt: float | None = None, readout: dict[str, Any] | None = None):
    """The forward network F of ``graph`` (a forward or a BSD graph) as a ``nir.NIRGraph``.

    ``dt`` (seconds per step, default the graph's own) sets NIR's time constants: tau = τ·dt. The graph
    metadata records dt, the integration scheme and the reset mode."""
    nir = nir_module()
    dt = check_dt(graph.dt if dt is None else dt, "export")
    ex = _Export(graph, params, dict(state or {}), dt, readout)
    edges = _emit(ex, [n for n in graph.topo_order() if n.stream == Stream.F])
    # the order of the nodes as written: where branches leave several topological orders, import follows this one,
    # so that the graph it rebuilds equals this one node for node (JSON: NIR metadata holds no lists of strings)
    meta = {**_graph_meta(graph, dt, "forward"), "order": json.dumps(list(ex.nodes))}
    return nir.NIRGraph(nodes=ex.nodes, edges=edges, metadata=meta)


def export_backward(bsd: Graph, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor] | None = None,
                    dt: float | None = None):
    """BSD's backward network B (concept -> stimulus) as a second NIR graph, with the layer pairing (which F node
    each local loss compares with which B node, and which weights it updates) as JSON in its metadata."""
    from bsdgraph.compiler.feedback import pairing

    nir = nir_module()
    dt = check_dt(bsd.dt if dt is None else dt, "export")
    ex = _Export(bsd, params, dict(state or {}), dt)
    b_nodes = [n for n in bsd.topo_order() if n.stream == Stream.B]
    edges = _emit(ex, b_nodes)
    last = b_nodes[-1]
    flat = last.op == Op.UNFLATTEN  # dropped by its rule: B's output is the flat current before it
    shape = bsd.inputs(last.name)[0].shape if flat else last.shape
    out = ex.fresh("output")
    ex.nodes[out] = nir.Output(output_type={"output": np.array(shape)},
                               **(_meta(unflatten=list(last.shape)) if flat else {}))
    edges.append((ex.ends[last.name][1], out))
    losses = {n.name: n for n in bsd.nodes if n.op in GroupOp.LOSS}
    # b_nir: the NIR node of B holding b_side's value (B's bottom unflatten is dropped: its input holds it)
    table = [{**asdict(p), **_b_nir(ex, p.b_side), "op": losses[p.loss].op.value,
              "attrs": dict(losses[p.loss].attrs)} for p in pairing(bsd)]
    meta = {**_graph_meta(bsd, dt, "backward"), "pairing": json.dumps(table)}
    return nir.NIRGraph(nodes=ex.nodes, edges=edges, metadata=meta)
