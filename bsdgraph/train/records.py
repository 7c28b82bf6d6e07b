"""The epoch record ``bsdgraph train`` writes (a line of ``metrics.jsonl``, an entry of a checkpoint's history),
checked the same way wherever one is read back: by ``plot`` and by the checkpoint's field checks."""

from __future__ import annotations

from typing import Any


def _numbers(d: Any) -> bool:
    return isinstance(d, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.values())


def is_epoch_record(rec: Any, first: Any) -> bool:
    """Whether ``rec`` is an epoch record with the same metric, losses and layers as ``first`` (the run's first
    record): the plots index every record by the first one's keys (found by fuzzing: ``{}`` or ``1`` on a line was
    a KeyError in plot, and a checkpoint whose history held such records resumed into a metrics.jsonl that plot
    then refused)."""
    metric = "test_accuracy" if isinstance(first, dict) and "test_accuracy" in first else "test_mse"
    ok = (isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and not isinstance(rec["epoch"], bool)
          and _numbers({metric: rec.get(metric)}) and _numbers(rec.get("losses")) and _numbers(rec.get("rates")))
    if ok and rec is not first:
        ok = set(rec["losses"]) == set(first["losses"]) and set(rec["rates"]) == set(first["rates"])
    return ok
