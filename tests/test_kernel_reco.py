"""kernels/reco.py and its twin against autograd on a direct torch formula of the ReCo loss (float64)."""

import inspect

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.reco import reco_loss_grad
from kernels.ref import reco as twin
from tests.kernels_strategies import (
    TOL,
    U64,
    assert_within,
    dims,
    nan_padded,
    negatives,
    reco_grad_scale,
    reco_lams,
    seeds,
)


def direct_reco(v, v_hat, labels, lam, negatives, eps):
    """The loss exactly as written in docs/bsd.md ("ReCo"), for autograd."""
    b = v.shape[0]
    cos = (v @ v_hat.T) / (v.norm(dim=1)[:, None] * v_hat.norm(dim=1)[None, :] + eps)
    if negatives == "all":
        others = ~torch.eye(b, dtype=torch.bool)
    else:
        others = labels[:, None] != labels[None, :]
    positive = ((1 - cos.diagonal()) ** 2).sum()
    negative = (cos.clamp(min=0) ** 2 * others).sum()
    return (positive + lam * negative) / b


def oracle(v, v_hat, labels, lam, negatives, eps):
    v64, h64 = v.double().requires_grad_(), v_hat.double().requires_grad_()
    loss = direct_reco(v64, h64, labels, lam, negatives, eps)
    return (loss.detach(), *torch.autograd.grad(loss, (v64, h64)))


@st.composite
def reco_inputs(draw):
    """v, v̂ [B, F] with the situations the engine produces: silent (zero) rows, B driven by per-class codes
    (rows of v̂ repeated by label), perfectly aligned pairs (C = 1), and plain random streams."""
    B, F = draw(dims()), draw(st.integers(1, 130))
    gen = torch.Generator().manual_seed(draw(seeds()))
    labels = torch.randint(0, draw(st.integers(1, 4)), (B,), generator=gen)
    v = torch.randn(B, F, generator=gen)
    v_hat = torch.randn(B, F, generator=gen)
    if draw(st.booleans()):
        v_hat = torch.randn(4, F, generator=gen)[labels]  # per-class codes
    if draw(st.booleans()):
        v_hat[0] = 2 * v[0]  # an aligned pair
    if draw(st.booleans()):
        v[-1] = 0  # a silent sample
    if draw(st.booleans()):
        v, v_hat = v.clamp(min=0), v_hat.clamp(min=0)  # non-negative streams, like spike-driven currents
    return nan_padded(v), nan_padded(v_hat), labels


def test_signature_matches_twin():
    assert inspect.signature(reco_loss_grad) == inspect.signature(twin.reco_loss_grad)


def reco_bounds(v, v_hat, lam, eps, unit):
    B, F = v.shape
    count = F + B + 16
    scale_v, scale_h = reco_grad_scale(v, v_hat, lam, eps)
    loss_scale = 4 + 4 * lam * B  # (1/B)[Σ (1 - C)² + λ Σ C²] has B + λ B² terms of size <= 4
    return unit * count * loss_scale, unit * count * scale_v, unit * count * scale_h


@given(data=reco_inputs(), lam=reco_lams(), negatives=negatives(), eps=st.sampled_from([1e-8, 1e-4]))
def test_kernel_matches_autograd(data, lam, negatives, eps):
    v, v_hat, labels = data
    loss, grad_v, grad_v_hat = reco_loss_grad(v, v_hat, labels, lam, negatives, eps)
    ref_loss, ref_v, ref_h = oracle(v, v_hat, labels, lam, negatives, eps)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad_v.dtype == grad_v_hat.dtype == torch.float32
    loss_bound, bound_v, bound_h = reco_bounds(v, v_hat, lam, eps, TOL["reco"])
    assert_within(loss, ref_loss, loss_bound, "loss")
    assert_within(grad_v, ref_v, bound_v, "grad_v")
    assert_within(grad_v_hat, ref_h, bound_h, "grad_v_hat")


