"""The cpu backend: the plan executed with torch kernels and explicit local gradients (no autograd over time)."""

from __future__ import annotations

import torch

from bsdgraph.runtime.executor import Executor
from bsdgraph.runtime.philox import poisson_encode
from bsdgraph.runtime.torch_kernels import KERNELS, TWIN_PRIMS


@torch.no_grad()
def lif_forward(current, tau, v_th, v_reset, soft_reset, v_init=None, return_h=False):
    """The twin's LIF (kernels/ref/lif.py) in place, with preallocated outputs and no autograd bookkeeping."""
    spikes, _, hs = _lif_loop(lambda t, s_prev: current[t], current.shape, current.dtype, tau, v_th, v_reset,
                              soft_reset, v_init, return_h)
    return spikes, hs


@torch.no_grad()
def rec_lif_forward(ff, rec_weight, rec_bias, tau, v_th, v_reset, soft_reset, return_v=False, return_h=False):
    """A recurrent layer given its feedforward current ``ff`` [T, B, N]: I[t] = ff[t] + s[t-1] Uᵀ + b_U, then the
    LIF; bit-identical to kernels/ref/linear_lif.linear_lif_rec_forward (same expression, same order)."""
    currents = torch.empty(ff.shape, dtype=ff.dtype) if return_v else None

    def current_at(t, s_prev):
        i = ff[t] + torch.nn.functional.linear(s_prev.to(ff.dtype), rec_weight, rec_bias)
        if currents is not None:
            currents[t] = i
        return i

    spikes, _, hs = _lif_loop(current_at, ff.shape, ff.dtype, tau, v_th, v_reset, soft_reset, None, return_h)
    return spikes, currents, hs


def _lif_loop(current_at, shape, dtype, tau, v_th, v_reset, soft_reset, v_init, return_h):
    """h is computed with the twin's exact expression (v - 0.0 is v exactly, so that subtraction is skipped for a
    zero reset), so spikes and h are bit-identical to the twin's; the hard reset is a masked fill (exact:
    h*(1-s) + v_reset*s is h or v_reset when s is 0 or 1). ``current_at(t, s[t-1])`` gives step t's current."""
    v = torch.zeros(shape[1:], dtype=dtype) if v_init is None else v_init.clone()
    spikes = torch.empty(shape, dtype=torch.uint8)
    hs = torch.empty(shape, dtype=dtype) if return_h else None
    fired = torch.zeros(shape[1:], dtype=torch.bool)
    for t in range(shape[0]):
        leak = v if v_reset == 0 else v - v_reset
        h = torch.sub(current_at(t, fired), leak).div_(tau).add_(v)  # v + (I - (v - v_reset)) / tau, same rounding
        torch.ge(h, v_th, out=fired)
        spikes[t] = fired
        if hs is not None:
            hs[t] = h
        v = h.sub_(fired * v_th) if soft_reset else h.masked_fill_(fired, v_reset)
    return spikes, None, hs


class CPURuntime(Executor):
    name = "cpu"

    def __init__(self, g, **kwargs):
        super().__init__(g, KERNELS, {**TWIN_PRIMS, "lif_forward": lif_forward, "rec_lif_forward": rec_lif_forward,
                                      "poisson_encode": poisson_encode}, **kwargs)
