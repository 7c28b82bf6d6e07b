"""The graph IR: a closed ``Op`` enum, frozen nodes, a frozen graph and the one mutable ``GraphBuilder``.

A node holds hyper-parameters and its per-sample shape, never weights: weights are bound by name at run time
(``"<node>.weight"``), as torch.fx binds ``get_attr`` targets. Every activity tensor is ``[T, B, *node.shape]``.
Operand order (``port``), recurrence (``delay``) and BSD's stop-gradient points (``detach``) live on edges.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx


class Op(enum.Enum):
    INPUT = "input"            # stimulus, encoded over T steps (direct | poisson | sequence)
    TARGET = "target"          # B's input: the concept code of the labels (onehot | population | analog | sequence)
    LINEAR = "linear"
    CONV2D = "conv2d"
    CONV_T2D = "conv_t2d"      # B's mirror of conv2d
    AVGPOOL2D = "avgpool2d"
    MAXPOOL2D = "maxpool2d"
    UPSAMPLE2D = "upsample2d"  # B's mirror of pooling (nearest, to an exact size)
    FLATTEN = "flatten"
    UNFLATTEN = "unflatten"    # B's mirror of flatten
    BATCHNORM = "batchnorm"
    ADD = "add"                # sum of two currents: a recurrent layer's feedforward + recurrent synapse
    LIF = "lif"
    OUTPUT = "output"          # F's concept: the top synapse's current, read out as mean_t
    RECO = "reco"              # ReCo local loss between an F layer and its paired B layer
    CE = "ce"                  # top classification loss
    MSE = "mse"                # top regression loss, or bottom recall loss for generation


class GroupOp:
    """Op groups: rules ask membership, never compare against a list of ops inline."""

    SOURCE = frozenset({Op.INPUT, Op.TARGET})
    SYNAPSE = frozenset({Op.LINEAR, Op.CONV2D, Op.CONV_T2D})
    POOL = frozenset({Op.AVGPOOL2D, Op.MAXPOOL2D})
    TRANSFORM = frozenset({Op.AVGPOOL2D, Op.MAXPOOL2D, Op.UPSAMPLE2D, Op.FLATTEN, Op.UNFLATTEN})
    NEURON = frozenset({Op.LIF})
    LOSS = frozenset({Op.RECO, Op.CE, Op.MSE})
    PARAMETRIC = frozenset({Op.LINEAR, Op.CONV2D, Op.CONV_T2D, Op.BATCHNORM})
    # what a user may write in a forward network; the rest is produced by derive_feedback
    FORWARD = frozenset(
        {Op.INPUT, Op.LINEAR, Op.CONV2D, Op.CONV_T2D, Op.AVGPOOL2D, Op.MAXPOOL2D, Op.UPSAMPLE2D, Op.FLATTEN,
         Op.BATCHNORM, Op.ADD, Op.LIF, Op.OUTPUT}
    )


class Stream(enum.Enum):
    F = "F"        # feedforward network (stimulus -> concept)
    B = "B"        # BSD's backward network (concept -> stimulus); never autodiff
    LOSS = "loss"  # layer-local losses


# ---------------------------------------------------------------------------------------------------- attributes


@dataclass(frozen=True)
class Attr:
    """One hyper-parameter of an op: its name, accepted types, default, and allowed values (if a choice)."""

    name: str
    types: tuple[type, ...]
    default: Any = None
    choices: tuple[Any, ...] | None = None
    required: bool = False


def _a(name: str, types: type | tuple[type, ...], default: Any = None, choices=None, required=False) -> Attr:
    return Attr(name, types if isinstance(types, tuple) else (types,), default, choices, required)


_NUM = (int, float)
_SHAPE = (tuple,)

# Attribute schemas, in printing order. A node's attrs are exactly these keys (validate checks it).
ATTRS: dict[Op, tuple[Attr, ...]] = {
    # sequence: the stimulus is [T, *shape] per sample, step t's slice is the current of step t (time series)
    Op.INPUT: (_a("encoding", str, "direct", ("direct", "poisson", "sequence")),),
    Op.TARGET: (
        _a("encoding", str, "onehot", ("onehot", "population", "analog", "sequence")),
        _a("n_classes", int, 0),
        _a("population", int, 1),
    ),
    Op.LINEAR: (_a("in_features", int, required=True), _a("out_features", int, required=True), _a("bias", bool, True)),
    Op.CONV2D: (
        _a("in_channels", int, required=True), _a("out_channels", int, required=True),
        _a("kernel", _SHAPE, required=True), _a("stride", _SHAPE, (1, 1)), _a("padding", _SHAPE, (0, 0)),
        _a("bias", bool, True),
    ),
    Op.CONV_T2D: (
        _a("in_channels", int, required=True), _a("out_channels", int, required=True),
        _a("kernel", _SHAPE, required=True), _a("stride", _SHAPE, (1, 1)), _a("padding", _SHAPE, (0, 0)),
        _a("output_padding", _SHAPE, (0, 0)), _a("bias", bool, True),
    ),
    Op.AVGPOOL2D: (_a("kernel", _SHAPE, required=True), _a("stride", _SHAPE, None)),
    Op.MAXPOOL2D: (_a("kernel", _SHAPE, required=True), _a("stride", _SHAPE, None)),
    Op.UPSAMPLE2D: (_a("size", _SHAPE, required=True),),
    Op.FLATTEN: (),
    Op.UNFLATTEN: (_a("shape", _SHAPE, required=True),),
    Op.BATCHNORM: (_a("num_features", int, required=True), _a("eps", _NUM, 1e-5), _a("momentum", _NUM, 0.1)),
    Op.ADD: (),
    Op.LIF: (
        _a("tau", _NUM, 2.0), _a("v_th", _NUM, 0.3), _a("v_reset", _NUM, 0.0),
        _a("reset", str, "hard", ("hard", "soft")), _a("surrogate", str, "atan", ("atan",)), _a("alpha", _NUM, 2.0),
    ),
    Op.OUTPUT: (
        _a("task", str, "classification", ("classification", "regression")),
        # regression: analog = one target per sample, read as mean_t of the top current; sequence = one per step,
        # V_L[t] predicts y[:, t] (sequence-to-sequence, e.g. next-step prediction of a time series)
        _a("target", str, "onehot", ("onehot", "population", "analog", "sequence")),
        _a("n_classes", int, 0),
        _a("population", int, 1),
    ),
    Op.RECO: (
        _a("layer", int, required=True), _a("lam", _NUM, 0.6), _a("negatives", str, "all", ("all", "other_class")),
        _a("eps", _NUM, 1e-8), _a("distill_on", str, "current", ("current", "membrane")),
        _a("freq", bool, False), _a("freq_r", _NUM, 0.25), _a("lam_low", _NUM, 0.3), _a("lam_high", _NUM, 0.9),
    ),
    Op.CE: (_a("layer", int, required=True), _a("population", int, 1)),
    Op.MSE: (_a("layer", int, required=True), _a("per_step", bool, False)),
}


def default_attrs(op: Op, **given: Any) -> dict[str, Any]:
    """The full attribute dict of ``op``: defaults overridden by ``given`` (unknown keys are kept for validate)."""
    out = {a.name: a.default for a in ATTRS[op] if not a.required}
    out.update(given)
    return out


class FrozenAttrs(Mapping):
    """An immutable, hashable mapping for node attributes (lists are frozen to tuples)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None):
        object.__setattr__(self, "_items", dict((k, _freeze(v)) for k, v in (items or {}).items()))

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._items.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"FrozenAttrs({self._items!r})"


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


