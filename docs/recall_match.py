"""Diagnostic for docs/experiments.md: does what B recalls for a class look like that class?

A picture of B's recall (``bsdgraph recall RUN_DIR``) is judged by eye; this puts two numbers beside it. For every
class c, B's recall R_c (``bsdgraph.load(RUN_DIR).recall()``, in the units of the raw images) is compared with the
mean training image M_k of every class k by Pearson correlation over the pixels, and F of the same checkpoint
classifies R_c as if it were a test image:

- ``r(own)``: the correlation of R_c with its own class mean M_c;
- ``nearest mean``: the class k whose mean R_c correlates with most (a nearest-prototype reading of the recall);
- ``F says``: F's class for R_c.

The last line counts the classes read back correctly both ways. For scale it gives the correlation of each class
mean with the nearest other class mean (pullover, coat and shirt look alike: their means correlate at 0.96-0.97),
which is how close a recall must come to its own mean to be told from its neighbours. Only the training
split is read: Fashion-MNIST, or the MNIST-format IDX files in ``--data-dir`` (the data the run trained on).

Usage: python docs/recall_match.py RUN_DIR [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import sys

import torch

import bsdgraph
from bsdgraph.errors import UserError
from bsdgraph.train.data import FASHION_NAMES, load_idx_dataset


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] correlations of the rows of ``a`` with the rows of ``b`` (each row one flattened image)."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)).T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        net = bsdgraph.load(args.run_dir)
        recall = net.recall().float()                     # [classes, C, H, W]
        ds = load_idx_dataset(args.data_dir)
    except UserError as err:
        sys.exit(f"error: {err}")
    classes = len(recall)
    if recall.shape[1:] != ds.x_train.shape[1:] or int(ds.y_train.max()) + 1 != classes:
        sys.exit(f"error: {args.run_dir} recalls {classes} classes of {list(recall.shape[1:])}, the data has "
                 f"{int(ds.y_train.max()) + 1} of {list(ds.x_train.shape[1:])}: give the run's data (--data-dir)")
    means = torch.stack([ds.x_train[ds.y_train == k].float().mean(0) for k in range(classes)])
    r = pearson(recall, means)                            # [recall class, mean class]
    said = net.predict(recall).argmax(1)
    between = pearson(means, means).fill_diagonal_(-1).max(1).values
    names = FASHION_NAMES if classes == len(FASHION_NAMES) else [f"class {k}" for k in range(classes)]
    print(f"{'class':12s} {'r(own)':>7s} {'nearest mean':>14s} {'F says':>12s}  (own mean vs nearest other: r)")
    for c in range(classes):
        near = int(r[c].argmax())
        print(f"{names[c]:12s} {float(r[c, c]):7.3f} {names[near]:>14s} {names[int(said[c])]:>12s}  "
              f"({float(between[c]):.3f})")
    hits_mean = int((r.argmax(1) == torch.arange(classes)).sum())
    hits_f = int((said == torch.arange(classes)).sum())
    print(f"own class nearest: {hits_mean}/{classes}; F recognises: {hits_f}/{classes}; "
          f"mean r(own) {float(r.diagonal().mean()):.3f}")


if __name__ == "__main__":
    main()
