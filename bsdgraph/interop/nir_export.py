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
- LIF -> ``LIF(tau = τ·dt, r = 1, v_leak = v_reset, v_threshold = v_th, v_reset)``; soft reset is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from bsdgraph.ir.graph import GroupOp, Graph, Node, Op, Stream
from bsdgraph.interop.nir import META, SCHEME, MappingError, check_dt, lif_to_nir, nir_module
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
    extra = {k: n.attrs[k] for k in ("encoding", "n_classes", "population") if k in n.attrs}
    return [(n.name, nir.Input(input_type={"input": np.array(n.shape)}, **_meta(op=n.op.value, **extra)))]


@export_rule(Op.LINEAR)
def _linear(ex: _Export, n: Node):
    nir = nir_module()
    w = ex.tensor(n, "weight")
    if n.attrs["bias"]:
        return [(n.name, nir.Affine(weight=w, bias=ex.tensor(n, "bias")))]
    return [(n.name, nir.Linear(weight=w))]


@export_rule(Op.CONV2D)
def _conv2d(ex: _Export, n: Node):
    nir, a = nir_module(), n.attrs
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
    """Whether ``name`` carries 0/1 values: a LIF's spikes, Poisson input, or a transform of those."""
    n = g[name]
    if n.op == Op.LIF or (n.op == Op.INPUT and n.attrs["encoding"] == "poisson"):
        return True
    return n.op in GroupOp.TRANSFORM and _binary(g, g.inputs(name)[0].name)


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


@export_rule(Op.LIF)
def _lif(ex: _Export, n: Node):
    if n.attrs["reset"] == "soft":
        raise MappingError("reset='soft' (v = h - v_th·s) cannot be expressed by NIR's LIF, which sets v to "
                           "v_reset after a spike", "export a model with reset='hard' (train with --lif reset=hard)")
    lif = nir_module().LIF(**lif_to_nir(n.attrs, n.shape, ex.dt),
                           **_meta(surrogate=n.attrs["surrogate"], alpha=n.attrs["alpha"]))
    return [(n.name, lif)]


@export_rule(Op.OUTPUT)
def _output(ex: _Export, n: Node):
    nir = nir_module()
    out = nir.Output(output_type={"output": np.array(n.shape)},
                     **_meta(**{k: n.attrs[k] for k in ("task", "target", "n_classes", "population")}))
    if not ex.readout:
        return [(n.name, out)]
    # an imported model keeps the NIR graph's last LIF as its readout (READOUT): write it back where it was
    r = ex.readout
    attrs = dict(tau=r["tau"], v_th=r["v_th"], v_reset=r.get("v_reset", 0.0))
    return [(ex.fresh(r["name"]), nir.LIF(**lif_to_nir(attrs, n.shape, ex.dt))), (n.name, out)]


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


@export_rule(Op.ADD)
def _recurrent(ex: _Export, n: Node):
    raise MappingError("is the sum of a recurrent layer; bsdgraph does not write recurrent layers as NIR yet "
                       "(a NIR cycle with its one-step delay)", "train and run this model in bsdgraph; NIR "
                       "export covers feed-forward models (docs/nir.md)")


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
    return nir.NIRGraph(nodes=ex.nodes, edges=edges, metadata=_graph_meta(graph, dt, "forward"))


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
    table = [{**asdict(p), "b_nir": ex.ends[p.b_side][1] if p.b_side else None, "op": losses[p.loss].op.value,
              "attrs": dict(losses[p.loss].attrs)} for p in pairing(bsd)]
    meta = {**_graph_meta(bsd, dt, "backward"), "pairing": json.dumps(table)}
    return nir.NIRGraph(nodes=ex.nodes, edges=edges, metadata=meta)
