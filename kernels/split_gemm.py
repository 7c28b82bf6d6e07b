"""0/1 spikes times an fp32 weight on bf16 tensor cores, with fp32-level accuracy by splitting the weight.

Contract (twin, derivation and error bound: ``kernels/ref/split_gemm.py``):

    spike_linear_split(spikes, weight, bias, parts=3) -> float32 [..., N]
        spikes  uint8 or float32 [..., K] holding 0/1 (leading dims are flattened to M rows)
        weight  float32 [N, K], |w| < 3.39e38 (bf16's largest finite value);  bias float32 [N] or None
        parts   1, 2 or 3: W ≈ w_hi + w_mid + w_lo with w_hi = bf16(W), w_mid = bf16(W - w_hi),
                w_lo = bf16(W - w_hi - w_mid) (round to nearest even); parts = 1 is plain bf16 weights
        out = Σ_parts spikes @ partᵀ + bias, each part a bf16 x bf16 tl.dot with fp32 accumulation

Spikes are exact in bf16 and s·p is exact in fp32, so the only errors are the split residual (<= 2^(-8·parts)
relative; 0 for parts = 3 and normal weights) and the fp32 sums: ``split_error_bound`` in the twin.
Values other than 0/1 in float32 spikes are outside the contract (a GPU rounds them to bf16, the interpreter
does not).

Where the split happens: inside the kernel, on the fp32 weight tile after it is loaded. The weight is then read
once as fp32 (4 bytes per weight per M block). Splitting in the launcher instead would cost a torch pass that
reads 4 and writes 2·parts bytes per weight, plus the kernel's 2·parts bytes per M block: at M = 16, K = N =
4096, where every weight is used by one M block and reading W is the whole cost, that is 16 instead of 4 bytes
per weight for parts = 3 (more with an unfused torch split); and the parts cannot be cached across calls because
training changes W every step. The price is that every M block re-splits its W tile (~20 integer/fp32 ops per
weight for parts = 3; 8 M blocks at M = 512). Nothing here is measured: no GPU was available.
The rounding is done on the bits (``_round_bf16``), not with ``.to(tl.bfloat16)``: the interpreter's fp32 ->
bf16 cast truncates (checked on triton 3.7.1) while a GPU rounds to nearest even, so a cast-based split would be
tested under another rounding than it runs with. The bit version gives the parts torch's ``.to(torch.bfloat16)``
gives, on both.

The dot: on a GPU the fp32 parts (bf16-representable, so the cast is exact) are cast to bf16 and multiplied on
tensor cores. The interpreter multiplies bf16 bit patterns as integers (``tl.dot`` on bf16 is wrong there), so
under it the same parts stay in fp32 for an IEEE fp32 dot: the same exact products, summed in fp32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.lif import block_size, check_tensor, is_interpreted
from kernels.ref.split_gemm import check_split_args

# Output tiles start at 64 x 64, or the smallest power of two >= 16 covering M or N (at 64 x 64: two fp32
# accumulators of 32 registers per thread with 4 warps, plus the fp32 W tile and its parts), and shrink until the grid has TARGET_PROGRAMS programs, the SM count of an H100 SXM: N
# first (a narrower N block costs nothing extra), then M (each extra M block re-splits the weights). K steps of
# 32. tl.dot needs >= 16 in every dimension on a GPU, so tiles never go below 16; smaller M, N, K are masked.
# Grids at the shapes that matter:
#   M = T·B = 512, K = 784,  N = 1024: 64 x 32 tiles -> 8 x 32 = 256 programs
#   M = 16,        K = 4096, N = 4096: 16 x 16 tiles -> 1 x 256 = 256 programs
# No split-K: narrower tiles reach 256 programs at both shapes without a workspace and a second reduction pass
# (which would also add roundings). Not tuned (no GPU), no autotune (house style).
MAX_BLOCK_M, MAX_BLOCK_N, MIN_BLOCK, BLOCK_K = 64, 64, 16, 32
TARGET_PROGRAMS = 132


def tiles(M: int, N: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for an [M, N] output: see the comment above."""
    bm, bn = block_size(M, MIN_BLOCK, MAX_BLOCK_M), block_size(N, MIN_BLOCK, MAX_BLOCK_N)
    while triton.cdiv(M, bm) * triton.cdiv(N, bn) < TARGET_PROGRAMS and bn > MIN_BLOCK:
        bn //= 2
    while triton.cdiv(M, bm) * triton.cdiv(N, bn) < TARGET_PROGRAMS and bm > MIN_BLOCK:
        bm //= 2
    return bm, bn


