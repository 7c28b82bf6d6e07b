"""The local losses of the spec, written directly (autograd gives their gradients in the reference runtime).

Activity tensors arrive as ``[T, B, ...]``; ReCo flattens each sample over time and features (``[B, T*D]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bsdgraph.ir import Node, Op


def per_sample(x: torch.Tensor) -> torch.Tensor:
    """[T, B, ...] -> [B, T*D]: one row per sample, time-major inside the row."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def negative_mask(B: int, labels: torch.Tensor | None, negatives: str, device=None) -> torch.Tensor:
    """N(k) as a boolean [B, B] matrix: all j != k, or only j with another label."""
    if negatives == "other_class":
        if labels is None:
            raise ValueError("negatives='other_class' needs the labels of the batch")
        return labels[:, None] != labels[None, :]
    return ~torch.eye(B, dtype=torch.bool, device=device)


def reco_loss(v: torch.Tensor, v_hat: torch.Tensor, labels: torch.Tensor | None, lam: float, negatives: str,
              eps: float) -> torch.Tensor:
    """ReCo = (1/B)[sum_k (1 - C_kk)^2 + lam sum_k sum_{j in N(k)} max(0, C_kj)^2] on [B, F] rows."""
    B = v.shape[0]
    cos = (v @ v_hat.T) / (v.norm(dim=1)[:, None] * v_hat.norm(dim=1)[None, :] + eps)
    positive = ((1 - cos.diagonal()) ** 2).sum()
    negative = (F.relu(cos) ** 2 * negative_mask(B, labels, negatives, v.device)).sum()
    return (positive + lam * negative) / B


def band_split(x: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split [..., H, W] into (low, high) with a 2-D FFT: low keeps radius <= r * Nyquist; low + high == x."""
    H, W = x.shape[-2:]
    fy = torch.fft.fftfreq(H, device=x.device)[:, None]
    fx = torch.fft.fftfreq(W, device=x.device)[None, :]
    mask = (torch.sqrt(fy ** 2 + fx ** 2) / 0.5) <= r  # fftfreq's Nyquist is 0.5 cycles per sample
    low = torch.fft.ifft2(torch.fft.fft2(x) * mask).real
    return low, x - low


def reco_freq_loss(v, v_hat, labels, lam_low: float, lam_high: float, r: float, negatives: str, eps: float):
    """Frequency-aware ReCo: ReCo on the low band with lam_low plus ReCo on the high band with lam_high."""
    (vl, vh), (hl, hh) = band_split(v, r), band_split(v_hat, r)
    return (reco_loss(per_sample(vl), per_sample(hl), labels, lam_low, negatives, eps)
            + reco_loss(per_sample(vh), per_sample(hh), labels, lam_high, negatives, eps))


def class_scores(v: torch.Tensor, population: int) -> torch.Tensor:
    """Top current [T, B, C*k] -> class scores [B, C]: mean over time, then over each class's population block."""
    z = v.mean(0)
    return z.reshape(z.shape[0], -1, population).mean(-1) if population > 1 else z


def _reco(n: Node, args, labels):
    a = n.attrs
    if a["freq"]:
        return reco_freq_loss(args[0], args[1], labels, a["lam_low"], a["lam_high"], a["freq_r"], a["negatives"],
                              a["eps"])
    return reco_loss(per_sample(args[0]), per_sample(args[1]), labels, a["lam"], a["negatives"], a["eps"])


def _ce(n: Node, args, labels):
    return F.cross_entropy(class_scores(args[0], n.attrs["population"]), labels)


def _mse(n: Node, args, labels):
    if len(args) == 2:  # bottom recall for generation: compare the encoded stimulus with B's reconstruction
        return F.mse_loss(args[1], args[0])
    return F.mse_loss(args[0].mean(0).reshape(labels.shape), labels.to(args[0].dtype))


LOSS_IMPLS = {Op.RECO: _reco, Op.CE: _ce, Op.MSE: _mse}
