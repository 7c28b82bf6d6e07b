"""Paper-scale CIFAR-10 CNN (BSD paper, Table 1 setting): five 3x3 conv layers 128-128-256-256-512 with batchnorm
and LIF neurons, average pooling after layers 2, 4 and 5, then a linear classifier; T = 4.

Meant for GPU users who bring CIFAR-10 as ``--npz`` (x_train [N, 3, 32, 32] uint8 or float in [0, 1]); the
development machines have neither the data nor the compute for it.
"""

from bsdgraph import GraphBuilder

TRAIN = dict(epochs=100, batch_size=128, lr=1e-3, weight_decay=5e-4, clip=1.0)
# recall_loss="mse": B's bottom synapse learns to generate the stimulus itself, so `bsdgraph recall` shows
# class prototypes (ReCo, a cosine, leaves B's recall without scale or offset); that loss trains only that
# one synapse, so F and the rest of B train exactly as with recall_loss="reco" (tests/test_feedback.py)
BSD = dict(lam=0.6, negatives="all", distill_on="current", recall=True, recall_loss="mse")


def build():
    g = GraphBuilder("cifar_cnn", T=4)
    h = g.input((3, 32, 32))
    for i, channels in enumerate((128, 128, 256, 256, 512)):
        h = g.lif(g.batchnorm(g.conv2d(h, channels, kernel=3, padding=1)))
        if i in (1, 3, 4):
            h = g.avgpool2d(h, 2)
    g.output(g.linear(g.flatten(h), 10), task="classification")
    return g.build()
