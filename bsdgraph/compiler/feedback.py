"""Derive BSD's backward network B and the layer-local losses from a forward network F.

F is cut into layers at its neurons (``segment``): each layer is ``synapse(s) -> [add] -> [batchnorm] -> neuron``,
reading spikes that may pass transforms and sums (residual merges) on the way; a chain or a residual network
(branches and merges, ``_backward_network``). For every synapse of F, B gets a mirrored synapse with its own
weights (criterion C1), built by the rule in ``MIRROR_RULES``: Linear(D_in -> D_out) <-> Linear(D_out -> D_in),
Conv2d <-> ConvTranspose2d restoring the exact input shape, pooling <-> nearest upsampling to the exact size,
Flatten <-> Unflatten; batchnorm and LIF neurons are mirrored at the same layer with copied hyper-parameters. A
recurrent layer (``synapse -> add(., rec(s[t-1])) -> lif``) gets in B its own sum and its own recurrent synapse
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
    recall: bool = True              # bottom loss L_0(encode(x), V̂_0): makes B a generator
    # mse (default) | reco: L_0 trains θ_1 alone, so F learns the same either way; with MSE B's recall draws the
    # stimulus itself (class prototypes), with ReCo only up to scale and offset, which renders as noise
    recall_loss: str = "mse"
    freq: bool = False               # frequency-aware ReCo on layers with a spatial layout
    freq_r: float = 0.25
    lam_low: float = 0.3
    lam_high: float = 0.9
    # sample (one cosine per sample over T*D) | step (one per step: [T*B, D] rows in one contrast) | each_step (one
    # ReCo per step over the batch's [B, D] rows at that step, averaged over the steps; with negatives='other_class'
    # and a sequence target, a sample's negatives at step t are those with another class at step t)
    reco_rows: str = "sample"
    # per-layer lam: one value per hidden ReCo layer 1..L-1, bottom to top (overrides lam there); () lam everywhere
    layer_lam: tuple[float, ...] = ()
    # label smoothing s of the top CE: the target is (1 - s) one-hot + s / classes (BPTT's CE takes it too)
    label_smoothing: float = 0.0
    # step (default): a recurrent layer's delayed edge is a stop-gradient, so its ReCo credits only the current
    # step | through_time: the layer's own loss reaches back through its recurrent synapse and its neurons (BPTT
    # confined to the layer; the input from below stays detached, so there is still no global backward pass)
    recurrent_credit: str = "step"
    # True (default): B's recurrent layer has its own recurrent synapse on B's spikes, as F's has | False: B's layer
    # gets no recurrent synapse, so B's spikes do not carry the targets it has seen on to later steps (only its
    # neurons' membranes do; backward_membrane below). With a target per step (the next character) B's recurrence
    # has seen the input F sees at step t (the previous target), and F can meet B through it without predicting
    backward_recurrence: bool = True
    # True (default): B's LIF neurons copy F's, membrane and all | False: they start every step from rest (tau = 1:
    # h[t] = V[t] + v_reset), so B's spikes at step t depend on its input at t alone; a membrane that leaks over
    # steps, like B's recurrence, carries earlier targets that F has read as inputs
    backward_membrane: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> BSDConfig:
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GraphError([Diagnostic(None, None, f"unknown BSD option(s) {unknown}",
                                         f"known: {', '.join(sorted(known))}")])
        if isinstance(d.get("layer_lam"), list):  # a list in a BSD dict or a run's JSON record
            d["layer_lam"] = tuple(d["layer_lam"])
        return cls(**d)


@dataclass(frozen=True)
class Layer:
    """Layer l of F: the neurons it ends in (None at the top) and the current feeding them: the sum of one or more
    synapses (a residual merge of currents), optionally batch-normalised, or a recurrent layer's sum."""

    index: int
    current: str              # the node holding V_l, the current into the layer's neurons (or the output)
    synapses: tuple[str, ...]  # F's synapses whose currents add up to V_l (a recurrent layer's rec excluded)
    bn: str | None
    neuron: str | None
    add: str | None = None   # recurrent layer: V_l = synapse(s_{l-1}) + rec(s_l[t-1]), summed by this node
    rec: str | None = None   # the recurrent synapse (a Linear reading the layer's own spikes through a delay)

    @property
    def synapse(self) -> str:
        """The layer's synapse when it has one (a chain's layer); the first of them otherwise."""
        return self.synapses[0]


