"""What a kernel is given besides its tensors: ``Ctx``, built once per launch when a program is bound.

A kernel is ``fn(ctx, *inputs) -> outputs``: its inputs are the tensors of its launch's ``reads`` in order, and
it returns one value per entry of ``writes`` (``Ctx.outputs`` orders them). The context holds what is fixed
for the launch: its nodes and their attributes, the plan's facts about each buffer (time-invariant, one row per
class), the backend's primitives, the device, whether the step trains, and the objects a few kernels own
across steps (the optimiser). No kernel sees a runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

from bsdgraph.compiler.plan import Kind, Launch, Plan, Ref
from bsdgraph.ir.graph import Graph, Node

Kernel = Callable[..., tuple]


class Grouping(NamedTuple):
    """The classes of a batch (B's rows when deduplicated), each sample's row among them, and their counts."""

    classes: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor


@dataclass(frozen=True, eq=False)
class Ctx:
    launch: Launch
    graph: Graph
    plan: Plan
    prims: SimpleNamespace
    device: torch.device
    training: bool = True
    owned: Mapping[str, Any] = field(default_factory=dict)  # e.g. "optimizer", "opt_cfg", "comm"

    def __post_init__(self):
        # what kernels ask about their buffers, answered once per launch (not once per step)
        refs = (*self.launch.reads, *self.launch.writes)
        shapes = {r: self.plan.buffer(r).shape for r in refs}
        object.__setattr__(self, "_steady", {r: "T" not in s and r.kind not in (Kind.PARAM, Kind.STATE)
                                             for r, s in shapes.items()})
        object.__setattr__(self, "_per_class", {r: "R" in s for r, s in shapes.items()})
        n_in = len(self.graph.in_edges(self.launch.nodes[0])) if self.launch.nodes else 0
        object.__setattr__(self, "_operands", self.launch.reads[:n_in])
        object.__setattr__(self, "_writes", frozenset(self.launch.writes))
        # the graph's edges are networkx's: read them now, not while a step runs (or is traced by torch.compile)
        object.__setattr__(self, "_inputs", {n: self.graph.inputs(n) for n in self.launch.nodes})
        object.__setattr__(self, "_delay", {n: self.graph.in_edges(n)[0].delay for n in self.launch.nodes
                                            if self.graph.in_edges(n)})

    @property
    def T(self) -> int:
        return self.plan.T

    @property
    def node(self) -> Node:
        """The node the launch is named after (the last of a fused group: the neuron)."""
        return self.graph[self.launch.nodes[-1]]

    def inputs_of(self, node: str) -> list[Node]:
        """``node``'s operand nodes, in port order (one of the launch's nodes)."""
        return self._inputs[node]

    def in_shape(self, node: str) -> tuple[int, ...]:
        return self.inputs_of(node)[0].shape

    def delay(self, node: str) -> int:
        """The delay of ``node``'s first operand edge (1: a recurrent synapse reads s[t-1])."""
        return self._delay[node]

    def time_invariant(self, ref: Ref) -> bool:
        """Stored once as [rows, ...] and read at every step (the direct stimulus, the current it drives)."""
        steady = self._steady.get(ref)
        if steady is None:  # a buffer the launch does not touch
            return "T" not in self.plan.buffer(ref).shape and ref.kind not in (Kind.PARAM, Kind.STATE)
        return steady

    def per_class(self, ref: Ref) -> bool:
        """One row per class of the batch (B's buffers when the plan deduplicates them)."""
        rows = self._per_class.get(ref)
        return "R" in self.plan.buffer(ref).shape if rows is None else rows

    def operands(self) -> tuple[Ref, ...]:
        """The buffers holding the values of the launch's node's inputs (a loss's operands): the first reads."""
        return self._operands

    def wants(self, ref: Ref) -> bool:
        return ref in self._writes

    def args(self, ins) -> dict[Ref, Any]:
        """The launch's inputs by ref."""
        return dict(zip(self.launch.reads, ins))

    def outputs(self, values: Mapping[Ref, Any]) -> tuple:
        """``values`` in the order of the launch's writes (a write the kernel did not produce is None)."""
        return tuple(values.get(w) for w in self.launch.writes)
