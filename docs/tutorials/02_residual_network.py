# %% [markdown]
# # A spiking residual network: branches in F, and the backward network B that mirrors them
#
# Declare a SEW-ResNet (residual blocks whose shortcut adds the block's input spikes to its output spikes), see
# how BSD pairs its layers — B is F's transpose, so a skip in F is a skip in B — train it with BSD and, beside it,
# with backpropagation through time, and draw both networks. Runs as a script or cell by cell in a notebook, on a
# small made-up image task so that it takes seconds; `models/fmnist_resnet.py` is the Fashion-MNIST version.

# %%
import bsdgraph
from bsdgraph.compiler.feedback import mirrors_of, pairing
from bsdgraph.tools.draw import draw
from bsdgraph.train.data import make_synthetic

OUT = "runs/tutorial-02"
data = make_synthetic(400, 100, (1, 8, 8), 4, seed=0)
train, test = (data.x_train, data.y_train), (data.x_test, data.y_test)

# %% [markdown]
# ## F: a stem, a block with an identity shortcut, a block that doubles the channels
# `g.residual_block(h, channels, stride)` adds two conv-batchnorm-LIF units and a sum with `h`, or with a
# conv1x1-batchnorm-LIF projection of it when the channels or the size change. `g.sum(...)` is the merge itself,
# for networks you wire by hand.

# %%
def build():
    g = bsdgraph.GraphBuilder("tutorial_resnet", T=4)
    h = g.lif(g.batchnorm(g.conv2d(g.input((1, 8, 8)), 4, kernel=3, padding=1)), name="stem")
    h = g.residual_block(h, name="block1")              # identity shortcut: block1 = block1_b_h + stem
    h = g.residual_block(h, 8, stride=2, name="block2")  # projection shortcut: block2 = block2_b_h + block2_down_h
    g.output(g.linear(g.flatten(h), 4))
    return g.build()


net = bsdgraph.net(build(), train={"batch_size": 32})

# %% [markdown]
# ## The pairing: one local loss per neuron layer
# Each loss trains F's synapses into its layer and the B synapses that make B's current of that layer. The
# shortcut `block1 = block1_b_h + stem` sends what B computes at `block1`'s place to *both* `block1_b_h` and
# `stem`; each of those layers has its own loss, so the mirrors behind the sum are built once per operand
# (`..._via_stem`, `..._via_block1_b_h`): every weight still learns from exactly one loss.

# %%
for p in pairing(net.program.graph):
    print(f"layer {p.layer} {p.loss:>5}: F {', '.join(p.f_params) or '-'} | B {', '.join(p.b_params) or '-'}")
print("mirrors of block2_a:", mirrors_of(net.program.graph, "block2_a"))

# %% [markdown]
# ## Train with BSD, and with BPTT beside it

# %%
bsd_records = bsdgraph.fit(net, train, test=test, epochs=4, lr=5e-3, out=f"{OUT}/bsd", overwrite=True,
                           progress=False)
bptt = bsdgraph.net(build(), rule="bptt", train={"batch_size": 32})
bptt_records = bsdgraph.fit(bptt, train, test=test, epochs=4, lr=5e-3, out=f"{OUT}/bptt", overwrite=True,
                            progress=False)
for rule, records in (("BSD", bsd_records), ("BPTT", bptt_records)):
    print(f"{rule}: test accuracy " + ", ".join(f"{100 * r['test_accuracy']:.1f} %" for r in records))

# %% [markdown]
# ## Draw F and B side by side
# Skips that jump rows are the purple arcs beside each column: F's shortcuts on the left, their mirrors in B on
# the right.

# %%
print("wrote", draw(net.program.graph, f"{OUT}/resnet.png"))
