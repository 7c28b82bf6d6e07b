"""US quarterly macroeconomic data (10 channels, 1959-2009, statsmodels' macrodata, fetched by `make data`;
bsdgraph/train/macro.py) predicted one quarter ahead on all channels at every step, with a recurrent spiking
network, T = 8 quarters: the real multivariate series beside the generated Lorenz-96.

At step t the network has read the quarters of its window up to t (growth rates of output, consumption,
investment, government spending, income, prices, money and population, and the T-bill and unemployment rates, each
standardised over the training part) and its top current predicts all 10 values of the next quarter
(`target="sequence"`: MSE per step). The test part is the last fifth of the quarters (1999Q4-2009Q3, the 2008
recession included). The baselines (docs/experiments.md): the training mean, persistence and least-squares
autoregression (`bsdgraph/train/macro.py`, `bsdgraph/train/series.py`).
"""

from bsdgraph import GraphBuilder
from bsdgraph.train.macro import CHANNELS, macro_dataset

T = 8
# 154 training windows: small batches, many epochs, and the epoch chosen on a validation split
TRAIN = dict(epochs=60, batch_size=16, lr=1e-3, weight_decay=1e-4, clip=1.0, init="calibrated", val_split=0.1)
# Lorenz-96's options (models/lorenz96_rnn.py): credit through time inside the recurrent layer, one ReCo per step,
# B's recurrent layer without its loop
BSD = dict(lam=0.6, negatives="all", distill_on="current", recall=True, recall_loss="reco",
           recurrent_credit="through_time", reco_rows="each_step", backward_recurrence=False)
TAU = 1.0
ALPHA = 6.0


def build():
    g = GraphBuilder("macro_rnn", T=T)
    x = g.input((len(CHANNELS),), encoding="sequence")
    h = g.recurrent_lif(g.linear(x, 128), tau=TAU, alpha=ALPHA)
    h = g.lif(g.linear(h, 128), tau=TAU, alpha=ALPHA)
    g.output(g.linear(h, len(CHANNELS)), task="regression", target="sequence")
    return g.build()


def data():
    return macro_dataset(T)
