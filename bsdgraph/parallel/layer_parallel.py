"""Layer-parallel BSD: consecutive layers of F, each with the B layer paired with it, on a pipeline of stages
(one per rank). Micro-batches stream through; no gradient or error signal ever crosses a stage.

A stage holds layers (``split``): layer l is F's layer l (its pooling/flatten, synapse, batchnorm, neuron), the
B nodes computing V̂_l and s'_l (θ_{l+1} and what follows it), and loss l with the AdamW step of what it owns;
layer 0 (the stimulus, the recall loss) goes with layer 1. Stages get contiguous ranges of about equal cost
(the plan's FLOPs plus the optimiser's work per parameter).

What travels, always as spikes packed 8 to a byte:
- F's spikes go up: for each micro-batch, stage r sends s_l of its top layer to stage r+1 ([T, B, D] bits).
- B's spikes go down, which is B's own forward direction (concept -> stimulus). B is driven by class codes, so
  stage r+1 sends B's spikes at its bottom layer *for every class* ([T, C, D] bits, whatever the batch size).
No signal ever goes against its network's direction.

Why B cannot stay entirely local: B's stream at layer l runs through the B weights of every layer above, and
those are trained by the losses of the layers above, on other stages. So B's information must come down; what
keeps the pipeline free of backward locking is that it comes one slot late.

Schedule (deterministic; ``emulate`` runs the same per-stage program in one process). Stage r processes
micro-batches m = 0..M-1 in order. For m it receives F's spikes from stage r-1 (computed by r-1 before its own
update on m, exactly as in sequential training), runs its B layers from the class table of stage r+1, then its
F layers, losses and AdamW steps. The table it uses for m is the one stage r+1 computed while processing m-2
(before r+1's update on m-2); for m < 2 it is the table of the initial weights, sent down once before the first
micro-batch. Hence, compared with one process stepping micro-batch after micro-batch: F's weights and every
stage's own B weights are exact; the B weights of stage r+j as seen from stage r on micro-batch m are those
before micro-batch max(m - 2j, 0) (B lags 2 micro-batches per stage above). With one stage it is the plain
sequential step. The table was sent one pipeline slot earlier, so no stage ever waits for a result of the
current slot: the only bubble is the pipeline's fill and drain.

Limits: B must be a function of the class alone (``lower.can_dedup``: class codes; and no batchnorm in B,
whose statistics depend on the batch's class counts), since a table per class is what travels down.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
import math
import queue
import threading
from collections import Counter
from collections.abc import Callable

import torch

from bsdgraph.compiler.codegen import generate
from bsdgraph.compiler.cost import launch_flops
from bsdgraph.compiler.lower import can_dedup
from bsdgraph.compiler.plan import GROUPING, Kind, Launch, Plan, Ref, value
from bsdgraph.compiler.program import as_program
from bsdgraph.ir.graph import Graph, GroupOp, Op, Stream
from bsdgraph.ir.params import param_shapes
from bsdgraph.runtime.common import StepResult, make_optimizer, readout
from bsdgraph.runtime.executor import Backend, Executor
from bsdgraph.train.config import TrainingError


class LayerParallelError(TrainingError):
    """A model or set-up the layer-parallel pipeline cannot run; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------- layers


def node_layers(g: Graph) -> dict[str, int]:
    """The layer of every node of a BSD graph (see the module docstring)."""
    layer: dict[str, int] = {}
    order = g.topo_order()
    for stream, step in ((Stream.F, 1), (Stream.B, -1)):  # F first: the top layer's index seeds B's target
        for n in (n for n in order if n.stream == stream):
            ins = [e.src for e in sorted(g.in_edges(n.name), key=lambda e: e.port)
                   if e.delay == 0 and g[e.src].stream == stream]
            if n.op == Op.INPUT:
                layer[n.name] = 0
            elif n.op == Op.TARGET:
                layer[n.name] = layer[g.by_op(Op.OUTPUT)[0].name]
            elif ins and ins[0] in layer:
                layer[n.name] = layer[ins[0]] + (step if n.op in GroupOp.SYNAPSE else 0)
    for n in g.by_op(*GroupOp.LOSS):
        layer[n.name] = n.attrs["layer"]
    # F's pooling/flatten belong to the layer whose synapse reads them (so stages exchange spikes); a recurrent
    # synapse (only a delayed input) to the sum it feeds
    for n in reversed(order):
        if (n.stream == Stream.F and n.op in GroupOp.TRANSFORM) or n.name not in layer:
            outs = [e.dst for e in g.out_edges(n.name) if e.delay == 0 and g[e.dst].stream == n.stream]
            layer[n.name] = layer[outs[0]]
    return layer


