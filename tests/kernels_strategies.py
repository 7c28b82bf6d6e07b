"""Hypothesis strategies, the tolerance table and the threshold-margin helpers of the kernel tests.

Shapes mix 1, primes, non-powers of two and sizes just above the kernels' block caps (LIF/encode blocks of
1024 lanes, dot tiles of 64 with K/M steps of 32): the interpreter's cost grows with the number of programs, so
the tests use the production blocks and small shapes that still cross a block edge, rather than tiny blocks.
Tensors are drawn from a torch generator seeded by hypothesis (drawing each element through hypothesis would be
slow and would not shrink usefully).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from kernels.ref.lif import lif_forward as lif_forward_twin

# ---------------------------------------------------------------------------------------------------------------
# Tolerance table. Kernels compute in float32 and are compared with the float64 twin, so every number is a
# multiple of the float32 unit roundoff U32 = 2^-24 times a scale computed from the data (the bound is
# elementwise: |kernel - reference| <= TOL[name] * scale). Spikes and Philox uniforms are compared exactly.
# The numbers are worst-case bounds, not fits. Measured under the interpreter with HYPOTHESIS_PROFILE=long
# (500 examples per test), the largest error seen was this fraction of its bound: V 0.41, dW 0.31, lif
# gradient 0.26, db 0.16, h 0.03, ReCo gradients 0.016, ReCo loss 0.014.
U32 = 2.0**-24
U64 = 2.0**-53
TOL = {
    # LIF potentials. A step rounds ~3 times (subtract, divide, add) at magnitude <= S = 1 + max|I| + |v_reset|
    # + v_th; an error in v decays by (1 - 1/τ) per step, so errors sum to <= 3 τ u S <= 24 u S for τ <= 8.
    # Twice that, per unit of S.
    "lif_h": 48 * U32,
    # lif_backward. Per step: the surrogate is ~5 roundings, dv/dh and the update ~4 more, all relative to the
    # terms' absolute values. The scale is the same recurrence run on absolute values (``lif_grad_scale``), and
    # errors add up linearly over the T steps: bound = 16 T u * scale (16 >= 5 + 4 + 1 with a 1.6x margin).
    "lif_grad": 16 * U32,
    # A sum of n products in any order (tl.dot's tiles, the interpreter's np.matmul chunks) is within
    # (n + 1) u Σ|terms| of the exact sum (Higham's γ_n bound; +1 for the bias / accumulator add). Used for the
    # linear current (n = K), weight_grad (n = M) and db (n = M); the factor 2 is headroom.
    "dot": 2 * U32,
    # ReCo. Cosines carry ~(F + 4) u relative error (Gram and norm sums over F, sqrt, division); the gradient
    # adds a sum over B. The scale ``reco_grad_scale`` is |∂L/∂C| <= 2(1 + λ)/B propagated with absolute values
    # through the closed form; bound = 4 (F + B + 16) u * scale.
    "reco": 4 * U32,
}

SPIKE_MARGIN = 1e-3  # generated inputs keep |h - v_th| >= this at every step (see ``keep_lif_margin``)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, what: str) -> None:
    """Elementwise |actual - expected| <= bound, reporting the worst element relative to its bound."""
    err = (actual.double() - expected.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    bad = ~(err <= bound)  # NaN compares false: written so that a NaN counts as outside the bound
    if bad.any():
        ratio = torch.where(bad, (err / bound.clamp(min=1e-300)).nan_to_num(nan=float("inf")), 0.0)
        i = int(ratio.flatten().argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements outside the bound; worst at flat index {i}: "
            f"|{actual.flatten()[i].item()!r} - {expected.flatten()[i].item()!r}| = {err.flatten()[i].item():.3e}"
            f" > {bound.flatten()[i].item():.3e}"
        )


def nan_padded(t: torch.Tensor, pad: int = 4096) -> torch.Tensor:
    """``t`` as a contiguous view at the front of a larger buffer whose tail is NaN (uint8: 255).

    A kernel that loads past the end of a tensor without a mask (or with a wrong one) then reads NaN, which
    survives any multiplication by a masked-out zero, instead of whatever finite bytes happen to follow.
    """
    fill = 255 if t.dtype == torch.uint8 else float("nan")
    buf = torch.full((t.numel() + pad,), fill, dtype=t.dtype, device=t.device)
    buf[: t.numel()] = t.flatten()
    return buf[: t.numel()].view(t.shape)


# ---------------------------------------------------------------------------------------------------------------
# Shapes and parameters.
AWKWARD = [1, 2, 3, 5, 7, 13, 16, 17, 31, 33, 64, 65, 70]


def dims(max_value: int = 70) -> st.SearchStrategy[int]:
    """A size: mostly awkward ones (1, primes, 2^k ± 1, just above a 64 tile), sometimes any in range."""
    return st.one_of(st.sampled_from([d for d in AWKWARD if d <= max_value]), st.integers(1, max_value))


def trailing_shapes() -> st.SearchStrategy[tuple[int, ...]]:
    """The [*] of a [T, *] neuron tensor: 0-3 dims, sometimes more neurons than one 1024-lane block."""
    small = st.lists(dims(17), min_size=0, max_size=3).map(tuple)
    big = st.sampled_from([(1031,), (3, 347), (1025, 1)])  # 1031 and 347 are prime
    return st.one_of(small, small, small, big)


@dataclass(frozen=True)
class LifParams:
    tau: float
    v_th: float
    v_reset: float
    soft_reset: bool

    @property
    def args(self) -> tuple[float, float, float, bool]:
        return self.tau, self.v_th, self.v_reset, self.soft_reset


@st.composite
def lif_params(draw) -> LifParams:
    """τ in [1.2, 8], v_reset in [-0.3, 0.3], v_th in (v_reset + 0.05, 1.5], hard or soft reset."""
    tau = draw(st.floats(1.2, 8.0))
    v_reset = draw(st.floats(-0.3, 0.3))
    v_th = draw(st.floats(v_reset + 0.05, 1.5, exclude_min=True))
    return LifParams(tau, v_th, v_reset, draw(st.booleans()))


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


def reco_lams() -> st.SearchStrategy[float]:
    return st.sampled_from([0.0, 0.6]) | st.floats(0.0, 1.5)


def negatives() -> st.SearchStrategy[str]:
    return st.sampled_from(["all", "other_class"])


def lif_currents(shape: tuple[int, ...], p: LifParams, seed: int) -> torch.Tensor:
    """float32 currents around the firing point I = v_th (steady state of the membrane is I + v_reset)."""
    gen = torch.Generator().manual_seed(seed)
    return (p.v_th - p.v_reset) * (1 + torch.randn(shape, generator=gen, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# Threshold margin. A spike is a comparison, so a float32 kernel and a float64 reference can only be required to
# agree exactly where h is not within their rounding difference of v_th. The helpers below shape the inputs so
# that the float64 trajectory (computed from the float32-rounded inputs the kernel sees) keeps
# |h - v_th| >= SPIKE_MARGIN at every step. 1e-3 is ~100x the largest kernel error the tolerance table allows
# for the shapes used here (e.g. K u Σ|s w| ~ 70 * 6e-8 * 20 ~ 1e-4 for the linear current).


def keep_lif_margin(
    current: torch.Tensor, p: LifParams, v_init: torch.Tensor | None = None, margin: float = SPIKE_MARGIN
) -> torch.Tensor:
    """Rebuild ``current`` [T, *] step by step: where h would land within ``margin`` of v_th, shift I[t] by
    ±2·margin·τ (h moves by ±2·margin, away from v_th on the side it was on). Returns float32."""
    cur = current.to(torch.float32).clone()
    v = v_init.double() if v_init is not None else torch.zeros(cur.shape[1:], dtype=torch.float64, device=cur.device)
    for t in range(cur.shape[0]):
        h = v + (cur[t].double() - (v - p.v_reset)) / p.tau
        close = (h - p.v_th).abs() < margin
        side = torch.where(h >= p.v_th, 1.0, -1.0)
        cur[t] = torch.where(close, (cur[t].double() + side * 2 * margin * p.tau).float(), cur[t])
        h = v + (cur[t].double() - (v - p.v_reset)) / p.tau
        assert bool(((h - p.v_th).abs() >= margin * 0.99).all()), "margin rebuild failed"  # internal invariant
        s = (h >= p.v_th).double()
        v = h - p.v_th * s if p.soft_reset else h * (1 - s) + p.v_reset * s
    return cur


def keep_linear_margin(
    s_in: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: LifParams,
    margin: float = SPIKE_MARGIN, tries: int = 40,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Scale each neuron's weight row (and bias) by a factor near 1 so that its float64 trajectory keeps the
    margin; neurons are independent, so each keeps the first factor that works. None if some neuron never does
    (the caller rejects the example)."""
    w_out, b_out = weight.clone(), None if bias is None else bias.clone()
    done = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    s64 = s_in.double()
    for i in range(tries):
        c = 1.0 + 0.0173 * ((i + 1) // 2) * (-1) ** i  # 1, 0.983, 1.017, 0.965, ...
        w_c = (weight.double() * c).float()
        b_c = None if bias is None else (bias.double() * c).float()
        current = s64 @ w_c.double().T + (0 if b_c is None else b_c.double())
        _, h = lif_forward_twin(current, *p.args, return_h=True)
        ok = ((h - p.v_th).abs() >= margin).flatten(0, 1).all(0) & ~done
        w_out[ok] = w_c[ok]
        if b_out is not None:
            b_out[ok] = b_c[ok]
        done |= ok
        if bool(done.all()):
            return w_out, b_out
    return None


# ---------------------------------------------------------------------------------------------------------------
# Error scales for the tolerance table (float64, from the inputs; never used as the reference itself).


def lif_potential_scale(current: torch.Tensor, p: LifParams) -> float:
    """S of TOL["lif_h"]: the largest magnitude a step's arithmetic sees."""
    return 1.0 + float(current.double().abs().max()) + abs(p.v_reset) + abs(p.v_th)


def lif_grad_scale(grad_h: torch.Tensor, h: torch.Tensor, p: LifParams, alpha: float) -> torch.Tensor:
    """T * (the backward recurrence run on absolute values) / τ: the scale of TOL["lif_grad"]."""
    grad_h, h = grad_h.double(), h.double()
    x = math.pi * alpha * (h - p.v_th) / 2
    surrogate = alpha / (2 * (1 + x * x))
    if p.soft_reset:
        dv_dh = 1 + abs(p.v_th) * surrogate
    else:
        dv_dh = (h < p.v_th).double() + (p.v_reset - h).abs() * surrogate
    out = torch.empty_like(h)
    g_next = torch.zeros_like(h[0])
    for t in reversed(range(h.shape[0])):
        g_next = grad_h[t].abs() + g_next * abs(1 - 1 / p.tau) * dv_dh[t] + 1e-30
        out[t] = g_next / p.tau
    return out * h.shape[0]


def reco_grad_scale(v: torch.Tensor, v_hat: torch.Tensor, lam: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row scales of TOL["reco"] for grad_v and grad_v_hat: the closed form with |∂L/∂C| replaced by its bound
    2(1 + λ)/B and every term by its absolute value (row-wise max over features)."""
    v, v_hat = v.double(), v_hat.double()
    b = v.shape[0]
    n, m = v.norm(dim=1), v_hat.norm(dim=1)
    g = 2 * (1 + lam) / b / (n[:, None] * m[None, :] + eps)  # |H| bound
    vmax, hmax = v.abs().amax(1), v_hat.abs().amax(1)
    ratio_v = torch.where(n > 0, vmax / n.clamp(min=1e-300), torch.zeros_like(n))
    ratio_h = torch.where(m > 0, hmax / m.clamp(min=1e-300), torch.zeros_like(m))
    scale_v = (g * (hmax[None, :] + ratio_v[:, None] * m[None, :])).sum(1)
    scale_h = (g * (vmax[:, None] + ratio_h[None, :] * n[:, None])).sum(0)
    return scale_v[:, None], scale_h[:, None]
