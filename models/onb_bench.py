"""The Open Neuromorphic benchmark shape: one Linear + LIF layer, batch 16, T = 500, trained forward + backward.

As in the ONB harness, the stimulus is a fresh [T, N] current per sample (``encoding="sequence"``), so the
layer's GEMM really runs at all 500 steps (a direct-encoded stimulus would let the engine compute it once).
Published (GPU, unsynchronised timing, 4096 neurons): SpikingJelly CuPy 10.0 ms, Spyx fp16 5.5 ms, snnTorch
266 ms per fwd+bwd. Here the layer is trained with BSD (its local loss against the derived B) or BPTT, so the
work per step is not identical to theirs; ``bsdgraph bench models/onb_bench.py --batch-size 16`` times it.

The width (inputs = neurons) is 4096; set ``BSDGRAPH_ONB_NEURONS=8192`` (or 16384) in the environment for the
larger shapes.
"""

import os

from bsdgraph import GraphBuilder


def _neurons() -> int:
    raw = os.environ.get("BSDGRAPH_ONB_NEURONS", "4096")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"BSDGRAPH_ONB_NEURONS must be a positive integer (4096, 8192, 16384), got {raw!r}")
    return int(raw)


NEURONS = _neurons()
TRAIN = dict(batch_size=16)


def build():
    g = GraphBuilder(f"onb_{NEURONS}", T=500)
    h = g.lif(g.linear(g.input((NEURONS,), encoding="sequence"), NEURONS))
    g.output(g.linear(h, 10))
    return g.build()
