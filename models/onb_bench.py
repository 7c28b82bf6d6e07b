"""The Open Neuromorphic benchmark shape: one Linear + LIF layer, batch 16, T = 500, trained forward + backward.

Published (GPU, unsynchronised timing, 4096 neurons): SpikingJelly CuPy 10.0 ms, Spyx fp16 5.5 ms, snnTorch
266 ms per fwd+bwd. Here the layer is trained with BSD (its local loss against the derived B) or BPTT, so the
work per step is not identical to theirs; ``bsdgraph bench models/onb_bench.py --batch-size 16`` times it.
Change NEURONS to 8192 or 16384 for the larger shapes.
"""

from bsdgraph import GraphBuilder

NEURONS = 4096
TRAIN = dict(batch_size=16)


def build():
    g = GraphBuilder(f"onb_{NEURONS}", T=500)
    h = g.lif(g.linear(g.input((NEURONS,)), NEURONS))
    g.output(g.linear(h, 10))
    return g.build()
