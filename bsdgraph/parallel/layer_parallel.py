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
import math
import queue
import threading
from collections import Counter
from collections.abc import Callable

import torch

from bsdgraph.ir.graph import Graph, GroupOp, Op, Stream
from bsdgraph.compiler.lower import can_dedup, lower
from bsdgraph.ir.params import param_shapes
from bsdgraph.runtime.common import ExecutionError, StepResult, make_optimizer, readout
from bsdgraph.runtime.executor import Executor
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


def layer_costs(g: Graph, batch: int = 128) -> dict[int, float]:
    """Cost of each layer's launches: dense FLOPs (``bench.launch_flops``) + 20 per parameter (AdamW, clipping)."""
    from bsdgraph.compiler.cost import launch_flops

    plan, layer = lower(g), node_layers(g)
    cost: dict[int, float] = {}
    for la in plan.launches:
        extra = sum(20 * math.prod(s) for n in la.nodes for s in param_shapes(g[n]).values())
        ell = layer[la.nodes[0]]
        cost[ell] = cost.get(ell, 0.0) + launch_flops(plan, g, la, batch) + extra
    return cost


def split(g: Graph, n_stages: int) -> list[int]:
    """Stage of each layer 0..L: contiguous ranges minimising the largest stage cost (layer 0 joins layer 1)."""
    cost = layer_costs(g)
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


# ---------------------------------------------------------------------------------------------------- a stage


