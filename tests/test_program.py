"""The compiler core: compile_model's one pipeline, the typed plan, the generated step code, the parallel plan
transforms and shadow validation."""

import ast
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from bsdgraph import BSDConfig, GraphBuilder, derive_feedback
from bsdgraph.cli.main import main
from bsdgraph.compiler import feedback, lower as lowering
from bsdgraph.compiler.codegen import generate
from bsdgraph.compiler.lower import lower
from bsdgraph.compiler.plan import GROUPING, Kind, Launch, Ref, finish, value
from bsdgraph.compiler.program import compile_graph, compile_model
from bsdgraph.parallel.distributed import FINISH, REDUCE, SHARD, data_parallel_plan
from bsdgraph.parallel.layer_parallel import LayerParallelError, partition
from bsdgraph.runtime.cpu import cpu_backend, cpu_runtime
from bsdgraph.runtime.executor import Executor
from bsdgraph.runtime.validate import ShadowValidator, ValidationError
from bsdgraph.train.data import make_synthetic
from tests.strategies import any_graph
from tests.test_cpu_backend import batch


def mlp(widths=(24, 20, 16), T=3):
    g = GraphBuilder("m", T=T)
    h = g.flatten(g.input((1, 4, 5)))
    for w in widths:
        h = g.lif(g.linear(h, w))
    g.output(g.linear(h, 4))
    return g.build()


def cnn():
    g = GraphBuilder("c", T=2)
    h = g.lif(g.batchnorm(g.conv2d(g.input((1, 6, 6)), 3, kernel=3, padding=1)))
    h = g.lif(g.linear(g.flatten(g.maxpool2d(h, 2)), 12))
    g.output(g.linear(h, 3))
    return g.build()


# ---------------------------------------------------------------------------------------------------- compile_model


