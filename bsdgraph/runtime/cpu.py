"""The cpu backend: the plan executed with torch kernels and explicit local gradients (no autograd over time)."""

from __future__ import annotations

import torch

from bsdgraph.runtime.executor import Executor
from bsdgraph.runtime.philox import poisson_encode
from bsdgraph.runtime.torch_kernels import KERNELS, TWIN_PRIMS


@torch.no_grad()
def lif_forward(current, tau, v_th, v_reset, soft_reset, v_init=None, return_h=False):
    """The twin's LIF (kernels/ref/lif.py) in place, with preallocated outputs and no autograd bookkeeping.

    h is computed with the twin's exact expression (v - 0.0 is v exactly, so that subtraction is skipped for a
    zero reset), so spikes and h are bit-identical to the twin's; the hard reset is a masked fill (exact:
    h*(1-s) + v_reset*s is h or v_reset when s is 0 or 1)."""
    v = torch.zeros_like(current[0]) if v_init is None else v_init.clone()
    spikes = torch.empty(current.shape, dtype=torch.uint8)
    hs = torch.empty_like(current) if return_h else None
    fired = torch.empty(current.shape[1:], dtype=torch.bool)
    for t in range(current.shape[0]):
        leak = v if v_reset == 0 else v - v_reset
        h = torch.sub(current[t], leak).div_(tau).add_(v)  # v + (I - (v - v_reset)) / tau, same rounding
        torch.ge(h, v_th, out=fired)
        spikes[t] = fired
        if hs is not None:
            hs[t] = h
        v = h.sub_(fired * v_th) if soft_reset else h.masked_fill_(fired, v_reset)
    return spikes, hs


class CPURuntime(Executor):
    name = "cpu"

    def __init__(self, g, **kwargs):
        super().__init__(g, KERNELS, {**TWIN_PRIMS, "lif_forward": lif_forward, "poisson_encode": poisson_encode},
                         **kwargs)
