"""kernels/local_update.py against a float64 grad_outᵀ @ inp."""

import inspect

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.local_update import weight_grad
from kernels.ref import local_update as twin
from tests.kernels_strategies import TOL, assert_within, dims, nan_padded, seeds


def test_signature_matches_twin():
    assert inspect.signature(weight_grad) == inspect.signature(twin.weight_grad)


@given(
    lead=st.lists(dims(), min_size=1, max_size=2).map(tuple), N=dims(), K=dims(), seed=seeds(),
    spikes_in=st.booleans(), with_bias=st.booleans(),
)
def test_matches_float64_matmul(lead, N, K, seed, spikes_in, with_bias):
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(*lead, N, generator=gen)
    inp = torch.rand(*lead, K, generator=gen)
    if spikes_in:
        inp = (inp < 0.3).to(torch.uint8)
    grad_out, inp = nan_padded(grad_out), nan_padded(inp)
    dw, db = weight_grad(grad_out, inp, with_bias)
    g, x = grad_out.reshape(-1, N).double(), inp.reshape(-1, K).double()
    M = g.shape[0]
    assert dw.dtype == torch.float32 and dw.shape == (N, K)
    # γ_M bound of TOL["dot"]: a sum of M products in any order.
    assert_within(dw, g.T @ x, TOL["dot"] * (M + 1) * (g.abs().T @ x.abs()), "dW")
    if with_bias:
        assert db.dtype == torch.float32 and db.shape == (N,)
        assert_within(db, g.sum(0), TOL["dot"] * (M + 1) * g.abs().sum(0), "db")
    else:
        assert db is None
    ref_dw, _ = twin.weight_grad(grad_out.double(), inp.double() if not spikes_in else inp, with_bias)
    assert_within(ref_dw, g.T @ x, 1e-12 * (1 + (g.abs().T @ x.abs())), "twin dW")


def test_rows_longer_than_many_blocks():
    # M = 8 * 67 = 536 rows: 17 steps of the 32-row loop; N = 130, K = 200 cross several 64 tiles.
    gen = torch.Generator().manual_seed(2)
    grad_out = torch.randn(8, 67, 130, generator=gen)
    inp = (torch.rand(8, 67, 200, generator=gen) < 0.2).to(torch.uint8)
    dw, db = weight_grad(grad_out, inp, True)
    g, x = grad_out.reshape(-1, 130).double(), inp.reshape(-1, 200).double()
    assert_within(dw, g.T @ x, TOL["dot"] * 537 * (g.abs().T @ x.abs()), "dW")
    assert_within(db, g.sum(0), TOL["dot"] * 537 * g.abs().sum(0), "db")


def test_degenerate_shapes():
    dw, db = weight_grad(torch.zeros(0, 3), torch.zeros(0, 4), True)
    assert torch.equal(dw, torch.zeros(3, 4)) and torch.equal(db, torch.zeros(3))
    dw, db = weight_grad(torch.ones(2, 5, 3), torch.zeros(2, 5, 0), True)
    assert dw.shape == (3, 0) and torch.equal(db, torch.full((3,), 10.0))


def test_validation():
    g, x = torch.zeros(4, 3), torch.zeros(4, 5)
    with pytest.raises(ValueError, match=r"equal leading dims, got \(4, 3\) and \(5, 5\)"):
        weight_grad(g, torch.zeros(5, 5), False)
    with pytest.raises(ValueError, match=r"inp must have dtype torch.uint8 or torch.float32, got torch.bool"):
        weight_grad(g, x.bool(), False)
    with pytest.raises(ValueError, match=r"grad_out must have dtype torch.float32, got torch.float16"):
        weight_grad(g.half(), x, False)
    with pytest.raises(ValueError, match=r"grad_out must be contiguous"):
        weight_grad(torch.zeros(3, 4).T, x, False)
    with pytest.raises(ValueError, match=r"inp must have at least 2 dims, got shape \(5,\)"):
        weight_grad(g, torch.zeros(5), False)
