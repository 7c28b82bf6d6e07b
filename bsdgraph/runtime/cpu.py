"""The cpu backend: the plan executed with torch kernels and explicit local gradients (no autograd over time)."""

from __future__ import annotations

import torch

from bsdgraph.runtime.executor import Executor
from bsdgraph.runtime.torch_kernels import KERNELS, TWIN_PRIMS


@torch.no_grad()
def lif_forward(current, tau, v_th, v_reset, soft_reset, v_init=None, return_h=False):
    """The twin's LIF (kernels/ref/lif.py) with preallocated outputs and no autograd bookkeeping.

    h is computed with the twin's exact expression, so spikes are bit-identical; the hard reset uses
    ``where`` (exact: h*(1-s) + v_reset*s is h or v_reset when s is 0 or 1)."""
    v = torch.zeros_like(current[0]) if v_init is None else v_init.clone()
    spikes = torch.empty(current.shape, dtype=torch.uint8)
    hs = torch.empty_like(current) if return_h else None
    for t in range(current.shape[0]):
        h = v + (current[t] - (v - v_reset)) / tau
        s = h >= v_th
        spikes[t] = s
        if hs is not None:
            hs[t] = h
        v = h - v_th * s if soft_reset else torch.where(s, v_reset, h)
    return spikes, hs


class CPURuntime(Executor):
    name = "cpu"

    def __init__(self, g, **kwargs):
        super().__init__(g, KERNELS, {**TWIN_PRIMS, "lif_forward": lif_forward}, **kwargs)
