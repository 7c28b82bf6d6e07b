"""Every environment variable bsdgraph reads, declared once: name, default, parse, meaning (docs/environment.md).

Accessors read the environment at call time (tests and users change it between calls); no other module reads
``os.environ`` (tests/test_env.py checks both). A value a knob cannot parse is an ``EnvError``: one line naming
the variable, what it holds and what it should hold, exit 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bsdgraph.errors import UserError


class EnvError(UserError):
    """An environment variable holds a value its knob cannot use; the message names it (exit 1)."""


def _text(raw: str) -> str:
    return raw


def _not_zero(raw: str) -> bool:
    """A switch that only ``0`` turns off (an empty value leaves it on, as it always has)."""
    return raw != "0"


def _one(raw: str) -> bool:
    """A switch that only ``1`` turns on (Triton's own reading of TRITON_INTERPRET)."""
    return raw == "1"


def _whole(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("expected a whole number") from None


def _threads(raw: str) -> int | None:
    """``auto`` (None: tune) or a whole number >= 1."""
    if raw == "auto":
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError("expected 'auto' or a whole number >= 1")
    return int(raw)


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:  # nan too
        raise ValueError("expected a number of seconds > 0")
    return value


@dataclass(frozen=True)
class Knob:
    """One environment variable: its ``default`` text (None: unset means "not given") is parsed like a set value."""

    name: str
    default: str | None
    doc: str
    parse: Callable[[str], Any] = _text  # raises ValueError saying what it expected

    def raw(self) -> str | None:
        return os.environ.get(self.name, self.default)

    def is_set(self) -> bool:
        return self.name in os.environ

    def on(self) -> bool:
        """A switch: anything but "0" (and empty) is on."""
        return self.raw() not in ("0", "")

    def get(self) -> Any:
        """The parsed value (None when unset without a default); ``EnvError`` when it does not parse."""
        raw = self.raw()
        if raw is None:
            return None
        try:
            return self.parse(raw)
        except ValueError as err:
            raise EnvError(f"{self.name}={raw!r}: {err}") from None


# -- bsdgraph's own
VALIDATE = Knob("BSDGRAPH_VALIDATE", "0",
                "1: run each launch's reference twin beside it and stop at the first launch whose outputs "
                "diverge, naming it (slow; for finding a kernel bug)")
DIST_TIMEOUT = Knob("BSDGRAPH_DIST_TIMEOUT", "300.0",
                    "seconds a process of a multi-process run waits for its peers (rendezvous, each collective, "
                    "each pipeline message) before it stops with an error naming what failed", _seconds)
NATIVE = Knob("BSDGRAPH_NATIVE", "1",
              "0: the cpu backend's LIF runs its torch loop instead of the native C kernel (compiled on first use "
              "with CC into XDG_CACHE_HOME/bsdgraph; a missing or failing compiler warns once and falls back)",
              _not_zero)
KEEP_HEAP = Knob("BSDGRAPH_KEEP_HEAP", "1",
                 "0: leave glibc's allocator at its defaults; otherwise the cpu backend and the BPTT baseline keep "
                 "freed memory in the heap (re-mapping large tensors every step cost a CNN step half its time)",
                 _not_zero)
MEMORY_CHECK = Knob("BSDGRAPH_MEMORY_CHECK", "1",
                    "0: do not refuse a model whose estimated memory exceeds what is free (the estimate leaves "
                    "out torch's own footprint, so it errs towards letting a model run)", _not_zero)

THREADS = Knob("BSDGRAPH_THREADS", None,
               "CPU threads of a training run: a whole number >= 1; unset: all cores but one (one other job cannot "
               "make training collapse); 'auto': time all threads against one every 250 steps and keep the faster "
               "(results then depend on the machine's load)", _threads)

# -- other programs' conventions that bsdgraph follows
OMP_NUM_THREADS = Knob("OMP_NUM_THREADS", None, "torch's CPU threads (read by torch itself); set and "
                       "BSDGRAPH_THREADS unset, a training run keeps torch's count")
TRITON_INTERPRET = Knob("TRITON_INTERPRET", "0",
                        "1: Triton kernels run in its CPU interpreter, so the triton backend is available without "
                        "a GPU (slow; tests/conftest.py sets it)", _one)
XDG_STATE_HOME = Knob("XDG_STATE_HOME", None,
                      "where bsdgraph records the files it writes (bsdgraph/written.jsonl; default "
                      "HOME/.local/state), so that it replaces only its own outputs")
XDG_CACHE_HOME = Knob("XDG_CACHE_HOME", "",
                      "where the native LIF kernel is cached (bsdgraph/; default HOME/.cache)")
HOME = Knob("HOME", None, "the fallback of XDG_STATE_HOME and XDG_CACHE_HOME")
CC = Knob("CC", "cc", "the C compiler that builds the native LIF kernel")

# -- set by torchrun for each process of a multi-process run
RANK = Knob("RANK", None, "this process's rank (with WORLD_SIZE: the run is multi-process)", _whole)
WORLD_SIZE = Knob("WORLD_SIZE", None, "the number of processes", _whole)
LOCAL_RANK = Knob("LOCAL_RANK", "0", "this process's rank on its machine: its GPU", _whole)
MASTER_ADDR = Knob("MASTER_ADDR", None, "the rendezvous host (named in an error when the rendezvous fails)")
MASTER_PORT = Knob("MASTER_PORT", None, "the rendezvous port (named in an error when the rendezvous fails)")

KNOBS: dict[str, Knob] = {k.name: k for k in (
    VALIDATE, DIST_TIMEOUT, NATIVE, KEEP_HEAP, MEMORY_CHECK, THREADS, TRITON_INTERPRET, OMP_NUM_THREADS,
    XDG_STATE_HOME, XDG_CACHE_HOME, HOME, CC, RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT,
)}


def validate_launches() -> bool:
    return VALIDATE.on()
