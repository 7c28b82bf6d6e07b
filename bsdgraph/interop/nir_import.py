"""Import a NIR graph into bsdgraph's IR: a validated forward network F with its weights.

Three passes. ``nir_graph.flatten`` inlines nested subgraphs (a ``nir.NIRGraph`` node): inner node ``n`` of subgraph
``S`` becomes ``S.n``, and the subgraph's own Input and Output become plain connections. ``nir_graph.structure``
checks edges, the one Input and Output, fan-in and loops, and finds the recurrent layers: a neuron whose second input
is an Affine/Linear that reads only that neuron (how snnTorch writes RLeaky and RSynaptic). Then one rule per NIR node
type in ``IMPORT_RULES`` (keyed by the type's name, as NIR files store it) adds the bsdgraph node(s) for one NIR node
and returns the name of the node that carries its output; a node bsdgraph cannot represent raises ``MappingError``,
which becomes a ``Diagnostic`` naming the NIR node and its type. All of them are collected into one ``GraphError``;
nodes downstream of a failed one are skipped (no cascade).

Exact rewrites (docs/nir.md): each neuron's factor and shift on its input current (LIF: r and v_leak - v_reset; IF:
dt·r; LI: r; CubaLI(F): r·w_in) are folded into the synapse feeding it, as is a Scale right after that synapse and
a recurrent synapse's bias; a Scale right before a synapse is folded into its columns; SumPool2d is an average pool
whose window size goes into the next synapse, and SumPool2d + Threshold(t), 0 <= t < 1, on spikes is max-pooling;
a neuron right after the last synapse and before the Output becomes the readout (``READOUT``): bsdgraph's output
reads the top synapse's current, as BSD's top loss needs, and ``bsdgraph run`` applies the readout to that current.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bsdgraph.ir.graph import GroupOp, Graph, Op
from bsdgraph.ir.builder import GraphBuilder
from bsdgraph.ir.neurons import NEURONS
from bsdgraph.interop.nir import (
    NEURONS_FROM_NIR, MappingError, NeuronFromNIR, NIRError, check_dt, nir_module, per_neuron, plain, read_nir,
    readout_of,
)
from bsdgraph.interop.nir import node_metadata as _meta
from bsdgraph.interop.nir_graph import SYNAPSES, Flat, flatten, flattened_layers, structure
from bsdgraph.interop.nir_graph import is_synapse as _is_synapse, kind as _kind
from bsdgraph.ir.diagnostics import Diagnostic, GraphError
from bsdgraph.registry import registrar

DEFAULT_T = 4  # NIR graphs carry no number of steps per sample; bsdgraph's models use 4

# node types that take (synapses) or pass on (pools, flatten, Scale) a factor a SumPool2d or a Scale left pending
CARRIES_FACTOR = frozenset({*SYNAPSES, "AvgPool2d", "SumPool2d", "Flatten", "Scale"})
# what a neuron's fold means, per NIR type, for the message when nothing can take it
FOLDED = {"LIF": "r != 1 or v_leak != v_reset", "IF": "dt·r != 1 (Euler's step adds dt·r·I)", "LI": "r != 1",
          "CubaLI": "r·w_in != 1", "CubaLIF": "r·w_in != 1"}   # a Threshold has nothing to fold


@dataclass(frozen=True)
class Imported:
    graph: Graph
    params: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    readout: dict[str, Any] | None = None   # the NIR graph's top neuron, applied to the output current by `run`
    notes: tuple[str, ...] = ()


def _ints(v, n: int = 2) -> tuple[int, ...]:
    a = np.asarray(v).reshape(-1)
    return tuple(int(x) for x in (np.repeat(a, n) if a.size == 1 else a))


# ---------------------------------------------------------------------------------------------------- context


@dataclass(frozen=True)
class _Fold:
    """What a synapse absorbs, per output unit: out = scale * (post * (W (pre * x) + b) + extra) + shift."""

    pre: Any = None                     # a factor on the input (Scale / SumPool2d before), shaped to broadcast
    post: np.ndarray | None = None      # Scale nodes right after the synapse
    extra: np.ndarray | None = None     # a recurrent synapse's bias, summed with this synapse's current
    scale: np.ndarray | None = None     # the neuron's factor on its input current
    shift: np.ndarray | None = None     # the neuron's constant input


_NO = object()   # a per-neuron value a convolution cannot take (it varies within a channel)


def _per_output(v: np.ndarray | None, per_channel: bool):
    """``v`` per output unit: per channel for a convolution (which shares weights across positions), _NO when it
    varies within a channel."""
    if v is None or not per_channel:
        return v
    return v[:, 0, 0] if np.all(v == v[:, :1, :1]) else _NO


@dataclass
class _Import:
    graph: Flat
    dt: float
    builder: GraphBuilder
    preds: dict[str, list[str]]
    succs: dict[str, list[str]]
    loops: dict[str, str]                                 # recurrent neuron -> its recurrent synapse
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    out: dict[str, str] = field(default_factory=dict)     # NIR node -> bsdgraph node carrying its output
    ops: dict[str, Op] = field(default_factory=dict)      # bsdgraph node -> op
    binary: set[str] = field(default_factory=set)         # bsdgraph nodes carrying 0/1 values
    folded: set[str] = field(default_factory=set)         # NIR neurons whose fold went into their synapse
    absorbed: set[str] = field(default_factory=set)       # NIR nodes already mapped with a neighbour
    pending: dict[str, Any] = field(default_factory=dict)  # NIR node -> factor on its output a synapse must take
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
        self.record(name, op, attrs.get("model"), inputs[0] in self.binary if inputs else False)
        return name

    def record(self, name: str, op: Op, model: str | None = None, binary_input: bool = False) -> None:
        # spikes: a spiking neuron's value, and a max-pool or flatten of spikes (an average pool of spikes is not 0/1)
        self.ops[name] = op
        spiking = op == Op.LIF or (op == Op.NEURON and NEURONS[model].spiking)
        if spiking or (op in (Op.MAXPOOL2D, Op.FLATTEN) and binary_input):
            self.binary.add(name)

    def bind(self, name: str, **tensors: np.ndarray) -> None:
        for k, v in tensors.items():
            v = np.ascontiguousarray(v, dtype=np.float32)
            if not np.all(np.isfinite(v)):  # a NaN weight imports fine and then silences or floods every layer
                raise MappingError(f"{k} holds {int((~np.isfinite(v)).sum())} non-finite value(s) (NaN or Inf, "
                                   "after conversion to float32)", "fix the weights before exporting them")
            self.params[f"{name}.{k}"] = torch.from_numpy(v)

    def pre(self, name: str, per_channel: bool):
        """The factor a Scale or SumPool2d before synapse ``name`` left on its input, shaped to multiply its weight:
        per input value of an Affine, per input channel of a Conv2d (which shares weights across positions)."""
        v = self.pending.get(self.preds[name][0])
        if v is None or np.ndim(v) == 0:
            return v
        if not per_channel:
            return np.reshape(v, (1, -1))
        if not np.all(v == v[:, :1, :1]):
            raise MappingError("the Scale before it varies within a channel, and a convolution shares its weights "
                               "across positions: it takes one factor per input channel",
                               "scale each channel by one value, or put the Scale after the convolution")
        return v[:, 0, 0].reshape(1, -1, 1, 1)

    def fold(self, name: str, shape: tuple[int, ...], per_channel: bool) -> _Fold:
        """What synapse ``name`` absorbs from the nodes after it: Scale nodes right after it, then the factor and
        shift of the neuron they feed and, for a recurrent layer's neuron, the bias of its recurrent synapse. A
        node it cannot absorb is left alone: its own rule reports why."""
        post, (nxt_name, nxt) = None, self.only_succ(name)
        while _kind(nxt) == "Scale" and len(self.preds[nxt_name]) == 1:  # a Scale of several inputs is a sum
            try:
                s = _per_output(per_neuron(nxt, "scale", shape), per_channel)
            except MappingError:
                s = _NO
            if s is _NO:
                return _Fold(self.pre(name, per_channel), post)
            post = s if post is None else post * s
            self.absorbed.add(nxt_name)
            self.out[nxt_name] = name
            nxt_name, nxt = self.only_succ(nxt_name)
        if _kind(nxt) not in NEURONS_FROM_NIR:
            return _Fold(self.pre(name, per_channel), post)
        try:
            m = NEURONS_FROM_NIR[_kind(nxt)](nxt, shape, self.dt)
        except MappingError:
            return _Fold(self.pre(name, per_channel), post)
        scale, shift = _per_output(m.scale, per_channel), _per_output(m.shift, per_channel)
        extra = self.rec_bias(nxt_name, shape)
        if scale is _NO or shift is _NO or extra is _NO:
            return _Fold(self.pre(name, per_channel), post)
        if scale is not None or shift is not None or extra is not None:
            self.folded.add(nxt_name)
        return _Fold(self.pre(name, per_channel), post, extra, scale, shift)

    def rec_bias(self, neuron: str, shape: tuple[int, ...]):
        """The bias of ``neuron``'s recurrent synapse (None: none, or all zeros; _NO: not one per neuron)."""
        if neuron not in self.loops:
            return None
        b = getattr(self.graph.nodes[self.loops[neuron]], "bias", None)
        if b is None:
            return None
        b = np.asarray(b, np.float64).reshape(-1)
        if len(shape) != 1 or b.shape != (shape[0],):
            return _NO
        return b if np.any(b) else None


