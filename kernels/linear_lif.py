"""Linear synapse fused with the LIF neuron: spikes in, spikes out, the current never touches memory.

Contract (twin: ``kernels/ref/linear_lif.py``):

    linear_lif_forward(s_in, weight, bias, tau, v_th, v_reset, soft_reset, return_v=False, return_h=False)
        -> (spikes, V | None, h | None)
        s_in    [T, B, K] uint8 (0/1 spikes) or float32 (e.g. the analog image of direct encoding)
        weight  float32 [N, K];  bias float32 [N] or None
        I[t] = s_in[t] @ weightᵀ + bias                     (fp32 accumulation, IEEE products)
        spikes uint8 [T, B, N] from the LIF neuron of ``kernels/lif.py`` (v[-1] = 0)
        V = I float32 [T, B, N] only if return_v;  h float32 [T, B, N] only if return_h

One program owns a (batch block x neuron block) tile and walks t = 0..T-1: the tile's current is a ``tl.dot``
over K, the LIF update runs on it in registers, and only spikes (1 byte per element) are stored unless V or h
are requested.

What 0/1 spike inputs buy: every product s·w is exactly w or 0, so the only rounding is in the fp32 sum (the
error bound is K·2^-24·Σ|w|, independent of input magnitudes); a uint8 spike tile is 4x fewer bytes to load
than fp32; and a GPU could feed the spike operand to an int8/fp8 tensor-core dot without any rounding of s
(the weights would then need quantising, which this kernel does not do). The speed effect of any of this is
NOT measured: no GPU was available when this was written (see bench/gpu_check.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.lif import as_float32, block_size, check_neuron_params, check_same_device, check_tensor, lif_step

# Tile caps. tl.dot needs >= 16 in every dimension on a GPU. 64x64 output tiles with a 32-deep K step keep the
# accumulator plus the membrane state at 64 fp32 registers per thread with 4 warps (not tuned: no GPU here).
MAX_BLOCK_B, MAX_BLOCK_N, MAX_BLOCK_K = 64, 64, 32


@triton.jit
def _spike_matmul_tile(
    s_rows, w_cols, K, stride_sk, stride_wk, mask_b, mask_n,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 tile of s @ wᵀ: ``s_rows`` [BLOCK_B, 1] row pointers of s, ``w_cols`` [1, BLOCK_N] row pointers of w."""
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        s = tl.load(s_rows + offs_k[None, :] * stride_sk, mask=mask_b[:, None] & mask_k[None, :], other=0)
        w = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        # "ieee": the default fp32 dot on NVIDIA is TF32 (10-bit mantissa), which would move currents by ~1e-3
        # relative and flip spikes against the fp32 reference.
        acc = tl.dot(s.to(tl.float32), w, acc, input_precision="ieee")
    return acc


