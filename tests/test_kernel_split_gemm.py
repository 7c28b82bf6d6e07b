"""kernels/split_gemm.py against its torch twin, and against the exact (float64) product within the documented
bound of ``kernels/ref/split_gemm.py``."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from kernels.lif import block_size
from kernels.ref import split_gemm as twin
from kernels.split_gemm import MIN_BLOCK, TARGET_PROGRAMS, spike_linear_split, tiles
from tests.kernels_strategies import U32, U64, assert_within, dims, nan_padded, seeds

# Leading dims of the spike tensor: none ([K] in, [N] out), one, or [T, B].
LEADS = st.one_of(st.just(()), st.tuples(dims()), st.tuples(st.integers(1, 4), dims(17)))


def test_signature_matches_twin():
    assert inspect.signature(spike_linear_split) == inspect.signature(twin.spike_linear_split)


def make_inputs(lead, K, N, seed, spikes_u8=True, with_bias=True, density=0.3):
    """0/1 spikes; weights N(0, 1) with full 24-bit significands, scaled by 2^e, e in [-6, 6] per weight, so the
    parts of one row land in many binades; NaN-padded so that an unmasked load past the end shows up."""
    gen = torch.Generator().manual_seed(seed)
    spikes = (torch.rand(*lead, K, generator=gen) < density).to(torch.uint8 if spikes_u8 else torch.float32)
    weight = torch.randn(N, K, generator=gen) * torch.exp2(torch.randint(-6, 7, (N, K), generator=gen).float())
    bias = torch.randn(N, generator=gen) if with_bias else None
    return nan_padded(spikes), nan_padded(weight), None if bias is None else nan_padded(bias)


def exact(spikes, weight, bias):
    """The float64 product: exact for these sizes up to float64's 2^-53 (see ``twin_own_error``)."""
    out = spikes.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def twin_own_error(weight, parts, K, bias, twin_out):
    """|twin - exact split product|: its float64 sum of parts·K + 1 terms (each part <= 2 |w|, so Σ|terms| <=
    2 S + |b|) and its final rounding to float32 (2^-24 relative, 2^-150 absolute below the normal range)."""
    s, b = weight.double().abs().sum(1), (0 if bias is None else bias.double().abs())
    return 2 * (parts * K + 1) * U64 * (2 * s + b) + U32 * twin_out.double().abs() + 2.0**-150


@given(lead=LEADS, K=dims(), N=dims(), parts=st.sampled_from([1, 2, 3]), seed=seeds(), spikes_u8=st.booleans(),
       with_bias=st.booleans())
def test_matches_twin(lead, K, N, parts, seed, spikes_u8, with_bias):
    spikes, weight, bias = make_inputs(lead, K, N, seed, spikes_u8, with_bias)
    out = spike_linear_split(spikes, weight, bias, parts)
    ref = twin.spike_linear_split(spikes, weight, bias, parts)
    assert out.dtype == torch.float32 and out.shape == (*lead, N)
    # Both hold the same split (the kernel's bit rounding = torch's bf16 rounding), so they differ only by the
    # kernel's fp32 accumulation (the bound's γ terms) and the twin's own rounding.
    bound = twin.accumulation_error_bound(weight, parts, K, bias) + twin_own_error(weight, parts, K, bias, ref)
    assert_within(out, ref, bound, f"kernel vs twin, parts={parts}")


def test_large_tiles_match_twin():
    # 750 x 700 keeps the 64 x 64 tiles (12 x 11 = 132 programs), which the small shapes above never reach.
    lead, K, N = (3, 250), 40, 700
    assert tiles(750, N) == (64, 64)
    spikes, weight, bias = make_inputs(lead, K, N, seed=3)
    out = spike_linear_split(spikes, weight, bias, 3)
    ref = twin.spike_linear_split(spikes, weight, bias, 3)
    bound = twin.accumulation_error_bound(weight, 3, K, bias) + twin_own_error(weight, 3, K, bias, ref)
    assert_within(out, ref, bound, "kernel vs twin, 64 x 64 tiles")


# The 3-part kernel against a plain fp32 dot, both measured against float64, maxima over all outputs:
#     max err_3 <= FP32_RATIO · max err_fp32 + 2^-24 · max |exact|.
# For parts = 3 the split is exact (twin docstring, step 2), so both errors are roundings of the same exact
# products summed in fp32 in different orders: in 150 random cases (shapes up to 70, inputs as ``make_inputs``)
# the largest ratio was 1.45, the errors being a few final roundings of the largest outputs. The kernel adds one
# more rounding (A + C), hence the factor 2, plus one rounding of the largest output (which also covers a plain
# sum that happens to be exact). A 2-part split leaves up to 2^-16 Σ|w| (~2^8 fp32 roundings): with w_lo dropped
# from the kernel this test fails (checked by editing the kernel).
FP32_RATIO = 2.0


