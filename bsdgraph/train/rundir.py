"""A training run's directory: one writer at a time, and nothing in it replaced that bsdgraph did not write.

``claim`` is held for the whole of ``bsdgraph train``:

- **One writer.** An advisory lock (``fcntl.flock`` on ``run.lock``, which holds the writer's pid) is taken before
  anything is read or written. A second training into the same directory stops at once, naming the holder; two
  writers used to interleave ``metrics.jsonl`` and leave whichever checkpoint finished last. The kernel drops
  the lock when its process ends, kill -9 included, so a killed run never leaves a stale lock behind.
- **Nothing foreign overwritten.** ``run.json`` marks a directory that ``bsdgraph train`` made. A fresh run into
  a directory whose ``metrics.jsonl`` (or model snapshot) bsdgraph did not write stops and says so; ``--force``
  replaces them. A directory holding a checkpoint needs ``--resume`` (or ``--force`` to start over, which
  removes the old checkpoint first so that it can never be resumed by mistake).
- **A snapshot of the model.** ``model_source.py`` is a copy of the model file the run trained, shown by
  ``bsdgraph plot``; bsdgraph never imports it (or any path a checkpoint names) unless the user passes it with
  ``--model``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from bsdgraph.train.checkpoint import remove_stale_temporaries
from bsdgraph.errors import UsageError, UserError

LOCK, MANIFEST, SNAPSHOT = "run.lock", "run.json", "model_source.py"
CHECKPOINT, METRICS = "checkpoint.pt", "metrics.jsonl"
FORMAT = "bsdgraph.run"


class RunDirError(UserError):
    """The run directory is in use or holds files bsdgraph did not write; the message names them (exit 1)."""


@contextlib.contextmanager
def claim(out: Path, model_path: Path, *, resume: bool, force: bool, record: dict | None = None,
          source: bytes | None = None) -> Iterator[None]:
    """Hold ``out`` for one training: lock it, check what is there, write the manifest and snapshot (of the model
    file, or ``source``: the graph's JSON for a network built in Python)."""
    out.mkdir(parents=True, exist_ok=True)
    try:  # O_NOFOLLOW: the pid written into the lock must never land in a file a symlink points at
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise RunDirError(f"{out / LOCK}: cannot be opened as the run's lock file ({err.strerror}); remove it if no "
                          "training is running") from None
    try:
        _lock(fd, out)
        for name in (MANIFEST, SNAPSHOT):  # what a writer killed inside _write_atomic left behind
            remove_stale_temporaries(out / name)
        _check(out, resume, force)
        _record(out, model_path, resume, record or {}, source)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a writer waiting for it)


def _lock(fd: int, out: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        raise RunDirError(f"{out} is being written by another `bsdgraph train` (pid {holder}); wait for it to "
                          "finish, or train into another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _check(out: Path, resume: bool, force: bool) -> None:
    checkpoint = out / CHECKPOINT
    if resume:
        return  # Trainer.resume verifies the checkpoint; metrics.jsonl is rewritten from its history
    if checkpoint.exists():
        if not force:
            raise UsageError(f"{out} already holds a checkpoint: pass --resume to continue it, --force to start "
                              "over (it is deleted), or another --out")
        checkpoint.unlink()
    if force or is_run_dir(out):
        return
    foreign = [name for name in (METRICS, SNAPSHOT, MANIFEST) if (out / name).exists()]
    if foreign:
        raise RunDirError(f"{out} holds {', '.join(foreign)}, which `bsdgraph train` did not write; pass --force "
                          "to replace them, or train into another --out")


def manifest(out: Path) -> dict:
    """The manifest ``bsdgraph train`` wrote into ``out`` ({} when there is none or it is not one)."""
    try:
        doc = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else {}


def is_run_dir(out: Path) -> bool:
    return bool(manifest(out))


def _record(out: Path, model_path: Path, resume: bool, record: dict, source: bytes | None = None) -> None:
    """The manifest and the model snapshot: always for a fresh run; on resume only where a run made before they
    existed lacks them (a changed model file is the user's to notice: the note says so, the snapshot stays)."""
    in_memory = source is not None
    source = source if in_memory else model_path.read_bytes()
    snapshot = out / SNAPSHOT
    if resume and snapshot.exists() and is_run_dir(out):
        if snapshot.read_bytes() != source:
            print(f"note: {model_path} differs from the snapshot this run started with ({snapshot})", file=sys.stderr)
        return
    doc = {"format": FORMAT, "version": 1, "model": str(model_path if in_memory else model_path.resolve()),
           "snapshot": SNAPSHOT, **record,
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    # the manifest first: a run killed between the two writes still owns its directory (a snapshot without a
    # manifest would look foreign to the next fresh run)
    _write_atomic(out / MANIFEST, (json.dumps(doc, indent=1) + "\n").encode())
    _write_atomic(snapshot, source)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def describe(out: Path) -> str | None:
    """One line naming the model a run trained and where its snapshot is, or None for a directory without one."""
    doc = manifest(out)
    if not isinstance(doc.get("model"), str):
        return None
    return (f"run of {doc['model']} (its source as trained: {out / SNAPSHOT}; bsdgraph runs a model file only when "
            "you pass it with --model)")