# ---------------------------------------------------------------------------------------------------- segmentation

# Which side of a layer a node of F sits on: SPIKES (the stimulus, neurons' values and what transforms or sums of
# them give: what synapses read) or CURRENT (a synapse's output, its batchnorm, a sum of currents: what neurons read).
SPIKES, CURRENT = "spikes", "current"
_SHAPE_HINT = ("a BSD layer is synapse(s) -> [add] -> [batchnorm] -> neuron; spikes may pass transforms (pool, "
               "flatten) and sums (a residual merge) on the way to synapses; the top layer is synapse(s) -> output")


def _sides(f: Graph) -> tuple[dict[str, str], list[Diagnostic]]:
    """Each F node's side, and what breaks the rule "spikes -> synapse -> current -> neuron -> spikes"."""
    side: dict[str, str] = {}
    diags = []

    def bad(n: Node, problem: str, hint: str = _SHAPE_HINT) -> None:
        diags.append(Diagnostic(n.name, n.op, problem, hint))

    for n in f.topo_order():
        ins = [(e, side.get(e.src, SPIKES if e.delay else None)) for e in f.in_edges(n.name)]
        got = {s for _, s in ins}
        if n.op == Op.INPUT:
            side[n.name] = SPIKES
        elif n.op in GroupOp.SYNAPSE:
            if got == {CURRENT}:
                bad(n, "follows a synapse without a neuron between them")
            side[n.name] = CURRENT
        elif n.op in GroupOp.TRANSFORM:
            if got == {CURRENT}:
                bad(n, "sits between a synapse and its neuron")
            side[n.name] = SPIKES
        elif n.op == Op.ADD:
            if len(got) > 1:
                bad(n, "adds spikes to a current", "sum spikes (a residual merge before a synapse) or currents (of "
                    "synapses feeding one neuron), not both")
            side[n.name] = got.pop() if len(got) == 1 else CURRENT
        elif n.op == Op.BATCHNORM:
            users = f.consumers(n.name)
            if got != {CURRENT}:
                bad(n, "must directly follow a synapse (or a sum of synapses)")
            elif len(users) != 1 or users[0].op not in GroupOp.NEURON:
                bad(n, "must directly feed a neuron", "B mirrors a batchnorm in front of the same layer's neurons")
            side[n.name] = CURRENT
        elif n.op in GroupOp.NEURON or n.op == Op.OUTPUT:
            if got != {CURRENT}:
                bad(n, "has no synapse in its layer" if n.op != Op.OUTPUT else "must read a synapse's current")
            side[n.name] = SPIKES
        if side.get(n.name) == CURRENT and n.op != Op.BATCHNORM:
            users = f.out_edges(n.name)
            if len(users) != 1:
                bad(n, f"its current feeds {len(users)} consumers; a current drives exactly one layer",
                    "branch on the spikes: read the neurons' output from several synapses")
        for e in f.in_edges(n.name):
            if e.delay and not (n.op in (Op.LINEAR, Op.CONV2D) and f[e.src].op in GroupOp.NEURON):
                bad(n, f"reads '{e.src}' through a delay-{e.delay} edge; only a recurrent layer's synapse may",
                    "build recurrence with g.recurrent_lif / g.recurrent_neuron")
    return side, diags


def _is_rec(f: Graph, name: str) -> bool:
    """Whether ``name`` is a recurrent synapse: one reading through a delayed edge."""
    return any(e.delay for e in f.in_edges(name))


