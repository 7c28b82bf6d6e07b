"""Torch twin of ``kernels/reco.py``: ReCo loss and its closed-form gradients.

    C_kj = <v_k, v̂_j> / (‖v_k‖ ‖v̂_j‖ + eps)
    ReCo = (1/B) [ Σ_k (1 - C_kk)² + λ Σ_k Σ_{j∈N(k)} max(0, C_kj)² ]
    N(k) = {j ≠ k} ("all")  or  {j : label_j ≠ label_k} ("other_class")

Derivation (n_k = ‖v_k‖, m_j = ‖v̂_j‖, d_kj = n_k m_j + eps, S_kj = <v_k, v̂_j>, C = S / d):

    G_kj = ∂L/∂C_kj = (2λ/B) max(0, C_kj) [j∈N(k)] - [j = k] 2 (1 - C_kk) / B
    ∂C_kj/∂v_k = v̂_j / d_kj - S_kj m_j v_k / (d_kj² n_k) = v̂_j / d_kj - C_kj m_j v_k / (d_kj n_k)
    with H = G / d:
    ∂L/∂v_k = Σ_j H_kj v̂_j - (Σ_j H_kj C_kj m_j / n_k) v_k = (H v̂)_k - a_k v_k
    ∂L/∂v̂_j = Σ_k H_kj v_k - (Σ_k H_kj C_kj n_k / m_j) v̂_j = (Hᵀ v)_j - b_j v̂_j

The eps stays in d (it is what makes C = 0 for a zero row). For a zero row (n_k = 0) the norm has no
derivative; we take a_k = 0 there, as torch's norm backward does, so the row's gradient is (H v̂)_k.
"""

from __future__ import annotations

from typing import Optional

import torch

NEGATIVES = ("all", "other_class")


def check_reco_args(fn: str, b: int, labels: Optional[torch.Tensor], lam: float, negatives: str, eps: float) -> None:
    """Raise ``ValueError`` for an unknown ``negatives``, missing/mis-shaped labels, or bad λ / eps."""
    if negatives not in NEGATIVES:
        raise ValueError(f"{fn}: negatives must be one of {NEGATIVES}, got {negatives!r}")
    if negatives == "other_class" and labels is None:
        raise ValueError(f"{fn}: negatives='other_class' needs labels (int64 [B]); pass labels or use 'all'")
    if labels is not None and (labels.dtype != torch.int64 or tuple(labels.shape) != (b,)):
        raise ValueError(f"{fn}: labels must be int64 of shape [{b}], got {labels.dtype} {tuple(labels.shape)}")
    if not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"{fn}: lam must be a number >= 0, got {lam!r}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{fn}: eps must be a number >= 0, got {eps!r}")


def _inverse_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1 / torch.where(x > 0, x, torch.ones_like(x)), torch.zeros_like(x))


def reco_coefficients(
    gram: torch.Tensor,
    norm_v: torch.Tensor,
    norm_v_hat: torch.Tensor,
    labels: Optional[torch.Tensor],
    lam: float,
    negatives: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The B×B part: from S = v v̂ᵀ and the row norms, return (loss, H, a, b) of the module docstring.

    Leading dimensions batch independent ReCo problems (gram [..., B, B], norms and labels [..., B]); the loss is
    then the sum of theirs."""
    b = gram.shape[-1]
    d = norm_v[..., :, None] * norm_v_hat[..., None, :] + eps
    cos = gram / d
    eye = torch.eye(b, dtype=torch.bool, device=gram.device)
    negative = ~eye if negatives == "all" else labels[..., :, None] != labels[..., None, :]
    excess = torch.where(negative, cos.clamp(min=0), torch.zeros_like(cos))
    miss = 1 - cos.diagonal(dim1=-2, dim2=-1)
    loss = ((miss * miss).sum() + lam * (excess * excess).sum()) / b
    g = (2 * lam / b) * excess - torch.diag_embed(2 * miss / b)
    h = g / d
    a = (h * cos * norm_v_hat[..., None, :]).sum(-1) * _inverse_or_zero(norm_v)
    b_coef = (h * cos * norm_v[..., :, None]).sum(-2) * _inverse_or_zero(norm_v_hat)
    return loss, h, a, b_coef


def reco_loss_grad(
    v: torch.Tensor,
    v_hat: torch.Tensor,
    labels: Optional[torch.Tensor],
    lam: float,
    negatives: str,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-dim, ∂L/∂v, ∂L/∂v̂) for v, v̂ [B, F]; any float dtype."""
    check_reco_args("reco_loss_grad", v.shape[0], labels, lam, negatives, eps)
    gram = v @ v_hat.T
    loss, h, a, b_coef = reco_coefficients(
        gram, v.norm(dim=1), v_hat.norm(dim=1), labels, lam, negatives, eps
    )
    grad_v = h @ v_hat - a[:, None] * v
    grad_v_hat = h.T @ v - b_coef[:, None] * v_hat
    return loss, grad_v, grad_v_hat


def reco_loss_grad_each_step(
    v: torch.Tensor,
    v_hat: torch.Tensor,
    labels: Optional[torch.Tensor],
    lam: float,
    negatives: str,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ReCo with ``rows='each_step'``: one ReCo at each step t over the batch's rows at that step, averaged over
    the T steps: (1/T) Σ_t ReCo(v[t], v̂[t]). v, v̂ [T, B, ...]; labels (``other_class``) [B], or [B, T] for a
    class per step. Returns (loss, ∂L/∂v, ∂L/∂v̂) shaped like v, v̂.

    The T problems share nothing, so they run as one batch of B×B ones (``reco_coefficients``); the 1/T scales G
    and therefore every coefficient. There is no Triton kernel for it: its per-step blocks are B×B, small beside
    the layers' GEMMs."""
    T, b = v.shape[:2]
    fn = "reco_loss_grad_each_step"
    per_sample_labels = labels
    if labels is not None and labels.dim() == 2:  # a class per step: checked here, its first step by the rest
        if tuple(labels.shape) != (b, T):
            raise ValueError(f"{fn}: per-step labels must have shape [{b}, {T}], got {tuple(labels.shape)}")
        per_sample_labels = labels[:, 0]
    check_reco_args(fn, b, per_sample_labels, lam, negatives, eps)
    rows, rows_hat = v.reshape(T, b, -1), v_hat.reshape(T, b, -1)
    per_step = None if labels is None else (labels.T if labels.dim() == 2 else labels.expand(T, b))
    gram = torch.bmm(rows, rows_hat.transpose(1, 2))
    loss, h, a, b_coef = reco_coefficients(gram, rows.norm(dim=2), rows_hat.norm(dim=2), per_step, lam, negatives,
                                           eps)
    grad_v = (torch.bmm(h, rows_hat) - a[..., None] * rows) / T
    grad_v_hat = (torch.bmm(h.transpose(1, 2), rows) - b_coef[..., None] * rows_hat) / T
    return loss / T, grad_v.reshape(v.shape), grad_v_hat.reshape(v_hat.shape)