def layer_costs(plan: Plan, g: Graph, batch: int = 128) -> dict[int, float]:
    """Cost of each layer's launches: dense FLOPs (``compiler/cost.launch_flops``) + 20 per parameter (AdamW,
    clipping)."""
    layer = node_layers(g)
    cost: dict[int, float] = {}
    for la in plan.launches:
        if not la.nodes:
            continue
        extra = sum(20 * math.prod(s) for n in la.nodes for s in param_shapes(g[n]).values())
        ell = layer[la.nodes[0]]
        cost[ell] = cost.get(ell, 0.0) + launch_flops(plan, g, la, batch) + extra
    return cost


def split(plan: Plan, g: Graph, n_stages: int) -> list[int]:
    """Stage of each layer 0..L: contiguous ranges minimising the largest stage cost (layer 0 joins layer 1)."""
    cost = layer_costs(plan, g)
    top = max(cost)
    if n_stages > top:
        raise LayerParallelError(f"{n_stages} stages for a network of {top} layers: use at most {top} processes")
    weights = [cost.get(0, 0.0) + cost.get(1, 0.0)] + [cost.get(ell, 0.0) for ell in range(2, top + 1)]
    best, best_cuts = math.inf, ()
    for cuts in itertools.combinations(range(1, len(weights)), n_stages - 1):
        bounds = (0, *cuts, len(weights))
        worst = max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds))
        if worst < best:
            best, best_cuts = worst, cuts
    stage_of = [sum(i >= c for c in best_cuts) for i in range(len(weights))]
    return [stage_of[0], *stage_of]  # layer 0 shares layer 1's stage


# ---------------------------------------------------------------------------------------------------- partition


@dataclass(frozen=True)
class Stage:
    """One stage's part of a plan: the launches it runs (B's, then F's, losses and updates) and the buffers it
    receives from and sends to its neighbours. The batch's grouping is not a launch here: a stage runs B for
    every class (a table that serves any micro-batch)."""

    index: int
    b_launches: tuple[Launch, ...]
    f_launches: tuple[Launch, ...]
    recv_f: tuple[Ref, ...]     # F's spikes from the stage below
    recv_b: tuple[Ref, ...]     # B's table from the stage above
    send_f: tuple[Ref, ...]
    send_b: tuple[Ref, ...]

    @property
    def launches(self) -> tuple[Launch, ...]:
        return self.b_launches + self.f_launches

    def params(self) -> set[str]:
        return {r.key for la in self.launches for r in la.reads if r.kind == Kind.PARAM}


