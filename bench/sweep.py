"""Run a declared grid of training runs over several seeds, resumably, and write one table.

    python bench/sweep.py GRID.json OUT [--jobs N] [--table-only] [--dry-run]

GRID.json declares the model, the flags every run shares, the seeds and the variants (name -> extra flags of
``bsdgraph train``)::

    {"model": "models/fmnist_mlp.py",
     "common": ["--epochs", "12", "--schedule", "cosine", "--val-split", "0.1"],
     "seeds": [0, 1, 2],
     "variants": {"bsd": [], "bsd+bn": ["--batchnorm"], "bptt": ["--rule", "bptt"]}}

Each (variant, seed) trains into OUT/<variant>/seed<k> with one thread (BSDGRAPH_THREADS=1; ``--jobs`` runs go
side by side; one thread each keeps runs of a shared machine from slowing each other, docs/experiments.md "A
shared machine"). A run that finished has OUT/<variant>/seed<k>/done.json and is skipped; one that was
interrupted after a checkpoint is resumed (``--resume``: exact), one interrupted before its first checkpoint
starts again. The table (OUT/table.md, also printed) gives, per variant, the test result of the epoch chosen on
the validation split (best.pt), mean and spread over the seeds, beside the last epoch's; runs without a
validation split report their last epoch only. The test split never chooses anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class SweepError(Exception):
    """A grid file that cannot be run; the message says what to fix."""


def load_grid(path: Path) -> dict:
    try:
        grid = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SweepError(f"{path}: cannot read the grid ({err})") from None
    problems = []
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: a grid is a JSON object with model, common, seeds and variants")
    if not isinstance(grid.get("model"), str):
        problems.append("model must be the path of a model file")
    if not (isinstance(grid.get("common", []), list) and all(isinstance(a, str) for a in grid.get("common", []))):
        problems.append("common must be a list of command-line arguments (strings)")
    seeds = grid.get("seeds")
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        problems.append("seeds must be a non-empty list of integers")
    variants = grid.get("variants")
    if not (isinstance(variants, dict) and variants and all(
            isinstance(v, list) and all(isinstance(a, str) for a in v) for v in variants.values())):
        problems.append("variants must map names to lists of command-line arguments")
    elif any(not name or "/" in name or name.startswith(".") for name in variants):
        problems.append("variant names are directory names: no '/', not empty, not starting with '.'")
    if problems:
        raise SweepError(f"{path}: " + "; ".join(problems))
    return grid


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed{seed}"


def command(grid: dict, variant: str, seed: int, out: Path) -> list[str]:
    """The ``bsdgraph train`` command of one run (``--resume`` where a checkpoint exists, ``--force`` where a
    killed run left a directory without one)."""
    where = run_dir(out, variant, seed)
    cmd = [sys.executable, "-m", "bsdgraph", "train", grid["model"], *grid.get("common", []),
           *grid["variants"][variant], "--seed", str(seed), "--out", str(where), "--json"]
    if (where / "checkpoint.pt").is_file():
        cmd.append("--resume")
    elif where.exists():
        cmd.append("--force")
    return cmd


def train(grid: dict, variant: str, seed: int, out: Path) -> tuple[str, int, float]:
    """Run one (variant, seed) to the end; (variant, return code, seconds). Its output goes to train.log."""
    where = run_dir(out, variant, seed)
    where.mkdir(parents=True, exist_ok=True)
    cmd = command(grid, variant, seed, out)
    env = {**os.environ, "BSDGRAPH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    # the log sits beside the run directory: bsdgraph train claims the directory and refuses foreign files in it
    with open(where.parent / f"seed{seed}.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if rc == 0:
        (where.parent / f"seed{seed}.done.json").write_text(json.dumps({"command": cmd, "seconds": round(seconds, 1)}))
    return f"{variant}/seed{seed}", rc, seconds


def done(out: Path, variant: str, seed: int) -> bool:
    return (out / variant / f"seed{seed}.done.json").is_file()


def records(where: Path) -> list[dict]:
    path = where / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(history: list[dict]) -> dict | None:
    """One run's metric ("accuracy" or "mse"), chosen record, last record and whether it was validated: chosen =
    the best validation epoch (the record names it), or the last epoch without a validation split."""
    if not history:
        return None
    last = history[-1]
    metric = "accuracy" if "test_accuracy" in last else "mse"
    best = last.get("best_epoch")
    chosen = history[best - 1] if best else last
    return {"metric": metric, "chosen": chosen, "last": last, "validated": best is not None}


def _cell(values: list[float], percent: bool) -> str:
    if not values:
        return "-"
    scale, digits = (100, 2) if percent else (1, 5)
    mean = statistics.fmean(values) * scale
    if len(values) == 1:  # one seed has no spread to show
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def table(grid: dict, out: Path) -> str:
    """The markdown table of every variant (finished seeds only; unfinished ones are counted)."""
    lines = ["| variant | seeds | validation, best epoch | test, chosen on validation | chosen epochs | "
             "test, last epoch | flags |", "|---|---|---|---|---|---|---|"]
    units = set()
    for variant, flags in grid["variants"].items():
        finished = [s for s in grid["seeds"] if done(out, variant, s)]
        runs = [summary(records(run_dir(out, variant, s))) for s in finished]
        runs = [r for r in runs if r]
        percent = bool(runs) and runs[0]["metric"] == "accuracy"
        key = f"test_{runs[0]['metric']}" if runs else ""
        units |= {"accuracy in %" if percent else "MSE"} if runs else set()
        chosen = [r["chosen"][key] for r in runs if r["validated"]]
        val = [r["chosen"][key.replace("test_", "val_")] for r in runs if r["validated"]]
        last = [r["last"][key] for r in runs]
        epochs = ", ".join(str(r["chosen"]["epoch"]) for r in runs if r["validated"]) or "-"
        seeds = f"{len(runs)}/{len(grid['seeds'])}"
        lines.append(f"| {variant} | {seeds} | {_cell(val, percent)} | {_cell(chosen, percent)} | {epochs} | "
                     f"{_cell(last, percent)} | "
                     f"{' '.join(flags) or '(none)'} |")
    head = (f"{grid['model']}, flags {' '.join(grid.get('common', []))}; seeds {grid['seeds']}; test "
            f"{' / '.join(sorted(units)) or 'results'}, mean ± sample standard deviation over the finished seeds "
            "(one seed: its value).")
    return head + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("grid", type=Path, metavar="GRID.json")
    p.add_argument("out", type=Path, metavar="OUT")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each (default 1)")
    p.add_argument("--table-only", action="store_true", help="write the table of what has finished, train nothing")
    p.add_argument("--dry-run", action="store_true", help="print the commands that would run")
    args = p.parse_args(argv)
    try:
        grid = load_grid(args.grid)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    todo = [(v, s) for v in grid["variants"] for s in grid["seeds"] if not done(args.out, v, s)]
    if args.dry_run:
        for v, s in todo:
            print(" ".join(command(grid, v, s, args.out)))
        return 0
    failed = []
    if not args.table_only and todo:
        print(f"sweep {args.grid}: {len(todo)} run(s) to do, {args.jobs} at a time -> {args.out}", file=sys.stderr)
        with ThreadPoolExecutor(args.jobs) as pool:
            for name, rc, seconds in pool.map(lambda vs: train(grid, *vs, args.out), todo):
                print(f"  {name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {seconds / 60:.1f} min",
                      file=sys.stderr)
                if rc:
                    failed.append(name)
    text = table(grid, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    print(text)
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; see their seed<k>.log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
