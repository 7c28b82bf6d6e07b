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

from bsdgraph.checkpoint import load_checkpoint
from bsdgraph.data import autoencode, load_idx_dataset
from bsdgraph.ir import Stream
from bsdgraph.model_file import load_model
from bsdgraph.printer import from_json
from bsdgraph.runtime.reference import ReferenceRuntime, run_graph

N_TRAIN, N_TEST, RIDGE = 6000, 2000, (1e-4, 1e-2, 1.0, 100.0)


def features(rt: ReferenceRuntime, x: torch.Tensor, y: torch.Tensor, nodes: list[str],
             all_steps: bool) -> dict[str, torch.Tensor]:
    """[N, D] float64 per node: its activity averaged over time, or every step's concatenated."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in nodes}
    with torch.no_grad():
        for i in range(0, len(x), 500):
            env = run_graph(rt.graph, rt._ctx(x[i:i + 500], y[i:i + 500], False), frozenset(Stream))
            for k in nodes:
                v = env[k].double()  # [T, B, ...]
                v = v.transpose(0, 1).reshape(v.shape[1], -1) if all_steps else v.mean(0).reshape(v.shape[1], -1)
                out[k].append(v)
    return {k: torch.cat(v) for k, v in out.items()}


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
    torch.set_num_threads(1)
    doc = load_checkpoint(args.checkpoint)
    g = from_json(doc["graph"])
    names = args.nodes.split(",")
    unknown = [k for k in names if k not in {n.name for n in g.nodes}]
    if unknown:
        sys.exit(f"{args.checkpoint}: no node {unknown} in its graph; nodes: {', '.join(n.name for n in g.nodes)}")
    model = load_model(doc["model"])
    if model.data is not None:
        ds = model.data()
    elif model.target == "input":
        ds = autoencode(load_idx_dataset(args.data_dir))
    else:
        sys.exit(f"{doc['model']}: not a regression model with its own data or an autoencoder")
    rt = ReferenceRuntime(g, doc["params"], state=doc["state"])
    n_tr, n_te = min(N_TRAIN, len(ds.x_train)), min(N_TEST, len(ds.x_test))
    ytr, yte = ds.y_train[:n_tr].double(), ds.y_test[:n_te].double()
    ftr = features(rt, ds.x_train[:n_tr], ds.y_train[:n_tr], names, args.all_steps)
    fte = features(rt, ds.x_test[:n_te], ds.y_test[:n_te], names, args.all_steps)
    for k in names:
        mse = ridge_mse(ftr[k], ytr.reshape(n_tr, -1), fte[k], yte.reshape(n_te, -1))
        print(f"{k:10s} {ftr[k].shape[1]:6d} features  ridge readout test MSE {mse:.5f}", flush=True)


if __name__ == "__main__":
    main()