def partition(plan: Plan, g: Graph, n_stages: int) -> tuple[Stage, ...]:
    """Cut ``plan`` into ``n_stages`` pipeline stages by layer (``split``); pure. Refuses a plan whose launches
    span stages or whose buffers would have to skip a stage."""
    layer_stage, layer = split(plan, g, n_stages), node_layers(g)
    grouping = [la for la in plan.launches if GROUPING in la.writes]  # computed by every stage that reads it
    launches = [la for la in plan.launches if la.nodes]
    stage_of = {la.index: {layer_stage[layer[n]] for n in la.nodes} for la in launches}
    for la in launches:
        if len(stage_of[la.index]) != 1:
            raise LayerParallelError(f"launch {la.index} ({la.kernel} of {'+'.join(la.nodes)}) spans stages "
                                     f"{sorted(stage_of[la.index])}; the plan cannot be cut there")
    where = {la.index: next(iter(stage_of[la.index])) for la in launches}
    producer = {w: where[la.index] for la in launches for w in la.writes}
    target = value(g.by_op(Op.TARGET)[0].name)
    moved = (Kind.VALUE, Kind.MEMBRANE)  # what may travel: node values (spikes, currents), never a gradient
    far = {str(r) for la in launches for r in la.reads if r.kind in moved and r in producer and r != target
           and abs(producer[r] - where[la.index]) > 1}
    if far:
        raise LayerParallelError(f"buffers {sorted(far)} are read two or more stages away from where they are "
                                 "computed; use fewer processes")
    stages = []
    for s in range(n_stages):
        mine = [la for la in launches if where[la.index] == s]
        reads = {r for la in mine for r in la.reads if r.kind in moved}
        if target in reads:  # the class code: computed wherever it is read, never sent
            mine = [la for la in launches if target in la.writes] + [la for la in mine if target not in la.writes]
        if any(GROUPING in la.reads for la in mine):
            mine = grouping + mine
        writes = {w for la in mine for w in la.writes if w.kind in moved}
        wanted = {t: {r for la in launches if where[la.index] == t for r in la.reads} for t in (s - 1, s + 1)}
        by_name = lambda refs: tuple(sorted(refs, key=str))  # noqa: E731
        stages.append(Stage(
            s, tuple(la for la in mine if la.phase in ("prepare", "forward-B")),
            tuple(la for la in mine if la.phase not in ("prepare", "forward-B")),
            by_name(r for r in reads if producer.get(r, s) < s),
            by_name(r for r in reads if producer.get(r, s) > s and r != target),
            by_name(writes & wanted[s + 1]), by_name((writes & wanted[s - 1]) - {target})))
    return tuple(stages)


# ---------------------------------------------------------------------------------------------------- a stage


class PipelineStage(Executor):
    """One stage of the pipeline: the generated code of its launches, only the weights it owns (with their own
    optimiser), and the buffers it exchanges."""

    def __init__(self, program, backend: Backend, *, stage: int, n_stages: int, **kwargs):
        program = as_program(program, dedup=True)
        g = program.graph
        # B's batchnorm takes the statistics of the batch's class counts, so a table computed for one
        # micro-batch would not serve another: B must be a function of the class alone
        if not can_dedup(g) or any(n.op == Op.BATCHNORM and n.stream == Stream.B for n in g.nodes):
            raise LayerParallelError("--layer-parallel needs a backward network driven by class codes without "
                                     "batchnorm (B's spikes travel as one table per class); this model has "
                                     "batchnorm or analog targets: train it data-parallel instead")
        super().__init__(program, backend, **kwargs)
        self.stage, self.n_stages = stage, n_stages
        self.part = partition(self.plan, g, n_stages)[stage]
        self.n_classes = g.by_op(Op.TARGET)[0].attrs["n_classes"]
        owned = self.part.params()
        self.params = {k: v for k, v in self.params.items() if k in owned}
        self.state = {k: v for k, v in self.state.items() if k.rsplit(".", 1)[0] + ".weight" in owned}
        self.optimizer = make_optimizer(self.params, self.opt_cfg)
        nodes = [n.name for n in g.nodes]
        b_out = {w for la in self.part.b_launches for w in la.writes}
        for_f = tuple(r for r in dict.fromkeys(r for la in self.part.f_launches for r in la.reads) if r in b_out)
        results = lambda launches: [w for la in launches for w in la.writes  # noqa: E731
                                    if w.kind in (Kind.LOSS, Kind.RATE)]
        forward = [la for la in self.part.f_launches if la.phase == "forward-F"]
        out = self.plan.value_of(g.by_op(Op.OUTPUT)[0].name)
        top = stage == n_stages - 1
        self.codes = {
            "b": generate(self.plan, nodes, self.part.b_launches, "stage_b",
                          list(dict.fromkeys((*self.part.send_b, *for_f, *results(self.part.b_launches))))),
            "f": generate(self.plan, nodes, self.part.f_launches, "stage_f",
                          list(dict.fromkeys((*self.part.send_f, *results(self.part.f_launches))))),
            "predict": generate(self.plan, nodes, forward, "stage_predict",
                                [out] if top else list(self.part.send_f), free=False),
        }
        self.env: dict[Ref, object] = {}
        self.last: dict[Ref, object] = {}

    def _run_code(self, name: str, training: bool) -> dict[Ref, object]:
        if name not in self._bound:
            self._bound[name] = self.bind(self.codes[name], training)
        out = self.call(self.codes[name], self._bound[name], self.env)
        self.env.update(out)
        return out

    def specs(self, refs, batch: int) -> dict[Ref, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of buffers as stored, for a batch of ``batch`` samples (B rows: every class)."""
        dims = {"T": self.T, "B": batch, "R": self.n_classes}
        out = {}
        for r in refs:
            b = self.plan.buffer(r)
            out[r] = (tuple(dims[d] if isinstance(d, str) else d for d in b.shape),
                      torch.uint8 if b.dtype == "u8" else torch.float32)
        return out

    def begin(self, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        """A micro-batch's inputs (none at the pipeline's fill)."""
        self.env = self.given(x, y)
        self.last = {}

    def run_b(self, received: dict[Ref, torch.Tensor]) -> dict[Ref, torch.Tensor]:
        """B's layers of this stage from the table above; returns the table for the stage below."""
        self.env.update(received)
        out = self._run_code("b", True)
        self.last.update((r, v) for r, v in out.items() if r.kind in (Kind.LOSS, Kind.RATE))
        return {k: out[k] for k in self.part.send_b}

    def run_f(self, received: dict[Ref, torch.Tensor]) -> dict[Ref, torch.Tensor]:
        """F's layers, losses and updates; returns the spikes for the stage above."""
        self.env.update(received)
        out = self._run_code("f", True)
        self.last.update((r, v) for r, v in out.items() if r.kind in (Kind.LOSS, Kind.RATE))
        self.steps += 1
        return {k: out[k] for k in self.part.send_f}

    def result(self) -> StepResult:
        """The losses and firing rates of this stage's launches on the last micro-batch."""
        return self.results_of(self.last)

    @torch.no_grad()
    def forward_f(self, x: torch.Tensor | None, received: dict[Ref, torch.Tensor]):
        """Inference through this stage's F layers: the spikes for the stage above, or (top) the readout."""
        self.env = {**self.given(x, None), **received}
        out = self._run_code("predict", False)
        if self.stage < self.n_stages - 1:
            return {k: out[k] for k in self.part.send_f}
        node = self.graph.by_op(Op.OUTPUT)[0]
        (v,) = out.values()
        return readout(node, v.to(torch.float32))