class PipelineStage:
    """Mixin over an Executor backend: the launches of one stage's layers, the buffers it exchanges, and only
    the weights it owns (with their own optimiser)."""

    def __init__(self, g: Graph, *, stage: int, n_stages: int, **kwargs):
        # B's batchnorm takes the statistics of the batch's class counts, so a table computed for one
        # micro-batch would not serve another: B must be a function of the class alone
        if not can_dedup(g) or any(n.op == Op.BATCHNORM and n.stream == Stream.B for n in g.nodes):
            raise LayerParallelError("--layer-parallel needs a backward network driven by class codes without "
                                     "batchnorm (B's spikes travel as one table per class); this model has "
                                     "batchnorm or analog targets: train it data-parallel instead")
        super().__init__(g, dedup=True, **kwargs)
        self.stage, self.n_stages = stage, n_stages
        self.layer_stage = split(g, n_stages)
        self.n_classes = g.by_op(Op.TARGET)[0].attrs["n_classes"]
        self._assign()
        owned = {r for la in self.own for r in la.reads if r in self.params}
        self.params = {k: v for k, v in self.params.items() if k in owned}
        self.state = {k: v for k, v in self.state.items() if k.rsplit(".", 1)[0] + ".weight" in owned}
        self.optimizer = make_optimizer(self.params, self.opt_cfg)

    def _assign(self) -> None:
        layer = node_layers(self.graph)
        stage_of = {la.index: {self.layer_stage[layer[n]] for n in la.nodes} for la in self.plan.launches}
        for la in self.plan.launches:
            if len(stage_of[la.index]) != 1:
                raise LayerParallelError(f"launch {la.index} ({la.kernel} of {'+'.join(la.nodes)}) spans stages "
                                         f"{sorted(stage_of[la.index])}; the plan cannot be cut there")
        producer = {w: next(iter(stage_of[la.index])) for la in self.plan.launches for w in la.writes}
        target = self.graph.by_op(Op.TARGET)[0].name
        mine = [la for la in self.plan.launches if stage_of[la.index] == {self.stage}]
        reads = {r for la in mine for r in la.reads if "." not in r}
        if target in reads:  # the class code: computed wherever it is read, never sent
            mine = [la for la in self.plan.launches if target in la.writes] + [la for la in mine
                                                                               if target not in la.writes]
        self.own = mine
        self.b_launches = [la for la in mine if la.phase == "forward-B"]
        self.f_launches = [la for la in mine if la.phase != "forward-B"]
        self.recv_f = sorted(r for r in reads if producer.get(r, self.stage) < self.stage)
        self.recv_b = sorted(r for r in reads if producer.get(r, self.stage) > self.stage and r != target)
        wanted = {s: {r for la in self.plan.launches if stage_of[la.index] == {s} for r in la.reads}
                  for s in (self.stage - 1, self.stage + 1)}
        mine_writes = {w for la in mine for w in la.writes}
        self.send_f = sorted(mine_writes & wanted[self.stage + 1])
        self.send_b = sorted((mine_writes & wanted[self.stage - 1]) - {target})
        far = {r for la in self.plan.launches for r in la.reads if "." not in r and r in producer
               and abs(producer[r] - next(iter(stage_of[la.index]))) > 1}
        if far:
            raise LayerParallelError(f"buffers {sorted(far)} are read two or more stages away from where they are "
                                     "computed; use fewer processes")

    def specs(self, names: list[str], batch: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of buffers as stored, for a batch of ``batch`` samples (B rows: every class)."""
        out = {}
        for b in self.plan.buffers:
            if b.name in names:
                dims = {"T": self.T, "B": batch, "R": self.n_classes}
                shape = tuple(dims[d] if isinstance(d, str) else d for d in b.shape)
                out[b.name] = (shape, torch.uint8 if b.dtype == "u8" else torch.float32)
        return out

    def _reset(self, x, y, training: bool) -> None:
        super()._reset(x, y, training)
        if training and self.plan.dedup:  # B runs for every class: one table serves any micro-batch
            self.classes = torch.arange(self.n_classes, device=self.device)
            self.counts = torch.ones(self.n_classes, dtype=torch.int64, device=self.device)  # the fill: no batch
            if y is not None:
                self.inverse = self.labels
                self.counts = torch.bincount(self.labels, minlength=self.n_classes)

    def _launch(self, launches) -> None:
        for la in launches:
            try:
                self.kernels[la.kernel](self, la)
            except ExecutionError:
                raise
            except Exception as err:
                node = self.graph[la.nodes[-1]]
                raise ExecutionError(node.name, node.op, err) from err

    def begin(self, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        self._reset(x, None if y is None else y.to(self.device), True)

    def run_b(self, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """B's layers of this stage from the table above; returns the table for the stage below."""
        self.buf.update(received)
        self._launch(self.b_launches)
        return {k: self.buf[k] for k in self.send_b}

    def run_f(self, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """F's layers, losses and updates; returns the spikes for the stage above."""
        self.buf.update(received)
        self._launch(self.f_launches)
        self.steps += 1
        return {k: self.buf[k] for k in self.send_f}

    def result(self) -> StepResult:
        return StepResult({k: float(v) for k, v in self.losses.items()}, dict(self.rates))

    @torch.no_grad()
    def forward_f(self, x: torch.Tensor | None, received: dict[str, torch.Tensor]):
        """Inference through this stage's F layers: the spikes for the stage above, or (top) the readout."""
        self._reset(x, None, False)
        self.buf.update(received)
        self._launch([la for la in self.own if la.phase == "forward-F"])
        if self.stage < self.n_stages - 1:
            return {k: self.buf[k] for k in self.send_f}
        out = self.graph.by_op(Op.OUTPUT)[0]
        return readout(out, self.read(self.plan_buffer(out.name)))


def pipeline_stage(runtime_cls: type) -> type:
    if not issubclass(runtime_cls, Executor):
        raise LayerParallelError(f"layer-parallel training runs the plan executor (backends cpu, triton); "
                                 f"{runtime_cls.__name__} is not one: use --backend cpu")
    return type(f"PipelineStage{runtime_cls.__name__}", (PipelineStage, runtime_cls), {})


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
        for name in sorted(tensors):
            wire = _wire(tensors[name])
            self.traffic[kind] += wire.numel() * wire.element_size()
            self._send(dst, wire, name)

    def recv(self, src: int, specs: dict) -> dict[str, torch.Tensor]:
        out = {}
        for name in sorted(specs):
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
    initial = links.recv(r + 1, stage.specs(stage.recv_b, 0)) if r < last else {}
    table = stage.run_b(initial)  # the initial weights' table, sent down once (the pipeline fill of B)
    if r > 0:
        links.send(r - 1, table)
    for m, (x, y) in enumerate(batches):
        stage.begin(x if r == 0 else None, y)
        above = links.recv(r + 1, stage.specs(stage.recv_b, 0)) if r < last and m >= 2 else initial
        table = stage.run_b(above)
        if r > 0 and m + 2 < M:
            links.send(r - 1, table)
        below = links.recv(r - 1, stage.specs(stage.recv_f, len(y))) if r > 0 else {}
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
        below = links.recv(r - 1, stage.specs(stage.recv_f, len(x))) if r > 0 else {}
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