def _apply_fold(w: np.ndarray, b: np.ndarray | None, f: _Fold):
    """The folded weight and bias (float64 arithmetic, rounded once to float32)."""
    w64, b64 = w.astype(np.float64), None if b is None else b.astype(np.float64)
    col = (-1, *([1] * (w.ndim - 1)))
    if f.pre is not None:
        w64 = w64 * f.pre
    if f.post is not None:
        w64, b64 = w64 * f.post.reshape(col), None if b64 is None else b64 * f.post
    if f.extra is not None:
        b64 = (np.zeros(w.shape[0]) if b64 is None else b64) + f.extra
    if f.scale is not None:
        w64, b64 = w64 * f.scale.reshape(col), None if b64 is None else b64 * f.scale
    if f.shift is not None:
        b64 = (np.zeros(w.shape[0]) if b64 is None else b64) + f.shift
    return w64.astype(np.float32), None if b64 is None else b64.astype(np.float32)


Rule = Callable[[_Import, str, Any], str]
IMPORT_RULES: dict[str, Rule] = {}


import_rule = registrar(IMPORT_RULES)  # @import_rule(*types): the bsdgraph nodes of those NIR node types


# ---------------------------------------------------------------------------------------------------- rules


@import_rule("Input")
def _input(ctx: _Import, name: str, node) -> str:
    shape = tuple(int(x) for x in np.asarray(node.input_type["input"]).reshape(-1))
    meta = _meta(node)
    if meta.get("op") == "target":
        raise MappingError("is the target input of a backward network B",
                           "import the forward network F; B is derived from F again")
    out = ctx.add(Op.INPUT, name, [], shape=shape, encoding=meta.get("encoding", "direct"))
    if meta.get("encoding") == "poisson":
        ctx.binary.add(out)
    return out