def _current_parts(f: Graph, current: str) -> tuple[str | None, str | None, str | None, tuple[str, ...]]:
    """(batchnorm, recurrent sum, recurrent synapse, feedforward synapses) making up a layer's current."""
    bn = current if f[current].op == Op.BATCHNORM else None
    top = f.inputs(bn)[0].name if bn else current
    syns, stack, add, rec = [], [top], None, None
    while stack:
        n = f[stack.pop()]
        if n.op in GroupOp.SYNAPSE:
            if _is_rec(f, n.name):
                rec = n.name
            else:
                syns.append(n.name)
        elif n.op == Op.ADD:
            stack += [i.name for i in reversed(f.inputs(n.name))]
    if rec is not None:
        add = next(c.name for c in f.consumers(rec) if c.op == Op.ADD)
    return bn, add, rec, tuple(syns)


def forward_of(bsd: Graph) -> Graph:
    """The forward network F inside a BSD graph: its F nodes and the edges between them."""
    return bsd.replace(nodes=[n for n in bsd.nodes if n.stream == Stream.F],
                       edges=[e for e in bsd.edges if bsd[e.src].stream == Stream.F and bsd[e.dst].stream == Stream.F])


def segment(f: Graph) -> list[Layer]:
    """Cut F into layers at its neurons, in topological order (layer L ends in the output); raise ``GraphError``
    on a shape BSD cannot pair. A chain gives layers 1..L bottom-up; a residual network one layer per neuron.
    Given a BSD graph, segments its F."""
    if any(n.stream != Stream.F for n in f.nodes):
        f = forward_of(f)
    inputs = f.by_op(Op.INPUT)
    if len(inputs) != 1:
        raise GraphError([Diagnostic(None, None, f"expected one input, got {len(inputs)}", "BSD maps one stimulus")])
    _, diags = _sides(f)
    if diags:
        raise GraphError(diags)
    layers = []
    for n in f.topo_order():
        if n.op in GroupOp.NEURON or n.op == Op.OUTPUT:
            current = f.inputs(n.name)[0].name
            bn, add, rec, syns = _current_parts(f, current)
            neuron = n.name if n.op != Op.OUTPUT else None
            layers.append(Layer(len(layers) + 1, current, syns, bn, neuron, add, rec))
    diags = [d for layer in layers if layer.rec for d in _recurrent_problems(f, layer)]
    if diags:
        raise GraphError(diags)
    return layers


