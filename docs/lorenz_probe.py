"""Diagnostic for docs/experiments.md ("Neurons without leak memory, a sharper surrogate, more updates"): how well
the next step of Lorenz-96 can be read from a trained `models/lorenz96_rnn.py`'s layers.

For each named F node of a checkpoint (and for the input itself, node ``x``), a ridge regression maps the node's
activity at step t (with ``--lags K``, also steps t-1..t-K side by side, zeros before the first step) to the
model's target at step t, the change x[t + 1] - x[t] on all 40 channels. It is fitted on the first 2,400 training
windows, its ridge strength chosen on the other 600, and scored on the test windows: the MSE, in the units of the
model's own test MSE. A layer whose probe is poor has lost what the next step needs, whatever the layers above
it learn. A probe of ``x`` is a linear autoregression fitted over every step, the first steps with zeros for their
missing lags (bsdgraph/train/series.py's AR baselines score only the steps that have all their lags).

Usage: python docs/lorenz_probe.py CHECKPOINT NODE[,NODE...] [--lags K]
e.g.   python docs/lorenz_probe.py runs/lorenz/checkpoint.pt x,h1,h2 --lags 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bsdgraph.compiler.model_file import load_model  # noqa: E402
from checkpoint_features import open_checkpoint  # noqa: E402  (docs/, beside this script)
from next_char_probe import F_ONLY, step_rows  # noqa: E402

N_FIT, RIDGE = 2400, (1e-3, 1e-1, 10.0, 1000.0)


def ridge_mse(a: torch.Tensor, ya: torch.Tensor, v: torch.Tensor, yv: torch.Tensor, b: torch.Tensor,
              yb: torch.Tensor) -> float:
    """Test MSE of the ridge fit of ``ya`` on ``a`` whose strength is best on (``v``, ``yv``)."""
    a, v, b = (torch.cat([m, torch.ones(len(m), 1, dtype=m.dtype)], 1) for m in (a, v, b))
    eye = torch.eye(a.shape[1], dtype=a.dtype)
    fits = [torch.linalg.solve(a.T @ a + lam * eye, a.T @ ya) for lam in RIDGE]
    best = min(fits, key=lambda w: float(((v @ w - yv) ** 2).mean()))
    return float(((b @ best - yb) ** 2).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("nodes", help="comma-separated F nodes, e.g. x,h1,h2 (x: the input)")
    p.add_argument("--lags", type=int, default=0, help="earlier steps read beside step t (default 0)")
    args = p.parse_args()
    rt, _, names = open_checkpoint(args.checkpoint, args.nodes, F_ONLY)
    ds = load_model(str(Path(__file__).resolve().parents[1] / "models/lorenz96_rnn.py")).data()
    ys = [y.reshape(-1, y.shape[-1]).double() for y in (ds.y_train[:N_FIT], ds.y_train[N_FIT:], ds.y_test)]
    for node in names:
        rows = [step_rows(rt, node, x, args.lags) for x in (ds.x_train[:N_FIT], ds.x_train[N_FIT:], ds.x_test)]
        mse = ridge_mse(rows[0], ys[0], rows[1], ys[1], rows[2], ys[2])
        print(f"{node}: next-step probe MSE {mse:.5f} (steps t-{args.lags}..t, {rows[0].shape[1]} features)",
              flush=True)


if __name__ == "__main__":
    main()
