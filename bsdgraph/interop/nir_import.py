"""Import a NIR graph into bsdgraph's IR: a validated forward network F with its weights.

One rule per NIR node type in ``IMPORT_RULES`` (keyed by the type's name, as NIR files store it). A rule adds the
bsdgraph node(s) for one NIR node and returns the name of the node that carries its output; a node bsdgraph
cannot represent raises ``MappingError``, which becomes a ``Diagnostic`` naming the NIR node and its type. All of
them are collected into one ``GraphError``; nodes downstream of a failed one are skipped (no cascade).

Exact rewrites (docs/nir.md): a LIF's r and v_leak are folded into the synapse feeding it (W' = r W,
b' = r b + v_leak - v_reset); SumPool2d + Threshold(t), 0 <= t < 1, on spikes is max-pooling; a LIF right after
the last synapse and before the Output becomes the readout (``READOUT``): bsdgraph's output reads the top
synapse's current, as BSD's top loss needs, and ``bsdgraph run`` applies the readout LIF to that current.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch

from bsdgraph.ir.graph import GroupOp, Graph, Op
from bsdgraph.ir.builder import GraphBuilder
from bsdgraph.interop.nir import MappingError, NIRError, check_dt, lif_from_nir, nir_module, per_neuron, plain, read_nir
from bsdgraph.interop.nir import node_metadata as _meta
from bsdgraph.ir.diagnostics import Diagnostic, GraphError
from bsdgraph.registry import registrar

DEFAULT_T = 4  # NIR graphs carry no number of steps per sample; bsdgraph's models use 4


@dataclass(frozen=True)
class Imported:
    graph: Graph
    params: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    readout: dict[str, Any] | None = None   # the NIR graph's top LIF, applied to the output current by `run`
    notes: tuple[str, ...] = ()


def _ints(v, n: int = 2) -> tuple[int, ...]:
    a = np.asarray(v).reshape(-1)
    return tuple(int(x) for x in (np.repeat(a, n) if a.size == 1 else a))


@dataclass
class _Import:
    graph: Any                        # the nir.NIRGraph
    dt: float
    builder: GraphBuilder
    preds: dict[str, list[str]]
    succs: dict[str, list[str]]
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    out: dict[str, str] = field(default_factory=dict)     # NIR node -> bsdgraph node carrying its output
    ops: dict[str, Op] = field(default_factory=dict)      # bsdgraph node -> op
    binary: set[str] = field(default_factory=set)         # bsdgraph nodes carrying 0/1 values
    folded: set[str] = field(default_factory=set)         # NIR LIFs whose r / v_leak went into their synapse
    absorbed: set[str] = field(default_factory=set)       # NIR nodes already mapped with their predecessor
    readout: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def src(self, name: str) -> str:
        return self.out[self.preds[name][0]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.builder.shape(self.src(name))

    def only_succ(self, name: str):
        s = self.succs[name]
        return (s[0], self.graph.nodes[s[0]]) if len(s) == 1 else (None, None)

    def add(self, op: Op, name: str, inputs: list[str], **attrs) -> str:
        self.builder.add(op, inputs, name=name, **attrs)
        self.ops[name] = op
        if op == Op.LIF or (op in GroupOp.TRANSFORM and inputs[0] in self.binary):
            self.binary.add(name)
        return name

    def bind(self, name: str, **tensors: np.ndarray) -> None:
        for k, v in tensors.items():
            v = np.ascontiguousarray(v, dtype=np.float32)
            if not np.all(np.isfinite(v)):  # a NaN weight imports fine and then silences or floods every layer
                raise MappingError(f"{k} holds {int((~np.isfinite(v)).sum())} non-finite value(s) (NaN or Inf, "
                                   "after conversion to float32)", "fix the weights before exporting them")
            self.params[f"{name}.{k}"] = torch.from_numpy(v)

    def fold(self, name: str, shape: tuple[int, ...], per_channel: bool):
        """(scale, shift) per output unit of synapse ``name`` for the LIF right after it, or (None, None).

        A LIF whose parameters cannot be mapped is left alone here: its own rule reports why."""
        lif_name, lif = self.only_succ(name)
        if type(lif).__name__ != "LIF":
            return None, None
        try:
            m = lif_from_nir(lif, shape, self.dt)
        except MappingError:
            return None, None
        scale, shift = m.scale, m.shift
        if per_channel:  # a convolution shares its weights across positions: one factor per channel
            if any(v is not None and not np.all(v == v[:, :1, :1]) for v in (scale, shift)):
                return None, None
            scale, shift = (None if v is None else v[:, 0, 0] for v in (scale, shift))
        if scale is not None or shift is not None:
            self.folded.add(lif_name)
        return scale, shift


def _apply_fold(w: np.ndarray, b: np.ndarray | None, scale, shift):
    w64, b64 = w.astype(np.float64), None if b is None else b.astype(np.float64)
    if scale is not None:
        w64 = w64 * scale.reshape(-1, *([1] * (w.ndim - 1)))
        b64 = None if b64 is None else b64 * scale
    if shift is not None:
        b64 = (np.zeros(w.shape[0]) if b64 is None else b64) + shift
    return w64.astype(np.float32), None if b64 is None else b64.astype(np.float32)


Rule = Callable[[_Import, str, Any], str]
IMPORT_RULES: dict[str, Rule] = {}


import_rule = registrar(IMPORT_RULES)  # @import_rule(*types): the bsdgraph nodes of those NIR node types


@import_rule("Input")
def _input(ctx: _Import, name: str, node) -> str:
    shape = tuple(int(x) for x in np.asarray(node.input_type["input"]).reshape(-1))
    meta = _meta(node)
    if meta.get("op") == "target":
        raise MappingError("is the target input of a backward network B",
                           "import the forward network F; B is derived from F again")
    return ctx.add(Op.INPUT, name, [], shape=shape, encoding=meta.get("encoding", "direct"))


def _batchnorm(ctx: _Import, name: str, node) -> str:
    meta, shape = _meta(node), ctx.shape(name)
    stats = {k: np.asarray(meta.get(k, []), np.float32).reshape(-1) for k in
             ("weight", "bias", "running_mean", "running_var")}
    if any(v.size != shape[0] for v in stats.values()):
        raise MappingError(f"batchnorm metadata must hold weight, bias, running_mean, running_var of {shape[0]} "
                           f"channels, got sizes { {k: v.size for k, v in stats.items()} }", "")
    eps = meta.get("eps", 1e-5)
    scale = stats["weight"].astype(np.float64) / np.sqrt(stats["running_var"].astype(np.float64) + eps)
    w = np.asarray(node.weight, np.float64).reshape(shape[0], shape[0])
    b = np.asarray(node.bias, np.float64).reshape(shape[0])  # one per channel: allclose alone would broadcast [1]
    if not (np.allclose(w, np.diag(scale), rtol=1e-5, atol=1e-6)
            and np.allclose(b, stats["bias"] - stats["running_mean"] * scale, rtol=1e-5, atol=1e-6)):
        raise MappingError("its batchnorm metadata disagrees with its weights (edited after export?)",
                           "drop the node's 'bsdgraph' metadata to import it as a plain layer")
    ctx.add(Op.BATCHNORM, name, [ctx.src(name)], num_features=shape[0], eps=eps,
            momentum=meta.get("momentum", 0.1))
    ctx.bind(name, weight=stats["weight"], bias=stats["bias"])
    ctx.state.update({f"{name}.{k}": torch.from_numpy(stats[k]) for k in ("running_mean", "running_var")})
    return name


@import_rule("Affine", "Linear")
def _linear(ctx: _Import, name: str, node) -> str:
    if _meta(node).get("op") == "batchnorm":
        return _batchnorm(ctx, name, node)
    w = np.asarray(node.weight)
    b = np.asarray(node.bias).reshape(-1) if hasattr(node, "bias") else None
    if w.ndim != 2 or (b is not None and b.shape != (w.shape[0],)):
        raise MappingError(f"weight {list(w.shape)} / bias {None if b is None else list(b.shape)} is not a "
                           "[out, in] matrix with an [out] bias", "")
    shape = ctx.shape(name)
    if len(shape) != 1 or shape[0] != w.shape[1]:
        raise MappingError(f"weight has shape {list(w.shape)} ([out, in]) but its input is {list(shape)}",
                           "the weight needs one column per input value" if len(shape) == 1 else
                           "NIR's Affine takes a flat vector: put a Flatten(start_dim=0) before it")
    w, b = _apply_fold(w, b, *ctx.fold(name, (w.shape[0],), per_channel=False))
    ctx.add(Op.LINEAR, name, [ctx.src(name)], in_features=w.shape[1], out_features=w.shape[0], bias=b is not None)
    ctx.bind(name, weight=w, **({"bias": b} if b is not None else {}))
    return name


def _conv_padding(node, kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    if isinstance(node.padding, str):
        if node.padding == "valid":
            return (0, 0)
        if stride == (1, 1) and all(k % 2 for k in kernel):  # 'same' with odd kernels is symmetric padding
            return (kernel[0] // 2, kernel[1] // 2)
        raise MappingError(f"padding='same' with kernel {list(kernel)} and stride {list(stride)} is asymmetric",
                           "use explicit padding")
    return _ints(node.padding)


@import_rule("Conv2d")
def _conv2d(ctx: _Import, name: str, node) -> str:
    meta = _meta(node)
    if meta.get("op") == "batchnorm":
        return _batchnorm(ctx, name, node)
    w, shape = np.asarray(node.weight), ctx.shape(name)
    if int(node.groups) != 1 or _ints(node.dilation) != (1, 1):
        raise MappingError(f"groups={int(node.groups)}, dilation={list(_ints(node.dilation))}: bsdgraph's conv2d "
                           "is dense and undilated", "use groups=1 and dilation=1")
    if w.ndim != 4 or len(shape) != 3 or w.shape[1] != shape[0]:
        raise MappingError(f"weight has shape {list(w.shape)} ([C_out, C_in, kh, kw]) but its input is "
                           f"{list(shape)} ([C, H, W])", "the weight needs one input channel per channel of its input")
    if node.input_shape is not None and _ints(node.input_shape) != tuple(shape[1:]):
        raise MappingError(f"declares input_shape {list(_ints(node.input_shape))} but its input is {list(shape)}",
                           "fix input_shape or the layer before it")
    kernel, stride = tuple(w.shape[2:]), _ints(node.stride)
    padding = _conv_padding(node, kernel, stride)
    out = (w.shape[0], *((shape[1 + i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in range(2)))
    bias = np.asarray(node.bias).reshape(-1)
    if bias.size != w.shape[0]:  # would be bound as is and broadcast over the channels
        raise MappingError(f"bias has {bias.size} value(s) but the weight has {w.shape[0]} output channels",
                           "give one bias per output channel")
    has_bias = meta.get("bias", True) or bool(np.any(bias))  # zeros written for a bias-free conv (export says so)
    w, b = _apply_fold(w, bias if has_bias else None, *ctx.fold(name, out, per_channel=True))
    ctx.add(Op.CONV2D, name, [ctx.src(name)], in_channels=w.shape[1], out_channels=w.shape[0], kernel=kernel,
            stride=stride, padding=padding, bias=b is not None)
    ctx.bind(name, weight=w, **({"bias": b} if b is not None else {}))
    return name


def _pool_attrs(node) -> dict[str, Any]:
    kernel, stride = _ints(node.kernel_size), _ints(node.stride)
    if any(_ints(node.padding)):
        raise MappingError(f"padding {list(_ints(node.padding))}: bsdgraph pools without padding", "pad before")
    return dict(kernel=kernel, stride=None if stride == kernel else stride)  # None = the kernel: canonical form


@import_rule("AvgPool2d")
def _avgpool(ctx: _Import, name: str, node) -> str:
    return ctx.add(Op.AVGPOOL2D, name, [ctx.src(name)], **_pool_attrs(node))


@import_rule("SumPool2d")
def _sumpool(ctx: _Import, name: str, node) -> str:
    thr_name, thr = ctx.only_succ(name)
    t = np.asarray(getattr(thr, "threshold", np.nan), np.float64)
    if type(thr).__name__ != "Threshold" or not np.all((t >= 0) & (t < 1)):
        raise MappingError("sum pooling without a following Threshold(0 <= t < 1) has no bsdgraph op",
                           "use AvgPool2d (sum = average x window size: fold that into the next synapse)")
    if ctx.src(name) not in ctx.binary:
        raise MappingError("SumPool2d + Threshold is max-pooling only on 0/1 spikes, and its input is not spikes",
                           "pool the output of a LIF")
    ctx.absorbed.add(thr_name)
    ctx.out[thr_name] = ctx.add(Op.MAXPOOL2D, name, [ctx.src(name)], **_pool_attrs(node))
    per_neuron(thr, "threshold", ctx.builder.shape(name))  # one per pooled value (or one): else a malformed file
    return name


@import_rule("Flatten")
def _flatten(ctx: _Import, name: str, node) -> str:
    shape = ctx.shape(name)
    declared = node.input_type.get("input") if node.input_type else None
    if declared is not None and tuple(int(x) for x in np.asarray(declared).reshape(-1)) != tuple(shape):
        raise MappingError(f"declares input {list(np.asarray(declared).reshape(-1))} but its input is {list(shape)}",
                           "fix input_type or the layer before it")
    start, end = int(node.start_dim) % len(shape), int(node.end_dim) % len(shape)
    out = (*shape[:start], math.prod(shape[start:end + 1]), *shape[end + 1:])
    if len(out) != 1:
        raise MappingError(f"flattens dims {int(node.start_dim)}..{int(node.end_dim)} of {list(shape)} into "
                           f"{list(out)}; bsdgraph flattens all of a sample's axes",
                           "NIR shapes exclude the batch axis: use start_dim=0, end_dim=-1")
    return ctx.add(Op.FLATTEN, name, [ctx.src(name)])


@import_rule("LIF")
def _lif(ctx: _Import, name: str, node) -> str:
    src = ctx.src(name)
    m = lif_from_nir(node, ctx.builder.shape(src), ctx.dt)
    if (m.scale is not None or m.shift is not None) and name not in ctx.folded:
        conv = " (a convolution shares weights across positions: it takes one r, v_leak per channel)"
        raise MappingError("has r != 1 or v_leak != v_reset, which import folds into the synapse feeding the LIF; "
                           f"{src!r} ({ctx.ops[src].value}) cannot take it"
                           + (conv if ctx.ops[src] == Op.CONV2D else ""),
                           "feed the LIF from an Affine/Linear (any r, v_leak) or a Conv2d (one r, v_leak per "
                           "channel)")
    meta = _meta(node)
    attrs = {**m.attrs, "surrogate": meta.get("surrogate", "atan"), "alpha": meta.get("alpha", 2.0)}
    out_name, out = ctx.only_succ(name)
    if type(out).__name__ == "Output" and ctx.ops[src] in GroupOp.SYNAPSE | {Op.BATCHNORM}:
        ctx.readout = {"name": name, **m.attrs}
        ctx.notes.append(f"LIF {name!r} before the output is the readout: the output reads its input current "
                         f"{src!r} (BSD's top loss needs a current); `bsdgraph run` applies the LIF to it")
        return src
    return ctx.add(Op.LIF, name, [src], **attrs)


@import_rule("Output")
def _output(ctx: _Import, name: str, node) -> str:
    shape, meta = ctx.shape(name), _meta(node)
    width = math.prod(shape)
    task = meta.get("task", "classification" if len(shape) == 1 and width >= 2 else "regression")
    population = int(meta.get("population", 1))
    target = meta.get("target", "onehot" if task == "classification" else "analog")
    return ctx.add(Op.OUTPUT, name, [ctx.src(name)], task=task, target=target, population=population,
                   n_classes=width // max(population, 1) if task == "classification" else 0)


_UNSUPPORTED = {
    "Conv1d": ("1-d convolution", "reshape to a 2-d convolution with a 1-pixel-high kernel"),
    "Delay": ("synaptic delay", "bsdgraph imports feed-forward graphs without delays"),
    "NIRGraph": ("nested subgraph (snnTorch writes recurrent layers this way)", "flatten it into feed-forward layers"),
    "Scale": ("elementwise scale", "fold it into the synapse before or after it"),
    "CubaLI": ("current-based leaky integrator (synaptic state)", "bsdgraph's neuron is a LIF without synaptic "
               "current state"),
    "CubaLIF": ("current-based LIF (two state variables)", "use LIF neurons (snnTorch: Leaky, not Synaptic)"),
    "I": ("integrator without leak or spikes", ""),
    "IF": ("integrate-and-fire without leak", "bsdgraph's LIF always leaks; use a LIF with a large tau"),
    "LI": ("leaky integrator without spikes", "read the last synapse's current instead (it is the output)"),
    "Threshold": ("threshold on its own (only SumPool2d + Threshold on spikes, i.e. max-pooling, maps)", ""),
}


def _unsupported(ctx: _Import, name: str, node) -> str:
    what, hint = _UNSUPPORTED[type(node).__name__]
    raise MappingError(f"bsdgraph has no {what}", hint)


for _t in _UNSUPPORTED:
    IMPORT_RULES[_t] = _unsupported


# ---------------------------------------------------------------------------------------------------- driver


def _structure(g) -> tuple[list[Diagnostic], list[str], dict, dict]:
    """Edges, inputs, outputs and fan-in checked before any rule runs; returns (diagnostics, order, preds, succs)."""
    diags = [Diagnostic(None, None, f"edge {a!r} -> {b!r} names {[x for x in (a, b) if x not in g.nodes]}, "
                        "which is not a node of the graph", "add the missing node or remove the edge")
             for a, b in g.edges if a not in g.nodes or b not in g.nodes]
    edges = [(a, b) for a, b in g.edges if a in g.nodes and b in g.nodes]
    preds = {n: [a for a, b in edges if b == n] for n in g.nodes}
    succs = {n: [b for a, b in edges if a == n] for n in g.nodes}
    for kind in ("Input", "Output"):
        found = [n for n, node in g.nodes.items() if type(node).__name__ == kind]
        if len(found) != 1:
            diags.append(Diagnostic(None, None, f"expected exactly one {kind} node, got {len(found)} "
                                    f"{found or ''}".rstrip(),
                                    "bsdgraph imports one stimulus -> one output networks"))
    for n, node in g.nodes.items():
        k = len(preds[n])
        if type(node).__name__ != "Input" and k != 1:
            diags.append(Diagnostic(n, None, f"({type(node).__name__}) has {k} incoming edges; bsdgraph nodes take "
                                    "exactly one input (NIR sums several)", "connect it to exactly one producer"))
    dag = nx.DiGraph(edges)
    dag.add_nodes_from(g.nodes)
    try:
        cycle = nx.find_cycle(dag)
        diags.append(Diagnostic(cycle[0][0], None, "is on a recurrent loop " + " -> ".join(a for a, _ in cycle),
                                "bsdgraph imports feed-forward NIR graphs"))
        order = list(g.nodes)
    except nx.NetworkXNoCycle:
        order = list(nx.topological_sort(dag))
    return diags, order, preds, succs


def _walk(ctx: _Import, order: list[str]) -> list[Diagnostic]:
    diags, failed = [], set()
    for name in order:
        node = ctx.graph.nodes[name]
        kind = type(node).__name__
        if name in ctx.absorbed:
            continue
        if any(p in failed or p not in ctx.out for p in ctx.preds[name]):
            failed.add(name)  # an upstream problem is already reported
            continue
        try:
            ctx.out[name] = IMPORT_RULES.get(kind, _unknown)(ctx, name, node)
        except MappingError as err:
            diags.append(Diagnostic(name, None, f"(NIR {kind}) {err.message}", err.hint))
            failed.add(name)
        except GraphError as err:  # shape inference of the bsdgraph node (wrong shapes in the file)
            diags += [Diagnostic(d.node, d.op, f"(NIR {kind}) {d.message}", d.hint) for d in err.diagnostics]
            failed.add(name)
        except (TypeError, ValueError, AttributeError, IndexError, KeyError, ArithmeticError) as err:
            # a field NIR left unchecked (ArithmeticError: int(inf) in a stride; docs/reliability.md)
            diags.append(Diagnostic(name, None, f"(NIR {kind}) malformed node: {type(err).__name__}: {err}",
                                    "write it with nir's own node constructors"))
            failed.add(name)
    return diags


def _unknown(ctx: _Import, name: str, node) -> str:
    raise MappingError(f"unknown NIR node type {type(node).__name__!r}", "")


def _steps_of(meta: dict, where: str) -> int:
    """The file's record of T (bsdgraph writes it), else DEFAULT_T; a record that is not a whole number is an error."""
    T = meta.get("T", DEFAULT_T)
    if isinstance(T, float) and T.is_integer():
        T = int(T)
    if isinstance(T, bool) or not isinstance(T, int):
        raise NIRError(f"{where}: its metadata records T = {T!r} steps per sample, not a whole number; pass --steps T")
    return T