def _recurrent_problems(f: Graph, layer: Layer) -> list[Diagnostic]:
    """What derive_feedback and the runtimes need of a recurrent layer: ``add(synapse, rec) -> neurons`` with a
    bias-free ``rec`` (a Linear, or a Conv2d keeping the size) reading the layer's own value through one delay-1
    edge, and one synapse above it reading the neurons with nothing in between (B mirrors that synapse straight
    into its own recurrent sum, which runs as one launch with it)."""
    rec, out = f[layer.rec], []
    add = f[layer.add] if layer.add else None
    fix = ("build it with g.recurrent_lif(g.linear(x, width)) (or on a conv2d's current) and read it with one "
           "synapse, g.linear(...) or g.conv2d(...)")
    ins = f.in_edges(rec.name)
    above = [f[e.dst] for e in f.out_edges(layer.neuron) if e.delay == 0] if layer.neuron else []
    if add is None or layer.current != add.name or [i.name for i in f.inputs(add.name)][1:] != [rec.name]:
        where = layer.add or rec.name
        out.append(Diagnostic(where, f[where].op, "a recurrent synapse must be the second operand of the sum that "
                              "directly feeds its layer's neurons", fix))
    elif layer.neuron is None:
        out.append(Diagnostic(layer.add, Op.ADD, "the top layer cannot be recurrent", fix))
    elif len(layer.synapses) != 1 or f.inputs(add.name)[0].name != layer.synapse:
        got = ", ".join(f"{f[s].op.value} '{s}'" for s in layer.synapses)
        out.append(Diagnostic(layer.add, Op.ADD, f"sums {got} with the recurrent synapse; a recurrent layer's "
                              "feedforward current must come from one synapse", fix))
    elif len(ins) != 1 or ins[0].src != layer.neuron or ins[0].delay != 1:
        got = ", ".join(f"'{e.src}' (delay {e.delay})" for e in ins)
        out.append(Diagnostic(rec.name, rec.op, f"is the second operand of '{layer.add}' but reads {got}; it must "
                              f"read '{layer.neuron}' through a delay-1 edge", fix))
    elif rec.op not in (Op.LINEAR, Op.CONV2D) or rec.shape != f[layer.neuron].shape:
        out.append(Diagnostic(rec.name, rec.op, f"a recurrent synapse must be a linear or a conv2d keeping the "
                              f"layer's shape {list(f[layer.neuron].shape)}, got {rec.op.value} {list(rec.shape)}",
                              fix))
    elif rec.attrs["bias"]:
        out.append(Diagnostic(rec.name, rec.op, "a recurrent synapse has no bias (the feedforward synapse's bias "
                              "already adds a constant current)", "create it with bias=False"))
    elif len(above) != 1 or above[0].op not in GroupOp.SYNAPSE:
        what = ", ".join(f"{c.op.value} '{c.name}'" for c in above)
        out.append(Diagnostic(above[0].name, above[0].op, f"reads the recurrent layer '{layer.neuron}'; a recurrent "
                              f"layer must feed exactly one synapse directly (B mirrors it into its own recurrent "
                              f"sum), got {what}", fix))
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
        self.built: dict[tuple[_Value, str], str] = {}

    def add(self, name: str, op: Op, attrs: dict, shape, src: str | None, detach: bool = False) -> str:
        self.nodes.append(Node(name, op, FrozenAttrs(default_attrs(op, **attrs)), tuple(shape), Stream.B))
        if src is not None:
            self.edges.append(Edge(src, name, 0, 0, detach))
        return name

    def build(self, f: Graph, v: _Value, suffix: str = "") -> str:
        """B's nodes for value ``v`` (once per value and suffix: equal values are the same nodes); returns the node
        holding it."""
        key = (v, suffix)
        if key not in self.built:
            self.built[key] = self._build(f, v, suffix)
        return self.built[key]

    def _build(self, f: Graph, v: _Value, suffix: str) -> str:
        if v.kind == "built":
            return v.ref
        if v.kind == "branch":
            return self.build(f, v.parts[0], f"{suffix}_via_{v.ref}")
        srcs = [self.build(f, p, suffix) for p in v.parts]
        if v.kind == "sum":
            name = self.add(f"{v.ref}_b_sum{suffix}", Op.ADD, {}, f[v.ref].shape, None)
            self.edges += [Edge(s, name, port) for port, s in enumerate(srcs)]
            return name
        synapse = f[v.ref].op in GroupOp.SYNAPSE  # θ reads sg(B's spikes)
        return self.mirror_of(f, v.ref, srcs[0], f.inputs(v.ref)[0].shape, synapse, f"{v.ref}_b{suffix}")

    def mirror_of(self, f: Graph, fnode: str, src: str, out_shape, detach: bool = False,
                  name: str | None = None, override: dict | None = None) -> str:
        n = f[fnode]
        op, attrs = MIRROR_RULES[n.op](n, f.inputs(fnode)[0].shape)
        return self.add(name or f"{fnode}_b", op, {**attrs, **(override or {})}, out_shape, src, detach)

    def recurrent(self, f: Graph, layer: Layer, src: str) -> str:
        """``add_b = src + rec_b(s'_l[t-1])``: the mirror of F's recurrent sum, reading B's neuron of the layer."""
        rec = f[layer.rec]
        rec_b = f"{rec.name}_b"
        self.nodes.append(Node(rec_b, rec.op, FrozenAttrs(default_attrs(rec.op, **rec.attrs)), rec.shape, Stream.B))
        total = self.add(f"{layer.add}_b", Op.ADD, {}, f[layer.add].shape, src)
        self.edges += [Edge(rec_b, total, 1), Edge(f"{layer.neuron}_b", rec_b, 0, delay=1, detach=True)]
        return total


@dataclass(frozen=True)
class _Value:
    """A value of B not built yet: what arrives at an F node's place during the transpose walk. ``kind`` is
    ``built`` (B node ``ref``), ``mirror`` (F node ``ref`` mirrored onto ``parts[0]``), ``sum`` (the sum of
    ``parts`` at F node ``ref``'s place) or ``branch`` (``parts[0]`` on its way to F operand ``ref`` of a sum of
    spikes: built once per operand)."""

    kind: str
    ref: str
    parts: tuple[_Value, ...] = ()


