"""Print the sequence-task tables of docs/experiments.md from the runs of docs/sequence_tasks.sh, with the baselines
computed on the same data: the unigram predictor for the character model, persistence and least-squares linear
autoregressive models for Lorenz-96.

Usage: python docs/sequence_tasks_table.py OUT_DIR. "final" is the last epoch's test metric, "best" the best epoch's
(reported, never used to choose: there is no validation split here)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

METRIC = {"char_rnn": "test_accuracy", "mnist1d_rnn": "test_accuracy", "lorenz96_rnn": "test_mse"}


def _runs(out: Path):
    for run in sorted(p for p in out.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists()):
        model, rule, seed = run.name.rsplit("_", 2)
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        yield model, rule, seed.lstrip("s"), recs


def baselines() -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bsdgraph.train import series, text

    lines = []
    if text.CORPUS.exists():
        b = text.unigram_baseline(text.corpus_dataset(24, max_chars=600_000))
        lines.append(f"| char_rnn | unigram (most frequent character) | accuracy {b['accuracy']:.4f}, "
                     f"{b['bits_per_step']:.3f} bits/char |")
    ds = series.lorenz96_dataset(16)
    lines.append(f"| lorenz96_rnn | persistence x[t+1] = x[t] | MSE {series.persistence_mse(ds):.5f} |")
    for lags in (1, 2, 4):
        lines.append(f"| lorenz96_rnn | linear AR({lags}), least squares | MSE {series.linear_ar_mse(ds, lags):.5f} "
                     f"{'(steps t >= ' + str(lags - 1) + ')' if lags > 1 else ''} |")
    return lines


def main(out: Path) -> None:
    print("| model | rule | seed | epochs | final | best | extra | s/epoch |")
    print("|---|---|---|---|---|---|---|---|")
    finals: dict[tuple[str, str], list[float]] = {}
    for model, rule, seed, recs in _runs(out):
        key = METRIC[model]
        final, best = recs[-1][key], (max if "accuracy" in key else min)(r[key] for r in recs)
        extra = f"{recs[-1]['test_bits_per_step']:.3f} bits/char" if "test_bits_per_step" in recs[-1] else ""
        finals.setdefault((model, rule), []).append(final)
        print(f"| {model} | {rule} | {seed} | {len(recs)} | {final:.4f} | {best:.4f} | {extra} | "
              f"{statistics.median(r['seconds'] for r in recs):.1f} |")
    print("\n| model | rule | final, mean over seeds | BSD / BPTT |")
    print("|---|---|---|---|")
    for (model, rule), vals in sorted(finals.items()):
        bptt = finals.get((model, "bptt"))
        ratio = f"{statistics.mean(vals) / statistics.mean(bptt):.3f}" if bptt and rule.startswith("bsd") else ""
        print(f"| {model} | {rule} | {statistics.mean(vals):.4f} | {ratio} |")
    print("\n| task | baseline | test |\n|---|---|---|")
    print("\n".join(baselines()))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