def _batchnorm(ctx: _Import, name: str, node) -> str:
    meta, shape = _meta(node), ctx.shape(name)
    if ctx.preds[name][0] in ctx.pending:
        raise MappingError("follows a Scale or SumPool2d whose factor only a plain synapse can take, and this node "
                           "is a batchnorm", "put the factor into the synapse before the batchnorm")
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
    w, b = _apply_fold(w, b, ctx.fold(name, (w.shape[0],), per_channel=False))
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
    w, b = _apply_fold(w, bias if has_bias else None, ctx.fold(name, out, per_channel=True))
    ctx.add(Op.CONV2D, name, [ctx.src(name)], in_channels=w.shape[1], out_channels=w.shape[0], kernel=kernel,
            stride=stride, padding=padding, bias=b is not None)
    ctx.bind(name, weight=w, **({"bias": b} if b is not None else {}))
    return name


@import_rule("Scale")
def _scale(ctx: _Import, name: str, node) -> str:
    if len(ctx.preds[name]) > 1:  # NIR sums a node's inputs: a Scale of ones reading several is their sum
        return _sum(ctx, name, node)
    # a Scale right after a synapse was folded into it (_Import.fold) and never gets here: this one multiplies the
    # columns of the synapse after it, W' = W diag(s), which needs that synapse to be its only consumer
    s = per_neuron(node, "scale", ctx.shape(name)) * ctx.pending.get(ctx.preds[name][0], 1.0)
    nxt_name, nxt = ctx.only_succ(name)
    if nxt is None or not _is_synapse(nxt):
        src = ctx.preds[name][0]
        raise MappingError(f"scales {src!r} ({_kind(ctx.graph.nodes[src])}) elementwise, and bsdgraph has no such "
                           "op: import folds a Scale into the synapse right before it (an Affine/Linear, or a Conv2d "
                           "with one value per channel, whose only consumer is the Scale) or right after it (its only "
                           "consumer), and neither is there",
                           "put the Scale right after or right before an Affine, Linear or Conv2d")
    ctx.pending[name] = s
    return ctx.src(name)


