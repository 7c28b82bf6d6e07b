"""Shared pieces of the reliability suite (docs/reliability.md): tiny models and data, the command-line invariant
every fuzz test asserts, and a fork server that lets the fault tests kill 30+ real training processes in seconds.

The invariant (``assert_clean``): whatever the input, ``bsdgraph`` ends with exit code 0, 1 or 2, says why on
stderr when it fails, and never shows a traceback. ``cli`` calls ``bsdgraph.cli.main.main`` in-process, so an exception
that escapes it fails the test with that exception's own traceback: the defect, not a symptom.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted(p for p in (ROOT / "models").glob("*.py") if p.name != "__init__.py")
LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"

# The profile's example count (ci 25, long 500), with the health check that objects to function-scoped fixtures
# off: every example here makes its own files under a fresh temporary folder.
FUZZ = settings(suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])

# 16 inputs -> 12 LIF -> 4 classes, T = 2: an epoch of 60 samples takes ~20 ms, so training is cheap to repeat.
TINY_MODEL = '''"""A tiny MLP for the reliability suite."""
from bsdgraph import GraphBuilder

TRAIN = dict(epochs=1, batch_size=20)


def build():
    g = GraphBuilder("tiny", T=2)
    h = g.lif(g.linear(g.input((16,)), 12))
    g.output(g.linear(h, 4))
    return g.build()
'''

# The same on 1x4x4 images with 10 classes: what MNIST-format IDX files hold (cropped).
TINY_IMAGE_MODEL = '''"""A tiny image MLP for IDX data."""
from bsdgraph import GraphBuilder


def build():
    g = GraphBuilder("tiny_image", T=2)
    h = g.lif(g.linear(g.flatten(g.input((1, 4, 4))), 8))
    g.output(g.linear(h, 10))
    return g.build()
'''


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def tiny_arrays(n_train: int = 60, n_test: int = 20, shape=(16,), classes: int = 4, seed: int = 0) -> dict:
    from bsdgraph.train.data import make_synthetic

    d = make_synthetic(n_train, n_test, shape, classes, seed=seed)
    return {"x_train": d.x_train.numpy(), "y_train": d.y_train.numpy(), "x_test": d.x_test.numpy(),
            "y_test": d.y_test.numpy()}


def write_npz(path: Path, arrays: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # np.savez would append ".npz" to a name without it
        np.savez(fh, **(arrays if arrays is not None else tiny_arrays()))
    return path


def fresh_dir(parent: Path, stem: str = "d") -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=parent))


def case_dir(parent: Path, *case) -> Path:
    """A folder named after the example: the same example (hypothesis replays a failure to confirm it) gets the same
    paths and so the same messages, a different one never shares a file (or a stale __pycache__ entry)."""
    folder = parent / hashlib.sha1(repr(case).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ---------------------------------------------------------------------------------------------------- the CLI


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    code: int
    out: str
    err: str


def cli(*argv) -> Result:
    """``bsdgraph.cli.main.main(argv)`` in this process with stdout/stderr captured. Leaves torch's thread count as it
    found it (``bench --threads`` sets it) and, so that a bad path never reads the real data set, points the
    Fashion-MNIST default at a folder that does not exist."""
    import bsdgraph.train.data
    from bsdgraph.cli.main import main

    argv = tuple(str(a) for a in argv)
    out, err = io.StringIO(), io.StringIO()
    threads, default_data = torch.get_num_threads(), bsdgraph.train.data.FASHION_MNIST_DIR
    bsdgraph.train.data.FASHION_MNIST_DIR = str(ROOT / "no-such-dataset")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        bsdgraph.train.data.FASHION_MNIST_DIR = default_data
        torch.set_num_threads(threads)
    return Result(argv, code, out.getvalue(), err.getvalue())


def assert_clean(r: Result, codes=(0, 1, 2)) -> Result:
    """Exit code in ``codes``; a failure says why on stderr; no traceback anywhere."""
    where = f"bsdgraph {' '.join(r.argv)}\n-- exit {r.code}\n-- stderr:\n{r.err[-3000:]}"
    assert r.code in codes, where
    assert "Traceback (most recent call last)" not in r.err + r.out, where
    if r.code != 0:
        lines = [line for line in r.err.splitlines() if line.strip()]
        assert lines, f"exit {r.code} without a message: {where}"
        assert not lines[-1].startswith((" ", "\t")), f"the last line is not a message: {where}"
    return r


def run_modules(argvs, cwd: Path | None = None, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """``python -m bsdgraph ARGV`` for each ARGV, side by side, each in a fresh interpreter with one thread: the
    way a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [(argv, subprocess.Popen([sys.executable, "-m", "bsdgraph", *map(str, argv)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=cwd or ROOT, env=env)) for argv in argvs]
    done = []
    for argv, p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(argv, p.returncode, out, err))
    return done


