"""Torch twin of ``kernels/encode.py``: Poisson (Bernoulli-rate) encoding with Triton's own random stream.

``philox_uniform`` reproduces ``tl.rand(seed, offset)`` bit for bit, so the twin and the kernel give the same
spikes on CPU and GPU. What ``tl.rand`` does (triton/language/random.py, read for triton 3.6/3.7):

    counter (c0, c1, c2, c3) = (offset mod 2^32, offset >> 32, 0, 0)    key (k0, k1) = (seed mod 2^32, seed >> 32)
    10 Philox-4x32 rounds:  c0, c1, c2, c3 = hi(B·c2) ^ c1 ^ k0,  lo(B·c2),  hi(A·c0) ^ c3 ^ k1,  lo(A·c0)
                            k0 += 0x9E3779B9,  k1 += 0xBB67AE85          (all mod 2^32)
        with A = 0xD2511F53, B = 0xCD9E8D57, hi/lo the upper/lower 32 bits of the 64-bit product
    u = float32(x) · float32(4.6566127342e-10), x = c0 read as int32, folded to [0, 2^31): x < 0 -> -x - 1

Torch has no unsigned 32-bit arithmetic worth the name, so uint32 values live in int64 tensors and every
operation masks back to 32 bits; the 64-bit products are built from 16-bit halves so nothing overflows int64.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
PHILOX_ROUNDS = 10
# Largest float32 scale with (2^31 - 1) · scale < 1 (Triton's constant; rounded to float32 as Triton does).
UNIFORM_SCALE = 4.6566127342e-10


def check_encode_args(fn: str, T, seed) -> None:
    """Raise ``ValueError`` unless T >= 1 and 0 <= seed < 2^63 are plain ints."""
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"{fn}: T (number of time steps) must be an int >= 1, got {T!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"{fn}: seed must be an int in [0, 2^63), got {seed!r}")


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper and lower 32 bits of a·b for a uint32 constant ``a`` and uint32 values ``b`` (held in int64)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2^48: exact in int64
    hi = (p_hi + (p_lo >> 16)) >> 16  # floor(a·b / 2^32), since a·b = p_hi·2^16 + p_lo
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox_uniform(seed: int, offset: torch.Tensor, mul_hi_lo=_mul_hi_lo) -> torch.Tensor:
    """float32 uniforms in [0, 1), equal bit for bit to ``tl.rand(seed, offset)`` for int64 ``offset`` >= 0.

    ``mul_hi_lo`` computes the two 32-bit halves of a uint32 product; the cpu backend passes a faster one."""
    c0, c1 = offset & MASK32, (offset >> 32) & MASK32
    c2 = c3 = torch.zeros_like(offset)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    folded = torch.where(signed < 0, -signed - 1, signed)
    # int32 -> float32 rounds to nearest, like Triton's sitofp; then one float32 multiply.
    scale = torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=offset.device)
    return folded.to(torch.int32).to(torch.float32) * scale


def poisson_encode(x: torch.Tensor, T: int, seed: int) -> torch.Tensor:
    """uint8 [T, *x.shape]: spikes[t, i] = [u < x_i], u = philox_uniform(seed, t·numel(x) + i)."""
    check_encode_args("poisson_encode", T, seed)
    offset = torch.arange(T * x.numel(), dtype=torch.int64, device=x.device).reshape(T, *x.shape)
    return (philox_uniform(seed, offset) < x.to(torch.float32)).to(torch.uint8)
