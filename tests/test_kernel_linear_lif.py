"""kernels/linear_lif.py against its torch twin in float64."""

import inspect

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from kernels.linear_lif import linear_lif_forward
from kernels.ref import linear_lif as twin
from tests.kernels_strategies import (
    TOL,
    LifParams,
    assert_within,
    dims,
    keep_linear_margin,
    lif_params,
    lif_potential_scale,
    nan_padded,
    seeds,
)


def test_signature_matches_twin():
    assert inspect.signature(linear_lif_forward) == inspect.signature(twin.linear_lif_forward)


def make_inputs(T, B, K, N, p: LifParams, seed, spikes_in: bool, with_bias: bool):
    """Inputs whose currents sit around the firing point, then the margin shaping of kernels_strategies."""
    gen = torch.Generator().manual_seed(seed)
    if spikes_in:
        s_in = (torch.rand(T, B, K, generator=gen) < 0.3).to(torch.uint8)
    else:
        s_in = torch.rand(T, B, K, generator=gen)
    scale = 2 * (p.v_th - p.v_reset) / (0.3 * K) ** 0.5
    weight = torch.randn(N, K, generator=gen) * scale
    bias = (p.v_th - p.v_reset) * (0.5 + 0.5 * torch.randn(N, generator=gen)) if with_bias else None
    shaped = keep_linear_margin(s_in, weight, bias, p)
    assume(shaped is not None)
    weight, bias = shaped
    return nan_padded(s_in), nan_padded(weight), None if bias is None else nan_padded(bias)


@given(
    T=st.integers(1, 5), B=dims(), K=dims(), N=dims(), p=lif_params(), seed=seeds(),
    spikes_in=st.booleans(), with_bias=st.booleans(), return_v=st.booleans(), return_h=st.booleans(),
)
def test_matches_twin(T, B, K, N, p, seed, spikes_in, with_bias, return_v, return_h):
    s_in, weight, bias = make_inputs(T, B, K, N, p, seed, spikes_in, with_bias)
    spikes, v, h = linear_lif_forward(s_in, weight, bias, *p.args, return_v=return_v, return_h=return_h)
    ref_spikes, ref_v, ref_h = twin.linear_lif_forward(
        s_in if spikes_in else s_in.double(), weight.double(), None if bias is None else bias.double(),
        *p.args, return_v=True, return_h=True,
    )
    assert spikes.dtype == torch.uint8 and spikes.shape == (T, B, N)
    assert torch.equal(spikes, ref_spikes)
    # γ_K bound of TOL["dot"] on the current; h inherits at most that (the neuron averages currents with weights
    # that sum to 1) plus its own rounding.
    abs_current = s_in.double().abs() @ weight.double().abs().T + (0 if bias is None else bias.double().abs())
    current_bound = TOL["dot"] * (K + 1) * abs_current
    if return_v:
        assert v.dtype == torch.float32 and v.shape == (T, B, N)
        assert_within(v, ref_v, current_bound, "V")
    else:
        assert v is None
    if return_h:
        h_bound = float(current_bound.max()) + TOL["lif_h"] * lif_potential_scale(ref_v, p)
        assert_within(h, ref_h, h_bound, "h")
    else:
        assert h is None


def test_spike_inputs_give_exact_currents():
    # 0/1 inputs and dyadic weights (multiples of 2^-8, |w| <= 1, K = 70): every partial sum is exactly
    # representable, so V must equal the exact current bit for bit whatever the summation order.
    gen = torch.Generator().manual_seed(5)
    s_in = (torch.rand(3, 33, 70, generator=gen) < 0.5).to(torch.uint8)
    weight = torch.randint(-256, 257, (65, 70), generator=gen).float() / 256
    _, v, _ = linear_lif_forward(s_in, weight, None, 2.0, 0.3, 0.0, False, return_v=True)
    assert torch.equal(v.double(), s_in.double() @ weight.double().T)


def test_empty_and_zero_k():
    spikes, v, h = linear_lif_forward(torch.zeros(0, 2, 3), torch.zeros(4, 3), None, 2.0, 0.3, 0.0, False, True, True)
    assert spikes.shape == v.shape == h.shape == (0, 2, 4)
    # K = 0: the current is the bias alone.
    bias = torch.tensor([1.0, 0.0])
    spikes, v, _ = linear_lif_forward(torch.zeros(2, 3, 0), torch.zeros(2, 0), bias, 2.0, 0.3, 0.0, False, True)
    assert torch.equal(v, bias.expand(2, 3, 2))
    assert spikes[..., 0].all() and not spikes[..., 1].any()


def test_validation():
    s_in, w = torch.zeros(2, 3, 4, dtype=torch.uint8), torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"s_in must have dtype torch.uint8 or torch.float32, got torch.int64"):
        linear_lif_forward(s_in.long(), w, None, 2.0, 0.3, 0.0, False)
    with pytest.raises(ValueError, match=r"s_in must have 3 dims, got shape \(3, 4\)"):
        linear_lif_forward(s_in[0], w, None, 2.0, 0.3, 0.0, False)
    with pytest.raises(ValueError, match=r"weight must be \[N, K\] with K = s_in.shape\[2\] = 4, got \(5, 3\)"):
        linear_lif_forward(s_in, torch.zeros(5, 3), None, 2.0, 0.3, 0.0, False)
    with pytest.raises(ValueError, match=r"weight must be contiguous"):
        linear_lif_forward(s_in, torch.zeros(4, 5).T, None, 2.0, 0.3, 0.0, False)
    with pytest.raises(ValueError, match=r"bias must be \[N\] = \[5\], got \(4,\)"):
        linear_lif_forward(s_in, w, torch.zeros(4), 2.0, 0.3, 0.0, False)
    with pytest.raises(ValueError, match=r"weight must have dtype torch.float32, got torch.float64"):
        linear_lif_forward(s_in, w.double(), None, 2.0, 0.3, 0.0, False)
    with pytest.raises(ValueError, match=r"tau must be > 0"):
        linear_lif_forward(s_in, w, None, -1.0, 0.3, 0.0, False)
