"""The local losses of the spec, written directly (autograd gives their gradients in the reference runtime).

Activity tensors arrive as ``[T, B, ...]``; ReCo flattens each sample over time and features (``[B, T*D]``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bsdgraph.ir.graph import Node, Op


def per_sample(x: torch.Tensor) -> torch.Tensor:
    """[T, B, ...] -> [B, T*D]: one row per sample, time-major inside the row."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def per_step(x: torch.Tensor) -> torch.Tensor:
    """[T, B, ...] -> [T*B, D]: one row per step of each sample (ReCo with rows='step')."""
    return x.reshape(x.shape[0] * x.shape[1], -1)


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


def reco_each_step(v: torch.Tensor, v_hat: torch.Tensor, labels: torch.Tensor | None, lam: float, negatives: str,
                   eps: float) -> torch.Tensor:
    """ReCo with rows='each_step': the mean over t of ReCo on the batch's rows at step t ([T, B, ...] operands);
    labels are one per sample [B] or one per step [B, T] (a sequence target)."""
    T = v.shape[0]

    def at(t):  # only other_class reads labels (a regression's targets are none)
        return None if negatives != "other_class" else labels if labels.dim() == 1 else labels[:, t]
    return sum(reco_loss(v[t].reshape(v.shape[1], -1), v_hat[t].reshape(v.shape[1], -1), at(t), lam, negatives, eps)
               for t in range(T)) / T