def _sum(ctx: _Import, name: str, node) -> str:
    """A Scale of ones with several incoming edges: the sum of its inputs (a residual merge; bsdgraph's export
    writes an add so). Its operands must all have the sum's shape."""
    shape = ctx.shape(name)
    scale = np.asarray(node.scale, np.float64)
    if scale.size not in (1, math.prod(shape)) or not np.all(scale == 1.0):
        raise MappingError("sums several inputs and scales the sum by values other than 1; bsdgraph imports a sum "
                           "of several inputs only as a Scale of ones", "scale the synapses before the sum instead")
    waiting = [p for p in ctx.preds[name] if p in ctx.pending]
    if waiting:
        raise MappingError(f"sums {waiting[0]!r}, which carries a factor only a synapse can take", "")
    ctx.add(Op.ADD, name, [ctx.out[p] for p in ctx.preds[name]])
    return name


def _pool_attrs(node) -> dict[str, Any]:
    kernel, stride = _ints(node.kernel_size), _ints(node.stride)
    if any(_ints(node.padding)):
        raise MappingError(f"padding {list(_ints(node.padding))}: bsdgraph pools without padding", "pad before")
    return dict(kernel=kernel, stride=None if stride == kernel else stride)  # None = the kernel: canonical form


def _carry(ctx: _Import, name: str, factor: float = 1.0) -> None:
    """Pass a pending factor of the node before ``name`` on through it (pooling and flattening commute with a
    number, not with a per-value Scale), times ``factor``."""
    before = ctx.pending.get(ctx.preds[name][0], 1.0)
    if np.ndim(before) != 0:
        raise MappingError("follows a Scale whose per-value factor cannot move through pooling or flattening",
                           "put the Scale right before the synapse")
    if before * factor != 1.0:
        ctx.pending[name] = float(before * factor)


@import_rule("AvgPool2d")
def _avgpool(ctx: _Import, name: str, node) -> str:
    _carry(ctx, name)
    return ctx.add(Op.AVGPOOL2D, name, [ctx.src(name)], **_pool_attrs(node))


@import_rule("SumPool2d")
def _sumpool(ctx: _Import, name: str, node) -> str:
    attrs = _pool_attrs(node)
    thr_name, thr = ctx.only_succ(name)
    t = np.asarray(getattr(thr, "threshold", np.nan), np.float64)
    if _kind(thr) == "Threshold" and np.all((t >= 0) & (t < 1)) and ctx.src(name) in ctx.binary:
        # on 0/1 spikes, (window sum > t) for 0 <= t < 1 is the window's max
        ctx.absorbed.add(thr_name)
        ctx.out[thr_name] = ctx.add(Op.MAXPOOL2D, name, [ctx.src(name)], **attrs)
        per_neuron(thr, "threshold", ctx.builder.shape(name))  # one per pooled value (or one): else a malformed file
        return name
    # sum = average x window size: the size waits for the next synapse to take it (W' = k W)
    _carry(ctx, name, float(math.prod(attrs["kernel"])))
    return ctx.add(Op.AVGPOOL2D, name, [ctx.src(name)], **attrs)


