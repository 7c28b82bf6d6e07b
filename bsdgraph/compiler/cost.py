"""What a plan costs: dense FLOPs per launch (synapse GEMMs and convolutions, their weight gradients, ReCo's
products). Benchmarks report them; the layer-parallel partition balances stages by them."""

from __future__ import annotations

import math

from bsdgraph.compiler.plan import Kind, Launch, Plan, Ref
from bsdgraph.ir.graph import Graph, Op


def _rows(plan: Plan, ref: Ref, T: int, B: int, R: int, time_invariant: bool = True) -> int:
    shape = plan.buffer(ref).shape
    sym = [d for d in shape if isinstance(d, str)]
    if not time_invariant and "T" not in sym:
        sym = ["T", *sym]
    return math.prod({"T": T, "B": B, "R": min(R, B)}[d] for d in sym)


def _synapse_flops(g: Graph, node: str, rows: int) -> int:
    n = g[node]
    a = n.attrs
    if n.op == Op.LINEAR:
        return 2 * rows * a["in_features"] * a["out_features"]
    per_output = a["in_channels"] * a["kernel"][0] * a["kernel"][1]
    # conv: every output pixel is a dot of length C_in k^2; conv_t: every input pixel scatters C_out k^2
    pixels = math.prod(n.shape[1:]) if n.op == Op.CONV2D else math.prod(g.inputs(node)[0].shape[1:])
    channels = a["out_channels"]
    return 2 * rows * pixels * channels * per_output


def launch_flops(plan: Plan, g: Graph, la: Launch, B: int, R: int = 10, time_invariant: bool = True) -> int:
    T = plan.T
    rows = lambda ref: _rows(plan, ref, T, B, R, time_invariant)  # noqa: E731
    if la.kernel in ("torch.linear", "linear_lif_forward", "torch.conv2d", "torch.conv_transpose2d"):
        return _synapse_flops(g, la.nodes[0], rows(la.reads[0]))
    if la.kernel in ("weight_grad", "torch.conv2d_weight_grad", "torch.conv_transpose2d_weight_grad"):
        return _synapse_flops(g, la.nodes[0], rows(la.reads[1]))
    if la.kernel == "reco_loss_grad":
        return _reco_flops(plan, g, la, B, rows(la.reads[1]) // T)  # partner: B rows, or R when deduplicated
    return 0


def _reco_flops(plan: Plan, g: Graph, la: Launch, B: int, partner: int) -> int:
    """Gram matrix + the two gradient products, each 2 B x partner x D per step. Against per-class B rows
    (runtime/reco_dedup.py) F's gradient is computed only when written, and a time-invariant F operand (the
    first current with direct encoding) meets the time sum of B's rows once: each product costs 1 step."""
    T, d = plan.T, math.prod(g.inputs(la.nodes[0])[0].shape)
    shape = {b.ref: b.shape for b in plan.buffers}
    if "R" not in shape[la.reads[1]]:
        return 3 * 2 * B * partner * d * T
    steps = 1 if "T" not in shape[la.reads[0]] else T
    return 2 * B * partner * d * (2 * steps + (steps if Ref(Kind.GRAD, la.reads[0].node) in la.writes else 0))


def plan_flops(plan: Plan, g: Graph, B: int, R: int = 10, time_invariant: bool = True) -> int:
    return sum(launch_flops(plan, g, la, B, R, time_invariant) for la in plan.launches)


