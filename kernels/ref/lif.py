"""Torch twin of ``kernels/lif.py``: the executable specification of the discrete LIF neuron.

Same signatures as the Triton launchers. Any float dtype is accepted (tests run the twin in float64 to get a
reference that is more accurate than the fp32 kernels). The forward is a plain loop over time; the backward is
*autograd* through that same loop, with a custom spike function whose gradient is the atan surrogate, so the
kernel's hand-derived recurrence is checked against the chain rule rather than against a second hand derivation.

Neuron, per step t (τ in steps; v[-1] = v_init, default 0):

    h[t] = v[t-1] + (I[t] - (v[t-1] - v_reset)) / τ
    s[t] = 1 if h[t] >= v_th else 0
    v[t] = v_reset if s[t] else h[t]        (hard reset)
    v[t] = h[t] - v_th * s[t]               (soft reset)

Surrogate derivative (atan): ds/dh = α / (2 (1 + (π α (h - v_th) / 2)^2)).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch


def as_float32(x: float) -> float:
    """``x`` rounded to float32 with subnormals flushed to zero, for a scalar kernel argument.

    Triton types a Python float outside the normal float32 range (0 < |x| < 2^-126) as fp64; measured here, the
    interpreter then fails inside ``div_rn`` ("Expected dtype ['fp32'] but got fp64"). The kernels compute in
    float32, so rounding first changes no result beyond what the kernel's arithmetic does anyway.
    """
    y = float(torch.tensor(float(x), dtype=torch.float32))
    return y if abs(y) >= 2.0**-126 else 0.0


def atan_surrogate(h: torch.Tensor, v_th: float, alpha: float) -> torch.Tensor:
    """ds/dh of the atan surrogate at membrane potential ``h``."""
    x = math.pi * alpha * (h - v_th) / 2
    return alpha / (2 * (1 + x * x))


class SpikeFn(torch.autograd.Function):
    """Heaviside forward (h >= v_th), atan-surrogate backward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, v_th: float, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(h)
        ctx.v_th, ctx.alpha = v_th, alpha
        return (h >= v_th).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_s: torch.Tensor):
        (h,) = ctx.saved_tensors
        return grad_s * atan_surrogate(h, ctx.v_th, ctx.alpha), None, None


def lif_recurrence(
    current: torch.Tensor,
    tau: float,
    v_th: float,
    v_reset: float,
    soft_reset: bool,
    v_init: Optional[torch.Tensor],
    spike: Callable[[torch.Tensor], torch.Tensor],
    pinned_h: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the neuron over ``current`` [T, *]; returns (spikes, h) in ``current``'s dtype.

    ``spike`` maps h to 0/1 (a plain comparison, or ``SpikeFn`` when a gradient is wanted). ``pinned_h`` (used by
    the backward) replaces the *value* of h at every step by the recorded forward's h while keeping the gradient
    of the recurrence: ``pinned + (h - h.detach())``, whose value is ``pinned`` exactly (``h + (pinned - h).detach()``
    can round one ulp off it and flip a spike at h = v_th). The backward receives h but not I or v_init, and this makes
    autograd see exactly the forward's spike pattern and surrogate values, whatever they were.
    """
    v = torch.zeros_like(current[0]) if v_init is None else v_init.to(current.dtype)
    spikes, hs = [], []
    for t in range(current.shape[0]):
        s, h, v = lif_step(v, current[t], tau, v_th, v_reset, soft_reset, spike,
                           None if pinned_h is None else pinned_h[t])
        spikes.append(s)
        hs.append(h)
    return torch.stack(spikes), torch.stack(hs)


def lif_step(v, current, tau, v_th, v_reset, soft_reset, spike, pinned_h=None):
    """One step of the neuron from membrane ``v``: (s[t], h[t], v[t])."""
    h = v + (current - (v - v_reset)) / tau
    if pinned_h is not None:
        h = pinned_h + (h - h.detach())  # the value exactly pinned_h, the gradient of h
    s = spike(h)
    return s, h, (h - v_th * s if soft_reset else h * (1 - s) + v_reset * s)


def lif_forward(
    current: torch.Tensor,
    tau: float,
    v_th: float,
    v_reset: float,
    soft_reset: bool,
    v_init: Optional[torch.Tensor] = None,
    return_h: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Spikes (uint8, shape of ``current``) and, if ``return_h``, the pre-reset membrane h (dtype of current)."""
    with torch.no_grad():
        spikes, h = lif_recurrence(
            current, tau, v_th, v_reset, soft_reset, v_init, lambda x: (x >= v_th).to(x.dtype)
        )
    return spikes.to(torch.uint8), (h if return_h else None)


def lif_backward(
    grad_h: torch.Tensor,
    h: torch.Tensor,
    tau: float,
    v_th: float,
    v_reset: float,
    soft_reset: bool,
    alpha: float = 2.0,
) -> torch.Tensor:
    """dL/dI[t] given dL/dh[t] for all t and the forward's h, by autograd through ``lif_recurrence``."""
    with torch.enable_grad():
        current = torch.zeros_like(h, requires_grad=True)
        _, h_graph = lif_recurrence(
            current, tau, v_th, v_reset, soft_reset, None, lambda x: SpikeFn.apply(x, v_th, alpha), pinned_h=h
        )
        (grad_current,) = torch.autograd.grad(h_graph, current, grad_h)
    return grad_current
