"""How many CPU threads a training step uses: a shared machine must not make training collapse.

torch's OpenMP threads spin while they wait for each other. Measured on the 2-core development machine
(fmnist_mlp, batch 128, samples/s of a 40-step run, 4 runs each; docs/threads.sh, docs/experiments.md "A shared
machine"):

    threads                           quiet          one other busy process
    2 (torch's default)               4,070-4,710    1,020-1,670   (collapses: 3-4x slower)
    1                                 2,700-3,020    2,610-2,930
    2, OMP_WAIT_POLICY=PASSIVE        2,600-3,230    2,200-2,530
    2, GOMP_SPINCOUNT=1000 / 10000    3,480-3,970 / 3,540-4,940    1,910-2,320 / 1,130-1,260

No wait policy keeps both. So a training uses all cores but one by default (``cores - 1``, at least 1): one other
job then finds a core free, and on 2 cores that is one thread, which loses a third of the quiet speed but cannot
collapse. The count is fixed for a run because it changes the results: GEMMs sum in another order with another
thread count, and spikes amplify the difference (20 MLP steps, 1 against 2 threads: weights differ by up to 5e-3).

``BSDGRAPH_THREADS=N`` fixes the count (on a machine of its own, ``BSDGRAPH_THREADS=2`` is the fast setting on 2
cores); ``OMP_NUM_THREADS``, set, is respected as torch reads it; ``BSDGRAPH_THREADS=auto`` times all threads against
one on real training steps every 250 steps and keeps the faster (``ThreadTuner``): the fastest on a machine whose
load changes, but results then depend on that load.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from bsdgraph import env

CLEARLY = 0.9  # one thread must take under 90 % of the time per sample of all threads to be chosen


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def training_threads() -> int | None:
    """The thread count for a training run, or None: tune it (BSDGRAPH_THREADS=auto)."""
    if env.THREADS.is_set():
        return env.THREADS.get()
    if env.OMP_NUM_THREADS.is_set():
        return torch.get_num_threads()
    return max(1, cores() - 1)


class ThreadTuner:
    """Runs training steps, switching between ``most`` threads and one to time both every ``every`` steps."""

    def __init__(self, most: int, every: int = 250, probe: int = 4, say: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter, set_threads: Callable[[int], None] | None = None):
        self.most, self.every, self.probe = most, every, probe
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.clock = clock
        self.set_threads = set_threads or torch.set_num_threads
        self.current, self.applied, self.steps = most, most, 0
        self.plan: list[int] = []                        # thread counts of the probe's remaining steps
        self.timed: dict[int, list[float]] | None = None  # threads -> seconds per sample of this probe's steps

    def run(self, step: Callable[[], Any], samples: int) -> Any:
        """One training step (``step()``), on the thread count this step should have; returns its result."""
        if self.steps % self.every == 0:
            self.plan, self.timed = [self.most] * (self.probe + 1) + [1] * (self.probe + 1), {}
        threads = self.plan.pop(0) if self.plan else self.current
        switched = threads != self.applied
        if switched:
            self.set_threads(threads)
            self.applied = threads
        start = self.clock()
        out = step()
        seconds = self.clock() - start
        self.steps += 1
        if self.timed is not None and not switched:  # a step right after a switch pays for it: not counted
            self.timed.setdefault(threads, []).append(seconds / max(samples, 1))
        if not self.plan and self.timed is not None:
            self._decide()
        return out

    def _decide(self) -> None:
        one = statistics.median(self.timed.get(1, [float("inf")]))
        most = statistics.median(self.timed.get(self.most, [float("inf")]))
        choice = 1 if one < CLEARLY * most else self.most
        if choice != self.current:
            why = (f"{most / one:.1f}x slower with {self.most}: another process is using the CPU" if choice == 1
                   else f"{one / most:.1f}x faster than one: the CPU is free again")
            self.say(f"threads: {choice} ({why}; measured over {self.probe} steps each, rechecked every "
                     f"{self.every} steps; BSDGRAPH_THREADS=N fixes the count)")
        self.current, self.timed = choice, None
        if choice != self.applied:
            self.set_threads(choice)
            self.applied = choice
