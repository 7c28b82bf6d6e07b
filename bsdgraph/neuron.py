"""The discrete LIF neuron of the spec, in plain torch with autograd: the contract kernels are tested against.

Per step t, per neuron (tau in steps):

    h[t] = v[t-1] + (I[t] - (v[t-1] - v_reset)) / tau
    s[t] = 1 if h[t] >= v_th else 0
    v[t] = v_reset if s[t] else h[t]        (hard reset)      v[t] = h[t] - v_th s[t]   (soft reset)
    v[-1] = 0

The spike's gradient is the atan surrogate ds/dh = alpha / (2 (1 + (pi alpha (h - v_th) / 2)^2)); it only matters
where a loss is taken through a spike (``distill_on=membrane``). The reset is differentiated through the
surrogate too (the "reset path").
"""

from __future__ import annotations

import math

import torch


def atan_surrogate(h_minus_th: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha / (2 * (1 + (math.pi * alpha * h_minus_th / 2) ** 2))


class SpikeFn(torch.autograd.Function):
    """Heaviside forward (h - v_th >= 0), atan surrogate backward."""

    @staticmethod
    def forward(ctx, h_minus_th: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(h_minus_th)
        ctx.alpha = alpha
        return (h_minus_th >= 0).to(h_minus_th.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (h_minus_th,) = ctx.saved_tensors
        return grad * atan_surrogate(h_minus_th, ctx.alpha), None


def lif_scan(current: torch.Tensor, tau: float, v_th: float, v_reset: float, soft_reset: bool,
             alpha: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the LIF over ``current`` [T, ...]; returns (spikes as 0/1 floats, pre-reset membrane h), both [T, ...]."""
    v = torch.zeros_like(current[0])
    spikes, hs = [], []
    for t in range(current.shape[0]):
        h = v + (current[t] - (v - v_reset)) / tau
        s = SpikeFn.apply(h - v_th, alpha)
        v = h - v_th * s if soft_reset else h * (1 - s) + v_reset * s
        spikes.append(s)
        hs.append(h)
    return torch.stack(spikes), torch.stack(hs)
