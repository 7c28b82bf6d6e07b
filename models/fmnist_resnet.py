"""Fashion-MNIST spiking residual network (SEW-ResNet style), T = 4: branches and merges trained with BSD.

stem conv3x3(16) - BN - LIF - maxpool2 (14 x 14) - SEW block(16) - SEW block(32, stride 2; 7 x 7) - flatten -
linear(10). A SEW block (Fang et al. 2021, connect function ADD) is ``lif(bn(conv(lif(bn(conv(s)))))) + s``: the
block's spikes plus its input's (or a conv1x1-BN-LIF projection of them where the channels or the size change),
read by the next synapse as 0/1/2 per neuron and step.

The derived backward network B is F's transpose with its own weights (docs/bsd.md, "Branches"): where F fans out,
B sums, and where F sums, B fans out, so the skip connections of F are skip connections of B. Every neuron of F is
a layer with its own ReCo loss; a mirror that sends B's value into a sum is built once per operand, so each weight
of B still learns from exactly one loss.
"""

from bsdgraph import GraphBuilder

TRAIN = dict(epochs=8, batch_size=128, lr=1e-3, weight_decay=1e-4, clip=1.0, schedule="cosine")
# the CNN's choices (models/fmnist_cnn.py): lam 0.3 with B's class rows as negatives, recall by MSE
BSD = dict(lam=0.3, negatives="all", distill_on="current", recall=True, recall_loss="mse")


def build():
    g = GraphBuilder("fmnist_resnet", T=4)
    h = g.lif(g.batchnorm(g.conv2d(g.input((1, 28, 28)), 16, kernel=3, padding=1)), name="stem")
    h = g.maxpool2d(h, 2)
    h = g.residual_block(h, name="block1")
    h = g.residual_block(h, 32, stride=2, name="block2")
    g.output(g.linear(g.flatten(h), 10), task="classification")
    return g.build()
