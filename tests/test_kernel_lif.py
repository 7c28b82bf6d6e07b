"""kernels/lif.py against its torch twin (float64) and against autograd."""

import inspect
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kernels.lif as lif
from kernels.lif import lif_backward, lif_forward
from kernels.ref import lif as twin
from tests.kernels_strategies import (
    TOL,
    LifParams,
    assert_within,
    keep_lif_margin,
    lif_currents,
    lif_grad_scale,
    lif_params,
    lif_potential_scale,
    nan_padded,
    seeds,
    trailing_shapes,
)


def test_assert_within_counts_nan_as_a_failure():
    # The tolerance check itself: NaN > bound is False, so a naive check would let a NaN through.
    with pytest.raises(AssertionError, match=r"1 of 2 elements outside the bound"):
        assert_within(torch.tensor([0.0, float("nan")]), torch.zeros(2), 1.0, "x")
    with pytest.raises(AssertionError, match=r"1 of 2 elements outside the bound"):
        assert_within(torch.tensor([0.0, 2.0]), torch.zeros(2), 1.0, "x")
    assert_within(torch.tensor([0.0, 1.0]), torch.zeros(2), 1.0, "x")


def test_signatures_match_twins():
    assert inspect.signature(lif_forward) == inspect.signature(twin.lif_forward)
    assert inspect.signature(lif_backward) == inspect.signature(twin.lif_backward)


@given(T=st.integers(1, 9), shape=trailing_shapes(), p=lif_params(), seed=seeds(), with_v_init=st.booleans())
def test_forward_matches_twin(T, shape, p, seed, with_v_init):
    v_init = None
    if with_v_init:
        gen = torch.Generator().manual_seed(seed + 1)
        v_init = (p.v_reset + (p.v_th - p.v_reset) * torch.rand(shape, generator=gen)).float()
    current = nan_padded(keep_lif_margin(lif_currents((T, *shape), p, seed), p, v_init))
    spikes, h = lif_forward(current, *p.args, v_init=v_init, return_h=True)
    ref_spikes, ref_h = twin.lif_forward(
        current.double(), *p.args, v_init=None if v_init is None else v_init.double(), return_h=True
    )
    assert spikes.dtype == torch.uint8 and spikes.shape == current.shape
    assert torch.equal(spikes, ref_spikes)
    assert_within(h, ref_h, TOL["lif_h"] * lif_potential_scale(current, p), "h")


def test_forward_without_h_returns_none_and_same_spikes():
    p = LifParams(2.0, 0.3, 0.0, False)
    current = keep_lif_margin(lif_currents((4, 5, 3), p, 0), p)
    spikes, h = lif_forward(current, *p.args)
    assert h is None
    assert torch.equal(spikes, lif_forward(current, *p.args, return_h=True)[0])


def test_threshold_is_inclusive():
    # h = 0 + (1.0 - (0 - 0)) / 2 = 0.5 exactly: s = [h >= v_th] fires at v_th = 0.5, not at the next float up.
    current = torch.ones(1, 2)
    assert lif_forward(current, 2.0, 0.5, 0.0, False)[0].tolist() == [[1, 1]]
    assert lif_forward(current, 2.0, 0.50000006, 0.0, False)[0].tolist() == [[0, 0]]


def test_forward_fires_and_rests():
    # Not vacuous: a constant strong current fires every step under soft reset; zero current never fires.
    p = LifParams(2.0, 0.3, 0.0, True)
    spikes, _ = lif_forward(torch.full((6, 4), 5.0), *p.args)
    assert bool(spikes.all())
    spikes, _ = lif_forward(torch.zeros(6, 4), *p.args)
    assert not bool(spikes.any())


@given(
    T=st.integers(1, 9), shape=trailing_shapes(), p=lif_params(), seed=seeds(),
    alpha=st.sampled_from([2.0]) | st.floats(0.5, 4.0),
)
def test_backward_matches_autograd_twin(T, shape, p, seed, alpha):
    # No margin needed: both sides decide spikes on the same h values (float32 h, upcast exactly to float64).
    current = lif_currents((T, *shape), p, seed).float()
    _, h = lif_forward(current, *p.args, return_h=True)
    grad_h = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed + 7))
    grad_h, h = nan_padded(grad_h), nan_padded(h)
    grad_current = lif_backward(grad_h, h, *p.args, alpha)
    ref = twin.lif_backward(grad_h.double(), h.double(), *p.args, alpha)
    assert grad_current.dtype == torch.float32
    assert_within(grad_current, ref, TOL["lif_grad"] * lif_grad_scale(grad_h, h, p, alpha), "grad_current")


@given(T=st.integers(1, 6), shape=trailing_shapes(), p=lif_params(), seed=seeds())
def test_backward_matches_autograd_from_the_current(T, shape, p, seed):
    # Independent of the twin's h-pinning: differentiate a float64 forward from I itself. The margin makes the
    # float64 and float32 spike patterns identical, so both differentiate the same piecewise function.
    current = keep_lif_margin(lif_currents((T, *shape), p, seed), p)
    _, h = lif_forward(current, *p.args, return_h=True)
    grad_h = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed + 3))
    cur64 = current.double().requires_grad_()
    spike = lambda x: twin.SpikeFn.apply(x, p.v_th, 2.0)  # noqa: E731
    _, h64 = twin.lif_recurrence(cur64, *p.args, None, spike)
    (ref,) = torch.autograd.grad(h64, cur64, grad_h.double())
    got = lif_backward(grad_h, h, *p.args, 2.0)
    assert_within(got, ref, TOL["lif_grad"] * lif_grad_scale(grad_h, h, p, 2.0), "grad_current")


