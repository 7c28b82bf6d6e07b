"""Files a command writes where the user points it (``-o``, ``--out``, ``--plot``): written whole, and an existing
file replaced only when bsdgraph wrote it, unchanged since, or with ``--force``.

``import-nir -o peer.py`` used to overwrite whatever ``peer.py`` held, a hand-written model included. Whether
bsdgraph wrote a file is recorded, not guessed: after each write, the file's path and SHA-256 are appended to
a small ledger in the user's state directory (``$XDG_STATE_HOME/bsdgraph/written.jsonl``, default
``~/.local/state/bsdgraph``). A file whose current hash is the ledger's last entry for its path is bsdgraph's
and is replaced silently, so re-running a command works as before; anything else stops with a message naming
``--force``. A file edited after bsdgraph wrote it counts as the user's. Without a writable state directory
nothing is recorded and existing files need ``--force``: the safe side.

Writes go to a temporary file in the same directory, renamed over the target when complete, so a failure or
Ctrl-C never leaves half a file under the user's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from bsdgraph import env
from bsdgraph.errors import UserError

LEDGER_LINES = 2000  # past this, the ledger keeps its newest half: it records outputs, it is not an archive


class OutputError(UserError):
    """An existing file bsdgraph did not write would be replaced (exit 1)."""


def ledger() -> Path | None:
    """Where the record of written files lives; the one reader of XDG_STATE_HOME / HOME for it."""
    home = env.HOME.get()
    base = env.XDG_STATE_HOME.get() or (Path(home) / ".local" / "state" if home else None)
    return Path(base) / "bsdgraph" / "written.jsonl" if base else None


def claim(path: str | Path, force: bool, flag: str = "-o") -> None:
    """Refuse (OutputError) to replace ``path`` unless it is absent, ours and unchanged, or ``force``."""
    path = Path(path)
    if force or not path.exists() or (path.is_file() and _ours(path)):
        return
    raise OutputError(f"{path} exists and bsdgraph did not write it (or it changed since): not replaced. Pass --force "
                      f"to replace it, or give {flag} another name")


@contextlib.contextmanager
def replacing(path: str | Path, force: bool, flag: str = "-o") -> Iterator[Path]:
    """``with replacing(p, force) as tmp: write(tmp)``: checked before, renamed into place and recorded after.
    ``tmp`` keeps ``p``'s suffix (matplotlib picks the format by it)."""
    path = Path(path)
    claim(path, force, flag)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    record(path)


def write_text(path: str | Path, text: str, force: bool, flag: str = "-o") -> None:
    with replacing(path, force, flag) as tmp:
        tmp.write_text(text)


def record(path: str | Path) -> None:
    """Note that bsdgraph wrote ``path`` as it is now (best effort: a ledger that cannot be written only means
    that the next replacement needs --force)."""
    where = ledger()
    if where is None:
        return
    line = json.dumps({"path": str(Path(path).resolve()), "sha256": _sha256(Path(path))}) + "\n"
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        with open(where, "a") as fh:  # one short append: atomic between processes (O_APPEND)
            fh.write(line)
        _trim(where)
    except OSError:
        pass


def _ours(path: Path) -> bool:
    where = ledger()
    if where is None:
        return False
    key = str(path.resolve())
    try:
        lines = where.read_text().splitlines()
    except OSError:
        return False
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a torn line of a killed writer
        if isinstance(entry, dict) and entry.get("path") == key:
            return entry.get("sha256") == _sha256(path)
    return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _trim(where: Path) -> None:
    lines = where.read_text().splitlines(keepends=True)
    if len(lines) > LEDGER_LINES:
        tmp = where.with_name(f"{where.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(lines[-LEDGER_LINES // 2:]))
        os.replace(tmp, where)