def test_a_program_is_frozen_and_holds_every_stage():
    program = compile_model(mlp())
    assert program.forward.name == "m" and program.plan.launches and set(program.code) == {"step", "gradients",
                                                                                           "predict"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        program.plan = None


MODEL = """
from bsdgraph import GraphBuilder
TRAIN = dict(epochs=1, batch_size=40, lr=1e-2)
def build():
    g = GraphBuilder("syn", T=3)
    h = g.lif(g.linear(g.input((16,)), 24))
    h = g.lif(g.linear(h, 20))
    g.output(g.linear(h, 4))
    return g.build()
"""


@pytest.mark.parametrize("argv", [["train", "--init", "calibrated", "--bsd", "lam=0.5"], ["bench"]])
def test_one_command_derives_b_and_lowers_the_plan_once(tmp_path, monkeypatch, capsys, argv):
    """`bsdgraph train --init calibrated` used to derive B three times and lower twice."""
    counts = {"derive": 0, "lower": 0}

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    # the functions derive_feedback and lower look up at call time, wherever they are called from
    monkeypatch.setattr(feedback, "_losses", counting("derive", feedback._losses))
    monkeypatch.setattr(lowering, "_Lowerer", counting("lower", lowering._Lowerer))
    model = tmp_path / "syn.py"
    model.write_text(MODEL)
    ds = make_synthetic(80, 40, (16,), 4, seed=0)
    npz = tmp_path / "syn.npz"
    np.savez(npz, x_train=ds.x_train.numpy(), y_train=ds.y_train.numpy(), x_test=ds.x_test.numpy(),
             y_test=ds.y_test.numpy())
    extra = (["--npz", npz, "--out", tmp_path / "run", "--json"] if argv[0] == "train"
             else ["--steps", "1", "--warmup", "0", "--batch-size", "8", "--json"])
    assert main([argv[0], str(model), *argv[1:], *map(str, extra)]) == 0
    assert counts == {"derive": 1, "lower": 1}, counts


# ---------------------------------------------------------------------------------------------------- the plan


@given(any_graph)
@settings(max_examples=25, deadline=None)
def test_the_plan_is_closed_typed_and_ordered(f):
    """Every ref a launch reads is written by an earlier launch or given to the step; a step's buffers are
    written once (parameters and state are updated in place by their own launches); lifetimes follow the
    launches; gradients are written only between a loss and its updates."""
    plan = lower(derive_feedback(f))
    given_kinds = {Kind.INPUT, Kind.PARAM, Kind.STATE}
    written: dict[Ref, int] = {}
    for la in plan.launches:
        for r in la.reads:
            assert r.kind in given_kinds or r in written, (la.index, str(r))
        for w in la.writes:
            assert w.kind in (Kind.PARAM, Kind.STATE) or w not in written, (la.index, str(w))
            written.setdefault(w, la.index)
            if w.kind in (Kind.GRAD, Kind.PARAM_GRAD):
                assert la.phase in ("loss", "grad", "update"), (la.index, la.kernel, str(w))
    for b in plan.buffers:
        assert all(c > b.producer for c in b.consumers if b.ref.kind not in (Kind.PARAM, Kind.STATE)), str(b.ref)
        assert ":" not in b.ref.node and not b.ref.node.startswith("grad")  # no string protocols left
    every_write = {w for la in plan.launches for w in la.writes}
    assert {r for r in every_write if r.kind == Kind.STATS} == {
        Ref(Kind.STATS, n) for la in plan.launches if la.kernel == "torch.batch_norm" for n in la.nodes}


def test_a_plan_that_uses_an_undeclared_buffer_is_refused():
    la = Launch(0, "torch.linear", "forward-F", ("fc",), (value("x"),), (value("fc"),))
    with pytest.raises(ValueError, match=r"not declared: \['x'\]"):
        finish("g", 2, [la], {value("fc"): ("f32", ("T", "B", 3))})


# ---------------------------------------------------------------------------------------------------- codegen


ALLOWED = (ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Expr, ast.Constant, ast.Assign, ast.Tuple,
           ast.Name, ast.Store, ast.Load, ast.Del, ast.Delete, ast.Call, ast.Subscript, ast.Return)


@pytest.mark.parametrize("build", [mlp, cnn])
def test_the_generated_step_is_straight_line_code_with_a_statement_per_launch(build):
    program = compile_model(build())
    for code in program.code.values():
        tree = ast.parse(code.source)
        assert all(isinstance(n, ALLOWED) for n in ast.walk(tree)), "only assignments, calls, del and return"
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
        assert [c.func.slice.value for c in calls] == list(code.launches)  # K[i](C[i], ...), in plan order
        assert all(c.args[0].slice.value == c.func.slice.value for c in calls)
    step = program.code["step"]
    body = ast.parse(step.source).body[0].body
    deleted = {t.id for s in body if isinstance(s, ast.Delete) for t in s.targets}
    assigned = {t.id for s in body if isinstance(s, ast.Assign) for e in s.targets
                for t in (e.elts if isinstance(e, ast.Tuple) else [e])}
    returned = {e.id for e in body[-1].value.elts}
    params = {t.id for s in body if isinstance(s, ast.Assign) and isinstance(s.value, ast.Subscript)
              and s.value.value.id == "params" for t in s.targets}
    # every buffer of the step dies at its last reader, or is returned; parameters stay bound
    assert assigned - deleted - returned - params == set()
    assert deleted and not (deleted & returned)


def test_node_names_become_identifiers_or_comments_never_code():
    """A name from a model or NIR file may hold quotes and newlines: it only appears as repr() in a comment."""
    evil = 'fc"""\nimport os; os.system("x")  #'
    plan = finish("g", 2, [Launch(0, "torch.linear", "forward-F", (evil,), (value("x"),), (value(evil),))],
                  {value("x"): ("f32", ("T", "B", 3)), value(evil): ("f32", ("T", "B", 3))})
    code = generate(plan, ["x", evil], plan.launches, "step", [value(evil)])
    tree = ast.parse(code.source)
    assert all(isinstance(n, ALLOWED) for n in ast.walk(tree))
    assert "import" not in {type(n).__name__.lower() for n in ast.walk(tree)}
    assert "v_n1" in code.source and repr((evil,)) in code.source  # an index name, and the repr in a comment
    fn = code.compile()
    assert fn([torch.ones(1)], [], {0: lambda ctx, v: (v + 1,)}, {0: None}) == (torch.ones(1) * 2,)


# ---------------------------------------------------------------------------------------------------- transforms


def test_the_data_parallel_plan_is_a_pure_transform():
    plan = lower(derive_feedback(cnn()))
    before = plan.to_json()
    dp = data_parallel_plan(plan)
    assert plan.to_json() == before  # the input plan is untouched
    assert dp.launches[-1].kernel == REDUCE and dp.launches[-2].kernel == FINISH
    optimizers = [la for la in dp.launches if la.kernel == "dp:torch.adamw_step"]
    assert len(optimizers) == sum(la.kernel == "torch.adamw_step" for la in plan.launches)
    # each optimizer launch hands its bucket to the next: the updates of bucket i happen at launch i+1
    for prev, nxt in zip(optimizers, optimizers[1:]):
        (bucket,) = [w for w in prev.writes if w.kind == Kind.PENDING]
        assert bucket in nxt.reads
    assert all(SHARD in la.reads for la in dp.launches if la.kernel.startswith("dp:") and la.kernel not in (
        "dp:torch.adamw_step", FINISH))
    every_param = {r for la in plan.launches if la.kernel == "torch.adamw_step" for r in la.writes}
    assert {w for la in dp.launches for w in la.writes if w.kind == Kind.PARAM} == every_param


def test_partition_cuts_a_plan_into_stages_that_exchange_only_spikes():
    plan = lower(derive_feedback(mlp((24, 20, 16, 12))), dedup=True)
    g = derive_feedback(mlp((24, 20, 16, 12)))
    for n in (1, 2, 3):
        stages = partition(plan, g, n)
        assert stages == partition(plan, g, n)  # pure: same plan, same stages
        shared = {la.index for la in plan.launches if GROUPING in la.writes or value("target") in la.writes}
        runs = [la.index for s in stages for la in s.launches if la.index not in shared]
        assert sorted(runs) == sorted(la.index for la in plan.launches if la.index not in shared)  # each once
        for lo, hi in zip(stages, stages[1:]):
            assert lo.send_f == hi.recv_f and hi.send_b == lo.recv_b
        sent = [r for s in stages for r in (*s.send_f, *s.send_b)]
        assert all(plan.buffer(r).dtype == "u8" for r in sent), [str(r) for r in sent]  # spikes only
    assert stages[0].recv_f == () and stages[-1].send_f == ()
    with pytest.raises(LayerParallelError, match="at most 5 processes"):
        partition(plan, g, 6)


# ---------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("build", [mlp, cnn])
def test_shadow_validation_passes_a_correct_backend(build, monkeypatch):
    monkeypatch.setenv("BSDGRAPH_VALIDATE", "1")
    bsd = derive_feedback(build())
    rt = cpu_runtime(bsd, seed=1)
    (validator,) = [o for o in rt.observers if isinstance(o, ShadowValidator)]
    rt.step(*batch(bsd, B=6, scale=2.0))
    n_checked = sum(la.kernel != "torch.adamw_step" for la in rt.plan.launches)
    assert validator.checked == n_checked > 0


@pytest.mark.parametrize("kernel,broken", [
    ("weight_grad", lambda fn: lambda ctx, *ins: tuple(None if v is None else v * 1.01 for v in fn(ctx, *ins))),
    ("linear_lif_forward", lambda fn: lambda ctx, *ins: (1 - fn(ctx, *ins)[0], *fn(ctx, *ins)[1:])),
])
def test_shadow_validation_names_the_first_launch_that_diverges(monkeypatch, kernel, broken):
    monkeypatch.setenv("BSDGRAPH_VALIDATE", "1")
    bsd = derive_feedback(mlp())
    backend = cpu_backend()
    rt = Executor(compile_graph(bsd), backend.with_kernels("broken", **{kernel: broken(backend.kernels[kernel])}))
    first = next(la for la in rt.plan.launches if la.kernel == kernel)
    with pytest.raises(ValidationError, match=rf"launch {first.index} \({kernel} of "):
        rt.step(*batch(bsd, B=6, scale=2.0))
    monkeypatch.setenv("BSDGRAPH_VALIDATE", "0")
    quiet = Executor(compile_graph(bsd), rt.backend)  # without the knob the broken kernel goes unnoticed
    assert not quiet.observers and quiet.step(*batch(bsd, B=6, scale=2.0)).losses


def test_every_generated_step_equals_a_step_of_the_reference_interpreter():
    """The generated code against the executable specification, on a CNN with batchnorm in F and B."""
    from bsdgraph.runtime.reference import ReferenceRuntime
    from tests.test_cpu_backend import assert_close_grads, well_conditioned

    bsd = derive_feedback(cnn(), BSDConfig(distill_on="membrane"))
    x, y = batch(bsd, B=6, scale=2.0)
    ref = ReferenceRuntime(bsd, seed=3)
    assert well_conditioned(bsd, ref.losses(x, y)[1], require_activity=True)
    grads, losses = cpu_runtime(bsd, seed=3).gradients(x, y)
    ref_grads, ref_losses, _ = ref.gradients(x, y)
    assert losses == pytest.approx({k: float(v.detach()) for k, v in ref_losses.items()}, rel=1e-5)
    assert_close_grads(ref_grads, grads)
