"""The graph IR: a closed ``Op`` enum, frozen nodes, a frozen graph and the one mutable ``GraphBuilder``.

A node holds hyper-parameters and its per-sample shape, never weights: weights are bound by name at run time
(``"<node>.weight"``), as torch.fx binds ``get_attr`` targets. Every activity tensor is ``[T, B, *node.shape]``.
Operand order (``port``), recurrence (``delay``) and BSD's stop-gradient points (``detach``) live on edges.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
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
    ADD = "add"                # elementwise sum: a residual merge, a recurrent layer's sum, B's fan-in
    LIF = "lif"
    NEURON = "neuron"          # a declared neuron type (ir/neurons.py): if, li, cuba_lif, alif, a user's own...
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
    NEURON = frozenset({Op.LIF, Op.NEURON})
    LOSS = frozenset({Op.RECO, Op.CE, Op.MSE})
    PARAMETRIC = frozenset({Op.LINEAR, Op.CONV2D, Op.CONV_T2D, Op.BATCHNORM})
    # what a user may write in a forward network; the rest is produced by derive_feedback
    FORWARD = frozenset(
        {Op.INPUT, Op.LINEAR, Op.CONV2D, Op.CONV_T2D, Op.AVGPOOL2D, Op.MAXPOOL2D, Op.UPSAMPLE2D, Op.FLATTEN,
         Op.BATCHNORM, Op.ADD, Op.LIF, Op.NEURON, Op.OUTPUT}
    )


class Stream(enum.Enum):
    F = "F"        # feedforward network (stimulus -> concept)
    B = "B"        # BSD's backward network (concept -> stimulus); never autodiff
    LOSS = "loss"  # layer-local losses


class FrozenAttrs(Mapping):
    """An immutable, hashable mapping for node attributes.

    Values are frozen on the way in (lists and tuples to tuples, mappings to ``FrozenAttrs``, sets to
    frozensets), the items live behind a read-only proxy, and attributes cannot be set, so nothing reachable
    through the object can change it. Equality is that of the plain dicts (``{'tau': 2} == {'tau': 2.0}``), so the
    hash is built from the values' own hashes, which Python keeps equal for equal numbers (``hash(1) ==
    hash(1.0) == hash(True)``) and so for tuples of equal numbers (``(3, 3)`` and ``(3.0, 3.0)``); the former
    ``repr``-based hash told ``2`` from ``2.0`` and broke ``a == b => hash(a) == hash(b)``.
    """

    __slots__ = ("_items", "_hash")

    def __new__(cls, items: Mapping[str, Any] | None = None) -> FrozenAttrs:
        self = super().__new__(cls)
        frozen = {k: _freeze(v) for k, v in (items or {}).items()}
        object.__setattr__(self, "_items", MappingProxyType(frozen))
        object.__setattr__(self, "_hash", None)
        return self

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:  # computed once: a Node's hash (a frozen dataclass) asks for it every time
            object.__setattr__(self, "_hash", hash(frozenset((k, _hash_key(v)) for k, v in self._items.items())))
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"FrozenAttrs is immutable: cannot set {name!r} (use Node.replace(attrs=...))")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"FrozenAttrs is immutable: cannot delete {name!r}")

    def __reduce__(self):  # pickle and copy rebuild through __new__ (the default would set the slots)
        return FrozenAttrs, (dict(self._items),)

    def __repr__(self) -> str:
        return f"FrozenAttrs({dict(self._items)!r})"


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, Mapping) and not isinstance(v, FrozenAttrs):
        return FrozenAttrs(v)
    if isinstance(v, (set, frozenset)):
        return frozenset(_freeze(x) for x in v)
    return v


_UNHASHABLE = object()


def _hash_key(v: Any) -> Any:
    """What ``v`` contributes to a hash: itself, or a constant for a value Python cannot hash (say an array, which
    validate refuses anyway); a constant keeps ``a == b => hash(a) == hash(b)`` whatever ``==`` says of it."""
    if isinstance(v, tuple):
        return tuple(_hash_key(x) for x in v)
    try:
        hash(v)
    except TypeError:
        return _UNHASHABLE
    return v


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
        _a("encoding", str, "onehot", ("onehot", "population", "analog", "sequence", "code")),
        _a("n_classes", int, 0),
        _a("population", int, 1),
        _a("code_active", int, 0), _a("code_seed", int, 0),
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
    # model: the declaration's name; params: its parameter values (the declaration's defaults fill the rest)
    Op.NEURON: (
        _a("model", str, required=True), _a("params", (Mapping,), FrozenAttrs()),
        _a("surrogate", str, "atan", ("atan",)), _a("alpha", _NUM, 2.0),
    ),
    Op.OUTPUT: (
        _a("task", str, "classification", ("classification", "regression")),
        # regression: analog = one target per sample, read as mean_t of the top current; sequence = one per step,
        # V_L[t] predicts y[:, t] (sequence-to-sequence, e.g. next-step prediction of a time series);
        # classification: one-hot or population codes of one class per sample, or sequence = one class per step,
        # V_L[t] classified against y[:, t] (e.g. next-character prediction)
        _a("target", str, "onehot", ("onehot", "population", "analog", "sequence", "code")),
        _a("n_classes", int, 0),
        _a("population", int, 1),
        # target 'code': each class is a fixed random pattern of code_active of the top width's neurons, drawn by
        # code_seed (runtime/losses.py class_codes); the readout is the cosine of the top current to each pattern
        _a("code_active", int, 0), _a("code_seed", int, 0),
    ),
    Op.RECO: (
        _a("layer", int, required=True), _a("lam", _NUM, 0.6), _a("negatives", str, "all", ("all", "other_class")),
        _a("eps", _NUM, 1e-8), _a("distill_on", str, "current", ("current", "membrane")),
        _a("freq", bool, False), _a("freq_r", _NUM, 0.25), _a("lam_low", _NUM, 0.3), _a("lam_high", _NUM, 0.9),
        # rows: one cosine per sample over all T steps (the paper's), one per step of each sample ("step"), or
        # one ReCo per step over the batch's rows at that step, averaged over the steps ("each_step")
        _a("rows", str, "sample", ("sample", "step", "each_step")),
    ),
    # per_step: the top current of step t is classified against y[:, t] (target='sequence')
    # smoothing: label smoothing of the target distribution, (1 - s) one-hot + s / classes (0: none)
    Op.CE: (_a("layer", int, required=True), _a("population", int, 1), _a("per_step", bool, False),
            _a("smoothing", _NUM, 0.0), _a("n_classes", int, 0), _a("code_active", int, 0), _a("code_seed", int, 0)),
    Op.MSE: (_a("layer", int, required=True), _a("per_step", bool, False)),
}


def default_attrs(op: Op, /, **given: Any) -> dict[str, Any]:
    """The full attribute dict of ``op``: defaults overridden by ``given`` (unknown keys are kept for validate).

    ``op`` is positional-only so that an attribute named ``op`` (invalid, but a JSON file can hold one) reaches
    validate as an unknown attribute instead of a TypeError here."""
    out = {a.name: a.default for a in ATTRS[op] if not a.required}
    out.update(given)
    return out


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
        # a plain dict for the lookup kernels make while a step runs (and torch.compile traces)
        self._by_name = {n.name: n for n in nodes}

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
        return self._by_name[name]

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

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self)} nodes, T={self.T})"
