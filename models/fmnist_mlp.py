"""Fashion-MNIST MLP 784-1024-512-256-10, T = 4: the spec's reference network for BSD.

LIF neurons with the spec's defaults (tau 2.0, v_th 0.3, hard reset to 0), direct input encoding (the analog
image is the current of every step), one-hot target code. The architecture is kept fixed so that accuracy figures
compare with the MLP results in the literature (BP MLP 88.5-89.6 %, DLL 87.5 %, CCL 88.6 %).
"""

from bsdgraph import GraphBuilder

TRAIN = dict(epochs=3, batch_size=128, lr=1e-3, weight_decay=1e-4, clip=1.0)
# recall_loss="mse": B's bottom synapse learns to generate the stimulus itself, so `bsdgraph recall` shows
# class prototypes (ReCo, a cosine, leaves B's recall without scale or offset); that loss trains only that
# one synapse, so F and the rest of B train exactly as with recall_loss="reco" (tests/test_feedback.py)
BSD = dict(lam=0.6, negatives="all", distill_on="current", recall=True, recall_loss="mse")


def build():
    g = GraphBuilder("fmnist_mlp", T=4)
    h = g.flatten(g.input((1, 28, 28)))
    for width in (1024, 512, 256):
        h = g.lif(g.linear(h, width))
    g.output(g.linear(h, 10), task="classification")
    return g.build()