# ---------------------------------------------------------------------------------------------------- node, graph


@dataclass(frozen=True)
class Node:
    """One operation. ``shape`` is the per-sample shape of its output (``[T, B, *shape]`` at run time)."""

    name: str
    op: Op
    attrs: FrozenAttrs = field(default_factory=FrozenAttrs)
    shape: tuple[int, ...] = ()
    stream: Stream = Stream.F

    def replace(self, **changes: Any) -> Node:
        if "attrs" in changes and not isinstance(changes["attrs"], FrozenAttrs):
            changes["attrs"] = FrozenAttrs(changes["attrs"])
        return replace(self, **changes)


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    port: int = 0
    delay: int = 0      # >= 1 closes a recurrent loop; the delay-0 subgraph must be a DAG
    detach: bool = False  # BSD stop-gradient: no gradient crosses this edge


class Graph:
    """A frozen graph of ``Node``s. ``T`` (time steps) and ``dt`` (seconds per step) are global."""

    def __init__(self, name: str, nodes: list[Node], edges: list[Edge], T: int, dt: float = 1.0):
        g = nx.MultiDiGraph()
        for n in nodes:
            g.add_node(n.name, node=n)
        for e in edges:
            g.add_edge(e.src, e.dst, edge=e)
        self._g = nx.freeze(g)
        self.name, self.T, self.dt = name, T, dt
        self._order = list(nodes)

    # -- access
    @property
    def nx(self) -> nx.MultiDiGraph:
        """The underlying (frozen) networkx graph: node attribute ``node``, edge attribute ``edge``."""
        return self._g

    @property
    def nodes(self) -> list[Node]:
        """Nodes in insertion order (builders insert in topological order)."""
        return list(self._order)

    @property
    def edges(self) -> list[Edge]:
        return [d["edge"] for _, _, d in self._g.edges(data=True)]

    def __getitem__(self, name: str) -> Node:
        return self._g.nodes[name]["node"]

    def __contains__(self, name: str) -> bool:
        return name in self._g

    def __len__(self) -> int:
        return len(self._order)

    def in_edges(self, name: str) -> list[Edge]:
        """Operand edges of ``name`` sorted by port."""
        return sorted((d["edge"] for _, _, d in self._g.in_edges(name, data=True)), key=lambda e: e.port)

    def out_edges(self, name: str) -> list[Edge]:
        return [d["edge"] for _, _, d in self._g.out_edges(name, data=True)]

    def inputs(self, name: str) -> list[Node]:
        return [self[e.src] for e in self.in_edges(name)]

    def consumers(self, name: str) -> list[Node]:
        return [self[e.dst] for e in self.out_edges(name)]

    def by_op(self, *ops: Op) -> list[Node]:
        return [n for n in self._order if n.op in ops]

    def topo_order(self) -> list[Node]:
        """Nodes in a topological order of the delay-0 edges (insertion order breaks ties). Needs validity."""
        dag = nx.DiGraph()
        dag.add_nodes_from(n.name for n in self._order)
        dag.add_edges_from((e.src, e.dst) for e in self.edges if e.delay == 0)
        rank = {n.name: i for i, n in enumerate(self._order)}
        return [self[n] for n in nx.lexicographical_topological_sort(dag, key=rank.__getitem__)]

    def replace(self, nodes: list[Node] | None = None, edges: list[Edge] | None = None, **meta: Any) -> Graph:
        return Graph(
            meta.get("name", self.name), self.nodes if nodes is None else nodes,
            self.edges if edges is None else edges, meta.get("T", self.T), meta.get("dt", self.dt),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        key = lambda e: (e.src, e.dst, e.port)  # noqa: E731
        return (
            (self.name, self.T, self.dt) == (other.name, other.T, other.dt)
            and self.nodes == other.nodes
            and sorted(self.edges, key=key) == sorted(other.edges, key=key)
        )

    __hash__ = None  # type: ignore[assignment]

    def __str__(self) -> str:
        from bsdgraph.printer import format_graph

        return format_graph(self)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self)} nodes, T={self.T})"