def _backward_network(f: Graph, layers: list[Layer], cfg: BSDConfig) -> tuple[_B, dict[int, str], dict[int, str]]:
    """B as the transpose of F's wiring, built top-down. Returns it, V̂_l per layer (0..L-1: 0 is the stimulus's
    place) and B's neurons per hidden layer.

    Walking F in reverse topological order, every F node receives B's values from the places its consumers
    mirror to, and passes their sum on: a synapse through its mirror (own weights, reading sg of B's value), a
    transform through its mirror, a sum to each of its operands, a batchnorm unchanged (B normalises in front of
    its own neurons instead). So a fan-out in F is a sum in B and a sum in F a fan-out in B: a skip connection in
    F is one in B. A neuron takes the sum arriving at its place as its current (after its own batchnorm and
    recurrent sum) and sends B's spikes on from its current's place. On a chain this is one mirrored synapse per
    layer.

    A sum of spikes in F (a residual merge) sends B's value to layers that each have their own loss, so whatever
    built that value is built once per operand (``<node>_b_via_<operand>``): each of B's weights belongs to exactly
    one loss (C2). Values are therefore built only where a layer (or the stimulus's place) takes them.
    """
    b, vhat, neuron = _B(), {}, {}
    arriving: dict[str, list[_Value]] = {}
    out = f.by_op(Op.OUTPUT)[0]
    by_neuron = {layer.neuron: layer for layer in layers if layer.neuron}
    target = b.add("target", Op.TARGET, dict(encoding=out.attrs["target"], n_classes=out.attrs["n_classes"],
                                             population=out.attrs["population"],
                                             code_active=out.attrs["code_active"], code_seed=out.attrs["code_seed"]),
                   out.shape, None)
    arriving[out.name] = [_Value("built", target)]
    side, _ = _sides(f)
    for n in reversed(f.topo_order()):
        parts = arriving.pop(n.name, [])
        if not parts:  # a recurrent synapse: B gets its own (b.recurrent)
            continue
        total = parts[0] if len(parts) == 1 else _Value("sum", n.name, tuple(parts))
        ins = [e.src for e in f.in_edges(n.name) if not _is_rec(f, e.src)]
        sent = {}
        if n.op in GroupOp.NEURON:
            layer = by_neuron[n.name]
            v = b.build(f, total)
            if layer.bn:
                v = b.mirror_of(f, layer.bn, v, f[layer.bn].shape)
            if layer.add and cfg.backward_recurrence:  # B's own recurrent synapse (own weights, C1), own spikes
                v = b.recurrent(f, layer, v)
            vhat[layer.index] = v
            # backward_membrane=False: tau = 1 leaves nothing of v[t-1] in h[t] (derive_feedback allows it for LIF only)
            neuron[layer.index] = b.mirror_of(f, n.name, v, n.shape,
                                              override=None if cfg.backward_membrane else {"tau": 1.0})
            sent = {src: _Value("built", neuron[layer.index]) for src in ins}
        elif n.op == Op.INPUT:
            vhat[0] = b.build(f, total)
        elif n.op in GroupOp.SYNAPSE | GroupOp.TRANSFORM:
            sent = {ins[0]: _Value("mirror", n.name, (total,))}
        elif n.op == Op.ADD and side[n.name] == SPIKES:
            sent = {src: _Value("branch", src, (total,)) for src in ins}
        else:  # output, a sum of currents, batchnorm: B's value passes unchanged to every operand
            sent = {src: total for src in ins}
        for src in ins:
            arriving.setdefault(src, []).append(sent[src])
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
    if cfg.layer_lam and len(cfg.layer_lam) != len(layers) - 1:
        raise GraphError([Diagnostic(None, None, f"BSD option layer_lam has {len(cfg.layer_lam)} values, but "
                                     f"{f.name} has {len(layers) - 1} hidden ReCo layer(s)",
                                     "give one lam per hidden layer, bottom to top, or drop layer_lam")])
    for layer in layers[:-1]:
        l, membrane = layer.index, cfg.distill_on == "membrane"
        srcs = [layer.neuron, bneuron[l]] if membrane else [layer.current, vhat[l]]
        lam = cfg.layer_lam[l - 1] if cfg.layer_lam else cfg.lam
        add(f"reco{l}", Op.RECO, srcs, layer=l, distill_on=cfg.distill_on, freq=split[l], **{**reco, "lam": lam})
    out = f.by_op(Op.OUTPUT)[0]
    top = len(layers)
    if out.attrs["task"] == "classification":
        add(f"ce{top}", Op.CE, [out.name], layer=top, population=out.attrs["population"],
            per_step=out.attrs["target"] == "sequence", smoothing=cfg.label_smoothing,
            **{k: out.attrs[k] for k in ("n_classes", "code_active", "code_seed")})
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
    if cfg.negatives == "other_class" and out.attrs["target"] == "sequence" and cfg.reco_rows != "each_step":
        raise GraphError([Diagnostic(out.name, out.op, "negatives='other_class' compares one class per sample, but "
                                     "this output has a class per step",
                                     "use reco_rows='each_step' (a contrast per step) or negatives='all'")])
    layers = segment(f)
    if cfg.recurrent_credit == "through_time":
        _check_through_time(f, layers, cfg)
    if not cfg.backward_recurrence and not any(layer.rec for layer in layers):
        raise GraphError([Diagnostic(None, None, "backward_recurrence=False removes the recurrence of B's recurrent "
                                     "layers, but this network has no recurrent layer",
                                     "drop backward_recurrence=False")])
    if not cfg.backward_membrane:
        _check_backward_membrane(f, layers)
    b, vhat, bneuron = _backward_network(f, layers, cfg)
    loss_nodes, loss_edges = _losses(f, layers, vhat, bneuron, cfg)
    f_edges = [dataclasses.replace(e, detach=f[e.dst].op in GroupOp.SYNAPSE) for e in f.edges]
    b_nodes, b_edges = _reaching_a_loss(b.nodes, b.edges, loss_edges)
    if cfg.recurrent_credit == "through_time":  # the only delayed edges are those into recurrent synapses
        f_edges, b_edges = ([dataclasses.replace(e, detach=False) if e.delay else e for e in es]
                            for es in (f_edges, b_edges))
    g = Graph(f.name, f.nodes + b_nodes + loss_nodes, f_edges + b_edges + loss_edges, f.T, f.dt)
    validate(g, forward=False)
    check_locality(g)
    return g


