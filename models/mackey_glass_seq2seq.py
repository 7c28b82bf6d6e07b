"""Mackey-Glass (tau = 17) next-step prediction at every step: the sequence-to-sequence form of
``mackey_glass_rnn.py``, T = 8.

Same network and data, but the output has ``target="sequence"``: at every step t the top current V_L[t] predicts
x[t+1] (targets [N, 8, 1]) instead of mean_t V_L predicting the value after the window. BSD's backward network
then carries the whole target trajectory, one value per step.
"""

from bsdgraph import GraphBuilder
from bsdgraph.train.series import mackey_glass_dataset

T = 8
TRAIN = dict(epochs=20, batch_size=64, lr=1e-3, weight_decay=1e-4, clip=1.0)
BSD = dict(lam=0.6, negatives="all", distill_on="current", recall=True, recall_loss="reco")


def build():
    g = GraphBuilder("mackey_glass_seq2seq", T=T)
    x = g.input((1,), encoding="sequence")
    h = g.recurrent_lif(g.linear(x, 128))
    h = g.lif(g.linear(h, 64))
    g.output(g.linear(h, 1), task="regression", target="sequence")
    return g.build()


def data():
    return mackey_glass_dataset(T, per_step=True)
