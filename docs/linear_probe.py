"""Diagnostic for docs/experiments.md: how linearly separable the classes are in each layer of a trained classifier.

For every named F node of a checkpoint, the time mean of its activity (F alone, evaluation mode) over the Fashion-
MNIST training set is standardised and a softmax regression is fitted to the labels (15 epochs of Adam, lr 1e-3,
batch 256, L2 1e-4, seed 0); the figures are its training and test accuracy. A layer whose probe is no better than
the network's own readout is not where the classifier loses information.

Usage: python docs/linear_probe.py CHECKPOINT NODE[,NODE...] [--data-dir DIR]
e.g.   python docs/linear_probe.py runs/cnn/checkpoint.pt pool2,h3
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bsdgraph.train.data import load_idx_dataset
from bsdgraph.ir.graph import Stream
from checkpoint_features import features, open_checkpoint  # docs/, beside this script


def probe(a: torch.Tensor, y: torch.Tensor, b: torch.Tensor, y_test: torch.Tensor, n_classes: int):
    mu, sd = a.mean(0), a.std(0) + 1e-3
    a, b = (a - mu) / sd, (b - mu) / sd
    w = torch.zeros(a.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        perm = torch.randperm(len(a), generator=gen)
        for i in range(0, len(a), 256):
            idx = perm[i:i + 256]
            loss = F.cross_entropy(a[idx] @ w + bias, y[idx]) + 1e-4 * (w ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = lambda m, t: float(((m @ w + bias).argmax(1) == t).float().mean())  # noqa: E731
        return acc(a, y), acc(b, y_test)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("nodes", help="comma-separated F node names")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    rt, _, names = open_checkpoint(args.checkpoint, args.nodes, frozenset({Stream.F}))
    ds = load_idx_dataset(args.data_dir)
    ftr, fte = (features(rt, x, None, names, frozenset({Stream.F}), torch.float32, batch=1000)
                for x in (ds.x_train, ds.x_test))
    for k in names:
        train, test = probe(ftr[k], ds.y_train, fte[k], ds.y_test, int(ds.y_train.max()) + 1)
        print(f"{k:8s} {ftr[k].shape[1]:5d} features  probe train {100 * train:.2f} %  test {100 * test:.2f} %",
              flush=True)


if __name__ == "__main__":
    main()