def _check_through_time(f: Graph, layers: list[Layer], cfg: BSDConfig) -> None:
    """What recurrent_credit='through_time' needs: a recurrent layer, each one a LIF layer with a Linear recurrence
    (the cpu and triton backends carry the credit back with the LIF's closed-form step; rec_lif_time_grad), and
    the loss on the current."""
    recurrent = [layer for layer in layers if layer.rec]
    fix = "use recurrent_credit='step'"
    if not recurrent:
        raise GraphError([Diagnostic(None, None, "recurrent_credit='through_time' carries a recurrent layer's credit "
                                     "back in time, but this network has no recurrent layer", fix)])
    diags = [Diagnostic(layer.rec, f[layer.rec].op, "recurrent_credit='through_time' supports recurrent LIF layers "
                        f"with a linear recurrence; this one is {f[layer.rec].op.value} -> {f[layer.neuron].op.value}",
                        fix) for layer in recurrent if (f[layer.rec].op, f[layer.neuron].op) != (Op.LINEAR, Op.LIF)]
    if cfg.distill_on != "current":
        diags.append(Diagnostic(None, None, "recurrent_credit='through_time' takes the credit from the loss on the "
                                "current; it does not combine with distill_on='membrane'", "drop one of the options"))
    if diags:
        raise GraphError(diags)


