"""runtime/heap.py: freed memory stays in the heap, so a step's large tensors are not paged in afresh."""

import resource
import sys

import pytest
import torch

from bsdgraph.runtime import heap


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_large_tensor_is_reused_without_page_faults(monkeypatch):
    monkeypatch.delenv("BSDGRAPH_KEEP_HEAP", raising=False)
    heap.keep_freed_memory.cache_clear()
    assert heap.keep_freed_memory()
    n = 16 * 2**20  # 64 MiB of float32: above glibc's largest dynamic mmap threshold (32 MiB)
    for _ in range(2):  # allocated, touched, freed into the heap (measured: the first two page it in)
        torch.ones(n)
    before = _faults()
    x = torch.ones(n)
    # with glibc's defaults this is ~16,000 faults (one per 4 KiB page); measured 0-2 with the heap kept
    assert _faults() - before < 1000, f"{_faults() - before} page faults for a 64 MiB tensor allocated again"
    del x


def test_the_knob_leaves_glibc_alone(monkeypatch):
    monkeypatch.setenv("BSDGRAPH_KEEP_HEAP", "0")
    heap.keep_freed_memory.cache_clear()
    try:
        assert heap.keep_freed_memory() is False
    finally:
        heap.keep_freed_memory.cache_clear()
