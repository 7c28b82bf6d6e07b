"""Weight gradient of a Linear synapse from its layer-local loss: dW = grad_outᵀ @ inp, db = Σ grad_out.

Contract (twin: ``kernels/ref/local_update.py``):

    weight_grad(grad_out, inp, with_bias) -> (dW, db | None)
        grad_out  float32 [..., N]   (∂L/∂V for the layer's current; leading dims, e.g. [T, B], are flattened to M)
        inp       uint8 (spikes) or float32 [..., K] with the same leading dims (the detached input of the synapse)
        dW        float32 [N, K] = Σ_m grad_out[m, :]ᵀ inp[m, :];  db float32 [N] = Σ_m grad_out[m, :] if with_bias

One program owns an (N block × K block) tile of dW and loops over the M rows with ``tl.dot`` (grad_out is read
transposed through its strides; no copy). The programs of the first K block also accumulate db from the tiles
they already loaded.

Conv synapses use torch's conv weight gradient (``torch.nn.grad.conv2d_weight`` / autograd on the conv with
a detached input) in the runtime: an implicit-GEMM Triton kernel for it is out of scope for now.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.lif import block_size, check_same_device, check_tensor

# 64x64 dW tiles, M walked 32 rows at a time (>= 16 for tl.dot on a GPU). Not tuned: no GPU here.
MAX_BLOCK_N, MAX_BLOCK_K, MAX_BLOCK_M = 64, 64, 32


@triton.jit
def _weight_grad_kernel(
    g_ptr, x_ptr, dw_ptr, db_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, WITH_BIAS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        # grad_out tile read as its transpose [BLOCK_N, BLOCK_M].
        g_t = tl.load(g_ptr + offs_n[:, None] * stride_gn + offs_m[None, :] * stride_gm,
                      mask=mask_n[:, None] & mask_m[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0)
        # "ieee": TF32 (the fp32 default on NVIDIA) would round grad_out to 10 mantissa bits.
        acc = tl.dot(g_t, x.to(tl.float32), acc, input_precision="ieee")
        if WITH_BIAS:
            acc_b += tl.sum(g_t, axis=1)
    tl.store(dw_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, acc,
             mask=mask_n[:, None] & mask_k[None, :])
    if WITH_BIAS:
        tl.store(db_ptr + offs_n, acc_b, mask=mask_n & (pid_k == 0))


def weight_grad(
    grad_out: torch.Tensor, inp: torch.Tensor, with_bias: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """dW [N, K] and db [N] (or None) of a Linear synapse; see the module docstring for the contract."""
    fn = "weight_grad"
    check_tensor(fn, "grad_out", grad_out, [torch.float32], _weight_grad_kernel, min_ndim=2)
    check_tensor(fn, "inp", inp, [torch.uint8, torch.float32], _weight_grad_kernel, min_ndim=2)
    if grad_out.shape[:-1] != inp.shape[:-1]:
        raise ValueError(
            f"{fn}: grad_out [..., N] and inp [..., K] must have equal leading dims, got {tuple(grad_out.shape)} "
            f"and {tuple(inp.shape)}"
        )
    check_same_device(fn, grad_out=grad_out, inp=inp)
    N, K = grad_out.shape[-1], inp.shape[-1]
    M = math.prod(grad_out.shape[:-1])
    g = grad_out.reshape(M, N)
    x = inp.reshape(M, K)
    dw = torch.empty((N, K), dtype=torch.float32, device=grad_out.device)
    db = torch.empty((N,), dtype=torch.float32, device=grad_out.device) if with_bias else None
    if N == 0:
        return dw, db
    BLOCK_N, BLOCK_K = block_size(N, 16, MAX_BLOCK_N), block_size(K, 16, MAX_BLOCK_K)
    BLOCK_M = block_size(M, 16, MAX_BLOCK_M)
    # At least one K block even when K == 0, so that db is still computed; M == 0 gives zeros (empty sums).
    _weight_grad_kernel[(triton.cdiv(N, BLOCK_N), max(1, triton.cdiv(K, BLOCK_K)))](
        g, x, dw, dw if db is None else db,
        M, N, K,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M, WITH_BIAS=bool(with_bias),
    )
    return dw, db
