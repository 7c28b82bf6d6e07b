"""Measure the effect of each lowering pass on one BSD training step, side by side in one process.

    python bench/passes.py [MODEL.py] [--batch-size 128] [--steps 20] [--threads N]

Variants of the cpu backend: everything on; without the class-deduplicated backward network; without the
time-invariant input; with neither; plus the reference runtime. Timing is interleaved (round-robin), medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bsdgraph.tools.bench import _batch, time_interleaved
from bsdgraph.compiler.cost import plan_flops
from bsdgraph.compiler.feedback import derive_feedback  # noqa: E402
from bsdgraph.compiler.model_file import load_model  # noqa: E402
from bsdgraph.runtime.cpu import cpu_runtime  # noqa: E402
from bsdgraph.runtime.reference import ReferenceRuntime  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default="models/fmnist_mlp.py")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    bsd = derive_feedback(model.graph, model.bsd)
    x, y = _batch(model.graph, args.batch_size)
    variants = {
        "all passes": cpu_runtime(bsd),
        "no per-class B": cpu_runtime(bsd, dedup=False),
        "no time-invariant input": cpu_runtime(bsd, time_invariant=False),
        "neither": cpu_runtime(bsd, dedup=False, time_invariant=False),
        "reference runtime": ReferenceRuntime(bsd),
    }
    times = time_interleaved({k: (lambda rt=rt: rt.step(x, y)) for k, rt in variants.items()}, args.steps, 3)
    base = statistics.median(times["all passes"])
    print(f"{args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads, median of {args.steps}")
    for k, rt in variants.items():
        ms = 1e3 * statistics.median(times[k])
        flop = plan_flops(rt.plan, bsd, args.batch_size) / 1e9 if hasattr(rt, "plan") else float("nan")
        print(f"  {k:<26} {ms:8.2f} ms  {flop:6.2f} GFLOP  {ms / (1e3 * base):5.2f}x the time of all passes")


if __name__ == "__main__":
    main()
