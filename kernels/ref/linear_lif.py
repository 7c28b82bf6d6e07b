"""Torch twin of ``kernels/linear_lif.py``: a Linear synapse followed by the LIF neuron of ``ref/lif.py``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kernels.ref.lif import lif_forward


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
