"""The reference runtime: a torch-eager interpreter over a BSD graph. It is the executable specification.

It runs F and B for T steps exactly as docs/bsd.md writes them, computes every local loss with autograd
(stop-gradients are the graph's ``detach`` edges, applied with ``Tensor.detach()``), and applies one optimiser
step. Nothing here is fused or clever: faster backends are tested against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.nn.functional as F

from bsdgraph.registry import registrar
from bsdgraph.ir.graph import Graph, GroupOp, Node, Op, Stream
from bsdgraph.runtime.losses import LOSS_IMPLS
from bsdgraph.ir.neurons import neuron_of
from bsdgraph.runtime.neurons import twin_scan, twin_step_fn
from bsdgraph.ir.params import Params, init_params, init_state
from bsdgraph.runtime.common import (
    ExecutionError, OptimConfig, StepResult, clip_per_node, encode_input, encode_target, make_optimizer, rates_of,
    readout, step_seed,
)


@dataclass
class Ctx:
    """What an op implementation may read: weights, running statistics, labels and the mode."""

    params: Params
    state: dict[str, torch.Tensor]
    T: int
    x: torch.Tensor | None
    labels: torch.Tensor | None
    training: bool
    seed: int
    membrane: dict[str, torch.Tensor] = field(default_factory=dict)  # pre-reset h of every LIF node


Impl = Callable[[Node, list[torch.Tensor], Ctx], torch.Tensor]
IMPLS: dict[Op, Impl] = {}
impl = registrar(IMPLS)


def _per_step(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a per-sample op to all T*B rows at once: [T, B, ...] -> [T*B, ...] -> [T, B, ...]."""
    T, B = x.shape[:2]
    y = fn(x.reshape(T * B, *x.shape[2:]))
    return y.reshape(T, B, *y.shape[1:])


def _w(ctx: Ctx, n: Node, key: str = "weight") -> torch.Tensor | None:
    return ctx.params.get(f"{n.name}.{key}")


@impl(Op.INPUT)
def _input(n: Node, args, ctx: Ctx):
    return encode_input(n, ctx.x, ctx.T, ctx.seed)


@impl(Op.TARGET)
def _target(n: Node, args, ctx: Ctx):
    return encode_target(n, ctx.labels, ctx.T)


@impl(Op.LINEAR)
def _linear(n: Node, args, ctx: Ctx):
    return F.linear(args[0], _w(ctx, n), _w(ctx, n, "bias"))


@impl(Op.CONV2D)
def _conv2d(n: Node, args, ctx: Ctx):
    a = n.attrs
    return _per_step(lambda x: F.conv2d(x, _w(ctx, n), _w(ctx, n, "bias"), a["stride"], a["padding"]), args[0])


@impl(Op.CONV_T2D)
def _conv_t2d(n: Node, args, ctx: Ctx):
    a = n.attrs
    return _per_step(lambda x: F.conv_transpose2d(x, _w(ctx, n), _w(ctx, n, "bias"), a["stride"], a["padding"],
                                                  a["output_padding"]), args[0])


@impl(Op.AVGPOOL2D)
def _avgpool(n: Node, args, ctx: Ctx):
    return _per_step(lambda x: F.avg_pool2d(x, n.attrs["kernel"], n.attrs["stride"] or n.attrs["kernel"]), args[0])


@impl(Op.MAXPOOL2D)
def _maxpool(n: Node, args, ctx: Ctx):
    return _per_step(lambda x: F.max_pool2d(x, n.attrs["kernel"], n.attrs["stride"] or n.attrs["kernel"]), args[0])


@impl(Op.UPSAMPLE2D)
def _upsample(n: Node, args, ctx: Ctx):
    return _per_step(lambda x: F.interpolate(x, size=n.attrs["size"], mode="nearest"), args[0])


@impl(Op.ADD)
def _add(n: Node, args, ctx: Ctx):
    total = args[0]
    for a in args[1:]:  # in port order, as every runtime adds them
        total = total + a
    return total


@impl(Op.FLATTEN, Op.UNFLATTEN)
def _reshape(n: Node, args, ctx: Ctx):
    return args[0].reshape(*args[0].shape[:2], *n.shape)


