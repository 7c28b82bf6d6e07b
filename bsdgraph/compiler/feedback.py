"""Derive BSD's backward network B and the layer-local losses from a forward network F.

F must be a chain ``input -> [transforms] -> synapse -> [batchnorm] -> lif -> ... -> synapse -> output``; it is
cut into layers at its neurons (``segment``). For every synapse of F, B gets a mirrored synapse with its own
weights (criterion C1), built by the rule in ``MIRROR_RULES``: Linear(D_in -> D_out) <-> Linear(D_out -> D_in),
Conv2d <-> ConvTranspose2d restoring the exact input shape, pooling <-> nearest upsampling to the exact size,
Flatten <-> Unflatten; batchnorm and LIF neurons are mirrored at the same layer with copied hyper-parameters. A
recurrent layer (``linear -> add(., rec(s[t-1])) -> lif``) gets in B its own sum and its own recurrent synapse
on B's spikes of that layer; the layer's V is the sum, so its ReCo trains both recurrent weights.

Learning semantics become part of the graph: every edge into a synapse is a stop-gradient (``detach``), and one
loss node per layer pairs F's layer with B's (ReCo at hidden layers, CE/MSE at the top, recall at the bottom).
``local_params`` walks back from a loss through non-detached edges: each parametric node is reached by exactly one
loss (criterion C2), which ``derive_feedback`` checks before returning.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bsdgraph.ir.graph import Edge, FrozenAttrs, GroupOp, Graph, Node, Op, Stream, default_attrs
from bsdgraph.ir.diagnostics import Diagnostic, GraphError
from bsdgraph.ir.validate import validate
from bsdgraph.registry import registrar


@dataclass(frozen=True)
class BSDConfig:
    """The learning rule's open choices (docs/bsd.md, "Options"); each is one flag away."""

    lam: float = 0.6                 # weight of the negative-pair term of ReCo (paper's best)
    negatives: str = "all"           # all | other_class
    distill_on: str = "current"      # current (V = syn(s)) | membrane (pre-reset h, through the surrogate)
    eps: float = 1e-8
    recall: bool = True              # bottom loss ReCo(encode(x), V̂_0): makes B a generator
    recall_loss: str = "reco"        # reco | mse (generation)
    freq: bool = False               # frequency-aware ReCo on layers with a spatial layout
    freq_r: float = 0.25
    lam_low: float = 0.3
    lam_high: float = 0.9
    reco_rows: str = "sample"        # sample (one cosine per sample over T*D) | step (one per step: [T*B, D] rows)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> BSDConfig:
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GraphError([Diagnostic(None, None, f"unknown BSD option(s) {unknown}",
                                         f"known: {', '.join(sorted(known))}")])
        return cls(**d)


@dataclass(frozen=True)
class Layer:
    """Layer l of F: transforms of the incoming spikes, one synapse, optional batchnorm, a neuron (not at top)."""

    index: int
    pre: tuple[str, ...]
    synapse: str
    bn: str | None
    neuron: str | None
    add: str | None = None   # recurrent layer: V_l = synapse(s_{l-1}) + rec(s_l[t-1]), summed by this node
    rec: str | None = None   # the recurrent synapse (a Linear reading the layer's own spikes through a delay)

    @property
    def current(self) -> str:
        """The node holding V_l, the current into the layer's neurons."""
        return self.add or self.bn or self.synapse


# ---------------------------------------------------------------------------------------------------- segmentation


def _chain(f: Graph) -> list[Node]:
    inputs = f.by_op(Op.INPUT)
    chain, diags = [inputs[0]], []
    while chain[-1].op != Op.OUTPUT:
        # a delayed edge (into a recurrent synapse) is not a step along the chain
        nxt = [f[e.dst] for e in f.out_edges(chain[-1].name) if e.delay == 0]
        if len(nxt) != 1:
            diags.append(Diagnostic(chain[-1].name, chain[-1].op, f"feeds {len(nxt)} consumers",
                                    "BSD derivation needs a chain of layers (no branches)"))
            break
        chain.append(nxt[0])
    if len(inputs) != 1:
        diags.append(Diagnostic(None, None, f"expected one input, got {len(inputs)}", "BSD maps one stimulus"))
    if diags:
        raise GraphError(diags)
    return chain


