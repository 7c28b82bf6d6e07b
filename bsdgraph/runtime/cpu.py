"""The cpu backend: the plan executed with torch kernels and explicit local gradients (no autograd over time)."""

from __future__ import annotations

from bsdgraph.runtime.executor import Executor
from bsdgraph.runtime.torch_kernels import KERNELS, TWIN_PRIMS


class CPURuntime(Executor):
    name = "cpu"

    def __init__(self, g, **kwargs):
        super().__init__(g, KERNELS, TWIN_PRIMS, **kwargs)
