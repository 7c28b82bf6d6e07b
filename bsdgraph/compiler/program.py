"""``compile_model``: the one pipeline from a model to a frozen ``Program``, one named step per line.

    build (the model file) -> validate F -> derive B and the local losses -> lower, with the plan passes
    (B once per class, the time-invariant stimulus hoisted) -> generate the step code

Every command, runtime, trainer and tool takes the ``Program``: B is derived and the plan lowered once per
command. ``bsdgraph compile MODEL.py --emit all`` prints each stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bsdgraph.compiler.codegen import StepCode, gradient_step, predict_step, training_step
from bsdgraph.compiler.feedback import BSDConfig, derive_feedback, forward_of
from bsdgraph.compiler.lower import lower
from bsdgraph.compiler.plan import Plan
from bsdgraph.ir.graph import Graph, Op
from bsdgraph.ir.validate import validate

RULES = ("bsd", "bptt")


@dataclass(frozen=True, eq=False)
class Program:
    """A compiled model: F, the graph the plan runs (F + B + losses), the plan and its generated entry points.

    For ``rule="bptt"`` there is no plan: the baseline runs F on the reference interpreter with autograd."""

    name: str
    forward: Graph
    graph: Graph
    rule: str = "bsd"
    plan: Plan | None = None
    code: Mapping[str, StepCode] = field(default_factory=dict)  # "step", "gradients", "predict"
    bsd: BSDConfig = field(default_factory=BSDConfig)
    model: object | None = None     # the Model it came from (compiler/model_file.py), when it came from a file

    @property
    def T(self) -> int:
        return self.graph.T


def compile_model(model, rule: str = "bsd", *, dedup: bool | None = None, time_invariant: bool = True) -> Program:
    """``model``: a ``Model`` (``compiler/model_file.load_model``) or a forward ``Graph`` (default BSD options)."""
    if rule not in RULES:
        raise ValueError(f"unknown learning rule {rule!r}: expected one of {', '.join(RULES)}")
    graph, cfg = (model, BSDConfig()) if isinstance(model, Graph) else (model.graph, model.bsd)
    forward = validate(graph, forward=True)
    if rule == "bptt":
        return Program(forward.name, forward, forward, rule, bsd=cfg, model=None if model is graph else model)
    bsd = derive_feedback(forward, cfg)
    return compile_graph(bsd, forward=forward, dedup=dedup, time_invariant=time_invariant, bsd_config=cfg,
                         model=None if model is graph else model)


def compile_graph(bsd: Graph, *, forward: Graph | None = None, dedup: bool | None = None,
                  time_invariant: bool = True, bsd_config: BSDConfig | None = None, model=None) -> Program:
    """A program from a BSD graph that is already derived (tests, tools that edit the graph)."""
    forward = forward_of(bsd) if forward is None else forward
    plan = lower(bsd, dedup, time_invariant)
    return Program(bsd.name, forward, bsd, "bsd", plan, generate_code(bsd, plan), bsd_config or BSDConfig(), model)


def generate_code(bsd: Graph, plan: Plan) -> dict[str, StepCode]:
    """The entry points of a plan: the training step, the step without updates, and F's forward."""
    nodes = [n.name for n in bsd.nodes]
    out = plan.value_of(bsd.by_op(Op.OUTPUT)[0].name)
    return {"step": training_step(plan, nodes), "gradients": gradient_step(plan, nodes),
            "predict": predict_step(plan, nodes, out)}


def transformed(program: Program, transform: Callable[[Plan], Plan]) -> Program:
    """``program`` with its plan rewritten by ``transform`` (a pure ``Plan -> Plan`` function: data-parallel
    collectives, ...) and its code generated again."""
    plan = transform(program.plan)
    return dataclasses.replace(program, plan=plan, code=generate_code(program.graph, plan))


def as_program(program_or_graph, **lowering) -> Program:
    """A ``Program`` as given, or one compiled from a BSD graph (``derive_feedback``'s result)."""
    if isinstance(program_or_graph, Program):
        if lowering and any(v is not None for v in lowering.values()) and program_or_graph.plan is not None:
            want = {k: v for k, v in lowering.items() if v is not None}
            if want.get("dedup", program_or_graph.plan.dedup) != program_or_graph.plan.dedup or \
                    want.get("time_invariant", True) is False:
                return compile_graph(program_or_graph.graph, forward=program_or_graph.forward,
                                     bsd_config=program_or_graph.bsd, model=program_or_graph.model, **lowering)
        return program_or_graph
    return compile_graph(program_or_graph, **{k: v for k, v in lowering.items() if v is not None})


def interpreted(graph: Graph) -> Program:
    """A graph run by the reference interpreter as it is (``bsdgraph run``, NIR checks): no plan, no code."""
    return Program(graph.name, graph, graph, "bptt")
