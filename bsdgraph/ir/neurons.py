"""Neurons as declarations: state variables, a per-step update, a spike condition, a reset and a surrogate.

A declaration is data the compiler turns into kernels (compiler/neuron_gen.py: the Triton forward over T, its
surrogate-gradient backward and the torch twin), as SpikingJelly's FlexSN turns a neuron into a Triton kernel. Per
step t, per neuron, with every state at 0 before the first step:

    1. ``update``: each (state, expression) in order; an expression reads the input current ``x``, the
       parameters and the states (those already updated this step with their new value, the others their last);
    2. ``spike``: ``s = [lhs >= rhs]`` (omitted for a non-spiking neuron such as the leaky integrator ``li``);
       the surrogate gradient is the atan one at ``lhs - rhs``: ds/dd = alpha / (2 (1 + (pi alpha d / 2)^2));
    3. ``reset``: each (state, expression) in order, reading ``s`` too (hard: ``v * (1 - s) + v_reset * s``);
    4. the neuron's value is ``s`` (spiking) or its ``membrane`` state (non-spiking). The membrane ``h`` a
       ``distill_on=membrane`` loss reads is the membrane state after the update, before the reset.

Expressions are Python arithmetic (``+ - * /``, unary minus, ``**`` with a small integer exponent, numbers and
names), parsed with ``ast``; nothing else is accepted, so a declaration can be turned into source for torch and for
Triton alike. A declaration comes from a model file (code the user chose to run) or from the built-ins below.

Declare one in a model file::

    from bsdgraph import declare_neuron
    declare_neuron("qif", params={"tau": 2.0, "v_c": 0.1, "v_th": 1.0},
                   states=["v"], update={"v": "v + (v * (v - v_c) + x) / tau"},
                   spike="v >= v_th", reset={"v": "v * (1 - s)"},
                   checks={"tau > 0": "tau is the time constant in steps"})

and use it with ``g.neuron("qif", x, tau=4.0)``.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bsdgraph.errors import UserError

INPUT, SPIKE = "x", "s"
MAX_POWER = 4   # ``a ** n`` for integer 1 <= n <= MAX_POWER is expanded to products (Triton has no tensor pow)

_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)
_UNARY = (ast.USub, ast.UAdd)


class NeuronError(UserError):
    """A declaration that cannot be compiled; the message names the neuron and the offending part."""


@dataclass(frozen=True)
class Neuron:
    """One neuron type. All fields are plain data (see the module docstring for their meaning)."""

    name: str
    params: tuple[tuple[str, float], ...]        # (name, default), in order
    states: tuple[str, ...]
    update: tuple[tuple[str, str], ...]          # (state, expression)
    spike: str | None = None                     # "lhs >= rhs"
    reset: tuple[tuple[str, str], ...] = ()      # (state, expression reading s)
    membrane: str = ""                           # the state h is read from; default: the last state
    checks: tuple[tuple[str, str], ...] = ()     # (condition over the parameters, what it means)
    doc: str = ""

    @property
    def spiking(self) -> bool:
        return self.spike is not None

    @property
    def defaults(self) -> dict[str, float]:
        return dict(self.params)

    def param_values(self, given: Mapping[str, float] | None = None) -> dict[str, float]:
        """The defaults overridden by ``given`` (unknown keys are validate's to report)."""
        out = self.defaults
        out.update({k: v for k, v in (given or {}).items() if k in out})
        return out

    def problems(self) -> list[str]:
        """Every reason this declaration cannot be compiled (empty when it is fine)."""
        return list(_declaration_problems(self))

    # -- parsed parts (a declaration that passed ``problems`` parses)
    def parsed_update(self) -> list[tuple[str, ast.expr]]:
        return [(st, expand_powers(parse(e))) for st, e in self.update]

    def parsed_spike(self) -> tuple[ast.expr, ast.expr] | None:
        if self.spike is None:
            return None
        cmp = parse(self.spike)
        assert isinstance(cmp, ast.Compare)
        return expand_powers(cmp.left), expand_powers(cmp.comparators[0])

    def parsed_reset(self) -> list[tuple[str, ast.expr]]:
        return [(st, expand_powers(parse(e))) for st, e in self.reset]

    def check_params(self, values: Mapping[str, float]) -> list[tuple[str, str]]:
        """(message, hint) for each declared check the parameter values break."""
        out = []
        for cond, meaning in self.checks:
            if not evaluate(parse(cond), values):
                shown = ", ".join(f"{k}={values[k]!r}" for k in sorted(names_in(parse(cond))) if k in values)
                out.append((f"{self.name} needs {cond}, got {shown}", meaning))
        return out


# ---------------------------------------------------------------------------------------------------- expressions


def parse(text: str) -> ast.expr:
    """The expression's AST; ``SyntaxError`` for text that is not a Python expression."""
    if not isinstance(text, str):
        raise SyntaxError(f"expected an expression as a string, got {type(text).__name__}")
    return ast.parse(text.strip(), mode="eval").body


def names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _unsupported(node: ast.AST, compare: bool) -> str | None:
    """Why ``node`` (a whole expression) is outside the arithmetic language, or None."""
    for sub in ast.walk(node):
        if isinstance(sub, (ast.Expression, ast.Name, ast.Load, *_BINOPS, *_UNARY)):
            continue
        if isinstance(sub, ast.Constant):
            if isinstance(sub.value, bool) or not isinstance(sub.value, (int, float)):
                return f"constant {sub.value!r} is not a number"
            continue
        if isinstance(sub, ast.BinOp):
            if not isinstance(sub.op, _BINOPS):
                return f"operator {type(sub.op).__name__} is not supported (use + - * / and ** n)"
            if isinstance(sub.op, ast.Pow) and _power(sub) is None:
                return f"only ** with an integer exponent 1..{MAX_POWER} is supported, got {ast.unparse(sub)!r}"
            continue
        if isinstance(sub, ast.UnaryOp):
            if not isinstance(sub.op, _UNARY):
                return f"operator {type(sub.op).__name__} is not supported"
            continue
        if compare and sub is node and isinstance(sub, ast.Compare):
            if len(sub.ops) != 1 or not isinstance(sub.ops[0], ast.GtE):
                return "a spike condition is one comparison 'lhs >= rhs'"
            continue
        if compare and isinstance(sub, ast.GtE):
            continue
        return f"{type(sub).__name__} ({ast.unparse(sub)!r}) is not arithmetic; use + - * / ** on names and numbers"
    return None


def _power(node: ast.BinOp) -> int | None:
    e = node.right
    if isinstance(e, ast.Constant) and not isinstance(e.value, bool) and isinstance(e.value, (int, float)):
        if float(e.value).is_integer() and 1 <= e.value <= MAX_POWER:
            return int(e.value)
    return None


class _ExpandPowers(ast.NodeTransformer):
    def visit_BinOp(self, node: ast.BinOp) -> ast.expr:
        node = self.generic_visit(node)
        if isinstance(node.op, ast.Pow):
            n = _power(node)
            out = node.left
            for _ in range(n - 1):
                out = ast.BinOp(out, ast.Mult(), node.left)
            return out
        return node


def expand_powers(node: ast.expr) -> ast.expr:
    """``a ** n`` -> ``a * a * ...``: the same result in torch and in Triton, which has no tensor power."""
    return ast.fix_missing_locations(_ExpandPowers().visit(_copy(node)))


def _copy(node: ast.expr) -> ast.expr:
    return ast.parse(ast.unparse(node), mode="eval").body


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b if b != 0 else math.copysign(math.inf, a) if a else math.nan,
        ast.Pow: lambda a, b: a ** b}