@triton.jit
def _round_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 (ties to even), as fp32: add 0x7FFF plus the lowest kept bit, clear
    the 16 dropped bits (c10's float -> BFloat16 rounding)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot_part(s, part, acc, BF16_DOT: tl.constexpr):
    """acc + s @ part; ``part`` holds bf16 values in fp32 and ``s`` is bf16 (GPU) or fp32 (interpreter)."""
    if BF16_DOT:
        return tl.dot(s, part.to(tl.bfloat16), acc, out_dtype=tl.float32)
    else:
        return tl.dot(s, part, acc, input_precision="ieee")


@triton.jit
def _split_linear_kernel(
    s_ptr, w_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_sm, stride_sk, stride_wn, stride_wk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PARTS: tl.constexpr, HAS_BIAS: tl.constexpr, BF16_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Two accumulators: w_hi's products in one, the small w_mid and w_lo products (<= 2^-7 of them) in the other,
    # so that their sum is not rounded at the scale of the large one at every step (the bound's c_2 term).
    acc_hi = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_k[None, :] * stride_sk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0)
        if BF16_DOT:  # 0/1: exact either way
            s = s.to(tl.bfloat16)
        else:
            s = s.to(tl.float32)
        # W tile read transposed, [BLOCK_K, BLOCK_N]; masked lanes are 0, whose parts are 0.
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        hi = _round_bf16(w)
        acc_hi = _dot_part(s, hi, acc_hi, BF16_DOT)
        if PARTS >= 2:
            residual = w - hi  # exact in fp32 (twin docstring, step 1)
            mid = _round_bf16(residual)
            acc_lo = _dot_part(s, mid, acc_lo, BF16_DOT)
            if PARTS == 3:
                lo = _round_bf16(residual - mid)
                acc_lo = _dot_part(s, lo, acc_lo, BF16_DOT)
    out = acc_hi + acc_lo
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, out,
             mask=mask_m[:, None] & mask_n[None, :])


def spike_linear_split(
    spikes: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], parts: int = 3
) -> torch.Tensor:
    """float32 [..., N] = spikes @ weightᵀ + bias through ``parts`` bf16 parts; see the module docstring."""
    fn = "spike_linear_split"
    check_split_args(fn, spikes, weight, bias, parts)
    check_tensor(fn, "spikes", spikes, [torch.uint8, torch.float32], _split_linear_kernel)
    check_tensor(fn, "weight", weight, [torch.float32], _split_linear_kernel)
    if bias is not None:
        check_tensor(fn, "bias", bias, [torch.float32], _split_linear_kernel)
    N, K = weight.shape
    M = math.prod(spikes.shape[:-1])
    out = torch.empty((*spikes.shape[:-1], N), dtype=torch.float32, device=spikes.device)
    if M * N == 0:
        return out
    s, o = spikes.reshape(M, K), out.view(M, N)
    BLOCK_M, BLOCK_N = tiles(M, N)
    _split_linear_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
        s, weight, weight if bias is None else bias, o,
        M, N, K,
        s.stride(0), s.stride(1), weight.stride(0), weight.stride(1), o.stride(0), o.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PARTS=int(parts), HAS_BIAS=bias is not None,
        BF16_DOT=not is_interpreted(_split_linear_kernel),
    )
    return out