# ---------------------------------------------------------------------------------------------------- links


def pack(t: torch.Tensor) -> torch.Tensor:
    """0/1 uint8 -> 8 spikes per byte (most significant bit first)."""
    flat = t.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % 8)]).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=t.device)
    return (flat * weights).sum(1, dtype=torch.uint8)


def unpack(p: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=p.device)
    bits = (p[:, None] >> shifts) & 1
    return bits.reshape(-1)[:math.prod(shape)].reshape(shape)


def _wire(t: torch.Tensor) -> torch.Tensor:
    return pack(t) if t.dtype == torch.uint8 else t.contiguous()


def _wire_like(shape, dtype) -> tuple[tuple[int, ...], torch.dtype]:
    return ((-(-math.prod(shape) // 8),), torch.uint8) if dtype == torch.uint8 else (shape, dtype)


class Links:
    """A stage's messages to and from its neighbours; spikes travel bit-packed; ``traffic`` counts bytes sent."""

    def __init__(self, stage: int):
        self.stage, self.traffic = stage, Counter()

    def send(self, dst: int, tensors: dict[str, torch.Tensor]) -> None:
        kind = "F spikes" if dst > self.stage else "B spikes"
        for name in sorted(tensors, key=str):
            wire = _wire(tensors[name])
            self.traffic[kind] += wire.numel() * wire.element_size()
            self._send(dst, wire, name)

    def recv(self, src: int, specs: dict) -> dict[str, torch.Tensor]:
        out = {}
        for name in sorted(specs, key=str):
            shape, dtype = specs[name]
            wire = self._recv(src, *_wire_like(shape, dtype), name)
            out[name] = unpack(wire, shape) if dtype == torch.uint8 else wire
        return out

    def flush(self) -> None:
        """Wait until every message sent has left."""


class QueueLinks(Links):
    """In-process links between stage threads (the single-process emulation)."""

    def __init__(self, stage: int, queues: dict, timeout: float):
        super().__init__(stage)
        self.queues, self.timeout = queues, timeout

    @classmethod
    def make(cls, n_stages: int, timeout: float = 60.0) -> list[QueueLinks]:
        queues = {(a, b): queue.Queue() for a in range(n_stages) for b in range(n_stages) if abs(a - b) == 1}
        return [cls(s, queues, timeout) for s in range(n_stages)]

    def _send(self, dst, wire, name) -> None:
        self.queues[(self.stage, dst)].put(wire.clone())

    def _recv(self, src, shape, dtype, name) -> torch.Tensor:
        try:
            return self.queues[(src, self.stage)].get(timeout=self.timeout)
        except queue.Empty:
            raise LayerParallelError(f"stage {self.stage}: nothing from stage {src} for {self.timeout:g} s "
                                     f"(waiting for {name})") from None


class DistLinks(Links):
    """Links over torch.distributed point-to-point messages: sends are asynchronous, receives block."""

    def __init__(self, comm):
        super().__init__(comm.rank)
        self.comm, self.in_flight = comm, []

    def _send(self, dst, wire, name) -> None:
        import torch.distributed as dist

        work = self.comm.guard(f"send of {name} to rank {dst}", lambda: dist.isend(wire, dst))
        self.in_flight = [(w, t) for w, t in self.in_flight if not w.is_completed()] + [(work, wire)]

    def _recv(self, src, shape, dtype, name) -> torch.Tensor:
        return self.comm.recv(torch.empty(shape, dtype=dtype, device=self.comm.device), src, name)

    def flush(self) -> None:
        for work, _ in self.in_flight:
            self.comm.wait(work, "a pipeline message")
        self.in_flight = []


# ---------------------------------------------------------------------------------------------------- schedule


def run_stage(stage: PipelineStage, links: Links, batches: list, on_step: Callable | None = None) -> None:
    """Stage ``stage.stage``'s part of the schedule of the module docstring over ``batches`` [(x, y), ...]."""
    r, last, M = stage.stage, stage.n_stages - 1, len(batches)
    stage.begin(None, None)
    initial = links.recv(r + 1, stage.specs(stage.part.recv_b, 0)) if r < last else {}
    table = stage.run_b(initial)  # the initial weights' table, sent down once (the pipeline fill of B)
    if r > 0:
        links.send(r - 1, table)
    for m, (x, y) in enumerate(batches):
        stage.begin(x if r == 0 else None, y)
        above = links.recv(r + 1, stage.specs(stage.part.recv_b, 0)) if r < last and m >= 2 else initial
        table = stage.run_b(above)
        if r > 0 and m + 2 < M:
            links.send(r - 1, table)
        below = links.recv(r - 1, stage.specs(stage.part.recv_f, len(y))) if r > 0 else {}
        up = stage.run_f(below)
        if r < last:
            links.send(r + 1, up)
        if on_step is not None:
            on_step(m, stage.result())
    links.flush()


def predict_stage(stage: PipelineStage, links: Links, xs: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Inference of F through the pipeline, batch after batch; the top stage returns the readouts."""
    r, last, outs = stage.stage, stage.n_stages - 1, []
    for x in xs:
        below = links.recv(r - 1, stage.specs(stage.part.recv_f, len(x))) if r > 0 else {}
        out = stage.forward_f(x if r == 0 else None, below)
        if r < last:
            links.send(r + 1, out)
        else:
            outs.append(out)
    links.flush()
    return outs if r == last else None


def emulate(stages: list[PipelineStage], batches: list, timeout: float = 60.0) -> list[Links]:
    """The whole pipeline in one process: each stage's program in its own thread, messages through queues.
    Same code and same messages as on several ranks, so the weights come out identical."""
    links = QueueLinks.make(len(stages), timeout)
    errors: list[BaseException] = []

    def program(s):
        try:
            run_stage(stages[s], links[s], batches)
        except Exception as err:  # noqa: BLE001 - re-raised below, in the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=program, args=(s,)) for s in range(len(stages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return links
