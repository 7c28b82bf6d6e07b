"""Keep freed memory in the process heap instead of handing it back to the OS (glibc ``mallopt``).

Why: glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh ``mmap`` and
returns it with ``munmap`` on free, so each large tensor a step creates is paged in again, one page fault per
4 KiB, which on this VM costs more than the arithmetic. A CNN step (fmnist_cnn, batch 128: [512, 32, 28, 28]
activations of 51 MB) took 1870 ms with glibc's defaults and 890 ms with freed memory kept (nearest upsampling
alone: 40,000 faults and 121 ms per call against 6,300 and 33 ms). A training process reuses the same sizes every
step, so the retained heap is the step's own peak, not a leak.

``keep_freed_memory()`` is called by the cpu backend's constructor and changes the whole process (every
candidate of ``bsdgraph bench --compare`` benefits alike). ``BSDGRAPH_KEEP_HEAP=0`` leaves glibc's defaults;
on a C library without ``mallopt`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools

from bsdgraph import env

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 1 << 30   # allocations below 1 GiB come from the heap (mallopt takes a C int)
_TRIM_THRESHOLD = 2**31 - 1  # and freed memory stays there unless 2 GiB lie unused at its top


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process; whether it took effect."""
    if not env.KEEP_HEAP.get():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
