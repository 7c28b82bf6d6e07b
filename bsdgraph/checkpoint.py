"""Checkpoints written atomically: a crash at any moment leaves the previous good checkpoint loadable.

write: serialise to ``<name>.tmp-<pid>`` in the same directory, flush + fsync, ``os.replace`` over the target
(atomic on POSIX), fsync the directory so the rename itself survives a power cut.
"""

from __future__ import annotations

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
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written file behind; the old checkpoint is untouched
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err}); "
                              "it may be truncated or from another program") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a bsdgraph checkpoint")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {doc.get('version')} is not supported (need {VERSION})")
    return doc
