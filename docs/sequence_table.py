"""Print the Mackey-Glass table of docs/experiments.md from the runs of docs/sequence_experiments.sh.

Usage: python docs/sequence_table.py OUT_DIR. Test MSE is in units of the series' training range squared; "final"
is the mean over the last 5 epochs (the per-epoch test MSE moves by ~10 % at a constant learning rate).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(out: Path) -> None:
    print("| model | rule | seed | final test MSE (mean of last 5 epochs) | best epoch MSE | s/epoch |")
    print("|---|---|---|---|---|---|")
    finals: dict[tuple[str, str], list[float]] = {}
    for run in sorted(p for p in out.iterdir() if p.is_dir()):
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        model = "_".join(run.name.split("_")[:3])
        rule, seed = run.name[len(model) + 1:].rsplit("_s", 1)
        final = statistics.mean(r["test_mse"] for r in recs[-5:])
        finals.setdefault((model, rule), []).append(final)
        print(f"| {model} | {rule} | {seed} | {final:.5f} | {min(r['test_mse'] for r in recs):.5f} | "
              f"{statistics.median(r['seconds'] for r in recs):.1f} |")
    print("\n| model | rule | mean over seeds | ratio to BPTT |")
    print("|---|---|---|---|")
    for (model, rule), vals in sorted(finals.items()):
        bptt = finals.get((model, "bptt"))
        ratio = f"{statistics.mean(vals) / statistics.mean(bptt):.2f}x" if bptt else "-"
        print(f"| {model} | {rule} | {statistics.mean(vals):.5f} | {ratio} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
