"""Torch twin of ``kernels/linear_lif.py``: a Linear synapse followed by the LIF neuron of ``ref/lif.py``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kernels.ref.lif import lif_forward, lif_step


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
