"""ReCo (relaxed contrastive) loss with both gradients in closed form, in three passes.

Contract (twin: ``kernels/ref/reco.py``, which also holds the derivation):

    reco_loss_grad(v, v_hat, labels, lam, negatives, eps=1e-8) -> (loss, grad_v, grad_v_hat)
        v, v_hat  float32 [B, F] contiguous (F = T·D: each sample flattened over time and features)
        labels    int64 [B] or None (required for negatives == "other_class")
        negatives "all" (j ≠ k) or "other_class" (label_j ≠ label_k)
        loss      float32 0-dim;  grad_v, grad_v_hat float32 [B, F]

        C_kj = <v_k, v̂_j> / (‖v_k‖‖v̂_j‖ + eps)
        ReCo = (1/B)[Σ_k (1 - C_kk)² + λ Σ_k Σ_{j∈N(k)} max(0, C_kj)²]

Passes:
    1. ``_gram_kernel`` (Triton): S = v v̂ᵀ with ``tl.dot`` over F, and the squared row norms of v and v̂ from the
       same loads. F is split over a third grid axis into partial sums that torch adds up in a fixed order
       (deterministic, unlike atomics): B×B is small, so without the split a 128×4096 problem would be 4
       programs on a 132-SM GPU.
    2. Torch, on B×B: cosines, the loss, the coefficient matrix H = (∂L/∂C) / d and the per-row norm-term
       coefficients a, b (``kernels.ref.reco.reco_coefficients``, shared with the twin). This is O(B²)
       elementwise work (16 K elements at B = 128) with label masks; a kernel would only save a handful of small
       launches (expected to be minor next to the two F-long passes; not measured, no GPU here), and torch keeps
       the loss formula in one place, shared with the twin.
    3. ``_combine_kernel`` (Triton), launched twice: grad_v = H v̂ - a ⊙ v and grad_v̂ = Hᵀ v - b ⊙ v̂, a ``tl.dot``
       over the batch axis; Hᵀ is H read with swapped strides, not a copy.

The frequency-aware variant (generation) splits V and V̂ into low/high spatial-frequency bands with a 2-D FFT
before calling this function once per band. That split stays in torch: Triton has no FFT primitive, and the
band filters are linear, so the gradient w.r.t. the unsplit tensors is the filters' adjoint applied in torch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.lif import block_size, check_same_device, check_tensor
from kernels.ref.reco import check_reco_args, reco_coefficients

# Output tiles of 64 (and >= 16 for tl.dot on a GPU); F is walked 64 columns at a time. Not tuned: no GPU here.
MAX_BLOCK_B, MAX_BLOCK_F = 64, 64
# Aim for about this many programs in the Gram pass (one per SM on an H200: 132) when splitting F.
TARGET_PROGRAMS = 128


@triton.jit
def _gram_kernel(
    v_ptr, vh_ptr, s_ptr, nv_ptr, nvh_ptr,
    B, F, F_PER_SPLIT,
    stride_vb, stride_vf, stride_hb, stride_hf,
    stride_ss, stride_sr, stride_sc, stride_ns,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = offs_r < B
    mask_c = offs_c < B
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    sq_r = tl.zeros([BLOCK_R], dtype=tl.float32)
    sq_c = tl.zeros([BLOCK_C], dtype=tl.float32)
    f_start = pid_s * F_PER_SPLIT
    for f0 in range(f_start, f_start + F_PER_SPLIT, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        a = tl.load(v_ptr + offs_r[:, None] * stride_vb + offs_f[None, :] * stride_vf,
                    mask=mask_r[:, None] & mask_f[None, :], other=0.0)
        # v̂ tile loaded transposed ([BLOCK_F, BLOCK_C]) through its strides.
        bt = tl.load(vh_ptr + offs_c[None, :] * stride_hb + offs_f[:, None] * stride_hf,
                     mask=mask_f[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision="ieee")  # TF32 would cost ~1e-3 relative in every cosine
        sq_r += tl.sum(a * a, axis=1)
        sq_c += tl.sum(bt * bt, axis=0)
    s_out = s_ptr + pid_s * stride_ss + offs_r[:, None] * stride_sr + offs_c[None, :] * stride_sc
    tl.store(s_out, acc, mask=mask_r[:, None] & mask_c[None, :])
    # Every program of a row (column) block computed the same norms; one of them writes.
    tl.store(nv_ptr + pid_s * stride_ns + offs_r, sq_r, mask=mask_r & (pid_c == 0))
    tl.store(nvh_ptr + pid_s * stride_ns + offs_c, sq_c, mask=mask_c & (pid_r == 0))


@triton.jit
def _combine_kernel(
    p_ptr, x_ptr, y_ptr, coef_ptr, out_ptr,
    B, F,
    stride_pr, stride_pc, stride_xb, stride_xf, stride_yb, stride_yf, stride_ob, stride_of,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """out[r, f] = Σ_c P[r, c] X[c, f] - coef[r] Y[r, f]."""
    pid_r = tl.program_id(0)
    pid_f = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_r = offs_r < B
    mask_f = offs_f < F
    acc = tl.zeros([BLOCK_R, BLOCK_F], dtype=tl.float32)
    for c0 in range(0, B, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < B
        p = tl.load(p_ptr + offs_r[:, None] * stride_pr + offs_c[None, :] * stride_pc,
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0)
        x = tl.load(x_ptr + offs_c[:, None] * stride_xb + offs_f[None, :] * stride_xf,
                    mask=mask_c[:, None] & mask_f[None, :], other=0.0)
        acc = tl.dot(p, x, acc, input_precision="ieee")
    mask = mask_r[:, None] & mask_f[None, :]
    coef = tl.load(coef_ptr + offs_r, mask=mask_r, other=0.0)
    y = tl.load(y_ptr + offs_r[:, None] * stride_yb + offs_f[None, :] * stride_yf, mask=mask, other=0.0)
    tl.store(out_ptr + offs_r[:, None] * stride_ob + offs_f[None, :] * stride_of, acc - coef[:, None] * y, mask=mask)


def _gram_and_norms(v: torch.Tensor, v_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 1: (S [B, B], ‖v_k‖ [B], ‖v̂_j‖ [B]) in float32."""
    B, F = v.shape
    BLOCK_B, BLOCK_F = block_size(B, 16, MAX_BLOCK_B), block_size(F, 16, MAX_BLOCK_F)
    tiles = triton.cdiv(B, BLOCK_B) ** 2
    f_blocks = max(triton.cdiv(F, BLOCK_F), 1)
    split = max(1, min(f_blocks, TARGET_PROGRAMS // tiles))
    f_per_split = triton.cdiv(f_blocks, split) * BLOCK_F
    split = triton.cdiv(max(F, 1), f_per_split)
    gram = torch.empty((split, B, B), dtype=torch.float32, device=v.device)
    sq = torch.empty((2, split, B), dtype=torch.float32, device=v.device)
    grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(B, BLOCK_B), split)
    _gram_kernel[grid](
        v, v_hat, gram, sq[0], sq[1],
        B, F, f_per_split,
        v.stride(0), v.stride(1), v_hat.stride(0), v_hat.stride(1),
        gram.stride(0), gram.stride(1), gram.stride(2), sq.stride(1),
        BLOCK_R=BLOCK_B, BLOCK_C=BLOCK_B, BLOCK_F=BLOCK_F,
    )
    sq = sq.sum(1)
    return gram.sum(0), sq[0].sqrt(), sq[1].sqrt()


def _combine(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Pass 3: P X - coef ⊙ Y for P [B, B] (any strides), X, Y [B, F]."""
    B, F = x.shape
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    BLOCK_B, BLOCK_F = block_size(B, 16, MAX_BLOCK_B), block_size(F, 16, MAX_BLOCK_F)
    _combine_kernel[(triton.cdiv(B, BLOCK_B), triton.cdiv(F, BLOCK_F))](
        p, x, y, coef, out,
        B, F,
        p.stride(0), p.stride(1), x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        BLOCK_R=BLOCK_B, BLOCK_C=BLOCK_B, BLOCK_F=BLOCK_F,
    )
    return out


def reco_loss_grad(
    v: torch.Tensor,
    v_hat: torch.Tensor,
    labels: Optional[torch.Tensor],
    lam: float,
    negatives: str,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ReCo loss and (∂L/∂v, ∂L/∂v̂); see the module docstring for the contract."""
    fn = "reco_loss_grad"
    check_tensor(fn, "v", v, [torch.float32], _gram_kernel, ndim=2)
    check_tensor(fn, "v_hat", v_hat, [torch.float32], _gram_kernel, ndim=2)
    if v.shape != v_hat.shape:
        raise ValueError(f"{fn}: v and v_hat must both be [B, F], got {tuple(v.shape)} and {tuple(v_hat.shape)}")
    if v.shape[0] == 0:
        raise ValueError(f"{fn}: the batch is empty (v has shape {tuple(v.shape)}); ReCo divides by B")
    check_reco_args(fn, v.shape[0], labels, lam, negatives, eps)
    check_same_device(fn, v=v, v_hat=v_hat, labels=labels)
    gram, norm_v, norm_v_hat = _gram_and_norms(v, v_hat)
    loss, h, a, b = reco_coefficients(gram, norm_v, norm_v_hat, labels, float(lam), negatives, float(eps))
    grad_v = _combine(h, v_hat, v, a)
    grad_v_hat = _combine(h.T, v, v_hat, b)
    return loss, grad_v, grad_v_hat
