"""Checkpoints written atomically: a crash at any moment leaves the previous good checkpoint loadable.

write: serialise to ``<name>.tmp-<pid>`` in the same directory, flush + fsync, ``os.replace`` over the target
(atomic on POSIX), fsync the directory so the rename itself survives a power cut.

A writer killed with SIGKILL (or a power cut) cannot delete its temporary file. That file never replaced the target,
so the target is still the previous complete checkpoint, and nothing reads ``*.tmp-<pid>``; the next successful
save removes the temporary files of writers that are no longer running, and so does the start of a training run
(a run killed after its last checkpoint has no save left to do it; measured: docs/reliability.md).
"""

from __future__ import annotations

import glob
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "bsdgraph.checkpoint"
VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the model; the message says which and why."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buf)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)  # never leave a half-written file behind; the old checkpoint is untouched
        if isinstance(err, OSError) and err.filename == str(tmp):
            err.filename = str(path)  # the user asked for `path`; the temporary name would only confuse
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    remove_stale_temporaries(path)


TRAINING_KEYS = ("model", "graph", "rule", "train", "params", "state", "optimizer", "rng", "epoch", "steps", "history")


def require(doc: dict[str, Any], path: str | Path, keys=TRAINING_KEYS) -> dict[str, Any]:
    """``doc`` if it holds ``keys`` (by default: everything ``bsdgraph train`` writes), else one CheckpointError line;
    a weights file of ``import-nir`` passed where a training checkpoint belongs would otherwise be a KeyError."""
    missing = [k for k in keys if k not in doc]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint of `bsdgraph train` (it has no {', '.join(missing)})")
    return doc


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def remove_stale_temporaries(path: str | Path) -> None:
    """Delete ``<name>.tmp-<pid>`` files left by writers that were killed; a running writer's file is kept."""
    path = Path(path)
    for tmp in path.parent.glob(f"{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _running(int(pid))):
            tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        # torch's own text can run to a page and, for a refused pickle, advises weights_only=False: arbitrary code
        # execution. One line, and never that advice.
        why = ("it holds pickled objects other than tensors and plain data" if isinstance(err, pickle.UnpicklingError)
               else f"{type(err).__name__}: {_first_line(err)}")
        raise CheckpointError(f"{path}: not a readable checkpoint ({why}); it may be truncated or from another "
                              "program") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a bsdgraph checkpoint")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {doc.get('version')} is not supported (need {VERSION})")
    return doc