@given(lead=LEADS, K=dims(), N=dims(), seed=seeds(), with_bias=st.booleans())
def test_error_against_exact_product(lead, K, N, seed, with_bias):
    spikes, weight, bias = make_inputs(lead, K, N, seed, with_bias=with_bias)
    ex = exact(spikes, weight, bias)
    for parts in (2, 3):
        assert_within(spike_linear_split(spikes, weight, bias, parts), ex,
                      twin.split_error_bound(weight, parts, K, bias), f"kernel vs exact, parts={parts}")
        ref = twin.spike_linear_split(spikes, weight, bias, parts)
        assert_within(ref, ex, twin.BF16_U**parts * weight.double().abs().sum(1)
                      + twin_own_error(weight, parts, K, bias, ref), f"twin vs exact, parts={parts}")
    err_3 = (spike_linear_split(spikes, weight, bias, 3).double() - ex).abs().max().item()
    err_fp32 = (F.linear(spikes.float(), weight, bias).double() - ex).abs().max().item()
    limit = FP32_RATIO * err_fp32 + U32 * ex.abs().max().item()
    assert err_3 <= limit, f"3-part error {err_3:.3e} is not fp32-level (plain fp32 dot: {err_fp32:.3e})"


def crafted_weights(N, K, seed):
    """fp32 weights whose parts all have the same sign along a row and maximal residuals:
    significand bits 22..16 random (w_hi), bit 15 = 0 (w_hi rounds down), bit 14 = 1 and 13..7 random (w_mid),
    bit 6 = 0 (w_mid rounds down), bits 5..0 = 1 (w_lo = 63 ulp). So |W - w_hi| >= 2^-10 |W| and
    |W - w_hi - w_mid| = 63 ulp32(W) >= 63·2^-24 |W|, all of one sign; exponents 2^-4..2^4, one sign per row."""
    gen = torch.Generator().manual_seed(seed)
    top = torch.randint(0, 128, (N, K), generator=gen, dtype=torch.int32)
    mid = torch.randint(0, 128, (N, K), generator=gen, dtype=torch.int32)
    significand = (top << 16) | (1 << 14) | (mid << 7) | 0x3F
    exponent = torch.randint(127 - 4, 127 + 5, (N, K), generator=gen, dtype=torch.int32)
    sign = torch.randint(0, 2, (N, 1), generator=gen, dtype=torch.int32).expand(N, K)
    return ((sign << 31) | (exponent << 23) | significand).view(torch.float32).contiguous()


@given(M=st.integers(1, 5), K=st.integers(1, 8), N=dims(20), seed=seeds())
def test_each_part_matters(M, K, N, seed):
    # All spikes 1, the worst case the bound is written for. Residuals of one sign add up: dropping a part leaves
    # at least 63·2^-24 S (lo) or 2^-10 S (mid), S = Σ|w|, against a next bound of ~(K + 1)·2^-23 S + u_b^P S.
    # K <= 8 keeps 63·2^-24 S above the 3-part bound plus the 2-part accumulation error (~2.7 vs ~1.1 e-6 S).
    weight = nan_padded(crafted_weights(N, K, seed))
    spikes = nan_padded(torch.ones(M, K, dtype=torch.uint8))
    ex = exact(spikes, weight, None)
    err = {p: (spike_linear_split(spikes, weight, None, p).double() - ex).abs() for p in (1, 2, 3)}
    bound = {p: twin.split_error_bound(weight, p, K).expand(M, N) for p in (2, 3)}
    assert bool((err[1] > bound[2]).all()), "w_hi alone is within the 2-part bound: the bound cannot see w_mid"
    assert_within(err[2], torch.zeros_like(err[2]), bound[2], "parts=2 (w_mid dropped?)")
    assert bool((err[2] > bound[3]).all()), "w_hi + w_mid is within the 3-part bound: the bound cannot see w_lo"
    assert_within(err[3], torch.zeros_like(err[3]), bound[3], "parts=3 (w_lo dropped?)")


