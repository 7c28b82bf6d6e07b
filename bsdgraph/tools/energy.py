"""Energy estimate of inference, the SNN community's headline metric (e.g. Rathi & Roy; Zhou et al.).

Per synapse layer of F and per sample:
  * a layer fed by spikes costs accumulates (AC): every input spike triggers one AC per outgoing synapse,
    ACs = sum_t (spikes into the layer) * fan_out  = T * rate_in * D_in * fan_out;
  * a layer fed by the analog stimulus (direct encoding) costs multiply-accumulates (MAC) at every step:
    MACs = T * D_in * fan_out (a neuromorphic chip repeats them each step; bsdgraph's cpu backend computes them
    once, which is a speed fact, not an energy one);
  * the same network as a non-spiking ANN costs D_in * fan_out MACs per layer, once.
A recurrent synapse reads its layer's own spikes of steps 0..T-2: (T - 1) * rate * D * fan_out ACs. A sequence
stimulus is analog (MACs every step), and its ANN twin, an RNN, also runs once per step (T times the MACs).
Fan-out: out_features for Linear; C_out * k_h * k_w / (s_h * s_w) for Conv2d (each input pixel reaches k^2/s^2
output positions on average; borders ignored). Pooling, batchnorm (foldable into weights) and neuron updates
are not counted, as in the usual convention. Energies at 45 nm CMOS (Horowitz, ISSCC 2014): E_AC = 0.9 pJ,
E_MAC = 4.6 pJ (32-bit float): these are assumptions, configurable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bsdgraph.compiler.feedback import segment
from bsdgraph.ir.graph import Graph, GroupOp, Op
from bsdgraph.ir.neurons import is_spiking

E_AC_PJ, E_MAC_PJ = 0.9, 4.6
ANALOG = ("direct", "sequence")  # stimulus encodings that feed analog values (MACs), not spikes


@dataclass(frozen=True)
class LayerEnergy:
    synapse: str
    input_rate: float | None      # None: analog (direct-encoded) input
    snn_ops: float                # ACs (spike input) or MACs (analog input) per sample
    snn_pj: float
    ann_macs: float
    ann_pj: float


def _fan_out(g: Graph, syn: str) -> float:
    n = g[syn]
    a = n.attrs
    if n.op == Op.LINEAR:
        return a["out_features"]
    fan = a["out_channels"] * a["kernel"][0] * a["kernel"][1]
    # a strided conv reaches each input pixel from k^2 / s^2 output positions on average; a transposed conv
    # scatters every input pixel to all k^2 positions of its window
    return fan / (a["stride"][0] * a["stride"][1]) if n.op == Op.CONV2D else fan


def _input_rate(g: Graph, syn: str, rates: dict[str, float]) -> float | None:
    """Firing rate of the spikes a synapse reads (through pooling/flatten), None for an analog input (the
    stimulus, or a non-spiking neuron such as a leaky integrator): those cost a MAC per weight. A residual sum
    of spike trains carries the spikes of all its operands, each one an accumulate: its rate is their sum."""
    return _rate_of(g, g.inputs(syn)[0], rates)


def _rate_of(g: Graph, src, rates: dict[str, float]) -> float | None:
    while src.op in GroupOp.TRANSFORM:
        src = g.inputs(src.name)[0]
    if src.op == Op.INPUT:
        return None if src.attrs["encoding"] in ANALOG else rates.get(src.name, 0.0)
    if src.op == Op.ADD:
        parts = [_rate_of(g, i, rates) for i in g.inputs(src.name)]
        return None if None in parts else sum(parts)
    return rates[src.name] if is_spiking(src) else None


def estimate(g: Graph, rates: dict[str, float], e_ac: float = E_AC_PJ, e_mac: float = E_MAC_PJ,
             input_rate: float | None = None) -> list[LayerEnergy]:
    """Per-layer inference energy of the forward network ``g`` given each LIF layer's firing rate.

    ``input_rate``: the stimulus' spike rate when it is Poisson-encoded (the mean pixel intensity)."""
    rates = dict(rates)
    x = g.by_op(Op.INPUT)[0]
    if input_rate is not None:
        rates[x.name] = input_rate
    # a sequence model's ANN twin (an RNN) also runs once per step; an image model's ANN runs once
    ann_steps = g.T if x.attrs["encoding"] == "sequence" else 1
    out = []
    for layer in segment(g):
        for syn, steps in (*((s, g.T) for s in layer.synapses), (layer.rec, g.T - 1)):
            if syn is None:
                continue
            # a recurrent synapse reads the layer's own spikes of steps 0..T-2 (s[-1] = 0 costs nothing)
            d_in = math.prod(g.inputs(syn)[0].shape)
            fan = _fan_out(g, syn)
            rate = _input_rate(g, syn, rates)
            ops = steps * d_in * fan * (1.0 if rate is None else rate)
            snn_pj = ops * (e_mac if rate is None else e_ac)
            ann = (steps if syn == layer.rec else ann_steps) * d_in * fan
            out.append(LayerEnergy(syn, rate, ops, snn_pj, ann, ann * e_mac))
    return out


@torch.no_grad()
def measured_rates(rt, x: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Mean firing rate of every F LIF layer over ``x`` (inference mode), through the reference interpreter."""
    from bsdgraph.ir.graph import Stream
    from bsdgraph.runtime.reference import Ctx, run_graph

    g = rt.graph
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        env = run_graph(g, Ctx(rt.params, rt.state, g.T, xb, None, False, 0), frozenset({Stream.F}))
        for lif in g.by_op(*GroupOp.NEURON):
            if lif.stream == Stream.F and is_spiking(lif):
                sums[lif.name] = sums.get(lif.name, 0.0) + float(env[lif.name].float().mean()) * len(xb)
        n += len(xb)
    return {k: v / n for k, v in sums.items()}


def format_energy(layers: list[LayerEnergy], source: str) -> str:
    lines = [f"energy of one inference (per sample), rates {source}; E_AC {E_AC_PJ} pJ, E_MAC {E_MAC_PJ} pJ "
             "(45 nm, assumed)",
             f"  {'synapse':<10} {'input':>12} {'SNN ops':>12} {'SNN nJ':>9} {'ANN MACs':>12} {'ANN nJ':>9}"]
    for e in layers:
        inp = "analog (MAC)" if e.input_rate is None else f"{100 * e.input_rate:.1f}% spikes"
        lines.append(f"  {e.synapse:<10} {inp:>12} {e.snn_ops:>12.3g} {e.snn_pj / 1e3:>9.2f} {e.ann_macs:>12.3g} "
                     f"{e.ann_pj / 1e3:>9.2f}")
    snn, ann = sum(e.snn_pj for e in layers), sum(e.ann_pj for e in layers)
    lines.append(f"  total: SNN {snn / 1e3:.2f} nJ vs ANN {ann / 1e3:.2f} nJ (ANN / SNN energy: {ann / snn:.2f})"
                 if snn else "  total: no synaptic operations")
    return "\n".join(lines)
