"""ReCo against class-deduplicated B rows: the exact B x R form of ReCo (docs/bsd.md, "Exact rewrites").

With per-class target codes, B's rows for all samples of a class are identical. Let u_r be the R distinct rows,
r_k = inverse[k] sample k's partner row, and M_kr the number of k's negatives equal to u_r: count(r) - [r = r_k]
for negatives 'all', count(r) [r != r_k] for 'other_class'. Then, with the B x R cosine matrix C,

    ReCo = (1/B) [ sum_k (1 - C_k,r_k)^2 + lam sum_k sum_r M_kr max(0, C_kr)^2 ]

equals the B x B form. With G_kr = (2 lam / B) max(0, C_kr) M_kr - [r = r_k] 2 (1 - C_k,r_k) / B,
d_kr = |a_k| |u_r| + eps and H = G / d:

    dL/da_k = sum_r H_kr u_r - (sum_r H_kr C_kr |u_r| / |a_k|) a_k
    dL/du_r = sum_k H_kr a_k - (sum_k H_kr C_kr |a_k| / |u_r|) u_r     (already the per-class sum)

Cost: three [B, F] x [F, R] products instead of [B, F] x [F, B] (12.8x fewer FLOPs at B = 128, R = 10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.ref.reco import reco_coefficients


def _inv(x: torch.Tensor) -> torch.Tensor:
    """1/x, and 0 where x = 0 (a zero row's norm has no derivative; as torch's norm backward)."""
    return torch.where(x > 0, 1 / torch.where(x > 0, x, torch.ones_like(x)), torch.zeros_like(x))


def reco_loss_grad_dedup(a: torch.Tensor, u: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor,
                         lam: float, negatives: str, eps: float, need_da: bool = True):
    """(loss, dL/da or None, dL/du) for per-sample rows ``a`` [T, B, D] and per-class rows ``u`` [T, R, D].

    Works in the [T, rows, D] layout the runtime stores (no transposed copies): every product is a batched
    matmul over t summed over t. ``a`` may be a time-invariant [B, D] (the direct-encoded stimulus, or the first
    current it drives): its dot products then use the time sum of u, its norm is sqrt(T) |a| (spec), T times
    fewer FLOPs, and dL/da is the gradient of that one value, [B, D] (the sum over t of the per-step ones)."""
    T = u.shape[0]
    invariant = a.dim() == 2
    B = a.shape[-2]
    # the [B, R] bookkeeping is gathers and scatters at (k, r_k), not one_hot and boolean masks (nonzero + index):
    # B = 128, R = 10, 2 threads, side by side: 0.47-1.10 -> 0.35-1.03 ms per call for D = 256-1024, 1.07-1.33x
    # (the products take ~0.3 ms at D = 512; the rest is ~20 small ops of 5-15 us each)
    if invariant:
        u_sum = u.sum(0)
        gram, na = a @ u_sum.T, a.norm(dim=1) * T ** 0.5
    else:
        gram, na = torch.matmul(a, u.transpose(1, 2)).sum(0), a.pow(2).sum((0, 2)).sqrt()
    nu = u.pow(2).sum((0, 2)).sqrt()
    d = torch.outer(na, nu).add_(eps)
    cos = gram.div_(d)
    at_own = inverse[:, None]  # [B, 1]: column r_k of row k
    # under torch.compile the [B, R] bookkeeping is a one-hot mask: Inductor (torch 2.13, CPU) computed a wrong G
    # from the scatter_add below (7 % off in float64, tests/test_compile.py), the mask form it gets right
    own = (F.one_hot(inverse, cos.shape[1]).to(a.dtype) if torch.compiler.is_compiling() else None)
    if own is not None:
        mult = counts.to(a.dtype)[None, :] - own if negatives == "all" else counts.to(a.dtype)[None, :] * (1 - own)
    else:
        mult = counts.to(a.dtype).expand(B, -1).clone()  # M_kr: negatives of k equal to u_r
        if negatives == "all":
            mult.scatter_add_(1, at_own, torch.full((B, 1), -1.0, dtype=a.dtype, device=a.device))
        else:
            mult.scatter_(1, at_own, 0.0)
    excess = cos.clamp(min=0)
    miss = 1 - cos.gather(1, at_own)  # [B, 1]: 1 - C_k,r_k
    g = excess * mult  # max(0, C) M: the negatives' loss terms and, scaled, their part of G
    loss = ((miss * miss).sum() + lam * (g * excess).sum()) / B
    if own is not None:
        h = (g * (2 * lam / B) + own * (miss * (-2 / B))) / d
    else:
        g.mul_(2 * lam / B).scatter_add_(1, at_own, miss * (-2 / B))
        h = g.div_(d)
    coef_u = (h * cos * na[:, None]).sum(0) * _inv(nu)
    du = torch.matmul(h.T, a) - coef_u[None, :, None] * u  # a [B, D] broadcasts over t
    da = None
    if need_da:
        coef_a = (h * cos * nu[None, :]).sum(1) * _inv(na)
        if invariant:  # a time-invariant a is one value read at every step: its gradient is the sum over t
            da = h @ u_sum - (T * coef_a)[:, None] * a
        else:  # -coef a + h u in place: one pass fewer over [T, B, D] (0.57 -> 0.33 ms at D = 512, one thread)
            da = (a * -coef_a[None, :, None]).baddbmm_(h.expand(T, -1, -1), u)
    return loss, da, du


def reco_loss_grad_steps(a: torch.Tensor, u: torch.Tensor, labels: torch.Tensor | None, lam: float, negatives: str,
                         eps: float):
    """The twin's B x B ReCo (kernels/ref/reco.py: per-sample rows of T*D values) computed in the runtime's
    [T, B, D] layout: the Gram matrix and both gradient products as batched matmuls over t, so neither operand
    is transposed into a [B, T*D] copy first. Same coefficients (``reco_coefficients``), so the same values up to
    float summation order. fmnist_cnn's two conv layers ([4, 128, 25088] and [4, 128, 12544]), 2 threads: 168 ms
    -> 134-155 ms per step."""
    gram = torch.matmul(a, u.transpose(1, 2)).sum(0)
    na, nu = a.pow(2).sum((0, 2)).sqrt(), u.pow(2).sum((0, 2)).sqrt()
    loss, h, coef_a, coef_u = reco_coefficients(gram, na, nu, labels, lam, negatives, eps)
    T = a.shape[0]
    da = (a * -coef_a[None, :, None]).baddbmm_(h.expand(T, -1, -1), u)
    du = (u * -coef_u[None, :, None]).baddbmm_(h.T.expand(T, -1, -1), a)
    return loss, da, du
