"""Fashion-MNIST MLP 784-512-256-10, T = 4, with a neuron the model file declares itself: the quadratic
integrate-and-fire (QIF) neuron.

A QIF membrane follows tau dv/dt = v (v - v_c) + I: below the critical potential v_c it relaxes to rest, above it
it runs away until the threshold and the reset. ``declare_neuron`` turns the declaration into the torch twin and
the Triton kernels (`bsdgraph compile models/fmnist_qif.py --emit kernels` prints them); docs/neurons.md explains
each field. The layers use it through ``g.neuron("qif", ...)``.
"""

from bsdgraph import GraphBuilder, declare_neuron

declare_neuron(
    "qif",
    params={"tau": 2.0, "v_c": 0.5, "v_th": 1.0},
    states=["v"],
    update={"v": "v + (v * (v - v_c) + x) / tau"},
    spike="v >= v_th",
    reset={"v": "v * (1 - s)"},
    checks={"tau > 0": "tau is the membrane time constant in steps", "v_th > v_c": "the threshold must lie above "
            "the critical potential, where the membrane runs away"},
    doc="quadratic integrate-and-fire, reset to 0",
)

TRAIN = dict(epochs=3, batch_size=128, lr=1e-3, weight_decay=1e-4, clip=1.0)
BSD = dict(lam=0.6, negatives="all", distill_on="current", recall=True, recall_loss="mse")


def build():
    g = GraphBuilder("fmnist_qif", T=4)
    h = g.flatten(g.input((1, 28, 28)))
    for width in (512, 256):
        h = g.neuron("qif", g.linear(h, width), v_c=0.1, v_th=0.3)
    g.output(g.linear(h, 10), task="classification")
    return g.build()
