"""runtime/heap.py: freed memory stays in the heap, so a step's large tensors are not paged in afresh."""

import os
import subprocess
import sys

import pytest

from bsdgraph.runtime import heap

# In a fresh process's main thread (a test worker's heap may be fragmented, and glibc serves threads other than
# the main one from 64 MiB arenas that a large tensor never fits in): page faults of a 64 MiB tensor allocated
# again after four were allocated, touched and freed, as a training step's tensors are at every step. After only
# two, 2-4 fresh processes in 16 still faulted every page in (glibc 2.36; the heap had not reached its steady
# state yet); after four, 0 in 56.
PROBE = """
import resource, torch
from bsdgraph.runtime import heap
print(heap.keep_freed_memory())
for _ in range(4):
    torch.ones(16 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(keep: str) -> tuple[str, int]:
    env = {**os.environ, "BSDGRAPH_KEEP_HEAP": keep}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    took, faults = out.split()
    return took, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    took, faults = _probe("1")
    assert took == "True"
    assert faults < 1000, f"{faults} page faults for a 64 MiB tensor allocated again (measured 0 with the heap kept)"
    took, faults = _probe("0")  # the control: glibc's defaults unmap it and fault every 4 KiB page in again
    assert took == "False" and faults > 10_000, faults


def test_the_knob_leaves_glibc_alone(monkeypatch):
    monkeypatch.setenv("BSDGRAPH_KEEP_HEAP", "0")
    heap.keep_freed_memory.cache_clear()
    try:
        assert heap.keep_freed_memory() is False
    finally:
        heap.keep_freed_memory.cache_clear()