@import_rule("Flatten")
def _flatten_node(ctx: _Import, name: str, node) -> str:
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
    _carry(ctx, name)
    return ctx.add(Op.FLATTEN, name, [ctx.src(name)])


def _as_written(m: NeuronFromNIR, meta: dict[str, Any], kind: str) -> NeuronFromNIR:
    """The neuron node bsdgraph's export described in the node's metadata: a neuron node of the lif declaration
    (not the lif op), and only the parameters its model gave (the others are the declaration's defaults, and a
    value that differs from its default is kept whatever the record says)."""
    if meta.get("op") != "neuron":
        return m
    if meta.get("model", m.model) != m.model:
        raise MappingError(f"its metadata names the neuron {meta['model']!r}, but a NIR {kind} maps to "
                           f"{m.model!r}", "drop the node's 'bsdgraph' metadata")
    given = set(str(meta.get("params", "")).split(",")) - {""}
    defaults = NEURONS[m.model].defaults
    params = {k: v for k, v in m.params.items() if k in given or v != defaults[k]}
    return NeuronFromNIR(Op.NEURON, {"model": m.model, "params": params}, m.scale, m.shift)


@import_rule(*NEURONS_FROM_NIR)
def _neuron(ctx: _Import, name: str, node) -> str:
    kind, src, meta = _kind(node), ctx.src(name), _meta(node)
    shape = ctx.builder.shape(src)
    m = _as_written(NEURONS_FROM_NIR[kind](node, shape, ctx.dt), meta, kind)
    if name in ctx.loops:
        _check_recurrent(ctx, name, shape)
    rec_bias = ctx.rec_bias(name, shape) is not None
    if (m.scale is not None or m.shift is not None or rec_bias) and name not in ctx.folded:
        what = " and ".join([FOLDED[kind]] * (m.scale is not None or m.shift is not None)
                            + ["a recurrent synapse with a bias"] * rec_bias)
        conv = " (a convolution shares weights across positions: it takes one value per channel)"
        raise MappingError(f"has {what}, which import folds into the synapse feeding the neuron; {src!r} "
                           f"({ctx.ops[src].value}) cannot take it" + (conv if ctx.ops[src] == Op.CONV2D else ""),
                           "feed the neuron from an Affine/Linear (any values) or a Conv2d (one value per channel)")
    surrogate = {"surrogate": meta.get("surrogate", "atan"), "alpha": meta.get("alpha", 2.0)}
    if name in ctx.loops:
        return _recurrent_layer(ctx, name, m, src, surrogate)
    out_name, out = ctx.only_succ(name)
    if _kind(out) == "Output" and ctx.ops[src] in GroupOp.SYNAPSE | {Op.BATCHNORM}:
        ctx.readout = readout_of(name, m)
        ctx.notes.append(f"{kind} {name!r} before the output is the readout: the output reads its input current "
                         f"{src!r} (BSD's top loss needs a current); `bsdgraph run` applies the {kind} to it")
        return src
    return ctx.add(m.op, name, [src], **m.attrs, **surrogate)


