"""Diagnostic for docs/experiments.md ("Credit through time inside a recurrent layer"): how well the next character
can be read from a trained character model's layers.

For each named F node of a `models/char_rnn.py` checkpoint, a least-squares (ridge) classifier maps the node's
activity at step t (with ``--lags K``, also steps t-1..t-K side by side, zeros before the first step) to the
character that follows step t, fitted on 3000 training sequences and scored on 1000 test sequences of the model's
own data (the best of three ridge strengths, picked on those test sequences: a diagnostic, not a result). A layer
whose probe is poor has lost the history, whatever the model's own readout learns on top of it.

Usage: python docs/next_char_probe.py CHECKPOINT NODE[,NODE...] [--lags K]
e.g.   python docs/next_char_probe.py runs/char/checkpoint.pt h1,h2 --lags 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bsdgraph.compiler.model_file import load_model  # noqa: E402
from bsdgraph.ir.graph import Stream  # noqa: E402
from checkpoint_features import features, open_checkpoint  # noqa: E402  (docs/, beside this script)

N_TRAIN, N_TEST, RIDGE = 3000, 1000, (1e-2, 1.0, 100.0)
F_ONLY = frozenset({Stream.F})


def step_rows(rt, node: str, x: torch.Tensor, lags: int) -> torch.Tensor:
    """[N * T, D * (lags + 1)]: each step's activity with the ``lags`` steps before it."""
    f = features(rt, x, None, [node], F_ONLY, torch.float64, all_steps=True)[node]
    n, T = x.shape[0], x.shape[1]
    f = f.reshape(n, T, -1)
    shifted = [torch.cat([torch.zeros_like(f[:, :k]), f[:, :T - k]], 1) for k in range(1, lags + 1)]
    return torch.cat([f, *shifted], -1).reshape(n * T, -1)


def probe(a: torch.Tensor, ya: torch.Tensor, b: torch.Tensor, yb: torch.Tensor, classes: int) -> float:
    a, b = (torch.cat([m, torch.ones(len(m), 1, dtype=m.dtype)], 1) for m in (a, b))
    target = torch.nn.functional.one_hot(ya, classes).to(a.dtype)
    eye = torch.eye(a.shape[1], dtype=a.dtype)
    return max(float(((b @ torch.linalg.solve(a.T @ a + lam * eye, a.T @ target)).argmax(1) == yb).double().mean())
               for lam in RIDGE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("nodes", help="comma-separated F nodes, e.g. h1,h2")
    p.add_argument("--lags", type=int, default=0, help="earlier steps read beside step t (default 0)")
    args = p.parse_args()
    rt, _, names = open_checkpoint(args.checkpoint, args.nodes, F_ONLY)
    ds = load_model(str(Path(__file__).resolve().parents[1] / "models/char_rnn.py")).data()
    for node in names:
        a = step_rows(rt, node, ds.x_train[:N_TRAIN], args.lags)
        b = step_rows(rt, node, ds.x_test[:N_TEST], args.lags)
        acc = probe(a, ds.y_train[:N_TRAIN].reshape(-1), b, ds.y_test[:N_TEST].reshape(-1), ds.n_classes)
        print(f"{node}: next-character probe accuracy {100 * acc:.1f} % (steps t-{args.lags}..t)", flush=True)


if __name__ == "__main__":
    main()
