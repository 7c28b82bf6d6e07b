"""Torch twin of ``kernels/split_gemm.py``: a 0/1-spike Linear whose fp32 weight is split into bf16 parts, and
the worst-case error bound of the kernel.

The split (``split_weight``). With r_0 = W (float32) and RN_bf16 = round to the nearest bf16, ties to even:

    p_j = RN_bf16(r_{j-1}),   r_j = r_{j-1} - p_j,   j = 1..P     (P = ``parts``; p_1, p_2, p_3 = w_hi, w_mid, w_lo)
    W = p_1 + ... + p_P + r_P   exactly

This twin computes the product in float64: y = fl32(Σ_j s @ p_jᵀ + b), each p_j exactly widened. float64 rather
than float32 so that the twin is the split alone with no accumulation error of its own (its sum of P·K + 1 terms
errs by <= (P·K + 1)·2^-53 relative, 2^29 times less than fp32's), and the kernel-vs-twin difference is then the
kernel's fp32 accumulation error plus the twin's final rounding. The result is rounded to float32 once, so the
twin keeps the kernel's contract (float32 out).

Derivation of ``split_error_bound`` (W an fp32 row w_1..w_K, s_k in {0, 1}, S = Σ_k s_k |w_k|, u_b = 2^-8):

1. Each residual is exact in fp32. bf16 keeps 8 significant bits (7 stored), so RN_bf16 errs by at most half a
   bf16 ulp: |r_j| <= 2^-8 |r_{j-1}|. r_{j-1} and p_j are both multiples of ulp32(r_{j-1}) (p_j's grid is
   coarser), so r_j is that multiple with |r_j| < 2^16 ulp32(r_{j-1}): it fits in 16 bits and the subtraction
   is exact (in the kernel's fp32 and in this twin's float64 alike).
   NB: with 8 significant bits the round-to-nearest bound is 2^-8, not 2^-9: W = 1 + 2^-8 lies halfway between
   the bf16 neighbours 1 and 1 + 2^-7 and rounds (to even) to 1, an error of 2^-8 / (1 + 2^-8) relative.
2. Split error: |r_P| <= u_b^P |W|, hence |Σ_k s_k w_k - Σ_k s_k Σ_j p_jk| <= u_b^P S.
   (For P = 3 it is in fact 0: |r_1| <= 2^15 ulp32(W) (half a bf16 ulp of W), |r_2| <= 2^7 ulp32(W) (half a
   bf16 ulp of r_1), and r_2 is a multiple of ulp32(W), so it has <= 8 significant bits and p_3 = r_2, unless
   r_2 is below bf16's normal range (|W| < ~2^-110). The bound keeps u_b^3 for tiny weights and flushed
   subnormals.)
3. Part sizes: |p_j| <= |r_{j-1}| + |r_j| <= (u_b^{j-1} + u_b^j) |W|, so Σ_k s_k|p_1k| <= c_1 S with
   c_1 = 1 + u_b and Σ_k s_k Σ_{j>=2}|p_jk| <= c_2 S with c_2 = Σ_{j=2..P} (u_b^{j-1} + u_b^j) (< 2^-7).
4. Accumulation. Products s·p are exact (s is 0 or 1). The kernel sums the p_1 products in one fp32 accumulator
   A (K terms) and the p_2, p_3 products in a second one C ((P-1)·K terms), then y = fl(fl(A + C) + b). For any
   summation tree, y = Σ_i x_i (1 + θ_i) with |θ_i| <= γ_{d_i}, d_i the number of roundings on leaf i's path
   and γ_n = n·u / (1 - n·u) (Higham, Accuracy and Stability, §3.1 and §4.2); adding an exact zero (a masked or
   non-spiking lane) does not round. Depths: <= K - 1 + 2 for p_1 terms, <= (P-1)·K - 1 + 2 for the others,
   1 for the bias. So
        |y - (exact split product + b)| <= γ_{K+1} c_1 S + γ_{(P-1)K+1} c_2 S + γ_1 |b|.
   u = 2^-23 (``ACC_U``), twice fp32's 2^-24: round-to-nearest additions (the interpreter's BLAS, fp32 CUDA
   cores) need 2^-24; the factor 2 is meant to cover NVIDIA tensor cores, whose fp32 accumulation Fasi, Higham,
   Mikaitis and Pranesh (2021, "Numerical behavior of NVIDIA tensor cores") found to truncate (round toward
   zero, < 2^-23 relative) rather than round to nearest. That GPU side is an assumption taken from the paper,
   not checked here (no GPU was available).
5. Underflow: each rounding may also err by up to 2^-126 absolute (subnormals, flush-to-zero): P per weight in
   the split and P·K + 2 in the sums, i.e. (2·P·K + 2)·2^-126 in all.

Total, worst case over spike patterns (S <= Σ_k |w_k|, all spikes 1):
    bound = u_b^P S + γ_{K+1} c_1 S + γ_{(P-1)K+1} c_2 S + γ_1 |b| + (2PK + 2)·2^-126
For comparison a plain fp32 dot of the same row is bounded by γ_K S (2^-24 rounding): for P = 3 the bound is
that of fp32 (times the 2x allowance for tensor cores), for P = 2 it adds 2^-16 S, for P = 1 (bf16 weights) 2^-8 S.
"""

