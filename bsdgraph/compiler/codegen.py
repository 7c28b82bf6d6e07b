"""Codegen: a plan (or part of one) becomes the source of a straight-line Python function.

One statement per launch, every buffer a named local, ``del`` after each buffer's last reader (as torch.fx's
``GraphModule.code``). A generated function looks like this (``bsdgraph compile MODEL.py --emit step``)::

    def step(inputs, params, K, C):
        in_x, in_y, in_seed = inputs
        p_fc1_weight = params[0]  # 'fc1.weight'
        ...
        # 9 forward-F linear_lif_forward ('fc1', 'h1')
        v_h1, v_fc1, rate_h1 = K[9](C[9], in_x, p_fc1_weight, p_fc1_bias)
        ...
        del v_fc1
        return (loss_reco1, ...)

``K[i]`` is launch i's kernel and ``C[i]`` its context (``runtime/context.py``), both bound by a runtime: the
source is the same for every backend. Names are built from identifiers only; a node name that is not a plain
identifier becomes ``n<index>``, and text from the model (node names) appears only as ``repr()`` in comments,
so nothing read from a model or a NIR file can turn into code. The source is parsed back before it is used.
"""

from __future__ import annotations

import ast
import keyword
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bsdgraph.compiler.plan import SPELLING, Kind, Launch, Plan, Ref

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class StepCode:
    """The generated source of one entry point, and the order of what it takes and returns."""

    name: str
    source: str
    launches: tuple[int, ...]       # plan indices of the launches it runs, in order (K and C are indexed by them)
    inputs: tuple[Ref, ...]         # the step's inputs (x, y, seed, buffers computed elsewhere), in order
    params: tuple[Ref, ...]         # persistent tensors it reads: parameters and running statistics, in order
    outputs: tuple[Ref, ...]        # what it returns, in order

    def compile(self) -> Callable:
        """The function itself (``fn(inputs, params, K, C) -> outputs``)."""
        tree = ast.parse(self.source, filename=f"<bsdgraph {self.name}>")
        namespace: dict = {}
        exec(compile(tree, f"<bsdgraph {self.name}>", "exec"), namespace)  # noqa: S102 - source built above
        return namespace[self.name]


class _Names:
    """Python identifiers for refs: readable where the node name allows it, unique always."""

    def __init__(self, nodes: Sequence[str]):
        self.index = {n: i for i, n in enumerate(nodes)}
        self.taken: dict[Ref, str] = {}
        self.used: set[str] = {"inputs", "params", "K", "C"}

    def __call__(self, ref: Ref) -> str:
        if ref not in self.taken:
            node = ref.node if _PLAIN.match(ref.node) and ref.node.isascii() else f"n{self.index.get(ref.node, 0)}"
            part = f"_{ref.part}" if ref.part and _PLAIN.match(ref.part) else ""
            base = f"{SPELLING[ref.kind][1]}_{node}{part}" if ref.kind != Kind.GROUPING else "grouping"
            name, k = base, 1
            while name in self.used or keyword.iskeyword(name):
                name, k = f"{base}_{k}", k + 1
            self.used.add(name)
            self.taken[ref] = name
        return self.taken[ref]


def generate(plan: Plan, nodes: Sequence[str], launches: Sequence[Launch], name: str, outputs: Sequence[Ref],
             free: bool = True, keep: Sequence[Ref] = ()) -> StepCode:
    """The source of ``name(inputs, params, K, C)`` running ``launches`` (in order) of ``plan``.

    Inputs are what the launches read before any of them writes it; ``params`` the persistent tensors they
    read. ``free``: delete each buffer after its last reader (not ``outputs`` or ``keep``)."""
    names = _Names(nodes)
    written: set[Ref] = set()
    inputs: list[Ref] = []
    params: list[Ref] = []
    for la in launches:
        for r in la.reads:
            if r not in written and r not in inputs and r not in params:
                (params if r.kind.persistent else inputs).append(r)
        written.update(la.writes)
    missing = [r for r in outputs if r not in written and r not in inputs and r not in params]
    if missing:
        raise ValueError(f"{name}: outputs {[str(r) for r in missing]} are computed by none of its launches")
    last: dict[Ref, int] = {}
    for pos, la in enumerate(launches):
        for r in (*la.reads, *la.writes):
            last[r] = pos
    stay = set(outputs) | set(keep) | set(params)

    lines = [f"def {name}(inputs, params, K, C):",
             f'    """{len(launches)} launches of a bsdgraph plan (generated source)."""']
    if inputs:
        lines.append(f"    {', '.join(names(r) for r in inputs)}{',' if len(inputs) == 1 else ''} = inputs")
    lines += [f"    {names(r)} = params[{i}]  # {str(r)!r}" for i, r in enumerate(params)]
    for pos, la in enumerate(launches):
        lines.append(f"    # {la.index} {la.phase} {la.kernel} {la.nodes!r}")
        targets = ", ".join(names(w) for w in la.writes) + ("," if len(la.writes) == 1 else "")
        args = ", ".join([f"C[{la.index}]", *(names(r) for r in la.reads)])
        lines.append(f"    {targets or '_'} = K[{la.index}]({args})")
        dead = sorted({names(r) for r in (*la.reads, *la.writes) if last[r] == pos and r not in stay}) if free else []
        if dead:
            lines.append(f"    del {', '.join(dead)}")
    ret = ", ".join(names(r) for r in outputs)
    lines.append(f"    return ({ret}{',' if len(outputs) == 1 else ''})")
    source = "\n".join(lines) + "\n"
    ast.parse(source)  # a generator bug surfaces here, not at the first step
    return StepCode(name, source, tuple(la.index for la in launches), tuple(inputs), tuple(params),
                    tuple(outputs))


# ---------------------------------------------------------------------------------------------------- entries


def results(launches: Sequence[Launch]) -> list[Ref]:
    """What a training step reports: its losses and firing rates."""
    return [w for la in launches for w in la.writes if w.kind in (Kind.LOSS, Kind.RATE)]


def training_step(plan: Plan, nodes: Sequence[str]) -> StepCode:
    """One BSD step: every launch, the optimizer's included; returns losses and rates."""
    return generate(plan, nodes, plan.launches, "step", results(plan.launches))


def gradient_step(plan: Plan, nodes: Sequence[str]) -> StepCode:
    """A step without its optimizer launches; returns losses, rates and every parameter gradient."""
    launches = [la for la in plan.launches if la.phase != "optimizer"]
    grads = [w for la in launches for w in la.writes if w.kind == Kind.PARAM_GRAD]
    return generate(plan, nodes, launches, "gradients", results(launches) + grads)


def predict_step(plan: Plan, nodes: Sequence[str], output: Ref) -> StepCode:
    """F's forward launches; returns the top current. Buffers are kept until it returns (what the memory
    estimate of evaluation assumes, ``train/memory.py``)."""
    launches = [la for la in plan.launches if la.phase == "forward-F"]
    return generate(plan, nodes, launches, "predict", [output], free=False)