def import_nir(source, dt: float | None = None, T: int | None = None, name: str | None = None) -> Imported:
    """A NIR graph (a ``nir.NIRGraph`` or the path of a NIR file) as a validated bsdgraph forward network.

    ``dt`` is the step length in seconds (tau in steps = tau / dt); a file written by bsdgraph records it, any
    other file needs it given. ``T`` (steps per sample) defaults to the file's record or 4."""
    where = str(source) if isinstance(source, (str, Path)) else "NIR graph"
    g = read_nir(source) if isinstance(source, (str, Path)) else source
    if not isinstance(g, nir_module().NIRGraph):
        raise NIRError(f"{where}: expected a nir.NIRGraph, got {type(g).__name__}")
    meta = plain(dict(g.metadata or {}))
    if meta.get("network") == "backward":
        raise NIRError(f"{where}: is a backward network B (written by export-nir --with-backward); import the "
                       "forward network F: B is derived from F again")
    if dt is None and "dt" not in meta:
        raise NIRError(f"{where}: the file does not record its time step; pass --dt SECONDS (the step the network "
                       "was built for: snnTorch's export assumes 1e-4)")
    dt = check_dt(meta["dt"] if dt is None else dt, where)
    T = T if T is not None else _steps_of(meta, where)
    default_name = Path(source).stem if isinstance(source, (str, Path)) else "imported"
    diags, order, preds, succs = _structure(g)
    if diags:
        raise GraphError(diags)
    builder = GraphBuilder(str(name or meta.get("name") or default_name), T=T, dt=dt)
    ctx = _Import(g, dt, builder, preds, succs)
    diags = _walk(ctx, order)
    if diags:
        raise GraphError(diags)
    if dt != meta.get("dt", dt):  # the file's record may be anything (it was not used): repr, not :g
        ctx.notes.append(f"imported with dt = {dt:g} s; the file records dt = {meta['dt']!r}")
    return Imported(builder.build(), ctx.params, ctx.state, ctx.readout, tuple(ctx.notes))
