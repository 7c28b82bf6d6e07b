"""Print the markdown table of docs/experiments.md from the runs that docs/experiments.sh wrote.

Usage: python docs/experiments_table.py OUT_DIR
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

VARIANTS = ["default", "other_class", "membrane", "poisson", "vth06_default", "vth06_calibrated", "bptt"]


def main(out: Path) -> None:
    print("| variant | seed | " + " | ".join(f"ep {i}" for i in range(1, 6)) + " | s/epoch | final hidden losses | "
          "B rates (last epoch) |")
    print("|---|---|" + "---|" * 5 + "---|---|---|")
    finals: dict[str, list[float]] = {}
    late: dict[str, list[float]] = {}  # the last two epochs: constant-lr test accuracy moves +-1.5 points
    for name in VARIANTS:
        for run in sorted(out.glob(f"{name}_s*")):
            path = run / "metrics.jsonl"
            if not path.is_file():
                continue
            recs = [json.loads(line) for line in path.read_text().splitlines()]
            accs = [f"{100 * r['test_accuracy']:.1f}" for r in recs] + ["-"] * (5 - len(recs))
            last = recs[-1]
            hidden = ", ".join(f"{k} {v:.2f}" for k, v in last["losses"].items() if k.startswith("reco"))
            b_rates = ", ".join(f"{k} {100 * v:.1f}%" for k, v in last["rates"].items() if k.endswith("_b"))
            secs = statistics.median(r["seconds"] for r in recs)
            print(f"| {name} | {run.name.rsplit('_s', 1)[1]} | {' | '.join(accs[:5])} | {secs:.0f} | "
                  f"{hidden or '-'} | {b_rates or '-'} |")
            finals.setdefault(name, []).append(100 * last["test_accuracy"])
            late.setdefault(name, []).extend(100 * r["test_accuracy"] for r in recs[-2:])
    print()
    print("| variant | epoch 5, mean over seeds | epochs 4-5, mean over seeds and epochs | seeds |")
    print("|---|---|---|---|")
    for name, accs in finals.items():
        print(f"| {name} | {statistics.mean(accs):.2f} % | {statistics.mean(late[name]):.2f} % | {len(accs)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