@pytest.mark.parametrize("soft_reset", [False, True])
def test_surrogate_gradient_is_never_silently_zero(soft_reset):
    # T = 2, loss = h[1]: dL/dI[0] = (1/τ)(1 - 1/τ) dv[0]/dh[0]. Just above threshold with a hard reset,
    # dv/dh = (v_reset - h) σ'(h): ONLY the surrogate carries the gradient, so a missing surrogate gives 0.
    tau, v_th, v_reset, alpha = 2.0, 0.3, 0.0, 2.0
    h = torch.tensor([[v_th + 0.01, v_th - 0.01], [0.1, 0.1]])
    grad_h = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    got = lif_backward(grad_h, h, tau, v_th, v_reset, soft_reset, alpha)
    sg = alpha / (2 * (1 + (math.pi * alpha * (h[0] - v_th) / 2) ** 2))
    dv_dh = 1 - v_th * sg if soft_reset else torch.tensor([0.0, 1.0]) + (v_reset - h[0]) * sg
    expected = (1 / tau) * (1 - 1 / tau) * dv_dh
    assert bool((got[0] != 0).all())
    torch.testing.assert_close(got[0], expected.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], torch.full((2,), 1 / tau), rtol=1e-6, atol=0)


@pytest.mark.parametrize("soft_reset", [False, True])
@pytest.mark.parametrize("tau, v_th", [(3.0, 0.1), (2.0, 0.3), (1.5, 0.7)])
def test_backward_twin_keeps_the_spikes_of_exact_threshold_ties(tau, v_th, soft_reset):
    """h == v_th exactly is a spike (the forward's h >= v_th). The twin pins autograd's h to the given values; were
    the pinned value one ulp off (h + (pinned - h) rounds), a tie would flip and the reset's gradient with it. The
    kernel reads the spike from h itself: both must agree on a grid of h through v_th, in float32 and float64."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        h = (v_th + torch.randint(-6, 7, (8, 3, 16), generator=gen).to(dtype) * 0.075).to(dtype)
        h[h.sub(v_th).abs() < 1e-9] = torch.tensor(v_th, dtype=dtype)  # ties exactly at v_th in this dtype
        grad_h = torch.randn(h.shape, generator=gen, dtype=dtype)
        ref = twin.lif_backward(grad_h, h, tau, v_th, 0.0, soft_reset, 2.0)
        got = lif_backward(grad_h.float(), h.float(), tau, v_th, 0.0, soft_reset, 2.0)
        torch.testing.assert_close(got.double(), ref.double(), rtol=1e-5, atol=1e-6)


def test_empty_time_axis():
    spikes, h = lif_forward(torch.empty(0, 3), 2.0, 0.3, 0.0, False, return_h=True)
    assert spikes.shape == (0, 3) and h.shape == (0, 3)
    assert lif_backward(torch.empty(0, 3), torch.empty(0, 3), 2.0, 0.3, 0.0, False).shape == (0, 3)


def test_forward_validation():
    good = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"current must have dtype torch.float32, got torch.float64"):
        lif_forward(good.double(), 2.0, 0.3, 0.0, False)
    with pytest.raises(ValueError, match=r"current must be contiguous"):
        lif_forward(torch.zeros(4, 3).T, 2.0, 0.3, 0.0, False)
    with pytest.raises(ValueError, match=r"current must have at least 1 dims, got shape \(\)"):
        lif_forward(torch.tensor(1.0), 2.0, 0.3, 0.0, False)
    with pytest.raises(ValueError, match=r"v_init must have shape current.shape\[1:\] = \(4,\), got \(3,\)"):
        lif_forward(good, 2.0, 0.3, 0.0, False, v_init=torch.zeros(3))
    with pytest.raises(ValueError, match=r"tau must be > 0"):
        lif_forward(good, 0.0, 0.3, 0.0, False)
    with pytest.raises(ValueError, match=r"v_th must be a finite number"):
        lif_forward(good, 2.0, math.nan, 0.0, False)
    with pytest.raises(ValueError, match=r"current must be a torch.Tensor, got list"):
        lif_forward([[0.0]], 2.0, 0.3, 0.0, False)


def test_backward_validation():
    h = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"grad_h and h must have the same shape"):
        lif_backward(torch.zeros(3, 5), h, 2.0, 0.3, 0.0, False)
    with pytest.raises(ValueError, match=r"h must have dtype torch.float32, got torch.float16"):
        lif_backward(h, h.half(), 2.0, 0.3, 0.0, False)
    with pytest.raises(ValueError, match=r"alpha .* must be a number > 0"):
        lif_backward(h, h, 2.0, 0.3, 0.0, False, alpha=0.0)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(lif, "is_interpreted", lambda kernel: False)
    with pytest.raises(ValueError, match=r"CPU tensor but Triton is compiling for a GPU.*TRITON_INTERPRET=1"):
        lif_forward(torch.zeros(2, 2), 2.0, 0.3, 0.0, False)