from __future__ import annotations

from typing import Optional

import torch

PARTS = (1, 2, 3)  # 1 = plain bf16 weights (for comparison); 2 and 3 are the split products
BF16_U = 2.0**-8  # unit roundoff of bf16: 8 significant bits, round to nearest even
ACC_U = 2.0**-23  # per-rounding relative error allowed in the fp32 accumulation (see step 4 above)
FP64_U = 2.0**-53
ETA = 2.0**-126  # absolute allowance per rounding for underflow (step 5)


def check_split_args(fn: str, spikes, weight, bias, parts) -> None:
    """Raise ``ValueError`` naming ``fn`` unless the arguments fit the contract (dtypes, shapes, parts)."""
    for name, t, dtypes in (("spikes", spikes, (torch.uint8, torch.float32)), ("weight", weight, (torch.float32,)),
                            ("bias", bias, (torch.float32,))):
        if name == "bias" and t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            want = " or ".join(str(d) for d in dtypes)
            raise ValueError(f"{fn}: {name} must have dtype {want}, got {t.dtype}; convert it with .to({dtypes[0]})")
    if spikes.dim() < 1:
        raise ValueError(f"{fn}: spikes must be [..., K] with at least 1 dim, got a scalar")
    if weight.dim() != 2 or weight.shape[1] != spikes.shape[-1]:
        raise ValueError(
            f"{fn}: weight must be [N, K] with K = spikes.shape[-1] = {spikes.shape[-1]}, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{fn}: bias must be [N] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if isinstance(parts, bool) or parts not in PARTS:
        raise ValueError(f"{fn}: parts must be 1, 2 or 3 (number of bf16 parts of the weight), got {parts!r}")
    devices = {t.device for t in (spikes, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{fn}: spikes, weight and bias must be on one device, got {sorted(map(str, devices))}")


def split_weight(weight: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """The bf16 parts p_1..p_P of an fp32 ``weight`` (module docstring), each widened exactly to float64."""
    residual = weight.double()  # an fp32 value held exactly; every residual below stays fp32-representable
    out = []
    for _ in range(parts):
        part = residual.to(torch.bfloat16).double()  # one round-to-nearest-even from the exact residual
        out.append(part)
        residual = residual - part  # exact (step 1 of the derivation)
    return out


def spike_linear_split(
    spikes: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], parts: int = 3
) -> torch.Tensor:
    """float32 [..., N]: fl32(Σ_j spikes @ p_jᵀ + bias) computed in float64 (see the module docstring)."""
    check_split_args("spike_linear_split", spikes, weight, bias, parts)
    s = spikes.double()
    out = sum(s @ p.T for p in split_weight(weight, parts))
    if bias is not None:
        out = out + bias.double()
    return out.float()


def _gamma(n: int, u: float) -> float:
    if n * u >= 1:
        raise ValueError(f"the error bound needs n·u < 1 (n = {n} roundings, u = {u}); K is too large")
    return n * u / (1 - n * u)


def _part_coefficients(parts: int) -> tuple[float, float]:
    """c_1, c_2 of step 3: Σ|p_1| <= c_1 S and Σ_{j>=2}|p_j| <= c_2 S."""
    c_1 = 1 + BF16_U
    c_2 = sum(BF16_U ** (j - 1) + BF16_U**j for j in range(2, parts + 1))
    return c_1, c_2


def _row_sums(fn: str, weight: torch.Tensor, parts: int, K: int, bias) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(parts, bool) or parts not in PARTS:
        raise ValueError(f"{fn}: parts must be 1, 2 or 3, got {parts!r}")
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"{fn}: weight must be [N, K] with K = {K}, got {tuple(weight.shape)}")
    s = weight.double().abs().sum(1)
    b = torch.zeros_like(s) if bias is None else bias.double().abs()
    return s, b


def accumulation_error_bound(
    weight: torch.Tensor, parts: int, K: int, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """float64 [N]: the kernel's fp32 accumulation error against the exact split product (step 4 + the sums'
    share of step 5), worst case over spike patterns."""
    s, b = _row_sums("accumulation_error_bound", weight, parts, K, bias)
    c_1, c_2 = _part_coefficients(parts)
    acc = _gamma(K + 1, ACC_U) * c_1 * s + _gamma((parts - 1) * K + 1, ACC_U) * c_2 * s + _gamma(1, ACC_U) * b
    return acc + (parts * K + 2) * ETA


def split_error_bound(
    weight: torch.Tensor, parts: int, K: int, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """float64 [N]: worst-case |kernel - exact| per output neuron, exact = spikes @ weightᵀ + bias in float64,
    over all 0/1 spike patterns (module docstring). ``weight`` is the fp32 [N, K] weight and ``K`` the length of
    the reduction (= weight.shape[1], checked; γ depends on it)."""
    s, _ = _row_sums("split_error_bound", weight, parts, K, bias)
    return BF16_U**parts * s + parts * K * ETA + accumulation_error_bound(weight, parts, K, bias)