def segment(f: Graph) -> list[Layer]:
    """Cut the chain into layers 1..L at its neurons; raise ``GraphError`` on a shape BSD cannot pair."""
    layers, diags = [], []
    pre: list[str] = []
    syn = bn = add = None
    for n in _chain(f)[1:]:
        problem = None
        if n.op in GroupOp.TRANSFORM:
            problem = "sits between a synapse and its neuron" if syn else None
            pre.append(n.name)
        elif n.op in GroupOp.SYNAPSE:
            problem = "follows a synapse without a neuron between them" if syn else None
            syn = n.name
        elif n.op == Op.BATCHNORM:
            problem = None if syn and not bn and not add else "must directly follow a synapse"
            bn = n.name
        elif n.op == Op.ADD:
            problem = None if syn and not bn and not add else (
                "must directly follow the feedforward synapse of a recurrent layer")
            add = n.name
        elif n.op in GroupOp.NEURON or n.op == Op.OUTPUT:
            if syn is None:
                problem = "has no synapse in its layer" if n.op != Op.OUTPUT else (
                    "must read a synapse's current")
            else:
                neuron = n.name if n.op in GroupOp.NEURON else None
                layers.append(Layer(len(layers) + 1, tuple(pre), syn, bn, neuron, add,
                                    f.inputs(add)[1].name if add else None))
            pre, syn, bn, add = [], None, None, None
        if problem:
            diags.append(Diagnostic(n.name, n.op, problem,
                                    "a BSD layer is [pool/flatten] -> synapse -> [batchnorm] -> lif, or "
                                    "linear -> add(., rec) -> lif for a recurrent one; the top layer is "
                                    "synapse -> output"))
    if diags:
        raise GraphError(diags)
    diags = [d for i, layer in enumerate(layers) if layer.add for d in _recurrent_problems(f, layers, i)]
    if diags:
        raise GraphError(diags)
    return layers


def _recurrent_problems(f: Graph, layers: list[Layer], i: int) -> list[Diagnostic]:
    """What derive_feedback and the runtimes need of a recurrent layer: a Linear feedforward synapse, a bias-free
    Linear ``rec`` from the layer's own spikes through one delay-1 edge, and a Linear layer above it
    with nothing in between (B mirrors that Linear straight into its own recurrent sum)."""
    layer, out = layers[i], []
    rec = f[layer.rec]
    fix = "build it with g.recurrent_lif(g.linear(x, width)) and put a g.linear(...) layer above it"
    ins = f.in_edges(rec.name)
    if layer.neuron is None:
        out.append(Diagnostic(layer.add, Op.ADD, "the top layer cannot be recurrent", fix))
    elif f[layer.synapse].op != Op.LINEAR:
        out.append(Diagnostic(layer.add, Op.ADD, f"sums a {f[layer.synapse].op.value} current; a recurrent layer's "
                              "feedforward synapse must be a linear", fix))
    elif rec.op != Op.LINEAR or len(ins) != 1 or ins[0].src != layer.neuron or ins[0].delay != 1:
        got = (f"{rec.op.value} reading " + ", ".join(f"'{e.src}' (delay {e.delay})" for e in ins))
        out.append(Diagnostic(rec.name, rec.op, f"is the second operand of '{layer.add}' but is a {got}; it must "
                              f"be a linear reading '{layer.neuron}' through a delay-1 edge", fix))
    elif rec.attrs["bias"]:
        out.append(Diagnostic(rec.name, rec.op, "a recurrent synapse has no bias (the feedforward synapse's bias "
                              "already adds a constant current)", "create it with bias=False"))
    elif i + 1 < len(layers) and (layers[i + 1].pre or f[layers[i + 1].synapse].op != Op.LINEAR):
        above = layers[i + 1]
        out.append(Diagnostic(above.synapse, f[above.synapse].op, f"reads the recurrent layer '{layer.neuron}' "
                              "through a transform or a non-linear synapse", fix))
    return out