@given(data=reco_inputs(), lam=reco_lams(), negatives=negatives())
def test_twin_matches_autograd(data, lam, negatives):
    # The twin's closed form in float64 must agree with autograd to float64 rounding (same scales, u = 2^-53).
    v, v_hat, labels = (data[0].double(), data[1].double(), data[2])
    loss, grad_v, grad_v_hat = twin.reco_loss_grad(v, v_hat, labels, lam, negatives, 1e-8)
    ref_loss, ref_v, ref_h = oracle(v, v_hat, labels, lam, negatives, 1e-8)
    loss_bound, bound_v, bound_h = reco_bounds(v, v_hat, lam, 1e-8, 4 * U64)
    assert_within(loss, ref_loss, loss_bound, "loss")
    assert_within(grad_v, ref_v, bound_v, "grad_v")
    assert_within(grad_v_hat, ref_h, bound_h, "grad_v_hat")


def test_known_values():
    # Two orthogonal aligned pairs: C = I, so the loss is 0 for any λ; swapping v̂ rows gives C = [[0,1],[1,0]]:
    # loss = (1/2)[2·1 + λ·2·1] = 1 + λ.
    v = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    loss, _, _ = reco_loss_grad(v, v.clone(), None, 0.6, "all", 0.0)
    assert abs(loss.item()) < 1e-7
    loss, _, _ = reco_loss_grad(v, v.flip(0).contiguous(), None, 0.6, "all", 0.0)
    assert abs(loss.item() - 1.6) < 1e-6
    # With other_class and equal labels there are no negatives: only the positive term remains (1 per sample).
    loss, _, _ = reco_loss_grad(v, v.flip(0).contiguous(), torch.tensor([3, 3]), 0.6, "other_class", 0.0)
    assert abs(loss.item() - 1.0) < 1e-6


def test_batch_larger_than_a_tile_and_long_rows():
    # B = 131 (prime, > 2 tiles of 64) and F = 300 (split over several F chunks in the Gram pass).
    gen = torch.Generator().manual_seed(11)
    v, v_hat = torch.randn(131, 300, generator=gen), torch.randn(131, 300, generator=gen)
    labels = torch.randint(0, 10, (131,), generator=gen)
    loss, grad_v, grad_v_hat = reco_loss_grad(v, v_hat, labels, 0.6, "other_class")
    ref_loss, ref_v, ref_h = oracle(v, v_hat, labels, 0.6, "other_class", 1e-8)
    loss_bound, bound_v, bound_h = reco_bounds(v, v_hat, 0.6, 1e-8, TOL["reco"])
    assert_within(loss, ref_loss, loss_bound, "loss")
    assert_within(grad_v, ref_v, bound_v, "grad_v")
    assert_within(grad_v_hat, ref_h, bound_h, "grad_v_hat")


def test_validation():
    v = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"negatives must be one of \('all', 'other_class'\), got 'some'"):
        reco_loss_grad(v, v, None, 0.6, "some")
    with pytest.raises(ValueError, match=r"negatives='other_class' needs labels"):
        reco_loss_grad(v, v, None, 0.6, "other_class")
    with pytest.raises(ValueError, match=r"labels must be int64 of shape \[3\], got torch.int32 \(3,\)"):
        reco_loss_grad(v, v, torch.zeros(3, dtype=torch.int32), 0.6, "other_class")
    with pytest.raises(ValueError, match=r"v and v_hat must both be \[B, F\], got \(3, 4\) and \(3, 5\)"):
        reco_loss_grad(v, torch.zeros(3, 5), None, 0.6, "all")
    with pytest.raises(ValueError, match=r"v_hat must be contiguous"):
        reco_loss_grad(v, torch.zeros(4, 3).T, None, 0.6, "all")
    with pytest.raises(ValueError, match=r"v must have 2 dims"):
        reco_loss_grad(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), None, 0.6, "all")
    with pytest.raises(ValueError, match=r"the batch is empty"):
        reco_loss_grad(torch.zeros(0, 4), torch.zeros(0, 4), None, 0.6, "all")
    with pytest.raises(ValueError, match=r"lam must be a number >= 0"):
        reco_loss_grad(v, v, None, -1.0, "all")
