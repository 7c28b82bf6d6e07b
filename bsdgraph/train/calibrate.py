"""``init = calibrated``: scale each synapse on one batch so that its layer fires in a target band (LSUV-style).

Why: the threshold is only meaningful together with the weight scale. With PyTorch's default init and the paper's
v_th = 0.6, B is silent and F's deep layers nearly so, and ReCo (a cosine) never pushes activity up (spec:
35-43 % after 2 epochs). Calibration walks F bottom-up and B top-down; for each synapse that feeds a LIF layer it
searches a multiplicative factor (bisection on log scale) until the layer's firing rate is inside the band.
Synapses followed by batchnorm are left alone: batchnorm sets their scale.
"""

from __future__ import annotations

import math

import torch

from bsdgraph.ir.graph import GroupOp, Graph, Op, Stream
from bsdgraph.ir.neurons import is_spiking
from bsdgraph.ir.params import Params, init_state
from bsdgraph.runtime.reference import Ctx, run_graph

TARGET_BAND = (0.05, 0.25)


def _rate_of(g: Graph, params: Params, x, y, lif: str, stream: Stream) -> float:
    # batch statistics for batchnorm, on a throwaway state: calibration must not touch running statistics
    ctx = Ctx(params, init_state(g), g.T, x, y, True, 0)
    return float(run_graph(g, ctx, frozenset({stream}))[lif].mean())


def _calibrated_layers(g: Graph) -> list[tuple[str, str, Stream]]:
    """(synapse, the LIF it drives, stream) in the order calibration must visit them (inputs first). A recurrent
    layer's feedforward synapse drives its neurons through the layer's sum (the recurrent synapse, which reads
    spikes of the layer itself, is left as initialised)."""
    out = []
    for n in g.topo_order():
        if n.op in GroupOp.SYNAPSE and not any(e.delay for e in g.in_edges(n.name)):
            nxt = [c for c in g.consumers(n.name) if c.op not in GroupOp.LOSS]
            if len(nxt) == 1 and nxt[0].op == Op.ADD:
                nxt = [c for c in g.consumers(nxt[0].name) if c.op not in GroupOp.LOSS]
            if len(nxt) == 1 and is_spiking(nxt[0]):
                out.append((n.name, nxt[0].name, n.stream))
    return out


@torch.no_grad()
def calibrate(g: Graph, params: Params, x: torch.Tensor, y: torch.Tensor, band=TARGET_BAND,
              iters: int = 24) -> dict[str, tuple[float, float]]:
    """Scale ``params`` in place; returns synapse -> (factor, firing rate reached).

    Assumes the rate grows with the factor (true for a positive threshold); the factor stays in [1e-3, 1e3]."""
    lo, hi = band
    report = {}
    for syn, lif, stream in _calibrated_layers(g):
        keys = [k for k in (f"{syn}.weight", f"{syn}.bias") if k in params]
        base = {k: params[k].clone() for k in keys}
        log_lo, log_hi, log_f = math.log(1e-3), math.log(1e3), 0.0
        rate = _rate_of(g, params, x, y, lif, stream)
        for _ in range(iters):
            if lo <= rate <= hi:
                break
            if rate < lo:
                log_lo = log_f
            else:
                log_hi = log_f
            log_f = (log_lo + log_hi) / 2
            for k in keys:
                params[k].copy_(base[k] * math.exp(log_f))
            rate = _rate_of(g, params, x, y, lif, stream)
        report[syn] = (math.exp(log_f), rate)
    return report
