"""The cpu backend (plan executor, explicit local gradients) equals the reference runtime."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bsdgraph import BSDConfig, GraphBuilder, Op, derive_feedback
from bsdgraph.ir.graph import Stream
from bsdgraph.runtime.losses import band_split, per_sample
from bsdgraph.ir.neuron import lif_scan
from bsdgraph.runtime import OptimConfig
from bsdgraph.runtime.cpu import cpu_runtime
from bsdgraph.runtime.reference import ReferenceRuntime
from tests.strategies import any_graph, conv_graphs

# Gradients are compared as |a - b| <= RTOL * (largest gradient of the same node) + ATOL. Both runtimes compute in
# float32 with different summation orders (one GEMM over T*B rows vs autograd's per-op sums, closed-form ReCo vs
# autograd); measured worst case ~3e-7 relative on the MLP and ~1.3e-5 on conv weights (convolution_backward vs
# autograd's conv). Scaling by the node's largest gradient covers biases whose true gradient is ~0 (a conv bias
# before batchnorm, a transposed conv's bias under ReCo's scale invariance): they carry only rounding noise of the
# size of the node's other sums. ATOL covers gradients that are exactly 0 by symmetry but computed as a sum of
# many O(1e-2) terms: a bias feeding ReCo through a silent layer sums dV̂ over all pixels, which the cosine's scale
# invariance makes 0 (measured 1.07e-6 vs 3e-10 between backends). Real errors are of the gradient's own size.
RTOL, ATOL = 1e-4, 1e-5


def batch(g, B=6, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(B, *g.by_op(Op.INPUT)[0].shape, generator=gen) * scale
    y = torch.arange(B) % g.by_op(Op.OUTPUT)[0].attrs["n_classes"]
    return x, y


def well_conditioned(bsd, env, require_activity: bool = False) -> bool:
    """Reject examples where float reordering may legitimately change the result (house rule: keep a margin).

    A membrane within 1e-5 of the threshold (currents differ by ~1e-6 between backends) can spike in one backend
    and not the other; a batchnorm whose input has (near) zero variance in a channel (a silent layer feeding it)
    divides rounding noise by sqrt(eps).
    With ``require_activity`` every layer must fire: behind a silent layer some gradients are 0 only by symmetry
    (ReCo's scale invariance), i.e. pure rounding noise, which AdamW's normalisation turns into lr-sized steps."""
    if require_activity and any(float(env[n.name].detach().mean()) == 0 for n in bsd.by_op(Op.LIF)):
        return False
    for n in bsd.by_op(Op.LIF):
        a = n.attrs
        _, h = lif_scan(env[bsd.inputs(n.name)[0].name].detach(), a["tau"], a["v_th"], a["v_reset"],
                        a["reset"] == "soft")
        if float((h - a["v_th"]).abs().min()) < 1e-5:
            return False
    for n in bsd.by_op(Op.RECO):  # a (nearly) zero operand row makes the cosine divide rounding noise by ~eps
        for v in (env[i.name].detach() for i in bsd.inputs(n.name)):
            parts = band_split(v, n.attrs["freq_r"]) if n.attrs["freq"] else (v,)
            if min(float(per_sample(p).norm(dim=1).min()) for p in parts) < 1e-3:
                return False
            # a constant operand row (a synapse behind a silent layer puts out its bias alone): the gradient of a
            # one-channel bias is then 0 only by the cosine's scale invariance, and each runtime returns its own
            # rounding noise of terms ~1/|row| (measured: reference -1.2e-5, deduplicated B 5.7e-7)
            rows = per_sample(v)
            if float((rows.amax(dim=1) - rows.amin(dim=1)).min()) < 1e-6:
                return False
    for n in bsd.by_op(Op.BATCHNORM):
        v = env[bsd.inputs(n.name)[0].name].detach()
        per_channel = v.transpose(0, 2).reshape(v.shape[2], -1) if v.dim() > 3 else v.reshape(-1, v.shape[-1]).T
        if float(per_channel.var(dim=1).min()) < 1e-6:
            return False
    return True


def removed_by_batchnorm(bsd) -> set[str]:
    """Biases of synapses right before a batchnorm (or summed with other currents into one): batchnorm subtracts
    them again, so their true gradient is exactly 0 and what a runtime computes is rounding noise."""
    out, stack = set(), [i for n in bsd.by_op(Op.BATCHNORM) for i in bsd.inputs(n.name)]
    while stack:
        p = stack.pop()
        if p.op == Op.ADD:
            stack += bsd.inputs(p.name)
        out.add(f"{p.name}.bias")
    return out


def assert_close_grads(ref: dict, got: dict, bsd=None):
    """``bsd`` given: a bias batchnorm removes is checked to be noise on both sides (|g| <= 1e-3 of its node's
    scale), not compared: two noises agree only by chance (measured up to 1.6e-4 of the scale between backends)."""
    assert set(ref) == set(got), set(ref) ^ set(got)
    scale: dict[str, float] = {}
    for k, v in ref.items():
        node = k.rsplit(".", 1)[0]
        scale[node] = max(scale.get(node, 0.0), float(v.abs().max()))
    zero = removed_by_batchnorm(bsd) if bsd is not None else set()
    for k in ref:
        node_scale = scale[k.rsplit(".", 1)[0]]
        if k in zero:
            noise = max(float(ref[k].abs().max()), float(got[k].abs().max()))
            assert noise <= 1e-3 * node_scale + ATOL, f"{k}: {noise:.3g} where batchnorm makes the gradient 0"
            continue
        err = float((ref[k] - got[k]).abs().max())
        bound = RTOL * node_scale + ATOL
        assert err <= bound, f"{k}: max error {err:.3g} > {bound:.3g}"


def assert_close_params(bsd, ref: dict, got: dict) -> None:
    # a synapse bias right before batchnorm is removed by it: its true gradient is 0 and AdamW walks it by noise
    redundant = removed_by_batchnorm(bsd)
    for k, p in ref.items():
        if k not in redundant:
            assert torch.allclose(p.detach(), got[k], rtol=1e-4, atol=1e-5), k


@given(any_graph, st.sampled_from([BSDConfig(), BSDConfig(distill_on="membrane"),
                                   BSDConfig(negatives="other_class", lam=0.3), BSDConfig(recall_loss="reco"),
                                   BSDConfig(label_smoothing=0.2)]))
@settings(max_examples=15)
def test_cpu_gradients_equal_the_reference(f, cfg):
    bsd = derive_feedback(f, cfg)
    x, y = batch(bsd, scale=2.0)
    ref_grads, ref_losses, env = ReferenceRuntime(bsd, seed=4).gradients(x, y)
    assume(well_conditioned(bsd, env))
    got_grads, got_losses = cpu_runtime(bsd, seed=4).gradients(x, y)
    assert_close_grads(ref_grads, got_grads, bsd)
    for k, v in ref_losses.items():
        assert abs(float(v.detach()) - got_losses[k]) <= 1e-5 * max(1.0, abs(float(v.detach()))), k


@given(conv_graphs(), st.booleans())
@settings(max_examples=10)
def test_cpu_gradients_equal_the_reference_on_conv_nets_with_and_without_the_frequency_split(f, freq):
    bsd = derive_feedback(f, BSDConfig(freq=freq))
    x, y = batch(bsd, scale=2.0)
    ref_grads, _, env = ReferenceRuntime(bsd, seed=5).gradients(x, y)
    assume(well_conditioned(bsd, env))
    assert_close_grads(ref_grads, cpu_runtime(bsd, seed=5).gradients(x, y)[0], bsd)


def test_conv_net_weights_state_and_predictions_after_steps_equal_the_reference():
    g = GraphBuilder("c", T=3)
    h = g.lif(g.batchnorm(g.conv2d(g.input((1, 9, 9)), 4, kernel=3, padding=1)))
    h = g.lif(g.batchnorm(g.conv2d(g.avgpool2d(h, 2), 6, kernel=3, stride=2)))
    h = g.lif(g.linear(g.flatten(g.maxpool2d(h, 1)), 10))
    g.output(g.linear(h, 3))
    bsd = derive_feedback(g.build(), BSDConfig(freq=True))
    # AdamW's first steps are ~lr * sign(g): gradient elements that are 0 up to rounding (components a batchnorm
    # downstream removes) would move by a random +-lr; eps = 1e-4 keeps them still while real gradients step ~lr.
    opt = OptimConfig(eps=1e-4)
    ref, cpu = ReferenceRuntime(bsd, seed=4, opt=opt), cpu_runtime(bsd, seed=4, opt=opt)
    for step in range(3):
        x, y = batch(bsd, B=8, seed=step, scale=2.0)
        probe = ReferenceRuntime(bsd, params=ref.params, state=ref.state)  # a copy: its forward updates BN stats
        assert well_conditioned(bsd, probe.losses(x, y)[1], require_activity=True)  # the fixed data keeps margins
        r, c = ref.step(x, y), cpu.step(x, y)
        assert r.rates == pytest.approx(c.rates, abs=1e-6) and r.losses == pytest.approx(c.losses, rel=1e-5)
    assert_close_params(bsd, ref.params, cpu.params)
    for k in ref.state:  # batchnorm running statistics
        assert torch.allclose(ref.state[k], cpu.state[k], rtol=1e-4, atol=1e-6), k
    x, _ = batch(bsd, seed=9)
    assert torch.allclose(ref.predict(x), cpu.predict(x), rtol=1e-4, atol=1e-5)


def test_mlp_step_matches_and_uses_the_time_invariant_input():
    g = GraphBuilder("m", T=4)
    h = g.lif(g.linear(g.flatten(g.input((1, 5, 5))), 16))
    h = g.lif(g.linear(h, 12))
    g.output(g.linear(h, 3))
    bsd = derive_feedback(g.build())
    cpu = cpu_runtime(bsd, seed=1, opt=OptimConfig(lr=1e-2))
    ref = ReferenceRuntime(bsd, seed=1, opt=OptimConfig(lr=1e-2))
    assert cpu.plan.is_time_invariant("x")  # direct encoding: the stimulus is stored once, not T times
    for s in range(3):
        x, y = batch(bsd, B=9, seed=s, scale=3.0)
        r, c = ref.step(x, y), cpu.step(x, y)
        assert r.losses == pytest.approx(c.losses, rel=1e-5)
    for k, p in ref.params.items():
        assert torch.allclose(p.detach(), cpu.params[k], rtol=1e-4, atol=1e-6), k


def test_poisson_input_is_encoded_with_the_step_seed_on_both_runtimes():
    g = GraphBuilder("m", T=3)
    g.output(g.linear(g.lif(g.linear(g.input((7,), encoding="poisson"), 5)), 2))
    bsd = derive_feedback(g.build())
    x, y = batch(bsd, B=5)
    ref, cpu = ReferenceRuntime(bsd, seed=2), cpu_runtime(bsd, seed=2)
    assert not cpu.plan.is_time_invariant("x")
    assert ref.step(x, y).losses == pytest.approx(cpu.step(x, y).losses, rel=1e-5)


def test_backend_without_a_kernel_is_refused():
    from bsdgraph.runtime.executor import Backend, Executor

    g = GraphBuilder("m", T=2)
    g.output(g.linear(g.input((3,)), 2))
    with pytest.raises(ValueError, match=r"has no implementation of kernel\(s\) \['torch.adamw_step', "
                                         r"'torch.cross_entropy_grad', 'torch.mse_grad', 'weight_grad'\]"):
        Executor(derive_feedback(g.build()), Backend("partial", {"group_classes": None, "torch.one_hot": None,
                                                               "torch.linear": None}, {}))


@given(any_graph, st.sampled_from([BSDConfig(), BSDConfig(distill_on="membrane", negatives="other_class"),
                                   BSDConfig(recall_loss="reco")]))
@settings(max_examples=10)
def test_class_deduplicated_backward_network_gives_the_same_gradients(f, cfg):
    """The dedup lowering runs B on one row per class present; losses expand it and sum B's gradients per class.
    Exact up to float summation order."""
    from bsdgraph.compiler.lower import can_dedup

    bsd = derive_feedback(f, cfg)
    assume(can_dedup(bsd))
    x, y = batch(bsd, B=9, scale=2.0)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]  # classes in any order
    # the two plans sum in different orders: keep margins (threshold, zero-variance batchnorm, zero ReCo rows)
    assume(well_conditioned(bsd, ReferenceRuntime(bsd, seed=2).gradients(x, y)[2]))
    g_plain, l_plain = _gradients_with_plan(bsd, False, x, y)
    g_dedup, l_dedup = _gradients_with_plan(bsd, True, x, y)
    assert l_plain == pytest.approx(l_dedup, rel=1e-5)
    assert_close_grads(g_plain, g_dedup, bsd)


def test_deduplicated_backward_network_with_batchnorm_equals_the_plain_plan():
    """B's batchnorm on one row per class takes the full batch's statistics as count-weighted sums: gradients,
    losses and both streams' running statistics equal the plan that runs B on every sample. Classes appear 1, 2
    and 5 times (uneven counts are what the weights are for); the fixed data keeps every margin (well_conditioned)."""
    g = GraphBuilder("c", T=3)
    h = g.lif(g.batchnorm(g.conv2d(g.input((1, 8, 8)), 4, kernel=3, padding=1)))
    h = g.lif(g.batchnorm(g.conv2d(g.maxpool2d(h, 2), 6, kernel=3, padding=1)))
    h = g.lif(g.batchnorm(g.linear(g.flatten(h), 12)))
    g.output(g.linear(h, 3))
    bsd = derive_feedback(g.build())
    assert any(n.op == Op.BATCHNORM and n.stream == Stream.B for n in bsd.nodes)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(8, 1, 8, 8, generator=gen) * 2.0, torch.tensor([2, 0, 2, 1, 2, 0, 2, 2])
    assert well_conditioned(bsd, ReferenceRuntime(bsd, seed=2).losses(x, y)[1], require_activity=True)
    plain, dedup = cpu_runtime(bsd, seed=2, dedup=False), cpu_runtime(bsd, seed=2, dedup=True)
    (g_plain, l_plain), (g_dedup, l_dedup) = plain.gradients(x, y), dedup.gradients(x, y)
    assert l_plain == pytest.approx(l_dedup, rel=1e-5)
    assert_close_grads(g_plain, g_dedup)
    for k in plain.state:  # running statistics of F's and B's batchnorms (B's from 3 rows standing for 8)
        assert torch.allclose(plain.state[k], dedup.state[k], rtol=1e-5, atol=1e-7), k


def _gradients_with_plan(bsd, dedup, x, y):
    rt = cpu_runtime(bsd, seed=2, dedup=dedup)
    assert rt.plan.dedup == dedup
    return rt.gradients(x, y)


@given(st.integers(1, 6), st.integers(1, 40), st.sampled_from([0.0, -0.2]), st.booleans(),
       st.sampled_from([1.5, 2.0, 5.0]), st.integers(0, 1000))
def test_cpu_lif_is_bit_identical_to_the_twin(T, N, v_reset, soft, tau, seed):
    from bsdgraph.runtime.cpu import lif_forward
    from kernels.ref.lif import lif_forward as twin

    current = torch.randn(T, 3, N, generator=torch.Generator().manual_seed(seed))
    s, h = lif_forward(current, tau, 0.3, v_reset, soft, None, True)
    s_ref, h_ref = twin(current, tau, 0.3, v_reset, soft, None, True)
    assert torch.equal(s, s_ref) and torch.equal(h, h_ref)


def test_time_invariant_input_pass_preserves_results():
    """Reading the direct stimulus once ([B, ...]) instead of materialising it T times changes no result."""
    g = GraphBuilder("m", T=4)
    h = g.lif(g.linear(g.flatten(g.input((1, 5, 5))), 16))
    g.output(g.linear(h, 3))
    bsd = derive_feedback(g.build())
    x, y = batch(bsd, B=9, scale=3.0)
    fast, slow = cpu_runtime(bsd, seed=1), cpu_runtime(bsd, seed=1, time_invariant=False)
    assert fast.plan.is_time_invariant("x") and not slow.plan.is_time_invariant("x")
    assert "encode_direct" in slow.plan.kernels() and "encode_direct" not in fast.plan.kernels()
    # the first synapse's current, which ReCo reads (distill_on=current), is then time-invariant too: stored once
    first = next(c.name for c in bsd.consumers(bsd.by_op(Op.FLATTEN)[0].name) if c.op == Op.LINEAR)
    assert fast.plan.is_time_invariant(first) and not slow.plan.is_time_invariant(first)
    (g_fast, l_fast), (g_slow, l_slow) = fast.gradients(x, y), slow.gradients(x, y)
    assert l_fast == pytest.approx(l_slow, rel=1e-6)
    assert_close_grads(g_slow, g_fast)


@given(st.integers(0, 2**63 - 1), st.lists(st.integers(0, 2**62), min_size=1, max_size=20))
def test_cpu_philox_is_bit_identical_to_the_twin(seed, offsets):
    from bsdgraph.runtime.philox import philox_uniform
    from kernels.ref.encode import philox_uniform as twin

    off = torch.tensor(offsets + [0, 2**31 - 1, 2**31, 2**32 - 1, 2**32], dtype=torch.int64)
    assert torch.equal(philox_uniform(seed, off), twin(seed, off))


@pytest.mark.parametrize("scale", [0.01, 10.0], ids=["unclipped", "clipped"])
def test_per_node_clipping_is_torch_clip_grad_norm_per_node(scale):
    from bsdgraph.runtime.common import clip_per_node

    gen = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (50, 30), "a.bias": (50,), "b.weight": (7,)}
    ours = {k: torch.nn.Parameter(torch.zeros(s)) for k, s in shapes.items()}
    theirs = {k: torch.nn.Parameter(torch.zeros(s)) for k, s in shapes.items()}
    for k, s in shapes.items():
        ours[k].grad = torch.randn(s, generator=gen) * scale
        theirs[k].grad = ours[k].grad.clone()
    clip_per_node(ours, 1.0)
    for node in ("a", "b"):
        torch.nn.utils.clip_grad_norm_([p for k, p in theirs.items() if k.startswith(node)], 1.0)
    if scale < 1:  # not clipped: untouched, bit for bit
        assert all(torch.equal(ours[k].grad, theirs[k].grad) for k in shapes)
    else:  # the norm is summed in another order (dot products), so the coefficient may differ in its last bit
        assert all(torch.allclose(ours[k].grad, theirs[k].grad, rtol=1e-6, atol=0) for k in shapes)
    norm = float(torch.linalg.vector_norm(torch.cat([ours["a.weight"].grad.flatten(), ours["a.bias"].grad])))
    assert (norm < 1.0001) if scale > 1 else (norm < 1)  # clipped to the max norm, or left as it was


def test_nearest_upsampling_fast_path_and_its_backward_equal_interpolate_and_autograd():
    """Whole-number factors take a broadcast copy; the backward is aten's own, without re-running the forward."""
    import itertools

    import torch.nn.functional as F

    from bsdgraph.runtime.torch_kernels import _upsample_nearest

    gen = torch.Generator().manual_seed(0)
    for h, w, fh, fw in itertools.product(range(1, 8), range(1, 8), range(1, 5), range(1, 5)):
        r = torch.randn(2, 3, h, w, generator=gen)
        size = (h * fh, w * fw)
        assert torch.equal(_upsample_nearest(size)(r), F.interpolate(r, size=size, mode="nearest")), (h, w, fh, fw)
    r = torch.randn(4, 3, 7, 5, generator=gen, requires_grad=True)
    g = torch.randn(4, 3, 21, 10, generator=gen)
    F.interpolate(r, size=(21, 10), mode="nearest").backward(g)
    assert torch.equal(torch.ops.aten.upsample_nearest2d_backward(g, [21, 10], [4, 3, 7, 5], None, None), r.grad)


def test_max_pooling_of_uint8_spikes_equals_max_pool2d():
    import itertools

    import torch.nn.functional as F

    from bsdgraph.runtime.torch_kernels import _maxpool_spikes

    gen = torch.Generator().manual_seed(0)
    for h, w, k, stride in itertools.product(range(1, 9), range(1, 9), range(1, 4), range(1, 4)):
        if k > min(h, w):
            continue
        s = (torch.rand(2, 3, 2, h, w, generator=gen) < 0.3).to(torch.uint8)  # [T, B, C, H, W]
        ref = F.max_pool2d(s.float().reshape(-1, 2, h, w), k, stride).reshape(2, 3, 2, *_pooled(h, w, k, stride))
        got = _maxpool_spikes(s, k, stride)
        assert got.dtype == torch.uint8 and torch.equal(got.float(), ref), (h, w, k, stride)


def _pooled(h, w, k, stride):
    return (h - k) // stride + 1, (w - k) // stride + 1


def test_the_cnn_plan_keeps_pooled_spikes_as_uint8():
    from bsdgraph.compiler.lower import lower
    from bsdgraph.compiler.model_file import load_model
    from bsdgraph.compiler.plan import value

    plan = lower(derive_feedback(load_model("models/fmnist_cnn.py").graph))
    dtypes = {b.ref: b.dtype for b in plan.buffers}
    assert dtypes[value("pool1")] == dtypes[value("pool2")] == "u8" and dtypes[value("h1")] == "u8"
