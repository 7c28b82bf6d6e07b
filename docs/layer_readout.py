"""Diagnostic for docs/experiments.md: how much of the regression target each layer of a trained model still holds.

For every named node of a checkpoint (F or B), the time mean of its activity (or, with ``--all-steps``, the
activity of every step side by side) on up to 6000 training samples is the feature vector of a ridge regression
onto the target; the figure is the test MSE of that least-squares readout on up to 2000 test samples (the best of
four ridge strengths, picked on the test samples: a diagnostic, not a result). A layer whose readout is poor has
lost the target, whatever the network's own readout learns on top of it. B runs on the sample's own target.

Regression models only: an autoencoder (TARGET = "input", Fashion-MNIST; the target is the image) or a model
with its own data (``def data()``, e.g. Mackey-Glass).

Usage: python docs/layer_readout.py CHECKPOINT NODE[,NODE...] [--all-steps] [--data-dir DIR]
e.g.   python docs/layer_readout.py runs/ae/checkpoint.pt h1,conv2,h2,fc1_b
"""

from __future__ import annotations

import argparse
import sys

import torch

from bsdgraph.train.data import autoencode, load_idx_dataset
from bsdgraph.ir.graph import Stream
from bsdgraph.compiler.model_file import load_model
from checkpoint_features import features, open_checkpoint  # docs/, beside this script

N_TRAIN, N_TEST, RIDGE = 6000, 2000, (1e-4, 1e-2, 1.0, 100.0)


def ridge_mse(a: torch.Tensor, y: torch.Tensor, b: torch.Tensor, y_test: torch.Tensor) -> float:
    a, b = (torch.cat([m, torch.ones(len(m), 1, dtype=m.dtype)], 1) for m in (a, b))
    eye = torch.eye(a.shape[1], dtype=a.dtype)
    return min(float(((b @ torch.linalg.solve(a.T @ a + lam * eye, a.T @ y) - y_test) ** 2).mean())
               for lam in RIDGE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("nodes", help="comma-separated node names")
    p.add_argument("--all-steps", action="store_true")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    rt, doc, names = open_checkpoint(args.checkpoint, args.nodes, frozenset(Stream))
    model = load_model(doc["model"])
    if model.data is not None:
        ds = model.data()
    elif model.target == "input":
        ds = autoencode(load_idx_dataset(args.data_dir))
    else:
        sys.exit(f"{doc['model']}: not a regression model with its own data or an autoencoder")
    n_tr, n_te = min(N_TRAIN, len(ds.x_train)), min(N_TEST, len(ds.x_test))
    ytr, yte = ds.y_train[:n_tr].double(), ds.y_test[:n_te].double()
    ftr, fte = (features(rt, x[:n], y[:n], names, frozenset(Stream), torch.float64, args.all_steps)
                for x, y, n in ((ds.x_train, ds.y_train, n_tr), (ds.x_test, ds.y_test, n_te)))
    for k in names:
        mse = ridge_mse(ftr[k], ytr.reshape(n_tr, -1), fte[k], yte.reshape(n_te, -1))
        print(f"{k:10s} {ftr[k].shape[1]:6d} features  ridge readout test MSE {mse:.5f}", flush=True)


if __name__ == "__main__":
    main()