def _check_backward_membrane(f: Graph, layers: list[Layer]) -> None:
    """backward_membrane=False sets tau = 1 on B's neurons, which makes a LIF memoryless; other neuron types keep
    state in other variables (a synaptic current, an adaptive threshold), so they are refused by name."""
    diags = [Diagnostic(layer.neuron, f[layer.neuron].op, "backward_membrane=False supports LIF layers (tau = 1 "
                        f"leaves a LIF no memory); this one is a {f[layer.neuron].attrs['model']!r} neuron",
                        "use g.lif for this layer, or backward_membrane=True")
             for layer in layers if layer.neuron and f[layer.neuron].op != Op.LIF]
    if diags:
        raise GraphError(diags)


# The BSD options that are a choice, and those that are a number >= 0.
BSD_CHOICES = {"negatives": ("all", "other_class"), "distill_on": ("current", "membrane"), "recall_loss": ("reco", "mse"),
               "reco_rows": ("sample", "step", "each_step"), "recurrent_credit": ("step", "through_time")}
BSD_NUMBERS = ("lam", "eps", "freq_r", "lam_low", "lam_high")


def check_config(cfg: BSDConfig) -> None:
    """Every problem of the options at once (one GraphError)."""
    diags = [Diagnostic(None, None, f"BSD option {k}={getattr(cfg, k)!r} is not one of {v}", "")
             for k, v in BSD_CHOICES.items() if getattr(cfg, k) not in v]
    diags += [Diagnostic(None, None, f"BSD option {k} must be True or False, got {getattr(cfg, k)!r}", "")
              for k in ("recall", "freq", "backward_recurrence", "backward_membrane")
              if not isinstance(getattr(cfg, k), bool)]
    for k in BSD_NUMBERS:
        v = getattr(cfg, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            diags.append(Diagnostic(None, None, f"BSD option {k} must be a finite number >= 0, got {v!r}", ""))
    if not (isinstance(cfg.layer_lam, tuple) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     and math.isfinite(v) and v >= 0 for v in cfg.layer_lam)):
        diags.append(Diagnostic(None, None, f"BSD option layer_lam must be numbers >= 0 (one per hidden layer), "
                                f"got {cfg.layer_lam!r}", ""))
    s = cfg.label_smoothing
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
        diags.append(Diagnostic(None, None, f"BSD option label_smoothing must be in [0, 1), got {s!r}",
                                "0.1 is the usual value"))
    if cfg.reco_rows == "step" and (cfg.freq is True or cfg.negatives == "other_class"):
        diags.append(Diagnostic(None, None, "reco_rows='step' compares single steps; it does not combine with "
                                "freq=True or negatives='other_class'", "drop one of the options"))
    if cfg.reco_rows == "each_step" and cfg.freq is True:
        diags.append(Diagnostic(None, None, "reco_rows='each_step' compares single steps; it does not combine with "
                                "freq=True", "drop one of the options"))
    if diags:
        raise GraphError(diags)


# ---------------------------------------------------------------------------------------------------- locality


def mirrors_of(bsd: Graph, fnode: str) -> list[str]:
    """The nodes of B that mirror F node ``fnode``: ``<fnode>_b``, or, behind a residual sum of spikes, one copy
    per operand of that sum (``<fnode>_b_via_<operand>``)."""
    return [n.name for n in bsd.nodes if n.stream == Stream.B
            and (n.name == f"{fnode}_b" or n.name.startswith(f"{fnode}_b_via_"))]


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


def layer_of_params(g: Graph) -> dict[str, int]:
    """Parametric node -> the layer l >= 1 whose learning rate it takes (``layer_lr``): in a BSD graph, the layer
    of the loss that trains it (the recall loss, layer 0, counts as layer 1: it trains B's bottom synapse); in F
    alone (BPTT), the layer its synapse, batchnorm or recurrent synapse belongs to."""
    if any(n.op in GroupOp.LOSS for n in g.nodes):
        return {p: max(pair.layer, 1) for pair in pairing(g) for p in pair.f_params + pair.b_params}
    return {node: layer.index for layer in segment(g)
            for node in (*layer.synapses, layer.bn, layer.rec) if node is not None}


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
