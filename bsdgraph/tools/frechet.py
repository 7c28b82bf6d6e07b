"""Fréchet distance in the feature space of the project's own trained Fashion-MNIST classifier.

This is *not* Inception FID: no Inception weights can be downloaded here, and Inception features of 28x28 grey
images would be a poor judge anyway. The features are those of a classifier trained with ``bsdgraph train``: the
time-mean synaptic current into the last hidden LIF layer of its forward network F (for ``models/fmnist_mlp.py``
the 256 inputs of ``h3``). The current, not the firing rate: at T = 4 a rate takes only five values, which leaves
the covariance coarse; the current is continuous and is what the layer's neurons integrate.

    FD = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)

computed in float64 with symmetric eigendecompositions (no scipy): C_a^1/2 C_b C_a^1/2 is symmetric positive
semi-definite, so the trace of its square root is the sum of the square roots of its eigenvalues.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bsdgraph.train.checkpoint import CheckpointError
from bsdgraph.ir.graph import Graph, GroupOp, Op, Stream


class FrechetError(CheckpointError):
    """The classifier checkpoint cannot serve as a feature extractor for these images; says why and the fix."""


def _psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` [N, D] and ``b`` [M, D]."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two [N, D] feature sets with the same D, got {list(a.shape)} and {list(b.shape)}")
    if min(len(a), len(b)) < 2:
        raise ValueError("a covariance needs at least 2 samples per set")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    c_a, c_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    s = _psd_sqrt(c_a)
    cross = torch.linalg.eigvalsh(s @ c_b @ s).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(c_a) + torch.trace(c_b) - 2 * cross
    return max(float(fd), 0.0)  # rounding can leave -1e-12 for identical sets


@dataclass(frozen=True)
class FeatureNet:
    """A trained classifier's forward network, cut at its last hidden layer."""

    graph: Graph
    params: dict
    state: dict
    layer: str  # the node holding the current into the last hidden LIF layer
    source: str

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Images [N, ...] -> [N, D]: time-mean current into the last hidden LIF layer of F."""
        from bsdgraph.runtime.reference import Ctx, run_graph

        shape = self.graph.by_op(Op.INPUT)[0].shape
        x = x.reshape(len(x), *shape).float()
        out = []
        for i in range(0, len(x), batch_size):
            ctx = Ctx(self.params, self.state, self.graph.T, x[i:i + batch_size], None, False, 0)
            env = run_graph(self.graph, ctx, frozenset({Stream.F}))
            out.append(env[self.layer].mean(0).reshape(len(ctx.x), -1))
        return torch.cat(out)


def load_feature_net(checkpoint: str | Path, stimulus_shape: tuple[int, ...]) -> FeatureNet:
    """The classifier of a ``bsdgraph train`` checkpoint (BSD or BPTT) as a feature extractor for images of
    ``stimulus_shape``; refuses a regression model, a net without hidden layers, or other image sizes."""
    import math

    from bsdgraph.train.checkpoint import load_checkpoint, require
    from bsdgraph.ir.printer import from_json

    path = Path(checkpoint)
    doc = require(load_checkpoint(path), path, ("graph", "params", "state"))
    graph = from_json(doc["graph"])
    out = graph.by_op(Op.OUTPUT)[0]
    fix = "train one with `bsdgraph train models/fmnist_mlp.py --out runs/fmnist_mlp` and pass its checkpoint.pt"
    if out.attrs["task"] != "classification":
        raise FrechetError(f"{path}: is a {out.attrs['task']} model ({doc.get('model')}), not a classifier; {fix}")
    shape = graph.by_op(Op.INPUT)[0].shape
    if math.prod(shape) != math.prod(stimulus_shape):
        raise FrechetError(f"{path}: the classifier takes {list(shape)} inputs but the images are "
                           f"{list(stimulus_shape)}; use a classifier trained on the same data")
    lifs = [n for n in graph.topo_order() if n.op in GroupOp.NEURON and n.stream == Stream.F]
    if not lifs:
        raise FrechetError(f"{path}: the classifier has no hidden LIF layer whose features could be compared; {fix}")
    layer = graph.inputs(lifs[-1].name)[0].name
    return FeatureNet(graph, doc["params"], doc["state"], layer, str(path))


@torch.no_grad()
def reconstruction_frechet(rt, x: torch.Tensor, classifier: str | Path, batch_size: int = 1000) -> float:
    """FD between images ``x`` and an autoencoder runtime's reconstructions of them, in the classifier's feature
    space. Reconstructions are clipped to the pixel range [0, 1] the classifier was trained on."""
    net = load_feature_net(classifier, tuple(x.shape[1:]))
    recon = torch.cat([rt.predict(x[i:i + batch_size]).reshape(-1, *x.shape[1:]).clamp(0, 1).cpu()
                       for i in range(0, len(x), batch_size)])
    return frechet_distance(net.features(x), net.features(recon))