def _recurrent_layer(ctx: _Import, name: str, m: NeuronFromNIR, src: str, surrogate: dict[str, Any]) -> str:
    """A neuron with its own Affine/Linear looping back: bsdgraph's recurrent layer, ``add(current,
    rec(value[t-1])) -> neuron``. The loop's one-step delay sits on the edge into rec, so rec reads the neurons'
    value of the previous step (0 before the first): docs/nir.md, the loop contract. rec's bias went into the
    feedforward synapse (fold); the neuron's factor multiplies rec's weight as it does the feedforward one's."""
    rec_name = ctx.loops[name]
    w = np.asarray(ctx.graph.nodes[rec_name].weight, np.float64)
    if surrogate["surrogate"] != "atan":
        raise MappingError(f"surrogate {surrogate['surrogate']!r} is not one bsdgraph has", "use 'atan'")
    layer = ctx.graph.layers.get(name, name)
    if m.op == Op.LIF:
        a = m.attrs
        ctx.builder.recurrent_lif(src, tau=a["tau"], v_th=a["v_th"], v_reset=a["v_reset"], reset=a["reset"],
                                  alpha=surrogate["alpha"], name=layer)
    else:
        ctx.builder.recurrent_neuron(m.attrs["model"], src, alpha=surrogate["alpha"], name=layer,
                                     **m.attrs["params"])
    ctx.record(f"{layer}_rec", Op.LINEAR)
    ctx.record(f"{layer}_in", Op.ADD)
    ctx.record(layer, m.op, m.attrs.get("model"))
    ctx.bind(f"{layer}_rec", weight=w if m.scale is None else w * m.scale.reshape(-1, 1))
    ctx.absorbed.add(rec_name)
    ctx.out[rec_name] = f"{layer}_rec"
    return layer


def _check_recurrent(ctx: _Import, name: str, shape: tuple[int, ...]) -> None:
    rec_name = ctx.loops[name]
    rec = ctx.graph.nodes[rec_name]
    w = np.asarray(rec.weight)
    b = np.asarray(getattr(rec, "bias", np.zeros(w.shape[:1])))
    if len(shape) != 1 or w.shape != (shape[0], shape[0]) or b.size != shape[0]:
        raise MappingError(f"its recurrent synapse {rec_name!r} has weight {list(w.shape)} and bias {list(b.shape)} "
                           f"but the layer is {list(shape)}; a recurrent layer is n flat neurons with an [n, n] "
                           "Affine/Linear", "flatten the layer's input; give the recurrent weight one row and column "
                           "per neuron")


@import_rule("Output")
def _output(ctx: _Import, name: str, node) -> str:
    shape, meta = ctx.shape(name), _meta(node)
    width = math.prod(shape)
    task = meta.get("task", "classification" if len(shape) == 1 and width >= 2 else "regression")
    population = int(meta.get("population", 1))
    target = meta.get("target", "onehot" if task == "classification" else "analog")
    code = {k: int(meta.get(k, 0)) for k in ("code_active", "code_seed")}  # a distributed class code, if any
    classes = int(meta["n_classes"]) if code["code_active"] and "n_classes" in meta else width // max(population, 1)
    return ctx.add(Op.OUTPUT, name, [ctx.src(name)], task=task, target=target, population=population,
                   n_classes=classes if task == "classification" else 0, **code)


@import_rule("NIRGraph")
def _subgraph(ctx: _Import, name: str, node) -> str:
    raise MappingError("is a nested subgraph left after flattening (a bsdgraph defect: _flatten inlines them all)", "")


_UNSUPPORTED = {
    "Conv1d": ("1-d convolution, and no reshape op that would make a [C, L] signal a one-pixel-high [C, 1, L] image",
               "build the network with Conv2d on [C, 1, L] inputs (kernels 1 x k)"),
    "Delay": ("delay node (its only delay is the one step of a recurrent layer's loop)",
              "remove the delay, or express it as a recurrent layer"),
    "I": ("integrator without leak or spikes (dv/dt = r I grows without bound)", "use LI with a long tau, or IF"),
}


def _unsupported(ctx: _Import, name: str, node) -> str:
    what, hint = _UNSUPPORTED[_kind(node)]
    raise MappingError(f"bsdgraph has no {what}", hint)


for _t in _UNSUPPORTED:
    IMPORT_RULES[_t] = _unsupported


# ---------------------------------------------------------------------------------------------------- driver


