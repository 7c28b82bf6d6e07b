"""The plan: kernel launches in schedule order and the typed buffers they read and write.

A buffer is named by a ``Ref``: what kind of value it holds (``Kind``) and the IR node (and parameter) it belongs
to. Kinds replace the string conventions the plan once had ("grad:x", "h:x", "x.weight", an undeclared
"bnstats:x"): every value a step touches is declared here with its dtype, symbolic shape, producer, consumers
and lifetime, so a generator can turn the plan into straight-line code (``codegen.py``) and a memory estimate
can be read off it (``Plan.peak_live``).
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from typing import NamedTuple


class Kind(enum.Enum):
    # values of one step (live from their producer to their last consumer)
    VALUE = "value"            # a node's output: spikes, a current, the encoded stimulus, a class code
    MEMBRANE = "membrane"      # a neuron's membrane before reset, h[t] (its surrogate backward reads it)
    GRAD = "grad"              # the gradient of a loss with respect to a node's value
    PARAM_GRAD = "param_grad"  # the gradient of a parameter (weight, bias)
    STATS = "stats"            # a batchnorm's batch mean and 1/std of this step (its backward reads them)
    LOSS = "loss"              # a loss value (0-d)
    RATE = "rate"              # a neuron layer's firing rate (0-d)
    # what a step is given
    INPUT = "input"            # a step input: the stimulus x, the labels y, the step's random seed
    GROUPING = "grouping"      # the classes of the batch, each sample's class row, the class counts
    PENDING = "pending"        # a collective in flight (data-parallel: a gradient bucket being all-reduced)
    # what lives across steps (bound by the runtime, updated in place)
    PARAM = "param"            # a weight or bias
    STATE = "state"            # a batchnorm's running statistics

    @property
    def persistent(self) -> bool:
        return self in (Kind.PARAM, Kind.STATE)

    # members are singletons: hash by identity (C) instead of Enum's Python-level hash of the name
    __hash__ = object.__hash__


# how a ref prints in plans and generated code: kind -> (text format, identifier prefix)
SPELLING = {
    Kind.VALUE: ("{node}", "v"), Kind.MEMBRANE: ("h({node})", "h"), Kind.GRAD: ("d({node})", "d"),
    Kind.PARAM_GRAD: ("d({node}.{part})", "dp"), Kind.STATS: ("stats({node})", "st"),
    Kind.LOSS: ("loss({node})", "loss"), Kind.RATE: ("rate({node})", "rate"), Kind.INPUT: ("{node}", "in"),
    Kind.GROUPING: ("classes", "grouping"), Kind.PENDING: ("pending({node})", "pending"),
    Kind.PARAM: ("{node}.{part}", "p"), Kind.STATE: ("{node}.{part}", "s"),
}


class Ref(NamedTuple):
    """A typed reference to one buffer: ``Ref(Kind.GRAD, "h1")`` is dLoss/d(h1).

    A named tuple (hashed and compared in C, with ``Kind`` hashed by identity): a step looks refs up and builds
    them a few hundred times, and as a frozen dataclass that cost 0.7 ms of a 5 ms step of a tiny network
    (measured with cProfile)."""

    kind: Kind
    node: str
    part: str = ""             # the parameter or state entry (weight, bias, running_mean, ...)

    def __str__(self) -> str:
        return SPELLING[self.kind][0].format(node=self.node, part=self.part)

    @property
    def key(self) -> str:
        """The runtime's name of a parameter or state tensor (``"fc1.weight"``)."""
        return f"{self.node}.{self.part}"


def value(node: str) -> Ref:
    return Ref(Kind.VALUE, node)


def param(node: str, part: str) -> Ref:
    return Ref(Kind.PARAM, node, part)


STIMULUS, LABELS, SEED = Ref(Kind.INPUT, "x"), Ref(Kind.INPUT, "y"), Ref(Kind.INPUT, "seed")
GROUPING = Ref(Kind.GROUPING, "")


@dataclass(frozen=True)
class Buffer:
    ref: Ref
    dtype: str                      # u8 (spikes), f32, i64 (labels), obj (a grouping, a seed)
    shape: tuple[int | str, ...]    # "T", "B" (samples) and "R" (distinct classes) stay symbolic
    producer: int = -1              # the launch that writes it (-1: given to the step, or persistent)
    consumers: tuple[int, ...] = ()  # the launches that read it, in order

    @property
    def first(self) -> int:
        return self.producer

    @property
    def last(self) -> int:
        """The last launch that reads it (its producer when nothing does)."""
        return self.consumers[-1] if self.consumers else self.producer

    def nbytes(self, T: int, B: int, R: int = 10) -> int:
        dims = [{"T": T, "B": B, "R": min(R, B)}.get(d, d) if isinstance(d, str) else d for d in self.shape]
        return math.prod(dims) * {"u8": 1, "i64": 8}.get(self.dtype, 4)


@dataclass(frozen=True)
class Launch:
    index: int
    kernel: str
    phase: str
    nodes: tuple[str, ...]          # IR nodes this launch implements
    reads: tuple[Ref, ...]
    writes: tuple[Ref, ...]


