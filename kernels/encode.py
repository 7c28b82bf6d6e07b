"""Poisson encoding: Bernoulli spikes with rate x at every time step, reproducible from a seed.

Contract (twin: ``kernels/ref/encode.py``, which reproduces ``tl.rand`` exactly):

    poisson_encode(x, T, seed) -> spikes
        x       float32 [B, *] contiguous, rates in [0, 1] (values outside saturate: x <= 0 never spikes,
                x >= 1 always does; not checked, as that would need a device sync)
        T       int >= 1;  seed int in [0, 2^63)
        spikes  uint8 [T, B, *];  spikes[t, i] = 1 if u < x[i], u = tl.rand(seed, t·numel(x) + i)

The Philox counter is the flat index of the output element, so the stream does not depend on the block size
or the grid, and the same seed gives the same spikes on CPU (interpreter) and GPU. The counter is int64:
T·numel(x) may exceed 2^31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.lif import block_size, check_tensor
from kernels.ref.encode import check_encode_args

MAX_BLOCK = 1024


@triton.jit
def _poisson_kernel(x_ptr, out_ptr, numel, seed, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    flat = tl.cast(t, tl.int64) * numel + offs  # output index = Philox counter
    u = tl.rand(seed, flat)
    tl.store(out_ptr + flat, (u < x).to(tl.uint8), mask=mask)


def poisson_encode(x: torch.Tensor, T: int, seed: int) -> torch.Tensor:
    """uint8 [T, *x.shape] Bernoulli(x) spikes; see the module docstring for the contract."""
    fn = "poisson_encode"
    check_tensor(fn, "x", x, [torch.float32], _poisson_kernel, min_ndim=1)
    check_encode_args(fn, T, seed)
    out = torch.empty((T, *x.shape), dtype=torch.uint8, device=x.device)
    numel = x.numel()
    if numel == 0:
        return out
    BLOCK = block_size(numel, 16, MAX_BLOCK)
    _poisson_kernel[(triton.cdiv(numel, BLOCK), T)](x, out, numel, seed, BLOCK=BLOCK)
    return out
