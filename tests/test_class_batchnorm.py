"""Batchnorm of class-deduplicated rows (B run once per class present) equals batchnorm of the full batch.

R rows stand for counts[r] identical samples each. Expanding them to the full batch and running torch's own
batchnorm (forward, running statistics, autograd backward with per-sample gradients summed per class) is the
twin; float64 so the comparison is tight (1e-10) and any mistake in a weight or a count shows."""

import math

import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bsdgraph.runtime.torch_kernels import class_weighted_batch_norm, class_weighted_batch_norm_backward

SHAPES = st.sampled_from([(), (3,), (2, 3)])  # per-channel feature map: linear, 1-D, 2-D


@given(st.integers(1, 3), st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(1, 3), SHAPES,
       st.booleans(), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_class_weighted_batchnorm_equals_the_full_batch(T, counts, C, spatial, affine, seed):
    assume(T * sum(counts) * math.prod(spatial) > 1)  # torch refuses one value per channel
    gen = torch.Generator().manual_seed(seed)
    R = len(counts)
    counts = torch.tensor(counts)
    inverse = torch.repeat_interleave(torch.arange(R), counts)
    rows = torch.randn(T, R, C, *spatial, generator=gen, dtype=torch.float64) * 2 + 0.5
    per_sample_grad = torch.randn(T, int(counts.sum()), C, *spatial, generator=gen, dtype=torch.float64)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(C, generator=gen, dtype=torch.float64) if affine else None
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    rm_twin, rv_twin = rm.clone(), rv.clone()

    # twin: the full batch, torch's batchnorm, autograd
    full = rows.index_select(1, inverse).reshape(-1, C, *spatial).requires_grad_()
    w_t = None if w is None else w.clone().requires_grad_()
    b_t = None if b is None else b.clone().requires_grad_()
    out_t = F.batch_norm(full, rm_twin, rv_twin, w_t, b_t, True, 0.1, 1e-5)
    out_t.backward(per_sample_grad.reshape(out_t.shape))
    g_in_t = torch.zeros_like(rows).index_add_(1, inverse, full.grad.reshape(T, -1, C, *spatial))

    out, mean, invstd = class_weighted_batch_norm(rows, counts, w, b, rm, rv, True, 0.1, 1e-5)
    per_class_grad = torch.zeros_like(rows).index_add_(1, inverse, per_sample_grad)
    g_in, g_w, g_b = class_weighted_batch_norm_backward(per_class_grad, rows, counts, w, mean, invstd)

    expanded = out.index_select(1, inverse).reshape(out_t.shape)
    assert torch.allclose(expanded, out_t.detach(), atol=1e-10), "forward"
    assert torch.allclose(rm, rm_twin, atol=1e-12) and torch.allclose(rv, rv_twin, atol=1e-12), "running stats"
    assert torch.allclose(g_in, g_in_t, atol=1e-10), "input gradient (per-class sums)"
    if affine:
        assert torch.allclose(g_w, w_t.grad, atol=1e-10) and torch.allclose(g_b, b_t.grad, atol=1e-10), "w, b"


def test_eval_mode_uses_the_running_statistics():
    rows = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    w, b = torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    out, _, _ = class_weighted_batch_norm(rows, torch.tensor([1, 7, 2]), w, b, rm.clone(), rv.clone(), False,
                                           0.1, 1e-5)
    twin = F.batch_norm(rows.reshape(-1, 4, 5), rm, rv, w, b, False, 0.1, 1e-5)
    assert torch.allclose(out.reshape(twin.shape), twin, atol=1e-12)