# ---------------------------------------------------------------------------------------------------- builder


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


class GraphBuilder:
    """The one mutable object of the IR: models call its methods in topological order, then ``build()``.

    Each method returns the new node's name. Shapes are inferred as nodes are added, so a mistake is reported
    at the line that made it (a ``GraphError`` naming the node), and ``build()`` validates the whole graph.
    """

    def __init__(self, name: str, T: int = 4, dt: float = 1.0):
        self.name, self.T, self.dt = name, T, dt
        self._nodes: dict[str, Node] = {}
        self._edges: list[Edge] = []
        self._counts: dict[str, int] = {}

    # -- generic
    def add(self, op: Op, inputs: list[str] | tuple[str, ...] = (), name: str | None = None,
            stream: Stream = Stream.F, shape: tuple[int, ...] | None = None, detach: bool = False,
            **attrs: Any) -> str:
        """Add a node. Its shape is inferred from its inputs unless given (sources give theirs)."""
        from bsdgraph.infer import infer_node_shape

        name = name or self._fresh(op.value)
        if name in self._nodes:
            from bsdgraph.validate import Diagnostic, GraphError

            raise GraphError([Diagnostic(name, op, "a node of this name already exists", "choose another name")])
        for i in inputs:
            if i not in self._nodes:
                from bsdgraph.validate import Diagnostic, GraphError

                raise GraphError([Diagnostic(name, op, f"input {i!r} does not exist", "add it before its consumer")])
        node = Node(name, op, FrozenAttrs(default_attrs(op, **attrs)), tuple(shape or ()), stream)
        if shape is None:
            node = node.replace(shape=infer_node_shape(node, [self._nodes[i] for i in inputs]))
        self._nodes[name] = node
        self._edges += [Edge(src, name, port, 0, detach) for port, src in enumerate(inputs)]
        return name

    def connect(self, src: str, dst: str, port: int, delay: int = 0, detach: bool = False) -> None:
        """Add an extra operand edge (e.g. a recurrent one with ``delay >= 1``)."""
        self._edges.append(Edge(src, dst, port, delay, detach))

    def shape(self, name: str) -> tuple[int, ...]:
        return self._nodes[name].shape

    def build(self, validate: bool = True) -> Graph:
        g = Graph(self.name, list(self._nodes.values()), list(self._edges), self.T, self.dt)
        if validate:
            from bsdgraph.validate import validate as _validate

            _validate(g)
        return g

    def _fresh(self, stem: str) -> str:
        self._counts[stem] = self._counts.get(stem, 0) + 1
        return f"{stem}{self._counts[stem]}"

    # -- sugar used by models/*.py
    def input(self, shape: tuple[int, ...], encoding: str = "direct", name: str = "x") -> str:
        return self.add(Op.INPUT, [], name=name, shape=tuple(shape), encoding=encoding)

    def linear(self, x: str, out_features: int, bias: bool = True, name: str | None = None) -> str:
        in_shape = self._nodes[x].shape
        in_features = in_shape[-1] if in_shape else 0  # a non-flat input is diagnosed by the shape rule
        return self.add(Op.LINEAR, [x], name=name or self._fresh("fc"), in_features=in_features,
                        out_features=out_features, bias=bias)

    def conv2d(self, x: str, out_channels: int, kernel: int | tuple[int, int], stride: int | tuple[int, int] = 1,
               padding: int | tuple[int, int] = 0, bias: bool = True, name: str | None = None) -> str:
        in_shape = self._nodes[x].shape
        return self.add(Op.CONV2D, [x], name=name or self._fresh("conv"), in_channels=in_shape[0] if in_shape else 0,
                        out_channels=out_channels, kernel=_pair(kernel), stride=_pair(stride),
                        padding=_pair(padding), bias=bias)

    def conv_transpose2d(self, x: str, out_channels: int, kernel: int | tuple[int, int],
                         stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                         output_padding: int | tuple[int, int] = 0, bias: bool = True, name: str | None = None) -> str:
        """A decoder synapse (e.g. an autoencoder's upsampling path); B mirrors it with a Conv2d that restores its
        input shape exactly."""
        in_shape = self._nodes[x].shape
        return self.add(Op.CONV_T2D, [x], name=name or self._fresh("deconv"),
                        in_channels=in_shape[0] if in_shape else 0, out_channels=out_channels, kernel=_pair(kernel),
                        stride=_pair(stride), padding=_pair(padding), output_padding=_pair(output_padding), bias=bias)

    def avgpool2d(self, x: str, kernel: int | tuple[int, int], stride=None, name: str | None = None) -> str:
        return self.add(Op.AVGPOOL2D, [x], name=name or self._fresh("pool"), kernel=_pair(kernel),
                        stride=None if stride is None else _pair(stride))

    def maxpool2d(self, x: str, kernel: int | tuple[int, int], stride=None, name: str | None = None) -> str:
        return self.add(Op.MAXPOOL2D, [x], name=name or self._fresh("pool"), kernel=_pair(kernel),
                        stride=None if stride is None else _pair(stride))

    def upsample2d(self, x: str, size: int | tuple[int, int], name: str | None = None) -> str:
        """Nearest-neighbour upsampling to ``size`` (an integer multiple of the input's height and width, so that
        B's mirror, an average pool, restores the input shape)."""
        return self.add(Op.UPSAMPLE2D, [x], name=name or self._fresh("up"), size=_pair(size))

    def flatten(self, x: str, name: str | None = None) -> str:
        return self.add(Op.FLATTEN, [x], name=name or self._fresh("flat"))

    def batchnorm(self, x: str, eps: float = 1e-5, momentum: float = 0.1, name: str | None = None) -> str:
        shape = self._nodes[x].shape
        return self.add(Op.BATCHNORM, [x], name=name or self._fresh("bn"), num_features=shape[0] if shape else 0,
                        eps=eps, momentum=momentum)

    def lif(self, x: str, tau: float = 2.0, v_th: float = 0.3, v_reset: float = 0.0, reset: str = "hard",
            surrogate: str = "atan", alpha: float = 2.0, name: str | None = None) -> str:
        return self.add(Op.LIF, [x], name=name or self._fresh("h"), tau=tau, v_th=v_th, v_reset=v_reset,
                        reset=reset, surrogate=surrogate, alpha=alpha)

    def recurrent_lif(self, current: str, tau: float = 2.0, v_th: float = 0.3, v_reset: float = 0.0,
                      reset: str = "hard", alpha: float = 2.0, name: str | None = None) -> str:
        """A recurrent layer's neurons: ``lif(current + rec(s[t-1]))``, where ``rec`` is a Linear (no bias) from the
        layer's own spikes through a delay-1 edge. Returns the LIF node; ``rec``'s weight is learned like any other.
        """
        (width,) = self._nodes[current].shape or (0,)
        lif = name or self._fresh("h")
        rec = f"{lif}_rec"
        # rec reads the LIF that does not exist yet: declare it with its known shape, wire its delayed edge last
        self._nodes[rec] = Node(rec, Op.LINEAR, FrozenAttrs(default_attrs(Op.LINEAR, in_features=width,
                                                                          out_features=width, bias=False)), (width,))
        total = self.add(Op.ADD, [current, rec], name=f"{lif}_in")
        self.lif(total, tau=tau, v_th=v_th, v_reset=v_reset, reset=reset, alpha=alpha, name=lif)
        self.connect(lif, rec, 0, delay=1)
        return lif

    def output(self, x: str, task: str = "classification", target: str | None = None, population: int = 1,
               name: str = "out") -> str:
        width = math.prod(self._nodes[x].shape)
        target = target or ("analog" if task != "classification" else "population" if population > 1 else "onehot")
        n_classes = width // max(population, 1) if task == "classification" else 0
        return self.add(Op.OUTPUT, [x], name=name, task=task, target=target, n_classes=n_classes,
                        population=population)