def _walk(ctx: _Import, order: list[str]) -> list[Diagnostic]:
    diags, failed = [], set()
    for name in order:
        node = ctx.graph.nodes[name]
        kind = _kind(node)
        if name in ctx.absorbed:
            continue
        if any(p in failed or p not in ctx.out for p in ctx.preds[name]):
            failed.add(name)  # an upstream problem is already reported
            continue
        found = _apply(ctx, name, node, kind)
        if found:
            diags += found
            failed.add(name)
            failed.update(k for k, v in ctx.out.items() if v == name)  # a Scale it absorbed fails with it
    return diags


def _apply(ctx: _Import, name: str, node, kind: str) -> list[Diagnostic]:
    """Run ``name``'s rule; the diagnostics of its failure (none when it mapped)."""
    try:
        _check_factor(ctx, name, kind)
        ctx.out[name] = IMPORT_RULES.get(kind, _unknown)(ctx, name, node)
    except MappingError as err:
        return [Diagnostic(name, None, f"(NIR {kind}) {err.message}", err.hint)]
    except GraphError as err:  # shape inference of the bsdgraph node (wrong shapes in the file)
        return [Diagnostic(d.node, d.op, f"(NIR {kind}) {d.message}", d.hint) for d in err.diagnostics]
    except (TypeError, ValueError, AttributeError, IndexError, KeyError, ArithmeticError) as err:
        # a field NIR left unchecked (ArithmeticError: int(inf) in a stride; docs/reliability.md)
        return [Diagnostic(name, None, f"(NIR {kind}) malformed node: {type(err).__name__}: {err}",
                           "write it with nir's own node constructors")]
    return []


def _check_factor(ctx: _Import, name: str, kind: str) -> None:
    """A factor a SumPool2d left pending reaches a node that is no synapse: refuse it here, naming the pool."""
    waiting = [p for p in ctx.preds[name] if p in ctx.pending]
    if waiting and kind not in CARRIES_FACTOR:
        raise MappingError(f"reads {waiting[0]!r}, which carries the window size of a SumPool2d: import makes a sum "
                           "pool an average pool and puts the window size into the next synapse, and there is none "
                           "before this node", "put an Affine/Linear/Conv2d after the sum pooling, or use AvgPool2d")


def _unknown(ctx: _Import, name: str, node) -> str:
    raise MappingError(f"unknown NIR node type {_kind(node)!r}", "bsdgraph reads the node types of NIR 1.0 (nir 1.0.8)")


def _steps_of(meta: dict, where: str) -> int:
    """The file's record of T (bsdgraph writes it), else DEFAULT_T; a record that is not a whole number is an error."""
    T = meta.get("T", DEFAULT_T)
    if isinstance(T, float) and T.is_integer():
        T = int(T)
    if isinstance(T, bool) or not isinstance(T, int):
        raise NIRError(f"{where}: its metadata records T = {T!r} steps per sample, not a whole number; pass --steps T")
    return T


def _written_order(meta: dict) -> list[str] | None:
    """The node order bsdgraph's export records (a JSON list of names); None for anything else."""
    try:
        order = json.loads(meta.get("order", "null"))
    except (TypeError, ValueError):
        return None
    return order if isinstance(order, list) and all(isinstance(n, str) for n in order) else None


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
    flat, diags = flatten(g)
    if diags:
        raise GraphError(diags)
    diags, order, preds, succs, loops = structure(flat, _written_order(meta))
    if diags:
        raise GraphError(diags)
    flat.layers.update(flattened_layers(flat, loops))
    builder = GraphBuilder(str(name or meta.get("name") or default_name), T=T, dt=dt)
    ctx = _Import(flat, dt, builder, preds, succs, loops)
    diags = _walk(ctx, order)
    if diags:
        raise GraphError(diags)
    if dt != meta.get("dt", dt):  # the file's record may be anything (it was not used): repr, not :g
        ctx.notes.append(f"imported with dt = {dt:g} s; the file records dt = {meta['dt']!r}")
    return Imported(builder.build(), ctx.params, ctx.state, ctx.readout, tuple(ctx.notes))