def band_split(x: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split [..., H, W] into (low, high) with a 2-D FFT: low keeps radius <= r * Nyquist; low + high == x.

    The mask depends on |f| only, so it is Hermitian-symmetric and the low band is real. Small maps multiply by the
    low-pass operator as an [HW, HW] matrix (one GEMM: 14x14 maps 37 -> 14 ms, 7x7 18 -> 3 ms for 16k maps on one
    core); larger ones use a real FFT over half the spectrum (28x28: 6.5 ms vs 9.5 ms as a GEMM). Both equal
    fft2/ifft2 to 1e-15 in float64."""
    H, W = x.shape[-2:]
    if H * W <= _GEMM_MAX_PIXELS:
        low = (x.reshape(-1, H * W) @ _low_pass_matrix(H, W, float(r), x.dtype, x.device)).reshape(x.shape)
    else:
        low = torch.fft.irfft2(torch.fft.rfft2(x) * _low_pass_mask(H, W, r, x.device, half=True),
                               s=(H, W))
    return low, x - low


_GEMM_MAX_PIXELS = 256


def _low_pass_mask(H: int, W: int, r: float, device=None, half: bool = False) -> torch.Tensor:
    fy = torch.fft.fftfreq(H, dtype=torch.float64, device=device)[:, None]
    fx = (torch.fft.rfftfreq if half else torch.fft.fftfreq)(W, dtype=torch.float64, device=device)[None, :]
    return (torch.sqrt(fy ** 2 + fx ** 2) / 0.5) <= r  # fftfreq's Nyquist is 0.5 cycles per sample


@functools.lru_cache(maxsize=32)
def _low_pass_matrix(H: int, W: int, r: float, dtype: torch.dtype, device) -> torch.Tensor:
    """P with low = x_flat @ P (P is symmetric: the split is self-adjoint), built in float64 from the FFT mask."""
    eye = torch.eye(H * W, dtype=torch.float64).reshape(H * W, H, W)
    P = torch.fft.ifft2(torch.fft.fft2(eye) * _low_pass_mask(H, W, r)).real.reshape(H * W, H * W)
    return P.to(dtype=dtype, device=device)


def reco_freq_loss(v, v_hat, labels, lam_low: float, lam_high: float, r: float, negatives: str, eps: float):
    """Frequency-aware ReCo: ReCo on the low band with lam_low plus ReCo on the high band with lam_high."""
    (vl, vh), (hl, hh) = band_split(v, r), band_split(v_hat, r)
    return (reco_loss(per_sample(vl), per_sample(hl), labels, lam_low, negatives, eps)
            + reco_loss(per_sample(vh), per_sample(hh), labels, lam_high, negatives, eps))


# A distributed code's class scores are CODE_SCALE times the cosine of the top current to each class's pattern: in
# [-10, 10], so that the CE on them can become confident (a cosine alone caps the softmax of 10 classes at 0.25).
CODE_SCALE = 10.0


@functools.lru_cache(maxsize=16)
def _codes(n_classes: int, width: int, active: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows: list[tuple[int, ...]] = []
    while len(rows) < n_classes:  # distinct patterns (validation checks that enough exist)
        row = tuple(sorted(torch.randperm(width, generator=gen)[:active].tolist()))
        if row not in rows:
            rows.append(row)
    codes = torch.zeros(n_classes, width)
    for c, row in enumerate(rows):
        codes[c, list(row)] = 1.0
    return codes


def class_codes(attrs, width: int, device=None) -> torch.Tensor | None:
    """The [classes, width] 0/1 patterns of a distributed class code (``target='code'`` on the output, encoding
    'code' on B's target, or a CE node's copy of them): ``code_active`` random neurons of ``width`` per class,
    fixed by ``code_seed``; None for other codes."""
    if not attrs.get("code_active"):
        return None
    # a copy: the cached patterns must survive whatever a caller does with its tensor
    return _codes(attrs["n_classes"], width, attrs["code_active"], attrs["code_seed"]).to(device, copy=True)


def class_scores(v: torch.Tensor, population: int, per_step: bool = False,
                 codes: torch.Tensor | None = None) -> torch.Tensor:
    """Top current [T, B, C*k] -> class scores [B, C]: mean over time, then over each class's population block;
    ``per_step``: the current of each step is that step's scores, [B, T, C]; ``codes`` [C, D]: CODE_SCALE times
    the cosine of the time-mean current to each class's pattern."""
    if per_step:
        return v.transpose(0, 1)
    z = v.mean(0)
    if codes is not None:
        return CODE_SCALE * F.normalize(z, dim=1, eps=1e-12) @ F.normalize(codes.to(z), dim=1).T
    return z.reshape(z.shape[0], -1, population).mean(-1) if population > 1 else z


def _reco(n: Node, args, labels):
    a = n.attrs
    if a["freq"]:
        return reco_freq_loss(args[0], args[1], labels, a["lam_low"], a["lam_high"], a["freq_r"], a["negatives"],
                              a["eps"])
    if a["rows"] == "each_step":
        return reco_each_step(args[0], args[1], labels, a["lam"], a["negatives"], a["eps"])
    rows = per_step if a["rows"] == "step" else per_sample
    return reco_loss(rows(args[0]), rows(args[1]), labels, a["lam"], a["negatives"], a["eps"])


def _ce(n: Node, args, labels):
    codes = class_codes(n.attrs, args[0].shape[-1], args[0].device)
    return class_loss(args[0], labels, n.attrs["population"], n.attrs["per_step"], n.attrs["smoothing"], codes)


def class_loss(v: torch.Tensor, labels: torch.Tensor, population: int, per_step: bool,
               smoothing: float = 0.0, codes: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the top current: of the time-mean scores against y [B], or of each step's scores against
    y [B, T] (the mean over all B*T steps); ``smoothing`` s: against (1 - s) one-hot + s / classes; ``codes``:
    of the scaled cosines to each class's pattern."""
    z = class_scores(v, population, per_step, codes)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), label_smoothing=smoothing)


def smoothed_targets(labels: torch.Tensor, classes: int, smoothing: float, dtype: torch.dtype) -> torch.Tensor:
    """The target distribution of ``class_loss``: softmax(z) minus this is its gradient by z (times 1/rows)."""
    hot = F.one_hot(labels, classes).to(dtype)
    return hot if not smoothing else hot * (1 - smoothing) + smoothing / classes


def regression_prediction(v: torch.Tensor, per_step: bool) -> torch.Tensor:
    """The top current [T, B, ...] read as predictions: mean over time [B, ...], or per step [B, T, ...]."""
    return v.transpose(0, 1) if per_step else v.mean(0)


def _mse(n: Node, args, labels):
    if len(args) == 2:  # bottom recall for generation: compare the encoded stimulus with B's reconstruction
        return F.mse_loss(args[1], args[0])
    pred = regression_prediction(args[0], n.attrs["per_step"])
    return F.mse_loss(pred, labels.to(args[0].dtype).reshape(pred.shape))


LOSS_IMPLS = {Op.RECO: _reco, Op.CE: _ce, Op.MSE: _mse}
