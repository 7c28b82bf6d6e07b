"""A compiled step (torch.compile of the generated code, fullgraph=True) equals the eager step.

fullgraph=True is the proof that a step is one Dynamo graph and reads nothing back to the host (a .item(),
float() or a data-dependent shape would be a graph break, i.e. an error here). Most cases trace with the
"aot_eager" backend (the same graph, no code generation: seconds); one case and the ReCo kernel Inductor once got
wrong run through Inductor itself (tens of seconds on 2 cores)."""

import pytest
import torch

from bsdgraph import BSDConfig, GraphBuilder, derive_feedback
from bsdgraph.runtime.cpu import cpu_runtime
from bsdgraph.runtime.executor import resolve_compile
from bsdgraph.runtime.reco_dedup import reco_loss_grad_dedup
from tests import test_recurrent as rec
from tests.test_cpu_backend import assert_close_grads, assert_close_params, batch
from tests.test_program import cnn


def mlp(encoding="direct"):
    g = GraphBuilder("m", T=3)
    h = g.lif(g.linear(g.flatten(g.input((1, 4, 5), encoding=encoding)), 12))
    g.output(g.linear(g.lif(g.linear(h, 10)), 3))
    return g.build()


def declared():
    """Declared neurons (two states, an adaptive threshold) in a feedforward and a recurrent layer."""
    g = GraphBuilder("d", T=3)
    h = g.neuron("cuba_lif", g.linear(g.flatten(g.input((1, 4, 5))), 12), tau_syn=1.5)
    g.output(g.linear(g.recurrent_neuron("alif", g.linear(h, 10), beta=0.5), 3))
    return g.build()


CASES = {
    "mlp": (mlp, BSDConfig(), lambda f: batch(f, B=6, scale=2.0)),
    "mlp-other-class": (mlp, BSDConfig(negatives="other_class"), lambda f: batch(f, B=6, scale=2.0)),
    "mlp-poisson": (lambda: mlp("poisson"), BSDConfig(), lambda f: batch(f, B=6, scale=2.0)),
    "cnn-batchnorm": (cnn, BSDConfig(), lambda f: batch(f, B=6, scale=2.0)),
    "rnn": (lambda: rec.rnn(encoding="sequence", task="classification"), BSDConfig(), rec.data),
    "rnn-through-time": (lambda: rec.rnn(encoding="sequence", task="classification"),
                         BSDConfig(recurrent_credit="through_time"), rec.data),
    "declared-neurons": (declared, BSDConfig(), lambda f: batch(f, B=6, scale=2.0)),
}


def assert_same_run(bsd, x, y, backend="aot_eager", steps=2):
    eager, compiled = cpu_runtime(bsd, seed=1), cpu_runtime(bsd, seed=1, compile=backend)
    (g_eager, l_eager), (g_comp, l_comp) = eager.gradients(x, y), compiled.gradients(x, y)
    assert l_comp == pytest.approx(l_eager, rel=1e-5)
    assert_close_grads(g_eager, g_comp)
    for _ in range(steps):  # the optimizer's traced form against the fused kernel, and a new Poisson seed per step
        r_eager, r_comp = eager.step(x, y), compiled.step(x, y)
        assert r_comp.losses == pytest.approx(r_eager.losses, rel=1e-5)
        assert r_comp.rates == pytest.approx(r_eager.rates, abs=1e-6)
    assert_close_params(bsd, eager.params, compiled.params)  # the existing tolerance (and its one exception)
    for k, v in eager.state.items():
        assert torch.allclose(v, compiled.state[k], rtol=1e-5, atol=1e-7), k
    return compiled


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_compiled_step_is_one_graph_and_equals_the_eager_step(case):
    build, cfg, data = CASES[case]
    bsd = derive_feedback(build(), cfg)
    x, y = data(bsd)
    compiled = assert_same_run(bsd, x, y)
    assert compiled.compile_seconds > 0


def test_an_inductor_step_equals_the_eager_step_and_compiles_once():
    """Poisson input: the seed changes every step and must be a value of the graph, not a constant (a constant
    would recompile at every step)."""
    from torch._dynamo.utils import counters

    bsd = derive_feedback(mlp("poisson"))
    x, y = batch(bsd, B=6, scale=2.0)
    counters.clear()
    assert_same_run(bsd, x, y, backend="inductor", steps=3)
    assert counters["stats"]["unique_graphs"] == 2  # one graph per entry point used: gradients and step


@pytest.mark.parametrize("negatives", ["all", "other_class"])
def test_inductor_computes_the_per_class_reco_gradients_right(negatives):
    """Inductor (torch 2.13, CPU) got G wrong when it was built with scatter_add (7 % off, float64): the compiled
    form uses a one-hot mask, pinned here against the eager scatter form."""
    gen = torch.Generator().manual_seed(0)
    a, u = torch.randn(3, 6, 12, generator=gen, dtype=torch.float64), torch.randn(3, 3, 12, generator=gen,
                                                                                 dtype=torch.float64)
    inverse, counts = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 2])
    torch._dynamo.reset()
    compiled = torch.compile(reco_loss_grad_dedup, fullgraph=True, dynamic=False)
    eager = reco_loss_grad_dedup(a, u, inverse, counts, 0.6, negatives, 1e-8)
    for want, got in zip(eager, compiled(a, u, inverse, counts, 0.6, negatives, 1e-8)):
        assert torch.allclose(want, got, rtol=1e-12, atol=1e-14)


def test_a_new_learning_rate_or_seed_is_a_value_of_the_graph_not_a_recompile():
    """A schedule changes the learning rate every epoch and Poisson encoding the seed every step: both are read
    from tensors the compiled step takes, so the step compiles once and still follows them."""
    from torch._dynamo.utils import counters

    bsd = derive_feedback(mlp("poisson"))
    x, y = batch(bsd, B=6, scale=2.0)
    eager, compiled = cpu_runtime(bsd, seed=1), cpu_runtime(bsd, seed=1, compile="aot_eager")
    counters.clear()
    for lr in (1e-3, 5e-3, 2e-4):
        eager.set_lr(lr)
        compiled.set_lr(lr)
        assert compiled.step(x, y).losses == pytest.approx(eager.step(x, y).losses, rel=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert_close_params(bsd, eager.params, compiled.params)


def test_auto_does_not_compile_on_a_cpu_and_says_why():
    mode, why = resolve_compile("auto", torch.device("cpu"))
    assert mode == "off" and "measured" in why
    with pytest.raises(ValueError, match="compile mode must be one of"):
        resolve_compile("cudagraphs", torch.device("cpu"))


def test_membrane_distillation_is_refused_with_the_reason():
    bsd = derive_feedback(mlp(), BSDConfig(distill_on="membrane"))
    with pytest.raises(ValueError, match="distill_on=membrane"):
        cpu_runtime(bsd, seed=1, compile="aot_eager")


def test_many_runtimes_compile_in_one_process():
    """Each runtime compiles its own generated code: a wrapper shared by all of them would be recompiled for each
    and fail after Dynamo's recompile limit (8), e.g. in a bench --sweep."""
    bsd = derive_feedback(mlp())
    x, y = batch(bsd, B=4, scale=2.0)
    for seed in range(10):
        cpu_runtime(bsd, seed=seed, compile="aot_eager").gradients(x, y)


def test_shadow_validation_and_a_compiled_step_are_refused_together(monkeypatch):
    monkeypatch.setenv("BSDGRAPH_VALIDATE", "1")
    with pytest.raises(ValueError, match="validate with --compile off"):
        cpu_runtime(derive_feedback(mlp()), seed=1, compile="aot_eager")