# ---------------------------------------------------------------------------------------------------- mirror rules

# A rule maps an F node (and the shape of its F operand) to the (op, attrs) of its mirror in B.
Mirror = Callable[[Node, tuple[int, ...]], tuple[Op, dict[str, Any]]]
MIRROR_RULES: dict[Op, Mirror] = {}


mirror = registrar(MIRROR_RULES)  # @mirror(*ops): what those ops become in B


@mirror(Op.LINEAR)
def _mirror_linear(n: Node, in_shape):
    return Op.LINEAR, dict(in_features=n.attrs["out_features"], out_features=n.attrs["in_features"],
                           bias=n.attrs["bias"])


@mirror(Op.CONV2D)
def _mirror_conv(n: Node, in_shape):
    a = n.attrs
    # conv: H_out = floor((H + 2p - k) / s) + 1 drops r = (H + 2p - k) mod s rows; the transpose gives
    # (H_out - 1) s - 2p + k + output_padding, so output_padding = r restores H exactly (and r < s always).
    out_pad = tuple((in_shape[1 + i] + 2 * a["padding"][i] - a["kernel"][i]) % a["stride"][i] for i in range(2))
    return Op.CONV_T2D, dict(in_channels=a["out_channels"], out_channels=a["in_channels"], kernel=a["kernel"],
                             stride=a["stride"], padding=a["padding"], output_padding=out_pad, bias=a["bias"])


@mirror(Op.CONV_T2D)
def _mirror_conv_t(n: Node, in_shape):
    a = n.attrs
    return Op.CONV2D, dict(in_channels=a["out_channels"], out_channels=a["in_channels"], kernel=a["kernel"],
                           stride=a["stride"], padding=a["padding"], bias=a["bias"])


@mirror(Op.AVGPOOL2D, Op.MAXPOOL2D)
def _mirror_pool(n: Node, in_shape):
    return Op.UPSAMPLE2D, dict(size=tuple(in_shape[1:]))