@impl(Op.BATCHNORM)
def _batchnorm(n: Node, args, ctx: Ctx):
    # statistics over all T*B rows (and pixels): time is merged into the batch, as in multi-step SNN practice
    a = n.attrs
    rm, rv = ctx.state[f"{n.name}.running_mean"], ctx.state[f"{n.name}.running_var"]
    return _per_step(lambda x: F.batch_norm(x, rm, rv, _w(ctx, n), _w(ctx, n, "bias"), ctx.training,
                                            a["momentum"], a["eps"]), args[0])


@impl(Op.LIF, Op.NEURON)
def _neuron(n: Node, args, ctx: Ctx):
    # every neuron runs its declaration's generated twin; for the lif op that twin is bitwise kernels/ref/lif.py's
    # recurrence (tests/test_neurons.py), so the specification of the LIF did not change
    neuron, values = neuron_of(n)
    out, h = twin_scan(neuron, values, args[0], n.attrs["alpha"])
    ctx.membrane[n.name] = h
    return out


@impl(Op.OUTPUT)
def _output(n: Node, args, ctx: Ctx):
    return args[0]


def _loss(n: Node, args, ctx: Ctx):
    return LOSS_IMPLS[n.op](n, args, ctx.labels)


for _op in GroupOp.LOSS:
    IMPLS[_op] = _loss


# ---------------------------------------------------------------------------------------------------- interpreter


def run_graph(g: Graph, ctx: Ctx, streams: frozenset[Stream] = frozenset(Stream)) -> dict[str, torch.Tensor]:
    """Evaluate every node of the given streams; returns node name -> value [T, B, ...].

    Nodes outside recurrent loops run once over all T steps, in topological order. A recurrent loop (a strongly
    connected component closed by delay edges) runs step by step: at step t each member reads its in-loop
    operands at t - delay (zero before the first step) and its neurons carry their states to the next step.
    """
    env: dict[str, torch.Tensor] = {}
    for group in _schedule(g):
        nodes = [n for n in group if n.stream in streams]
        if not nodes:
            continue
        try:
            if len(group) > 1 or any(e.src == group[0].name for e in g.in_edges(group[0].name)):
                env.update(_run_loop(g, nodes, env, ctx))
            else:
                env[nodes[0].name] = _eval(g, nodes[0], env, ctx)
        except ExecutionError:
            raise
        except Exception as err:  # report which node failed, keep the cause chained for debugging
            raise ExecutionError(nodes[0].name, nodes[0].op, err) from err
    return env


def _schedule(g: Graph) -> list[list[Node]]:
    """Groups of nodes in execution order: the condensation of all edges (delayed ones too: a whole-sequence
    value must exist before anything reads it, at any delay), each group in the delay-0 topological order."""
    full = nx.DiGraph([(e.src, e.dst) for e in g.edges])
    full.add_nodes_from(n.name for n in g.nodes)
    cond = nx.condensation(full)
    rank = {n.name: i for i, n in enumerate(g.topo_order())}
    order = nx.lexicographical_topological_sort(cond, key=lambda c: min(rank[m] for m in cond.nodes[c]["members"]))
    return [sorted((g[m] for m in cond.nodes[c]["members"]), key=lambda n: rank[n.name]) for c in order]


def _eval(g: Graph, n: Node, env, ctx: Ctx) -> torch.Tensor:
    args = []
    membrane = n.op in GroupOp.LOSS and n.attrs.get("distill_on") == "membrane"
    for e in g.in_edges(n.name):
        v = ctx.membrane[e.src] if membrane and g[e.src].op in GroupOp.NEURON else env[e.src]
        v = _shift(v, e.delay)
        args.append(v.detach() if e.detach else v)
    return IMPLS[n.op](n, args, ctx)


def _shift(v: torch.Tensor, delay: int) -> torch.Tensor:
    """v[t - delay], zero before the first step."""
    if delay == 0:
        return v
    return torch.cat([torch.zeros_like(v[:delay]), v[:-delay]]) if delay < len(v) else torch.zeros_like(v)


