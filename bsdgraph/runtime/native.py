"""A fused native LIF forward for the cpu backend: ``native_lif.c``, compiled on first use with the system C
compiler (``CC`` or ``cc``) and called through ctypes. ``cpu.lif_forward`` uses it when ``available()`` and the
inputs are contiguous float32 CPU tensors, and its torch loop otherwise; ``BSDGRAPH_NATIVE=0`` turns it off.

Why: the torch loop is ~6 elementwise ops per step, each a pass over memory, then a float -> uint8 cast; the C
kernel runs each neuron's time loop in registers in one pass and writes uint8 spikes directly. Measured (this
2-core VM, 2 threads, hard reset, median of 50, interleaved, two runs): torch loop + as_uint8 against native,
[4, 128, 1024] 917-1375 us vs 109-116 us; [4, 128, 512] 503-579 vs 61-63; [4, 10, 1024] 154-213 vs 30-42 (of
which ~15 us is the Python call). One thread, [4, 128, 1024]: 1.7-1.8 ms vs 0.29 ms. Without -march=native (SSE2)
the native figure for [4, 128, 1024] was ~200 us. First use compiles in ~0.3-0.4 s.

Exactness: the C expressions are the torch loop's, in the same order, in fp32, compiled with -ffp-contract=off
(no fused multiply-add), and the scalars are rounded to float as torch rounds them; spikes and h are bit-identical
(tests/test_native_lif.py checks it, threshold ties included).

Build: once per (source, compiler, flags) into ``$XDG_CACHE_HOME/bsdgraph`` (default ``~/.cache/bsdgraph``),
written to a temporary file and renamed, so processes compiling at once (pytest -n 2) never load a partial file,
and a process that has the old file mapped keeps it (the rename makes a new inode; nothing is written in place).
After the rename the library's SHA-256 is written beside it (``native_lif-<key>.so.sha256``, also temp + rename),
and every process hashes the file against that record before loading it: a damaged library (truncated by a full
disk, copied badly, a flipped bit) would otherwise crash the process with SIGBUS inside dlopen, with no message.
A library without a record or with a mismatch is rebuilt the same way, with one warning; a kill between the
rename and the record leaves a library without a record, so it is rebuilt, never trusted. A missing or failing
compiler (first build or rebuild) warns once and leaves the torch loop in place.

Threads: torch's wheel ships libgomp.so.1 under the same soname as the system's, and torch is loaded first, so
the kernel's ``omp parallel`` runs on torch's own OpenMP pool (a second runtime's threads would spin-wait against
torch's on a small machine); each call uses ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from bsdgraph import env

SOURCE = Path(__file__).with_name("native_lif.c")
FLAGS = ("-O3", "-fno-fast-math", "-ffp-contract=off", "-fPIC", "-shared")
OPENMP = ("-fopenmp",)
MARCH = ("-march=native",)  # AVX-512 here: 2x over the SSE2 default; bit-identity holds (no FMA contraction)
# In the cache key: libraries cached before the SHA-256 records have none, and would each be "rebuilt" with a
# damage warning on upgrade; a new key builds them afresh without one.
CACHE_FORMAT = b"sha256-record-1"
_P, _I64, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def available() -> tuple[bool, str]:
    """(whether the native kernel can run, why not / how it was built); the one reader of BSDGRAPH_NATIVE."""
    if not env.NATIVE.get():
        return False, "disabled by BSDGRAPH_NATIVE=0"
    lib, reason = _library()
    return lib is not None, reason


def accepts(current: torch.Tensor, v_init: torch.Tensor | None = None) -> bool:
    """Whether ``lif_forward`` can take these inputs (else the caller runs the torch loop)."""
    if not _plain(current, torch.float32) or current.dim() < 1:
        return False
    if v_init is not None and not (_plain(v_init, torch.float32) and v_init.shape == current.shape[1:]):
        return False
    return available()[0]


def lif_forward(current, tau, v_th, v_reset, soft_reset, v_init=None, return_h=False):
    """cpu.lif_forward's contract: (uint8 spikes shaped like ``current``, h [T, ...] float32 or None)."""
    lib = _library()[0]
    spikes = torch.empty(current.shape, dtype=torch.uint8)
    hs = torch.empty(current.shape, dtype=torch.float32) if return_h else None
    mode = 2 if soft_reset else 0 if v_reset == 0 else 1  # native_lif.c's enum, by the torch loop's own test
    lib.bsd_lif_forward(_ptr(current), current.shape[0], math.prod(current.shape[1:]), tau, v_th, v_reset, mode,
                        _ptr(v_init), _ptr(spikes), _ptr(hs), torch.get_num_threads())
    return spikes, hs