def evaluate(node: ast.expr, env: Mapping[str, float]) -> float | bool:
    """The value of an arithmetic expression (or one comparison) over plain numbers."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.UnaryOp):
        v = evaluate(node.operand, env)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        return _OPS[type(node.op)](evaluate(node.left, env), evaluate(node.right, env))
    if isinstance(node, ast.Compare):
        left = evaluate(node.left, env)
        right = evaluate(node.comparators[0], env)
        return {ast.Gt: left > right, ast.GtE: left >= right, ast.Lt: left < right, ast.LtE: left <= right,
                ast.Eq: left == right, ast.NotEq: left != right}[type(node.ops[0])]
    if isinstance(node, ast.BoolOp):
        vals = [evaluate(v, env) for v in node.values]
        return all(vals) if isinstance(node.op, ast.And) else any(vals)
    raise ValueError(f"cannot evaluate {ast.unparse(node)!r}")


# ---------------------------------------------------------------------------------------------------- checks


def _declaration_problems(n: Neuron):
    if not n.name.isidentifier():
        yield f"name {n.name!r} must be an identifier (letters, digits, _)"
    params = [p for p, _ in n.params]
    taken = {INPUT, SPIKE}
    for kind, names in (("parameter", params), ("state", list(n.states))):
        for name in names:
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                yield f"{kind} name {name!r} must be an identifier not starting with _"
            elif name in taken:
                yield f"{kind} name {name!r} is used twice (x and s are the input and the spike)"
            taken.add(name)
    for p, v in n.params:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            yield f"parameter {p!r} needs a finite number as its default, got {v!r}"
    if not n.states:
        yield "declares no state; a neuron has at least one (its membrane)"
    if n.membrane not in n.states:
        yield f"membrane {n.membrane!r} is not one of the states {list(n.states)}"
    known = set(params) | set(n.states) | {INPUT}
    yield from _part_problems("update", n.update, n.states, known)
    assigned = {st for st, _ in (*n.update, *n.reset)}
    for st in n.states:
        if st not in assigned:
            yield f"state {st!r} is never assigned by the update or the reset; give it an update or drop it"
    if INPUT not in set().union(*(names_in(_safe_parse(e)) for _, e in n.update)):
        yield "no update reads the input current x"
    if n.spike is not None:
        yield from _expression_problems("spike", n.spike, known, compare=True)
        if not n.reset:
            yield "a spiking neuron needs a reset, e.g. reset={'v': 'v * (1 - s)'} (to 0) or {'v': 'v - v_th * s'}"
        yield from _part_problems("reset", n.reset, n.states, known | {SPIKE})
        if n.reset and not any(SPIKE in names_in(_safe_parse(e)) for _, e in n.reset):
            yield "no reset expression reads the spike s"
    elif n.reset:
        yield "a reset without a spike condition: declare spike='v >= v_th' or drop the reset"
    for cond, _ in n.checks:
        try:
            tree = parse(cond)
        except SyntaxError as err:
            yield f"check {cond!r} is not an expression: {err.msg}"
            continue
        unknown = names_in(tree) - set(params)
        if unknown:
            yield f"check {cond!r} reads {sorted(unknown)}, which are not parameters"
        elif evaluate_or_none(tree, n.defaults) is None:
            yield f"check {cond!r} cannot be evaluated on the defaults"
        elif not evaluate(tree, n.defaults):
            yield f"the defaults break the declaration's own check {cond!r}"


def evaluate_or_none(tree: ast.expr, env: Mapping[str, float]):
    try:
        return evaluate(tree, env)
    except (ValueError, KeyError, ZeroDivisionError, OverflowError, TypeError):
        return None


def _safe_parse(text: str) -> ast.expr:
    try:
        return parse(text)
    except SyntaxError:
        return ast.Constant(0)


def _part_problems(part: str, items, states, known: set[str]):
    seen = set()
    for st, expr in items:
        if st not in states:
            yield f"{part} assigns {st!r}, which is not a declared state {list(states)}"
        if st in seen:
            yield f"{part} assigns {st!r} twice; combine the expressions"
        seen.add(st)
        yield from _expression_problems(f"{part} of {st!r}", expr, known)


def _expression_problems(where: str, text: str, known: set[str], compare: bool = False):
    try:
        tree = parse(text)
    except SyntaxError as err:
        yield f"{where}: {text!r} is not an expression ({err.msg})"
        return
    if compare and not isinstance(tree, ast.Compare):
        yield f"{where}: {text!r} must be a comparison 'lhs >= rhs'"
        return
    why = _unsupported(tree, compare)
    if why:
        yield f"{where}: {why}"
    unknown = names_in(tree) - known
    if unknown:
        yield (f"{where}: {text!r} reads {sorted(unknown)}, which are neither parameters, states nor x"
               + (" / s" if SPIKE in known else ""))


# ---------------------------------------------------------------------------------------------------- registry

NEURONS: dict[str, Neuron] = {}
BUILTIN: set[str] = set()


def _pairs(items: Mapping[str, str] | Sequence[tuple[str, str]] | None) -> tuple[tuple[str, str], ...]:
    if items is None:
        return ()
    return tuple((k, v) for k, v in (items.items() if isinstance(items, Mapping) else items))


def declare_neuron(name: str, *, params: Mapping[str, float], states: Sequence[str],
                   update: Mapping[str, str] | Sequence[tuple[str, str]], spike: str | None = None,
                   reset: Mapping[str, str] | Sequence[tuple[str, str]] | None = None, membrane: str | None = None,
                   checks: Mapping[str, str] | None = None, doc: str = "") -> Neuron:
    """Declare (and register) a neuron type; returns it. ``NeuronError`` lists every problem of the declaration.

    Declaring a name again with the same content is a no-op (a model file may be imported twice); with other
    content it is refused, as is redeclaring a built-in."""
    states = tuple(states) if not isinstance(states, str) else (states,)
    neuron = Neuron(name, tuple(dict(params).items()), states, _pairs(update), spike, _pairs(reset),
                    membrane if membrane is not None else (states[-1] if states else ""), _pairs(checks), doc)
    problems = neuron.problems()
    if problems:
        listing = "; ".join(problems)
        raise NeuronError(f"neuron {name!r}: {listing}")
    old = NEURONS.get(name)
    if old is not None and old != neuron:
        if name in BUILTIN:
            raise NeuronError(f"neuron {name!r} is built in; declare yours under another name")
        raise NeuronError(f"neuron {name!r} is already declared differently; declare the new one under another "
                          "name")
    NEURONS[name] = neuron
    return neuron


def _builtin(name: str, **kw) -> Neuron:
    n = declare_neuron(name, **kw)
    BUILTIN.add(name)
    return n


_TAU = {"tau > 0": "tau is the membrane time constant in steps (1 = no memory)"}
_ABOVE = {"v_th > v_reset": "a threshold at or below the reset potential fires every step"}
# LIF's update, written exactly as kernels/ref/lif.py computes it, so the generated twin is bit-identical to it
_LIF_UPDATE = {"v": "v + (x - (v - v_reset)) / tau"}

_builtin("if", params={"v_th": 1.0, "v_reset": 0.0}, states=["v"], update={"v": "v + x"},
         spike="v >= v_th", reset={"v": "v * (1 - s) + v_reset * s"}, checks=_ABOVE,
         doc="integrate-and-fire without leak (NIR IF; Sinabs' IAF)")
_builtin("li", params={"tau": 2.0, "v_leak": 0.0}, states=["v"], update={"v": "v + (x - (v - v_leak)) / tau"},
         checks=_TAU, doc="leaky integrator, no spikes: its value is the membrane (readouts; NIR LI)")
_builtin("lif", params={"tau": 2.0, "v_th": 0.3, "v_reset": 0.0}, states=["v"], update=_LIF_UPDATE,
         spike="v >= v_th", reset={"v": "v * (1 - s) + v_reset * s"}, checks={**_TAU, **_ABOVE},
         doc="leaky integrate-and-fire, hard reset to v_reset (the engine's lif op, reset='hard')")
_builtin("lif_soft", params={"tau": 2.0, "v_th": 0.3, "v_reset": 0.0}, states=["v"], update=_LIF_UPDATE,
         spike="v >= v_th", reset={"v": "v - v_th * s"}, checks={**_TAU, **_ABOVE},
         doc="leaky integrate-and-fire, soft reset (subtract v_th; the lif op with reset='soft')")
_builtin("cuba_lif", params={"tau_syn": 2.0, "tau": 2.0, "v_leak": 0.0, "v_th": 0.3, "v_reset": 0.0},
         states=["i", "v"], update={"i": "i + (x - i) / tau_syn", "v": "v + (i - (v - v_leak)) / tau"},
         spike="v >= v_th", reset={"v": "v * (1 - s) + v_reset * s"},
         checks={"tau_syn > 0": "tau_syn is the synaptic time constant in steps", **_TAU, **_ABOVE},
         doc="current-based LIF: a synaptic current i with its own tau_syn feeds the membrane (NIR CubaLIF; "
             "snnTorch Synaptic)")
_builtin("cuba_li", params={"tau_syn": 2.0, "tau": 2.0, "v_leak": 0.0}, states=["i", "v"],
         update={"i": "i + (x - i) / tau_syn", "v": "v + (i - (v - v_leak)) / tau"},
         checks={"tau_syn > 0": "tau_syn is the synaptic time constant in steps", **_TAU},
         doc="current-based leaky integrator, no spikes (NIR CubaLI)")
_builtin("alif", params={"tau": 2.0, "v_th": 0.3, "v_reset": 0.0, "tau_a": 20.0, "beta": 0.2},
         states=["v", "a"], update={"v": "v + (x - (v - v_reset)) / tau"}, spike="v >= v_th + beta * a",
         reset={"v": "v * (1 - s) + v_reset * s", "a": "a + (s - a) / tau_a"}, membrane="v",
         checks={**_TAU, **_ABOVE, "tau_a > 0": "tau_a is the adaptation time constant in steps",
                 "beta >= 0": "beta scales how much each spike raises the threshold"},
         doc="adaptive LIF: each spike raises the threshold by beta * a, a decaying with tau_a")


def lookup(name: str) -> Neuron:
    """The declaration called ``name``; ``NeuronError`` listing the declared ones otherwise."""
    try:
        return NEURONS[name]
    except (KeyError, TypeError):
        raise NeuronError(f"no neuron called {name!r}; declared: {', '.join(sorted(NEURONS))} "
                          "(declare a new one with bsdgraph.declare_neuron in the model file)") from None


def neuron_of(node) -> tuple[Neuron, dict[str, float]]:
    """(declaration, parameter values) of a neuron node: a ``lif`` node is the ``lif``/``lif_soft`` declaration,
    a ``neuron`` node names its own."""
    from bsdgraph.ir.graph import Op

    a = node.attrs
    if node.op == Op.LIF:
        return NEURONS["lif_soft" if a["reset"] == "soft" else "lif"], {
            "tau": a["tau"], "v_th": a["v_th"], "v_reset": a["v_reset"]}
    neuron = lookup(a["model"])
    return neuron, neuron.param_values(a["params"])


def is_spiking(node) -> bool:
    """Whether a node's value is 0/1 spikes: a neuron node of a spiking declaration."""
    from bsdgraph.ir.graph import GroupOp

    return node.op in GroupOp.NEURON and neuron_of(node)[0].spiking