@mirror(Op.UPSAMPLE2D)
def _mirror_upsample(n: Node, in_shape):
    size = n.attrs["size"]
    if any(o % i for o, i in zip(size, in_shape[1:])):
        raise GraphError([Diagnostic(n.name, n.op, f"upsamples {in_shape[1]}x{in_shape[2]} to {size[0]}x{size[1]}, "
                                     "not an integer multiple: B's mirror, an average pool, could not restore the "
                                     "input shape", f"use a size that is a multiple of {in_shape[1]}x{in_shape[2]}")])
    return Op.AVGPOOL2D, dict(kernel=tuple(o // i for o, i in zip(size, in_shape[1:])))


@mirror(Op.FLATTEN)
def _mirror_flatten(n: Node, in_shape):
    return Op.UNFLATTEN, dict(shape=tuple(in_shape))


@mirror(Op.UNFLATTEN)
def _mirror_unflatten(n: Node, in_shape):
    return Op.FLATTEN, {}


@mirror(Op.BATCHNORM, Op.LIF, Op.NEURON, Op.ADD)
def _mirror_copy(n: Node, in_shape):
    return n.op, dict(n.attrs)  # own parameters, hyper-parameters copied (C1: independent weights)


@mirror(Op.INPUT, Op.TARGET, Op.OUTPUT, Op.RECO, Op.CE, Op.MSE)
def _mirror_none(n: Node, in_shape):
    raise GraphError([Diagnostic(n.name, n.op, "has no mirror in the backward network",
                                 "sources, outputs and losses are placed by derive_feedback itself")])


# ---------------------------------------------------------------------------------------------------- derivation


class _B:
    """Accumulates B's nodes and edges while derive_feedback walks F's layers top-down."""

    def __init__(self):
        self.nodes: list[Node] = []
        self.edges: list[Edge] = []

    def add(self, name: str, op: Op, attrs: dict, shape, src: str | None, detach: bool = False) -> str:
        self.nodes.append(Node(name, op, FrozenAttrs(default_attrs(op, **attrs)), tuple(shape), Stream.B))
        if src is not None:
            self.edges.append(Edge(src, name, 0, 0, detach))
        return name

    def mirror_of(self, f: Graph, fnode: str, src: str, out_shape, detach: bool = False) -> str:
        n = f[fnode]
        op, attrs = MIRROR_RULES[n.op](n, f.inputs(fnode)[0].shape)
        return self.add(f"{fnode}_b", op, attrs, out_shape, src, detach)

    def recurrent(self, f: Graph, layer: Layer, src: str) -> str:
        """``add_b = src + rec_b(s'_l[t-1])``: the mirror of F's recurrent sum, reading B's neuron of the layer."""
        rec = f[layer.rec]
        rec_b = f"{rec.name}_b"
        self.nodes.append(Node(rec_b, Op.LINEAR, FrozenAttrs(default_attrs(Op.LINEAR, **rec.attrs)), rec.shape,
                               Stream.B))
        total = self.add(f"{layer.add}_b", Op.ADD, {}, f[layer.add].shape, src)
        self.edges += [Edge(rec_b, total, 1), Edge(f"{layer.neuron}_b", rec_b, 0, delay=1, detach=True)]
        return total


def _backward_network(f: Graph, layers: list[Layer], recall: bool) -> tuple[_B, dict[int, str], dict[int, str]]:
    """B's nodes top-down. Returns it, V̂_l per layer (0..L-1) and B's neuron per hidden layer.

    Without recall, B stops at layer 1: θ_1 would have no loss to learn from, so it is not built.
    """
    b, vhat, neuron = _B(), {}, {}
    mirrored = layers if recall else layers[1:]
    if not mirrored:
        return b, vhat, neuron
    out = f.by_op(Op.OUTPUT)[0]
    prev = b.add("target", Op.TARGET, dict(encoding=out.attrs["target"], n_classes=out.attrs["n_classes"],
                                           population=out.attrs["population"]), out.shape, None)
    for layer in reversed(mirrored):
        syn_in = f.inputs(layer.synapse)[0]
        prev = b.mirror_of(f, layer.synapse, prev, syn_in.shape, detach=True)  # θ_l reads sg(s'_l)
        for t in reversed(layer.pre):
            prev = b.mirror_of(f, t, prev, f.inputs(t)[0].shape)
        below = layers[layer.index - 2] if layer.index >= 2 else None
        if below and below.bn:
            prev = b.mirror_of(f, below.bn, prev, f[below.bn].shape)
        if below and below.add:  # B's layer gets its own recurrent synapse (own weights, C1) on its own spikes
            prev = b.recurrent(f, below, prev)
        vhat[layer.index - 1] = prev
        if below:
            prev = neuron[below.index] = b.mirror_of(f, below.neuron, prev, f[below.neuron].shape)
    return b, vhat, neuron


def _losses(f: Graph, layers: list[Layer], vhat, bneuron, cfg: BSDConfig) -> tuple[list[Node], list[Edge]]:
    nodes, edges = [], []

    def add(name, op, srcs, **attrs):
        nodes.append(Node(name, op, FrozenAttrs(default_attrs(op, **attrs)), (), Stream.LOSS))
        edges.extend(Edge(s, name, port) for port, s in enumerate(srcs))

    reco = dict(lam=cfg.lam, negatives=cfg.negatives, eps=cfg.eps, freq_r=cfg.freq_r, lam_low=cfg.lam_low,
                lam_high=cfg.lam_high, rows=cfg.reco_rows)
    x = f.by_op(Op.INPUT)[0]
    split = frequency_split(f, cfg, layers)
    if cfg.recall and cfg.recall_loss == "mse":
        add("mse0", Op.MSE, [x.name, vhat[0]], layer=0)
    elif cfg.recall:
        add("reco0", Op.RECO, [x.name, vhat[0]], layer=0, distill_on="current", freq=split[0], **reco)
    for layer in layers[:-1]:
        l, membrane = layer.index, cfg.distill_on == "membrane"
        srcs = [layer.neuron, bneuron[l]] if membrane else [layer.current, vhat[l]]
        add(f"reco{l}", Op.RECO, srcs, layer=l, distill_on=cfg.distill_on, freq=split[l], **reco)
    out = f.by_op(Op.OUTPUT)[0]
    top = len(layers)
    if out.attrs["task"] == "classification":
        add(f"ce{top}", Op.CE, [out.name], layer=top, population=out.attrs["population"],
            per_step=out.attrs["target"] == "sequence")
    else:
        add(f"mse{top}", Op.MSE, [out.name], layer=top, per_step=out.attrs["target"] == "sequence")
    return nodes, edges


def _reaching_a_loss(nodes: list[Node], edges: list[Edge], loss_edges: list[Edge]) -> tuple[list[Node], list[Edge]]:
    """B without the nodes whose value no loss reads, directly or through other nodes. Without recall, B's neuron
    of layer 1 is one: nothing mirrors the synapse that would read it (ReCo at layer 1 reads the current)."""
    used = {e.src for e in loss_edges}
    while True:
        more = {e.src for e in edges if e.dst in used} - used
        if not more:
            break
        used |= more
    return [n for n in nodes if n.name in used], [e for e in edges if e.dst in used]


def frequency_split(f: Graph, cfg: BSDConfig, layers: list[Layer] | None = None) -> dict[int, bool]:
    """Layer -> whether its ReCo loss (derived from F with ``cfg``) splits its operands into frequency bands."""
    layers = segment(f) if layers is None else layers
    split = {layer.index: cfg.freq and _spatial(f[layer.current].shape) for layer in layers[:-1]}
    if cfg.recall and cfg.recall_loss != "mse":
        split[0] = cfg.freq and _spatial(f.by_op(Op.INPUT)[0].shape)
    return split


def _spatial(shape: tuple[int, ...]) -> bool:
    """Whether the frequency split is meaningful: a [C, H, W] layer with more than one pixel (a 1x1 map is all
    DC, so its high band would be identically zero and ReCo on it pure rounding noise)."""
    return len(shape) == 3 and shape[1] * shape[2] > 1


def derive_feedback(f: Graph, cfg: BSDConfig | None = None) -> Graph:
    """F (validated forward graph) -> BSD graph: F with stop-gradients, B, and one local loss per layer."""
    cfg = cfg or BSDConfig()
    check_config(cfg)
    validate(f, forward=True)
    out = f.by_op(Op.OUTPUT)[0]
    if cfg.negatives == "other_class" and out.attrs["task"] != "classification":
        raise GraphError([Diagnostic(out.name, out.op, "negatives='other_class' needs class labels, but the task is "
                                     f"{out.attrs['task']!r}", "use negatives='all' for regression")])
    if cfg.negatives == "other_class" and out.attrs["target"] == "sequence":
        raise GraphError([Diagnostic(out.name, out.op, "negatives='other_class' compares one class per sample, but "
                                     "this output has a class per step", "use negatives='all'")])
    layers = segment(f)
    b, vhat, bneuron = _backward_network(f, layers, cfg.recall)
    loss_nodes, loss_edges = _losses(f, layers, vhat, bneuron, cfg)
    f_edges = [dataclasses.replace(e, detach=f[e.dst].op in GroupOp.SYNAPSE) for e in f.edges]
    b_nodes, b_edges = _reaching_a_loss(b.nodes, b.edges, loss_edges)
    g = Graph(f.name, f.nodes + b_nodes + loss_nodes, f_edges + b_edges + loss_edges, f.T, f.dt)
    validate(g, forward=False)
    check_locality(g)
    return g


# The BSD options that are a choice, and those that are a number >= 0.
BSD_CHOICES = {"negatives": ("all", "other_class"), "distill_on": ("current", "membrane"), "recall_loss": ("reco", "mse"),
               "reco_rows": ("sample", "step")}
BSD_NUMBERS = ("lam", "eps", "freq_r", "lam_low", "lam_high")


def check_config(cfg: BSDConfig) -> None:
    """Every problem of the options at once (one GraphError)."""
    diags = [Diagnostic(None, None, f"BSD option {k}={getattr(cfg, k)!r} is not one of {v}", "")
             for k, v in BSD_CHOICES.items() if getattr(cfg, k) not in v]
    diags += [Diagnostic(None, None, f"BSD option {k} must be True or False, got {getattr(cfg, k)!r}", "")
              for k in ("recall", "freq") if not isinstance(getattr(cfg, k), bool)]
    for k in BSD_NUMBERS:
        v = getattr(cfg, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            diags.append(Diagnostic(None, None, f"BSD option {k} must be a finite number >= 0, got {v!r}", ""))
    if cfg.reco_rows == "step" and (cfg.freq is True or cfg.negatives == "other_class"):
        diags.append(Diagnostic(None, None, "reco_rows='step' compares single steps; it does not combine with "
                                "freq=True or negatives='other_class'", "drop one of the options"))
    if diags:
        raise GraphError(diags)


# ---------------------------------------------------------------------------------------------------- locality


def local_params(g: Graph, loss: str) -> list[str]:
    """Parametric nodes whose output reaches ``loss`` without crossing a stop-gradient edge: what it updates."""
    seen, stack, out = set(), [loss], []
    while stack:
        for e in g.in_edges(stack.pop()):
            if e.detach or e.src in seen:
                continue
            seen.add(e.src)
            stack.append(e.src)
            if g[e.src].op in GroupOp.PARAMETRIC:
                out.append(e.src)
    return sorted(out, key=[n.name for n in g.nodes].index)


def check_locality(g: Graph) -> None:
    """C2 on the graph: every parametric node is updated by exactly one loss."""
    owner: dict[str, list[str]] = {n.name: [] for n in g.nodes if n.op in GroupOp.PARAMETRIC}
    for loss in g.nodes:
        if loss.op in GroupOp.LOSS:
            for p in local_params(g, loss.name):
                owner[p].append(loss.name)
    diags = [Diagnostic(p, g[p].op, f"is updated by {len(ls)} losses {ls}, expected exactly one",
                        "each weight must learn from the loss of the layer it feeds (C2)")
             for p, ls in owner.items() if len(ls) != 1]
    if diags:
        raise GraphError(diags)


@dataclass(frozen=True)
class Pair:
    layer: int
    loss: str
    f_side: str
    b_side: str | None
    f_params: tuple[str, ...]
    b_params: tuple[str, ...]


def pairing(g: Graph) -> list[Pair]:
    """The layer pairing of a BSD graph, read off its loss nodes (ordered by layer)."""
    pairs = []
    for n in g.nodes:
        if n.op not in GroupOp.LOSS:
            continue
        ins = g.inputs(n.name)
        params = local_params(g, n.name)
        pairs.append(Pair(n.attrs["layer"], n.name, ins[0].name, ins[1].name if len(ins) > 1 else None,
                          tuple(p for p in params if g[p].stream == Stream.F),
                          tuple(p for p in params if g[p].stream == Stream.B)))
    return sorted(pairs, key=lambda p: p.layer)
