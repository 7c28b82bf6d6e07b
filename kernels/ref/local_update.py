"""Torch twin of ``kernels/local_update.py``: the weight gradient of a Linear synapse from its local loss."""

from __future__ import annotations

import math
from typing import Optional

import torch


def weight_grad(
    grad_out: torch.Tensor, inp: torch.Tensor, with_bias: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """dW = grad_outᵀ @ inp ([N, K]) and db = Σ_rows grad_out ([N]) if with_bias; leading dims are flattened."""
    m = math.prod(grad_out.shape[:-1])
    g = grad_out.reshape(m, grad_out.shape[-1])
    x = inp.reshape(m, inp.shape[-1]).to(g.dtype)
    return g.T @ x, (g.sum(0) if with_bias else None)