@dataclass(frozen=True)
class Plan:
    graph: str
    T: int
    launches: tuple[Launch, ...]
    buffers: tuple[Buffer, ...]
    aliases: tuple[tuple[str, Ref], ...] = ()  # (view node, the buffer it aliases): no launch, no copy
    dedup: bool = False             # B runs on R rows, one per distinct class of the batch

    def __post_init__(self):
        object.__setattr__(self, "_by_ref", {b.ref: b for b in self.buffers})

    def buffer(self, ref: Ref) -> Buffer:
        return self._by_ref[ref]

    def kernels(self) -> list[str]:
        return sorted({la.kernel for la in self.launches})

    def value_of(self, node: str) -> Ref:
        """The buffer holding ``node``'s value (a view aliases its input's buffer)."""
        return dict(self.aliases).get(node, value(node))

    def is_time_invariant(self, node: str) -> bool:
        """Whether ``node``'s value is stored once as [rows, ...] and read at every step."""
        return "T" not in self.buffer(self.value_of(node)).shape

    def activations(self) -> list[Buffer]:
        """The buffers whose size follows the batch: values, gradients, the stimulus and labels given to the step
        (parameters, their gradients and optimiser state excluded: the same for every schedule)."""
        return [b for b in self.buffers if b.ref.kind not in (Kind.PARAM, Kind.STATE, Kind.PARAM_GRAD)
                and b.dtype != "obj" and (b.producer >= 0 or b.consumers)]

    def peak_live(self, B: int) -> int:
        """Peak bytes of the step's activation buffers alive at once (a given buffer is live from the start)."""
        acts = self.activations()
        return max((sum(b.nbytes(self.T, B) for b in acts if max(b.first, 0) <= i <= b.last)
                    for i in range(len(self.launches))), default=0)

    def replace(self, launches: list[Launch] | tuple[Launch, ...], declare: dict[Ref, tuple[str, tuple]] | None = None
                ) -> Plan:
        """The same plan with other launches (renumbered; lifetimes recomputed) and buffers ``declare``d besides
        its own: what a transform returns."""
        declared = {b.ref: (b.dtype, b.shape) for b in self.buffers} | (declare or {})
        return finish(self.graph, self.T, launches, declared, self.aliases, self.dedup)

    def __str__(self) -> str:
        return format_plan(self)

    def to_dict(self) -> dict:
        return {
            "graph": self.graph, "T": self.T, "kernels": self.kernels(), "dedup": self.dedup,
            "launches": [{"index": la.index, "kernel": la.kernel, "phase": la.phase, "nodes": list(la.nodes),
                          "reads": [str(r) for r in la.reads], "writes": [str(w) for w in la.writes]}
                         for la in self.launches],
            "buffers": [{"name": str(b.ref), "kind": b.ref.kind.value, "node": b.ref.node, "part": b.ref.part,
                         "dtype": b.dtype, "shape": list(b.shape), "producer": b.producer,
                         "consumers": list(b.consumers)} for b in self.buffers],
            "aliases": [[a, str(r)] for a, r in self.aliases],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def finish(graph: str, T: int, launches, declared: dict[Ref, tuple[str, tuple]], aliases=(),
           dedup: bool = False) -> Plan:
    """A plan from its launches and declared buffers: launches renumbered in order, each buffer's producer and
    consumers read off them. Every ref a launch touches must be declared (a plan is closed)."""
    launches = [Launch(i, la.kernel, la.phase, la.nodes, la.reads, la.writes) for i, la in enumerate(launches)]
    producer: dict[Ref, int] = {}
    consumers: dict[Ref, list[int]] = {}
    for la in launches:
        for r in la.reads:
            consumers.setdefault(r, []).append(la.index)
        for w in la.writes:
            producer.setdefault(w, la.index)
    undeclared = sorted({str(r) for la in launches for r in (*la.reads, *la.writes)} -
                        {str(r) for r in declared})
    if undeclared:
        raise ValueError(f"plan of {graph}: buffers used but not declared: {undeclared}")
    buffers = tuple(Buffer(ref, dt, shape, producer.get(ref, -1), tuple(dict.fromkeys(consumers.get(ref, ()))))
                    for ref, (dt, shape) in declared.items())
    return Plan(graph, T, tuple(launches), buffers, tuple(aliases), dedup)


# ---------------------------------------------------------------------------------------------------- text

# kinds the buffer table leaves out: parameters and their gradients are the same for every schedule, and the
# step's inputs and 0-d results take no memory worth listing
_UNLISTED = {Kind.PARAM, Kind.PARAM_GRAD, Kind.STATE, Kind.INPUT, Kind.LOSS, Kind.RATE, Kind.GROUPING,
             Kind.PENDING}


def _refs(refs) -> str:
    return ", ".join(map(str, refs)) or "-"


def format_plan(plan) -> str:
    lines = [f"plan {plan.graph}(T={plan.T}): {len(plan.launches)} launches, kernels: {', '.join(plan.kernels())}",
             *(["  B runs once per class present (R rows, R <= classes): losses expand it to samples"]
               if plan.dedup else []),
             "  schedule:"]
    for la in plan.launches:
        lines.append(f"    {la.index:3d} {la.phase:<10} {la.kernel:<34} {'+'.join(la.nodes) or '-':<18} "
                     f"reads {_refs(la.reads)}  ->  {_refs(la.writes)}")
    lines.append("  buffers (kind dtype[shape], live = launch range):")
    for b in plan.buffers:
        if b.ref.kind in _UNLISTED:
            continue
        dims = ",".join(map(str, b.shape))
        lines.append(f"    {str(b.ref):<16} {b.ref.kind.value:<8} {b.dtype}[{dims}]  live {b.first}..{b.last}")
    if plan.aliases:
        lines.append("  views (no launch): " + ", ".join(f"{a} = {b}" for a, b in plan.aliases))
    lines.append(f"  peak live activation memory at B=128: {plan.peak_live(128) / 2**20:.2f} MiB")
    return "\n".join(lines)