@triton.jit
def _linear_lif_kernel(
    s_ptr, w_ptr, b_ptr, spk_ptr, v_ptr, h_ptr,
    T, B, N, K,
    stride_st, stride_sb, stride_sk,
    stride_wn, stride_wk,
    stride_ot, stride_ob, stride_on,
    tau, v_th, v_reset,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SOFT_RESET: tl.constexpr, HAS_BIAS: tl.constexpr, RETURN_V: tl.constexpr, RETURN_H: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_b = offs_b < B
    mask_n = offs_n < N
    mask = mask_b[:, None] & mask_n[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)
    else:
        bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    s_rows = s_ptr + offs_b[:, None] * stride_sb
    w_cols = w_ptr + offs_n[None, :] * stride_wn
    out_offs = offs_b[:, None] * stride_ob + offs_n[None, :] * stride_on
    v = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for _ in range(T):
        current = _spike_matmul_tile(
            s_rows, w_cols, K, stride_sk, stride_wk, mask_b, mask_n, BLOCK_B, BLOCK_N, BLOCK_K
        ) + bias[None, :]
        spike, h, v = lif_step(v, current, tau, v_th, v_reset, SOFT_RESET)
        tl.store(spk_ptr + out_offs, spike.to(tl.uint8), mask=mask)
        if RETURN_V:
            tl.store(v_ptr + out_offs, current, mask=mask)
        if RETURN_H:
            tl.store(h_ptr + out_offs, h, mask=mask)
        # Advance base pointers one time step (64-bit pointer arithmetic: no int32 overflow of t * stride).
        s_rows += stride_st
        spk_ptr += stride_ot
        v_ptr += stride_ot
        h_ptr += stride_ot


def _check_inputs(s_in, weight, bias, tau, v_th, v_reset) -> None:
    fn = "linear_lif_forward"
    check_tensor(fn, "s_in", s_in, [torch.uint8, torch.float32], _linear_lif_kernel, ndim=3)
    check_tensor(fn, "weight", weight, [torch.float32], _linear_lif_kernel, ndim=2)
    if weight.shape[1] != s_in.shape[2]:
        raise ValueError(
            f"{fn}: weight must be [N, K] with K = s_in.shape[2] = {s_in.shape[2]}, got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor(fn, "bias", bias, [torch.float32], _linear_lif_kernel, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{fn}: bias must be [N] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_same_device(fn, s_in=s_in, weight=weight, bias=bias)
    check_neuron_params(fn, tau, v_th, v_reset)


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
    """Fused Linear + LIF over time; see the module docstring for the contract."""
    _check_inputs(s_in, weight, bias, tau, v_th, v_reset)
    T, B, K = s_in.shape
    N = weight.shape[0]
    spikes = torch.empty((T, B, N), dtype=torch.uint8, device=s_in.device)
    v = torch.empty((T, B, N), dtype=torch.float32, device=s_in.device) if return_v else None
    h = torch.empty((T, B, N), dtype=torch.float32, device=s_in.device) if return_h else None
    if T * B * N == 0:
        return spikes, v, h
    BLOCK_B, BLOCK_N = block_size(B, 16, MAX_BLOCK_B), block_size(N, 16, MAX_BLOCK_N)
    BLOCK_K = block_size(K, 16, MAX_BLOCK_K)
    grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(N, BLOCK_N))
    # Unused pointer slots get a real tensor of the right dtype; constexpr flags keep them untouched.
    _linear_lif_kernel[grid](
        s_in, weight, weight if bias is None else bias, spikes,
        weight if v is None else v, weight if h is None else h,
        T, B, N, K,
        s_in.stride(0), s_in.stride(1), s_in.stride(2),
        weight.stride(0), weight.stride(1),
        B * N, N, 1,
        as_float32(tau), as_float32(v_th), as_float32(v_reset),
        BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SOFT_RESET=bool(soft_reset),
        HAS_BIAS=bias is not None, RETURN_V=bool(return_v), RETURN_H=bool(return_h),
    )
    return spikes, v, h


# ---------------------------------------------------------------------------------------------------- recurrent


@triton.jit
def _linear_lif_rec_kernel(
    s_ptr, w_ptr, b_ptr, u_ptr, ub_ptr, spk_ptr, v_ptr, h_ptr, state_ptr,
    T, B, N, K,
    stride_st, stride_sb, stride_sk,
    stride_wn, stride_wk,
    stride_un, stride_uk,
    stride_ot, stride_ob, stride_on,
    tau, v_th, v_reset,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SOFT_RESET: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_REC_BIAS: tl.constexpr, RETURN_V: tl.constexpr,
    RETURN_H: tl.constexpr,
):
    # One program owns a block of batch rows and ALL N neurons: step t's recurrent current needs every neuron's
    # spike of step t-1, which a (batch x neuron) tiling would have to exchange between programs. The program walks
    # t outermost and the neuron blocks inside; spikes of step t-1 are re-read from global memory (written by this
    # same program, made visible to all its threads by the barrier at the end of each step), and the membrane of
    # each neuron block lives in ``state_ptr`` between visits.
    pid_b = tl.program_id(0)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    s_rows = s_ptr + offs_b[:, None] * stride_sb
    for t in range(T):
        prev_rows = spk_ptr + tl.maximum(t - 1, 0) * stride_ot + offs_b[:, None] * stride_ob
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            mask = mask_b[:, None] & mask_n[None, :]
            current = _spike_matmul_tile(
                s_rows + t * stride_st, w_ptr + offs_n[None, :] * stride_wn, K, stride_sk, stride_wk,
                mask_b, mask_n, BLOCK_B, BLOCK_N, BLOCK_K,
            )
            if HAS_BIAS:
                current += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
            # s[-1] = 0: at t = 0 the mask drops every row, so the recurrent tile is exactly zero
            current += _spike_matmul_tile(
                prev_rows, u_ptr + offs_n[None, :] * stride_un, N, stride_on, stride_uk,
                mask_b & (t > 0), mask_n, BLOCK_B, BLOCK_N, BLOCK_K,
            )
            if HAS_REC_BIAS:
                current += tl.load(ub_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
            state_offs = offs_b[:, None] * N + offs_n[None, :]
            v = tl.load(state_ptr + state_offs, mask=mask, other=0.0)
            spike, h, v = lif_step(v, current, tau, v_th, v_reset, SOFT_RESET)
            tl.store(state_ptr + state_offs, v, mask=mask)
            out_offs = t * stride_ot + offs_b[:, None] * stride_ob + offs_n[None, :] * stride_on
            tl.store(spk_ptr + out_offs, spike.to(tl.uint8), mask=mask)
            if RETURN_V:
                tl.store(v_ptr + out_offs, current, mask=mask)
            if RETURN_H:
                tl.store(h_ptr + out_offs, h, mask=mask)
        tl.debug_barrier()  # step t's spikes are complete before step t+1 reads them


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
    """A recurrent layer in one launch: I[t] = s_in[t] Wᵀ + b + s[t-1] Uᵀ + b_U (s[-1] = 0), then the LIF.

    Contract as ``linear_lif_forward`` plus ``rec_weight`` float32 [N, N] and ``rec_bias`` [N] or None
    (twin: ``kernels/ref/linear_lif.py``)."""
    fn = "linear_lif_rec_forward"
    _check_inputs(s_in, weight, bias, tau, v_th, v_reset)
    N = weight.shape[0]
    check_tensor(fn, "rec_weight", rec_weight, [torch.float32], _linear_lif_rec_kernel, ndim=2)
    if tuple(rec_weight.shape) != (N, N):
        raise ValueError(f"{fn}: rec_weight must be [N, N] = [{N}, {N}], got {tuple(rec_weight.shape)}")
    if rec_bias is not None:
        check_tensor(fn, "rec_bias", rec_bias, [torch.float32], _linear_lif_rec_kernel, ndim=1)
        if rec_bias.shape[0] != N:
            raise ValueError(f"{fn}: rec_bias must be [N] = [{N}], got {tuple(rec_bias.shape)}")
    check_same_device(fn, s_in=s_in, rec_weight=rec_weight, rec_bias=rec_bias)
    T, B, K = s_in.shape
    spikes = torch.empty((T, B, N), dtype=torch.uint8, device=s_in.device)
    v = torch.empty((T, B, N), dtype=torch.float32, device=s_in.device) if return_v else None
    h = torch.empty((T, B, N), dtype=torch.float32, device=s_in.device) if return_h else None
    if T * B * N == 0:
        return spikes, v, h
    state = torch.zeros((B, N), dtype=torch.float32, device=s_in.device)
    BLOCK_B, BLOCK_N = block_size(B, 16, MAX_BLOCK_B), block_size(N, 16, MAX_BLOCK_N)
    BLOCK_K = block_size(max(K, N), 16, MAX_BLOCK_K)
    _linear_lif_rec_kernel[(triton.cdiv(B, BLOCK_B),)](
        s_in, weight, weight if bias is None else bias, rec_weight, rec_weight if rec_bias is None else rec_bias,
        spikes, weight if v is None else v, weight if h is None else h, state,
        T, B, N, K,
        s_in.stride(0), s_in.stride(1), s_in.stride(2),
        weight.stride(0), weight.stride(1),
        rec_weight.stride(0), rec_weight.stride(1),
        B * N, N, 1,
        as_float32(tau), as_float32(v_th), as_float32(v_reset),
        BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SOFT_RESET=bool(soft_reset),
        HAS_BIAS=bias is not None, HAS_REC_BIAS=rec_bias is not None, RETURN_V=bool(return_v),
        RETURN_H=bool(return_h),
    )
    return spikes, v, h