def tie_heavy_weights(N, K, seed):
    """Random fp32 bit patterns (subnormals included; exponents below 254, so no part overflows to inf), a third
    with the low 16 bits 0x8000 (w_hi exactly halfway between two bf16 values) and a third with bit 15 = 0 and
    a tie in the residual (w_mid halfway)."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2**31 - 1, (N, K), generator=gen, dtype=torch.int64)
    bits = torch.where((bits >> 23) >= 254, bits - (2 << 23), bits)
    kind = torch.randint(0, 3, (N, K), generator=gen)
    mid_tie = (bits & ~0xFFFF) | 0x4000 | (bits & (0x7F << 7)) | 0x40
    bits = torch.where(kind == 1, (bits & ~0xFFFF) | 0x8000, torch.where(kind == 2, mid_tie, bits))
    sign = torch.randint(0, 2, (N, K), generator=gen, dtype=torch.int64) << 31
    return (bits | sign).to(torch.int32).view(torch.float32).contiguous()


@given(K=dims(), N=dims(), seed=seeds())
def test_split_rounding_bitwise(K, N, seed):
    # Identity spikes: out[m, n] = Σ_j p_j[n, m], one nonzero product per part, and the sum of the parts of one
    # weight is exact in fp32 (it has <= 24 significant bits). So the kernel must equal the twin bit for bit:
    # its integer rounding must be torch's round-to-nearest-even, ties and subnormals included. For parts = 3 it
    # is the weight itself wherever w_lo is a normal number (|w| >= 2^-100 is ample).
    weight = tie_heavy_weights(N, K, seed)
    spikes = nan_padded(torch.eye(K, dtype=torch.uint8))
    for parts in (1, 2, 3):
        out = spike_linear_split(spikes, nan_padded(weight), None, parts)
        assert torch.equal(out, twin.spike_linear_split(spikes, weight, None, parts)), f"parts={parts}"
    normal = weight.T.abs() >= 2.0**-100
    assert torch.equal(out[normal], weight.T[normal])


@given(lead=LEADS, K=dims(), N=dims(), parts=st.sampled_from([1, 2, 3]), seed=seeds(), with_bias=st.booleans())
def test_spike_dtypes_and_silence(lead, K, N, parts, seed, with_bias):
    spikes, weight, bias = make_inputs(lead, K, N, seed, with_bias=with_bias)
    out_u8 = spike_linear_split(spikes, weight, bias, parts)
    out_f32 = spike_linear_split(nan_padded(spikes.float()), weight, bias, parts)
    assert torch.equal(out_u8, out_f32)
    silent = spike_linear_split(nan_padded(torch.zeros_like(spikes)), weight, bias, parts)
    expected = torch.zeros(N) if bias is None else bias
    assert torch.equal(silent, expected.expand(*lead, N))


def programs(M, N, bm, bn):
    return math.ceil(M / bm) * math.ceil(N / bn)


def test_grid_fills_an_h100():
    # The two shapes named in kernels/split_gemm.py: >= 132 programs, every tile >= 16 (tl.dot on a GPU).
    for (M, N), want in (((512, 1024), (64, 32)), ((16, 4096), (16, 16))):
        bm, bn = tiles(M, N)
        assert (bm, bn) == want
        assert programs(M, N, bm, bn) == 256 >= TARGET_PROGRAMS


@given(M=st.integers(1, 20000), N=st.integers(1, 20000))
def test_tiles_property(M, N):
    # Tiles are 16..64 (tl.dot's minimum on a GPU); they start at the smallest power of two covering the output
    # (at most 64) and shrink, N first, only while the grid is short of TARGET_PROGRAMS, and no further.
    bm, bn = tiles(M, N)
    nat_m, nat_n = block_size(M, MIN_BLOCK, 64), block_size(N, MIN_BLOCK, 64)
    assert bm in (16, 32, 64) and bn in (16, 32, 64) and bm <= nat_m and bn <= nat_n
    assert programs(M, N, bm, bn) >= TARGET_PROGRAMS or (bm, bn) == (MIN_BLOCK, MIN_BLOCK)
    if bn < nat_n:
        assert programs(M, N, nat_m, 2 * bn) < TARGET_PROGRAMS
    if bm < nat_m:
        assert bn == MIN_BLOCK and programs(M, N, 2 * bm, bn) < TARGET_PROGRAMS


def test_empty_and_zero_k():
    assert spike_linear_split(torch.zeros(0, 3, dtype=torch.uint8), torch.ones(4, 3), None).shape == (0, 4)
    assert spike_linear_split(torch.zeros(2, 3, dtype=torch.uint8), torch.ones(0, 3), None).shape == (2, 0)
    bias = torch.tensor([1.5, -2.0])
    assert torch.equal(spike_linear_split(torch.zeros(3, 0), torch.zeros(2, 0), bias, 2), bias.expand(3, 2))


def test_validation():
    s, w = torch.zeros(3, 4, dtype=torch.uint8), torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"spikes must have dtype torch.uint8 or torch.float32, got torch.int64"):
        spike_linear_split(s.long(), w, None)
    with pytest.raises(ValueError, match=r"weight must have dtype torch.float32, got torch.float64"):
        spike_linear_split(s, w.double(), None)
    with pytest.raises(ValueError, match=r"weight must be \[N, K\] with K = spikes.shape\[-1\] = 4, got \(5, 3\)"):
        spike_linear_split(s, torch.zeros(5, 3), None)
    with pytest.raises(ValueError, match=r"bias must be \[N\] = \[5\], got \(4,\)"):
        spike_linear_split(s, w, torch.zeros(4))
    with pytest.raises(ValueError, match=r"parts must be 1, 2 or 3 .*got 4"):
        spike_linear_split(s, w, None, 4)
    with pytest.raises(ValueError, match=r"weight must be contiguous"):
        spike_linear_split(s, torch.zeros(4, 5).T, None)
    with pytest.raises(ValueError, match=r"weight must be \[N, K\] with K = 3"):
        twin.split_error_bound(w, 3, 3)
