# %% [markdown]
# # A first spiking network trained with BSD, from Python
#
# Declare a network, train it with BSD on arrays you hold, look at what its backward network B recalls for each
# class, and export it to NIR. Runs as a script (`python docs/tutorials/01_first_network.py`) or cell by cell in
# a notebook (Jupyter reads the `# %%` cells). It uses a small made-up image task so that it runs in seconds;
# swap in your own arrays of shape [N, 1, H, W] and integer labels.

# %%
import numpy as np
import torch

import bsdgraph
from bsdgraph.train.data import make_synthetic

OUT = "runs/tutorial-01"

# %% [markdown]
# ## Data: arrays of samples and labels
# `make_synthetic` draws a learnable 4-class task of 8x8 images (a noisy prototype per class).

# %%
data = make_synthetic(400, 100, (1, 8, 8), 4, seed=0)
x_train, y_train = data.x_train.numpy(), data.y_train.numpy()
x_test, y_test = data.x_test.numpy(), data.y_test.numpy()
print(x_train.shape, y_train[:10])

# %% [markdown]
# ## The forward network F
# Four steps (T), one hidden layer of leaky integrate-and-fire neurons, a 4-way readout (the mean over time of
# the top current). The engine derives the backward network B, the layer pairing and the local losses.

# %%
g = bsdgraph.GraphBuilder("tutorial", T=4)
h = g.lif(g.linear(g.flatten(g.input((1, 8, 8))), 64))
g.output(g.linear(h, 4))
net = bsdgraph.net(g, bsd={"recall_loss": "mse"}, train={"init": "calibrated", "batch_size": 32})
print(bsdgraph.format_graph(net.program.graph))   # F, B and the losses

# %% [markdown]
# ## Train, predict, evaluate

# %%
records = bsdgraph.fit(net, (x_train, y_train), test=(x_test, y_test), epochs=5, lr=5e-3, out=OUT,
                       overwrite=True, progress=False)
for r in records:
    print(f"epoch {r['epoch']}: test accuracy {100 * r['test_accuracy']:.1f} %, firing rates "
          + ", ".join(f"{k} {100 * v:.0f} %" for k, v in r["rates"].items()))
scores = net.predict(x_test)
print("predicted", scores.argmax(1)[:10].tolist(), "true", y_test[:10].tolist())
print(net.evaluate((x_test, y_test)))

# %% [markdown]
# ## What B recalls
# B runs from each class code alone; its bottom layer generates a stimulus. With `recall_loss="mse"` it learns
# to generate the class's mean image.

# %%
recalled = net.recall()
prototypes = torch.stack([data.x_train[data.y_train == c].mean(0) for c in range(4)])
for c in range(4):
    corr = np.corrcoef(recalled[c].flatten().numpy(), prototypes[c].flatten().numpy())[0, 1]
    print(f"class {c}: correlation of B's recall with the class mean image {corr:.2f}")

# %% [markdown]
# ## Export to NIR, and load the run again

# %%
path = net.export_nir(f"{OUT}/tutorial.nir")
again = bsdgraph.load(OUT)
assert torch.equal(again.predict(x_test), scores)
print("wrote", path, "and reloaded the run from", OUT)
