"""The triton backend (fused Triton kernels; interpreted on CPU) takes the same training step as the reference."""

import pytest

from bsdgraph import BSDConfig, GraphBuilder, derive_feedback
from bsdgraph.runtime.reference import ReferenceRuntime
from bsdgraph.runtime.triton import triton_backend, triton_runtime
from bsdgraph.compiler.lower import lower
from tests.test_cpu_backend import assert_close_grads, assert_close_params, batch, well_conditioned


def mlp(encoding="direct"):
    g = GraphBuilder("m", T=3)
    h = g.lif(g.linear(g.flatten(g.input((1, 4, 5), encoding=encoding)), 20))
    h = g.lif(g.linear(h, 17), reset="soft")
    g.output(g.linear(h, 3))
    return g.build()


def cnn():
    g = GraphBuilder("c", T=2)
    h = g.lif(g.batchnorm(g.conv2d(g.input((1, 7, 7)), 3, kernel=3, padding=1)))
    h = g.lif(g.linear(g.flatten(g.maxpool2d(h, 2)), 18))
    g.output(g.linear(h, 3))
    return g.build()


def decoder():
    # v_th 0.1 keeps every layer of this small net firing (with 0.3 B's bottom layer is silent for this batch)
    g = GraphBuilder("d", T=2)
    h = g.lif(g.conv2d(g.input((1, 7, 7)), 4, kernel=3, stride=2, padding=1), v_th=0.1)  # 4 x 4
    h = g.lif(g.conv2d(g.upsample2d(h, (8, 8)), 4, kernel=3, padding=1), v_th=0.1)
    h = g.lif(g.batchnorm(g.conv_transpose2d(h, 3, kernel=3, stride=2, padding=1, output_padding=1)), v_th=0.1)
    g.output(g.linear(g.flatten(h), 3))  # 3 x 16 x 16 -> 3
    return g.build()


def resnet():
    # a SEW block with a projection shortcut, then a layer whose current sums two synapses (a dense skip): the
    # sums of uint8 spikes and of currents, B's fan-in and the mirrors built once per operand of a sum
    g = GraphBuilder("r", T=2)
    h = g.lif(g.batchnorm(g.conv2d(g.input((1, 6, 6)), 3, kernel=3, padding=1)), v_th=0.1)
    h = g.flatten(g.residual_block(h, 4, stride=2, v_th=0.1))
    h2 = g.lif(g.linear(h, 10), v_th=0.1)
    h = g.lif(g.sum(g.linear(h2, 8), g.linear(h, 8)), v_th=0.1)
    g.output(g.linear(h, 3))
    return g.build()


def conv_rnn():
    # a recurrent conv layer: the feedforward conv once over all rows, then the time loop adding conv(s[t-1])
    g = GraphBuilder("cr", T=3)
    h = g.recurrent_lif(g.conv2d(g.input((1, 6, 6)), 3, kernel=3, padding=1), v_th=0.1)
    h = g.lif(g.conv2d(h, 4, kernel=3, stride=2, padding=1), v_th=0.1)
    g.output(g.linear(g.flatten(h), 3))
    return g.build()


CASES = {
    "mlp": (mlp, BSDConfig()),
    "mlp-membrane-other-class": (mlp, BSDConfig(distill_on="membrane", negatives="other_class")),
    "mlp-poisson": (lambda: mlp("poisson"), BSDConfig()),
    "cnn-freq": (cnn, BSDConfig(freq=True)),
    "decoder": (decoder, BSDConfig()),
    "resnet": (resnet, BSDConfig()),
    "conv-rnn": (conv_rnn, BSDConfig()),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "gemm-then-lif"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_step_equals_the_reference_step(case, fused):
    build, cfg = CASES[case]
    bsd = derive_feedback(build(), cfg)
    x, y = batch(bsd, B=7, scale=2.0)
    ref, tri = ReferenceRuntime(bsd, seed=3), triton_runtime(bsd, seed=3, fuse_linear_lif=fused)
    ref_grads, _, env = ref.gradients(x, y)
    assert well_conditioned(bsd, env), "fixed inputs should keep membranes away from the threshold"
    assert_close_grads(ref_grads, tri.gradients(x, y)[0])
    r, t = ref.step(x, y), tri.step(x, y)
    assert r.rates == pytest.approx(t.rates, abs=1e-6) and r.losses == pytest.approx(t.losses, rel=1e-5)
    assert_close_params(bsd, ref.params, tri.params)


def test_plan_names_the_triton_kernels_it_launches():
    plan = lower(derive_feedback(mlp(), BSDConfig(distill_on="membrane")))
    names = set(plan.kernels())
    assert {"linear_lif_forward", "reco_loss_grad", "weight_grad", "lif_backward"} <= names
    assert names <= set(triton_backend().kernels)
