"""Torch twin of ``kernels/linear_lif.py``: a Linear synapse followed by the LIF neuron of ``ref/lif.py``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kernels.ref.lif import atan_surrogate, lif_forward, lif_step


def linear_lif_forward(
    s_in: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    tau: float,
    v_th: float,
    v_reset: float,
    soft_reset: bool,
    return_v: bool = False,
    return_h: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """I[t] = s_in[t] @ weightᵀ + bias, then LIF over t.

    Returns (spikes uint8 [T, B, N], V = I if return_v, h if return_h); potentials in ``weight``'s dtype.
    """
    current = F.linear(s_in.to(weight.dtype), weight, bias)
    spikes, h = lif_forward(current, tau, v_th, v_reset, soft_reset, return_h=return_h)
    return spikes, (current if return_v else None), h


def linear_lif_rec_forward(
    s_in: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rec_weight: torch.Tensor,
    rec_bias: Optional[torch.Tensor],
    tau: float,
    v_th: float,
    v_reset: float,
    soft_reset: bool,
    return_v: bool = False,
    return_h: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """A recurrent layer: I[t] = s_in[t] @ weightᵀ + bias + s[t-1] @ rec_weightᵀ + rec_bias (s[-1] = 0), then LIF.

    ``rec_weight`` is [N, N]. Returns (spikes uint8 [T, B, N], V = I if return_v, h if return_h)."""
    ff = F.linear(s_in.to(weight.dtype), weight, bias)
    return rec_lif_forward(ff, rec_weight, rec_bias, tau, v_th, v_reset, soft_reset, return_v, return_h)


def rec_lif_forward(ff, rec_weight, rec_bias, tau, v_th, v_reset, soft_reset, return_v=False, return_h=False):
    """The recurrent part given the feedforward current ``ff`` [T, B, N]: I[t] = ff[t] + s[t-1] @ rec_weightᵀ +
    rec_bias, then the LIF of ``ref/lif.py``."""
    v = torch.zeros_like(ff[0])
    s = torch.zeros_like(ff[0])
    spikes, currents, hs = [], [], []
    with torch.no_grad():
        for t in range(ff.shape[0]):
            current = ff[t] + F.linear(s, rec_weight, rec_bias)
            s, h, v = lif_step(v, current, tau, v_th, v_reset, soft_reset, lambda x: (x >= v_th).to(x.dtype))
            spikes.append(s)
            currents.append(current)
            hs.append(h)
    return (torch.stack(spikes).to(torch.uint8), torch.stack(currents) if return_v else None,
            torch.stack(hs) if return_h else None)


def rec_lif_backward(grad_v, h, rec_weight, tau, v_th, v_reset, soft_reset, alpha=2.0):
    """A recurrent LIF layer's credit through time: dL/dV[t] given the loss's own dL/dV[t] (``grad_v`` [T, B, N])
    and the forward's pre-reset membrane ``h``, where V[t] = ff[t] + s[t-1] @ rec_weightᵀ feeds the LIF.

    V[t] reaches the loss directly and, through h[t], both later paths: the spike s[t] (atan surrogate, as
    ``ref/lif.py``'s SpikeFn) into V[t+1] by ``rec_weight``, and the membrane v[t] (reset included: with
    v = h(1 - s) + v_reset s, dv/dh = (1 - s) + (v_reset - h) ds/dh) into h[t+1]. Backward over t:

        a[t] = (g[t+1] @ rec_weight) ds/dh[t] + a[t+1] (1 - 1/tau) dv/dh[t]      (a = dL/dh, zero after T-1)
        g[t] = grad_v[t] + a[t] / tau                                              (dh[t]/dV[t] = 1/tau)

    Closed form in torch ops (one [B, N] x [N, N] GEMM per step, no autograd, so a compiled step traces it); the
    backends' primitive for ``rec_lif_time_grad``. tests/test_through_time.py checks it against autograd through
    ``lif_step`` with the forward's h pinned, and the whole step against the reference runtime."""
    g = torch.empty_like(grad_v)
    a = torch.zeros_like(grad_v[0])
    g_next = None
    for t in range(grad_v.shape[0] - 1, -1, -1):
        ht = h[t]
        sur = atan_surrogate(ht, v_th, alpha)
        if soft_reset:
            dv_dh = 1 - v_th * sur
        else:
            dv_dh = (ht < v_th).to(ht.dtype) + (v_reset - ht) * sur
        a = a * ((1 - 1 / tau) * dv_dh)
        if g_next is not None:
            a = a + (g_next @ rec_weight) * sur
        g[t] = grad_v[t] + a / tau
        g_next = g[t]
    return g
