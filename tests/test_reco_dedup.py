"""The class-deduplicated ReCo (B x R) equals the twin's B x B ReCo on expanded rows, gradients summed per class."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bsdgraph.runtime.reco_dedup import reco_loss_grad_dedup
from kernels.ref.reco import reco_loss_grad


@given(st.integers(1, 12), st.integers(1, 5), st.integers(1, 3), st.integers(1, 5), st.floats(0, 1),
       st.sampled_from(["all", "other_class"]), st.booleans(), st.integers(0, 10_000))
def test_dedup_equals_the_full_form(B, R, T, D, lam, negatives, invariant, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, R, (B,), generator=gen)
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    a = torch.randn(B, D, generator=gen, dtype=torch.float64)
    a_t = a.expand(T, B, D) if invariant else torch.randn(T, B, D, generator=gen, dtype=torch.float64)
    u = torch.randn(T, len(classes), D, generator=gen, dtype=torch.float64)
    loss, da, du = reco_loss_grad_dedup(a if invariant else a_t, u, inverse, counts, lam, negatives, 1e-8)
    rows = lambda v: v.transpose(0, 1).reshape(v.shape[1], -1)  # noqa: E731  [T, n, D] -> [n, T*D]
    ref_loss, ref_da, ref_dv_hat = reco_loss_grad(rows(a_t), rows(u[:, inverse]), labels, lam, negatives, 1e-8)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12, abs=1e-12)
    if invariant:  # the gradient of the one stored value: the per-step gradients summed over t
        assert da.shape == (B, D)
        assert torch.allclose(da, ref_da.reshape(B, T, D).sum(1), rtol=1e-10, atol=1e-12)
    else:
        assert torch.allclose(rows(da), ref_da, rtol=1e-10, atol=1e-12)
    per_class = torch.zeros(len(classes), T * D, dtype=torch.float64).index_add_(0, inverse, ref_dv_hat)
    assert torch.allclose(rows(du), per_class, rtol=1e-10, atol=1e-12)


@given(st.integers(1, 9), st.integers(1, 3), st.integers(1, 5), st.integers(1, 4), st.floats(0, 1),
       st.sampled_from(["all", "other_class"]), st.integers(0, 10_000))
def test_the_step_layout_form_equals_the_twin(B, T, D, n_classes, lam, negatives, seed):
    """reco_loss_grad_steps on [T, B, D] operands == the twin on [B, T*D] rows (per-sample B rows)."""
    from bsdgraph.runtime.reco_dedup import reco_loss_grad_steps

    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (B,), generator=gen)
    a, u = (torch.randn(T, B, D, generator=gen, dtype=torch.float64) for _ in range(2))
    loss, da, du = reco_loss_grad_steps(a, u, labels, lam, negatives, 1e-8)
    rows = lambda v: v.transpose(0, 1).reshape(v.shape[1], -1)  # noqa: E731
    ref_loss, ref_da, ref_du = reco_loss_grad(rows(a), rows(u), labels, lam, negatives, 1e-8)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12, abs=1e-12)
    assert torch.allclose(rows(da), ref_da, rtol=1e-10, atol=1e-12)
    assert torch.allclose(rows(du), ref_du, rtol=1e-10, atol=1e-12)