def _run_loop(g: Graph, nodes: list[Node], env, ctx: Ctx) -> dict[str, torch.Tensor]:
    """One recurrent loop, step by step. Non-neuron members run their usual impl on a one-step slice."""
    members = {n.name for n in nodes}
    steps: dict[str, list[torch.Tensor]] = {n.name: [] for n in nodes}
    hs: dict[str, list[torch.Tensor]] = {n.name: [] for n in nodes if n.op in GroupOp.NEURON}
    states: dict[str, tuple | None] = {name: None for name in hs}
    outside = next(env[e.src] for n in nodes for e in g.in_edges(n.name) if e.src not in members)
    step = {name: _step_fn(g[name], outside) for name in hs}
    zero = {n.name: outside.new_zeros(outside.shape[1], *n.shape) for n in nodes}  # s[-1] = 0 for every member
    for t in range(ctx.T):
        for n in nodes:
            args = []
            for e in g.in_edges(n.name):
                if e.src in members:
                    past = steps[e.src][t - e.delay] if t >= e.delay else zero[e.src]
                    a = past.unsqueeze(0)
                else:
                    a = env[e.src][t - e.delay: t - e.delay + 1] if t >= e.delay else torch.zeros_like(env[e.src][:1])
                args.append(a.detach() if e.detach else a)
            if n.name in step:
                out, h, states[n.name] = step[n.name](args[0][0], states[n.name])
                out = out.unsqueeze(0)
                hs[n.name].append(h)
            else:
                out = IMPLS[n.op](n, args, ctx)
            steps[n.name].append(out[0])
    for name, h in hs.items():
        ctx.membrane[name] = torch.stack(h)
    return {name: torch.stack(vals) for name, vals in steps.items()}


def _step_fn(n: Node, like: torch.Tensor):
    """One step of a neuron node's twin: (x[t], states | None) -> (value, h, states)."""
    neuron, values = neuron_of(n)
    return twin_step_fn(neuron, values, like, n.attrs["alpha"], grad=True)


class ReferenceRuntime:
    """One BSD training step = F and B forward, every local loss, gradients by autograd, one AdamW step."""

    name = "reference"

    def __init__(self, g: Graph, params: Params | None = None, opt: OptimConfig | None = None, seed: int = 0,
                 state: dict[str, torch.Tensor] | None = None, device: str | torch.device = "cpu"):
        self.graph, self.opt_cfg, self.seed = g, opt or OptimConfig(), seed
        self.device = torch.device(device)
        base = params if params is not None else init_params(g, seed)
        self.params = {k: v.detach().to(self.device).clone().requires_grad_(True) for k, v in base.items()}
        self.state = {k: v.to(self.device).clone() for k, v in (state or init_state(g)).items()}
        self.optimizer = make_optimizer(self.params, self.opt_cfg, g)
        self.steps = 0

    def _ctx(self, x, y, training: bool) -> Ctx:
        x, y = (None if v is None else v.to(self.device) for v in (x, y))
        return Ctx(self.params, self.state, self.graph.T, x, y, training, step_seed(self.seed, self.steps))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Forward F and B in training mode; returns (loss tensors by loss node, all node values)."""
        env = run_graph(self.graph, self._ctx(x, y, True))
        return {n.name: env[n.name] for n in self.graph.nodes if n.op in GroupOp.LOSS}, env

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """Per-parameter gradients of one step (not applied). Each weight gets its one local loss (C2)."""
        losses, env = self.losses(x, y)
        for p in self.params.values():
            p.grad = None
        torch.stack(list(losses.values())).sum().backward()
        grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for k, p in self.params.items()}
        return grads, losses, env

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        grads, losses, env = self.gradients(x, y)
        for k, p in self.params.items():
            p.grad = grads[k]
        clip_per_node(self.params, self.opt_cfg.clip)
        self.optimizer.step()
        self.steps += 1
        return StepResult({k: float(v.detach()) for k, v in losses.items()}, rates_of(self.graph, env))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (or regression outputs) of F alone: mean over time of the top current."""
        env = run_graph(self.graph, self._ctx(x, None, False), frozenset({Stream.F}))
        out = self.graph.by_op(Op.OUTPUT)[0]
        return readout(out, env[out.name])
