"""Checkpoints written atomically and verified on every load: a crash at any moment leaves the previous good
checkpoint loadable, and a damaged one is refused, never used.

write: serialise to ``<name>.tmp-<pid>`` in the same directory, flush + fsync, ``os.replace`` over the target
(atomic on POSIX), fsync the directory so the rename itself survives a power cut.

A writer killed with SIGKILL (or a power cut) cannot delete its temporary file. That file never replaced the target,
so the target is still the previous complete checkpoint, and nothing reads ``*.tmp-<pid>``; the next successful
save removes the temporary files of writers that are no longer running, and so does the start of a training run
(a run killed after its last checkpoint has no save left to do it; measured: docs/reliability.md).

verify: the file carries a SHA-256 ``checksum`` of its own contents (every field, tensors by dtype, shape and
bytes; ``digest``), computed before the write, so it is written atomically with them. ``load_checkpoint``
recomputes it: a flipped bit or a torn copy that torch still reads (its zip reader checks no CRC) is refused.
``require`` then checks the fields a command needs (``checkpoint_schema.py``): types, shapes against the saved
graph, finite weights, consistent optimiser state. Version-1 files (written before the checksum existed) carry
none and get the field checks only.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from bsdgraph.errors import UserError
from bsdgraph.train.checkpoint_schema import brief, problems

FORMAT = "bsdgraph.train.checkpoint"
VERSION = 2          # 2: with a checksum; 1: without
READABLE = (1, 2)


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model; the message says which and why."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    doc = {"format": FORMAT, "version": VERSION, **payload}
    doc["checksum"] = digest(doc)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            _stream(doc, fh)
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


def _stream(doc: dict[str, Any], fh) -> None:
    """torch.save straight into the file: serialising into memory first held a second copy of the whole checkpoint
    (and up to twice that while the buffer grew), which a 784-6000-6000-10 MLP under a 3 GB cap did not survive.
    torch wraps a failing write in a RuntimeError ("unexpected pos"); the cause (disk full, out of memory) is what
    the user needs to hear."""
    try:
        torch.save(doc, fh)
    except RuntimeError as err:
        if isinstance(err.__context__, (OSError, MemoryError)):
            raise err.__context__ from None
        raise


TRAINING_KEYS = ("model", "graph", "rule", "train", "params", "state", "optimizer", "rng", "epoch", "steps", "history")


def require(doc: dict[str, Any], path: str | Path, keys=TRAINING_KEYS) -> dict[str, Any]:
    """``doc`` if it holds ``keys`` (by default: everything ``bsdgraph train`` writes) and every field it holds is
    sound, else one CheckpointError line; a weights file of ``import-nir`` passed where a training checkpoint
    belongs would otherwise be a KeyError, a NaN weight a silently wrong evaluation."""
    missing = [k for k in keys if k not in doc]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint of `bsdgraph train` (it has no {', '.join(missing)})")
    found = problems(doc)
    if found:
        more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
        raise CheckpointError(f"{path}: unusable checkpoint: {found[0]}{more}")
    return doc


def digest(doc: dict[str, Any]) -> str:
    """SHA-256 of every field but ``checksum``, in order: tensors by dtype, shape and bytes, plain values by type
    and repr (repr round-trips floats exactly)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in doc.items() if k != "checksum"})
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}:".encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        text = repr(obj).encode()
        h.update(f"{type(obj).__name__}{len(text)}:".encode() + text)
    else:  # torch.load(weights_only=True) gives nothing else back; a writer passing one is a bsdgraph defect
        raise TypeError(f"cannot checksum a {type(obj).__name__}")


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
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 -- torch's unpickler on damaged bytes raises KeyError, IndexError,
        # AssertionError... as well as its own errors: any of them means "not readable". torch's own text can run to
        # a page and, for a refused pickle, advises weights_only=False: arbitrary code execution. One line, and
        # never that advice.
        why = ("it holds pickled objects other than tensors and plain data" if isinstance(err, pickle.UnpicklingError)
               else f"{type(err).__name__}: {_first_line(err)}")
        raise CheckpointError(f"{path}: not a readable checkpoint ({why}); it may be truncated or from another "
                              "program") from None
    if not isinstance(doc, dict) or not _is(doc.get("format"), str) or doc["format"] != FORMAT:
        raise CheckpointError(f"{path}: not a bsdgraph checkpoint")
    version = doc.get("version")
    if not (_is(version, int) and version in READABLE):
        raise CheckpointError(f"{path}: checkpoint version {brief(version)} is not supported (this bsdgraph "
                              f"reads {', '.join(map(str, READABLE))})")
    # A file that carries a checksum is verified whatever its version says (a flipped version byte must not switch
    # the check off); only a true version 1, written before checksums, has none.
    if ("checksum" in doc or version >= 2) and doc.get("checksum") != _digest_or_none(doc):
        raise CheckpointError(f"{path}: damaged: its contents do not match the checksum written with them (a flipped "
                              "bit or a torn copy); use an intact copy, or train again")
    return doc


def _is(value: Any, kind: type) -> bool:
    """``type(value) is kind``: a tensor or numpy value where a plain one belongs fails, bool is no int."""
    return type(value) is kind


def _digest_or_none(doc: dict[str, Any]) -> str | None:
    try:
        return digest(doc)
    except TypeError:  # a value no bsdgraph writer puts there
        return None