def _plain(x: torch.Tensor, dtype: torch.dtype) -> bool:
    return x.device.type == "cpu" and x.dtype == dtype and x.is_contiguous()


def _ptr(x: torch.Tensor | None):
    return None if x is None or x.numel() == 0 else x.data_ptr()


def _library() -> tuple[ctypes.CDLL | None, str]:
    # the cache key is these strings: building Paths on every call cost 12 us, measured
    return _build(env.CC.get(), env.XDG_CACHE_HOME.get(), env.HOME.get() or "")


@functools.lru_cache(maxsize=None)
def _build(cc: str, xdg_cache: str, home: str) -> tuple[ctypes.CDLL | None, str]:
    """The library for this compiler, built once (with OpenMP if the compiler has it, else without)."""
    if not (xdg_cache or home):
        return None, "no cache directory for the native LIF kernel: neither XDG_CACHE_HOME nor HOME is set"
    cache = Path(xdg_cache or Path(home) / ".cache") / "bsdgraph"
    src = SOURCE.read_bytes()
    reason = ""
    for flags in (FLAGS + MARCH + OPENMP, FLAGS + OPENMP, FLAGS):
        key = hashlib.sha256(b"\0".join([CACHE_FORMAT, src, cc.encode(), _cpu(), *map(str.encode, flags)]))
        path = cache / f"native_lif-{key.hexdigest()[:16]}.so"
        error = _ready(cc, flags, path)
        if error is None:
            try:
                return _bind(ctypes.CDLL(str(path))), f"{cc} {' '.join(flags)} -> {path}"
            except OSError as err:
                error = f"loading {path} failed: {err}"
        reason = error
    warnings.warn(f"bsdgraph: native LIF kernel unavailable, using the torch loop: {reason}", stacklevel=2)
    return None, reason


def _cpu() -> bytes:
    """The CPU's feature flags: -march=native code is cached per CPU (a home directory may be shared)."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
    except OSError:
        return b""


def _ready(cc: str, flags: tuple[str, ...], path: Path) -> str | None:
    """Makes ``path`` a library that matches its SHA-256 record, building or rebuilding it; the failure, or None."""
    if not path.exists():
        return _compile(cc, flags, path)
    damage = _damage(path)
    if damage is None:
        return None
    # dlopen of a damaged file can SIGBUS (a truncated segment) or run garbage: never load it, replace it.
    error = _compile(cc, flags, path)
    if error is None:
        warnings.warn(f"bsdgraph: the cached native LIF kernel {path} was damaged ({damage}); rebuilt it",
                      stacklevel=3)
    return error


def _damage(path: Path) -> str | None:
    """Why ``path`` does not match its SHA-256 record, or None when it does."""
    try:
        recorded = _record(path).read_text().strip()
    except FileNotFoundError:
        return "no SHA-256 record"
    except (OSError, UnicodeDecodeError) as err:
        return f"unreadable SHA-256 record: {err}"
    try:
        actual = _sha256(path)
    except OSError as err:
        return f"unreadable: {err}"
    return None if actual == recorded else "SHA-256 does not match its record"


def _record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path | str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _compile(cc: str, flags: tuple[str, ...], path: Path) -> str | None:
    """Compiles native_lif.c to ``path`` atomically, then records its SHA-256; the failure, shortened, or None."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        return f"cannot write the native LIF kernel to {path.parent}: {err}"
    try:
        cmd = [*shlex.split(cc), *flags, str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            message = " | ".join((done.stderr or done.stdout).strip().splitlines()[:3])[:300]
            return f"{' '.join(cmd)} failed: {message}"
        digest = _sha256(tmp)  # of the file as compiled, before another process's rename can replace it
        os.replace(tmp, path)
    except (OSError, ValueError, subprocess.SubprocessError) as err:
        return f"compiler {cc!r} failed to run: {err}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    # Only now that the library is complete and in place: a record never vouches for a partial file. (A process
    # that looks between another's rename and its record, or pairs one build with another's record from a
    # non-deterministic compiler, sees damage: it costs a rebuild and a warning, never a bad load.)
    return _write_atomically(_record(path), digest + "\n")


def _write_atomically(path: Path, text: str) -> str | None:
    """Writes ``text`` to ``path`` by temp file + rename; the failure, or None."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:
        return f"cannot write {path}: {err}"
    return None


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.bsd_lif_forward.argtypes = [_P, _I64, _I64, _F, _F, _F, ctypes.c_int, _P, _P, _P, ctypes.c_int]
    lib.bsd_lif_forward.restype = None
    return lib