# ---------------------------------------------------------------------------------------------------- fork server

_SERVER = r'''
import json, os, signal, sys
import torch
torch.set_num_threads(1)  # before any fork: the children never enter an OpenMP parallel region
import bsdgraph.cli.main
import bsdgraph.train.checkpoint
from bsdgraph.train.trainer import Trainer

_epoch = Trainer._epoch


def _marked_epoch(self):
    # "epoch k started", written unbuffered before the work: after a kill it tells how far the process got
    os.write(MARKS, f"{self.epoch + 1}\n".encode())
    return _epoch(self)


def _child(req):
    global MARKS
    log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    if req["kind"] == "train":
        MARKS = os.open(req["marks"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        Trainer._epoch = _marked_epoch
        code = bsdgraph.cli.main.main(req["argv"])
    else:  # save the same checkpoint path again and again: a kill lands inside save_checkpoint
        marks = os.open(req["marks"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        payload = torch.arange(req["numel"], dtype=torch.float32)
        for i in range(1, 10 ** 9):
            bsdgraph.train.checkpoint.save_checkpoint(req["path"], {"i": i, "w": payload + i})
            os.write(marks, f"{i}\n".encode())
        code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            try:
                _child(req)
            finally:
                os._exit(99)
        print(json.dumps({"pid": pid}), flush=True)
    elif req["op"] == "warm":  # run once in the server, so that every child inherits the lazy imports
        with open(os.devnull, "w") as null:
            sys.stdout, sys.stderr = null, null
            code = bsdgraph.cli.main.main(req["argv"])
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        print(json.dumps({"code": code}), flush=True)
    elif req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                          "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
'''


class ForkServer:
    """A helper process that imports bsdgraph once and forks one child per request.

    A fresh interpreter needs ~3 s to import torch on these machines, so 30+ kills of ``python -m bsdgraph train``
    would cost minutes; a fork costs milliseconds. Each child is a real process: it runs
    ``bsdgraph.cli.main.main(argv)`` (``kind="train"``) or saves a checkpoint in a loop (``kind="save"``) until it
    ends or the test kills it with SIGKILL. Its output goes to ``log``; ``marks`` gets one line per epoch started
    (train) or per checkpoint completed (save). The server reaps every child, so a pid stays valid until
    ``wait``."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=ROOT)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit {self.proc.wait()})")
        return json.loads(line)

    def _ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def spawn(self, kind: str, log: Path, marks: Path, **req) -> int:
        return self._ask(op="spawn", kind=kind, log=str(log), marks=str(marks), **req)["pid"]

    def warm(self, argv) -> int:
        """Run ``argv`` once inside the server: the children it forks afterwards start warm. A cold child spends
        most of its life importing and initialising what the command needs lazily: a 5-epoch run of the tiny model
        took 1.7-2.4 s cold and 0.18-0.34 s warm (measured)."""
        return self._ask(op="warm", argv=[str(a) for a in argv])["code"]

    def wait(self, pid: int) -> dict:
        return self._ask(op="wait", pid=pid)

    def run(self, argv, log: Path, marks: Path) -> tuple[dict, float]:
        """Run a training child to its end; (status, seconds)."""
        start = time.perf_counter()
        pid = self.spawn("train", log, marks, argv=[str(a) for a in argv])
        status = self.wait(pid)
        return status, time.perf_counter() - start

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def read_marks(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []
