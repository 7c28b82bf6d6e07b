"""From a neuron declaration (ir/neurons.py) to code: the torch twin, the Triton forward over T, and the Triton
surrogate-gradient backward derived symbolically from the same step.

A declaration is first put in SSA form (``step_ir``): every assignment gets a fresh name (``S<j>_<k>`` is state j
after its k-th assignment, ``P<i>`` parameter i, ``x`` the input current, ``spk`` the spike), so the declared
names never reach the generated source. Each expression is re-printed from its AST (``ast.unparse``) after
renaming, so the only text that survives from a declaration is numbers; declared names appear in comments as
``repr``. Divisions become ``tl.math.div_rn`` in Triton (its ``/`` on fp32 is approximate on NVIDIA), parameters
are fp32 scalars in both twin and kernel, and so the kernel's forward is bitwise the twin's.

The backward is reverse-mode differentiation of the SSA step, written out as code: the adjoint of each name is
the sum over its readers of (reader's adjoint) x (the reader's expression differentiated symbolically). The spike
``spk = [lhs >= rhs]`` contributes the atan surrogate at ``lhs - rhs``. The backward kernel recomputes the forward
(one sweep storing each step's states to a scratch buffer, then the reverse sweep), so it needs only the input
current: no kernel has to keep anything for it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from bsdgraph import env
from bsdgraph.ir.neurons import INPUT, SPIKE, Neuron, names_in

SPK, LHS, RHS, ZERO = "spk", "lhs", "rhs", "zero"
HEAVISIDE = "HEAVISIDE"   # marker call in the SSA: spk = HEAVISIDE(lhs, rhs)


@dataclass(frozen=True)
class StepIR:
    """One step of a neuron in SSA form (see the module docstring)."""

    neuron: Neuron
    assigns: tuple[tuple[str, ast.expr], ...]   # in order; the spike is (SPK, HEAVISIDE(LHS, RHS))
    h: str                                      # the membrane before the reset
    out: str                                    # SPK or h
    post: tuple[str, ...]                       # each state's name after the step

    @property
    def n_states(self) -> int:
        return len(self.neuron.states)

    @property
    def n_params(self) -> int:
        return len(self.neuron.params)

    def tensors(self) -> set[str]:
        """Names that hold per-neuron tensors (the rest are parameters: scalars)."""
        return {INPUT, *(f"S{j}_0" for j in range(self.n_states)), *(t for t, _ in self.assigns)}


class _Rename(ast.NodeTransformer):
    def __init__(self, names: dict[str, str]):
        self.names = names

    def visit_Name(self, node: ast.Name) -> ast.Name:
        return ast.Name(self.names[node.id], ast.Load())


def _renamed(expr: ast.expr, names: dict[str, str]) -> ast.expr:
    return ast.fix_missing_locations(_Rename(names).visit(ast.parse(ast.unparse(expr), mode="eval").body))


@functools.lru_cache(maxsize=None)
def step_ir(neuron: Neuron) -> StepIR:
    names = {p: f"P{i}" for i, (p, _) in enumerate(neuron.params)}
    names.update({st: f"S{j}_0" for j, st in enumerate(neuron.states)})
    names[INPUT] = INPUT
    version = {st: 0 for st in neuron.states}
    assigns: list[tuple[str, ast.expr]] = []

    def assign(state: str, expr: ast.expr) -> None:
        j = neuron.states.index(state)
        version[state] += 1
        target = f"S{j}_{version[state]}"
        assigns.append((target, _renamed(expr, names)))
        names[state] = target

    for st, expr in neuron.parsed_update():
        assign(st, expr)
    h = names[neuron.membrane]
    if neuron.spiking:
        lhs, rhs = neuron.parsed_spike()
        assigns.append((LHS, _renamed(lhs, names)))
        assigns.append((RHS, _renamed(rhs, names)))
        assigns.append((SPK, ast.Call(ast.Name(HEAVISIDE, ast.Load()), [ast.Name(LHS, ast.Load()),
                                                                       ast.Name(RHS, ast.Load())], [])))
        names[SPIKE] = SPK
        for st, expr in neuron.parsed_reset():
            assign(st, expr)
    return StepIR(neuron, tuple(assigns), h, SPK if neuron.spiking else h,
                  tuple(names[st] for st in neuron.states))


# ---------------------------------------------------------------------------------------------------- derivatives

ONE = 1.0


def _c(v: float) -> ast.Constant:
    return ast.Constant(v)


def _is(e: ast.expr | None, v: float) -> bool:
    return isinstance(e, ast.Constant) and e.value == v


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return ast.BinOp(a, ast.Add(), b)


def _sub(a, b):
    if b is None:
        return a
    if a is None:
        return ast.UnaryOp(ast.USub(), b)
    return ast.BinOp(a, ast.Sub(), b)


def _mul(a, b):
    if a is None or b is None:
        return None
    if _is(a, ONE):
        return b
    if _is(b, ONE):
        return a
    return ast.BinOp(a, ast.Mult(), b)


def _div(a, b):
    return None if a is None else ast.BinOp(a, ast.Div(), b)


def derivative(e: ast.expr, var: str) -> ast.expr | None:
    """d e / d var as an AST, or None where it is identically zero (powers are already expanded)."""
    if isinstance(e, ast.Constant):
        return None
    if isinstance(e, ast.Name):
        return _c(ONE) if e.id == var else None
    if isinstance(e, ast.UnaryOp):
        d = derivative(e.operand, var)
        return d if isinstance(e.op, ast.UAdd) or d is None else ast.UnaryOp(ast.USub(), d)
    if isinstance(e, ast.BinOp):
        da, db = derivative(e.left, var), derivative(e.right, var)
        if isinstance(e.op, ast.Add):
            return _add(da, db)
        if isinstance(e.op, ast.Sub):
            return _sub(da, db)
        if isinstance(e.op, ast.Mult):
            return _add(_mul(da, e.right), _mul(e.left, db))
        if isinstance(e.op, ast.Div):   # (a/b)' = a'/b - a b' / (b b)
            return _sub(_div(da, e.right), _div(_mul(e.left, db), ast.BinOp(e.right, ast.Mult(), e.right)))
    raise ValueError(f"cannot differentiate {ast.unparse(e)!r}")


def adjoint(ir: StepIR) -> tuple[list[tuple[str, ast.expr]], dict[str, ast.expr | None]]:
    """Reverse-mode code of one step.

    Inputs (names the code reads): the forward SSA names, ``G_out`` and ``G_h`` (dL/d out[t], dL/d h[t]),
    ``A<j>`` (dL/d state j after the step, carried from step t+1) and ``sg`` (the surrogate at lhs - rhs).
    Returns (assignments, results) where results maps ``x`` and ``S<j>_0`` to their adjoint expressions."""
    terms: dict[str, list[ast.expr]] = {}

    def seed(name: str, expr: ast.expr) -> None:
        terms.setdefault(name, []).append(expr)

    for j, post in enumerate(ir.post):
        seed(post, ast.Name(f"A{j}", ast.Load()))
    seed(ir.out, ast.Name("G_out", ast.Load()))
    seed(ir.h, ast.Name("G_h", ast.Load()))
    code: list[tuple[str, ast.expr]] = []
    tensors = ir.tensors()
    for target, expr in reversed(ir.assigns):
        if target not in terms:
            continue
        total = functools.reduce(_add, terms.pop(target))
        name = f"a_{target}"
        code.append((name, total))
        adj = ast.Name(name, ast.Load())
        if target == SPK:   # d spk / d lhs = sg, d spk / d rhs = -sg
            g = ast.BinOp(adj, ast.Mult(), ast.Name("sg", ast.Load()))
            seed(LHS, g)
            seed(RHS, ast.UnaryOp(ast.USub(), g))
            continue
        for var in sorted(names_in(expr) & tensors):
            d = derivative(expr, var)
            if d is not None:
                seed(var, _mul(adj, d))
    results = {INPUT: None, **{f"S{j}_0": None for j in range(ir.n_states)}}
    for name in results:
        if name in terms:
            results[name] = functools.reduce(_add, terms[name])
    return code, results


# ---------------------------------------------------------------------------------------------------- printing


class _TritonDialect(ast.NodeTransformer):
    """a / b -> tl.math.div_rn(a, b) (IEEE division, as torch), numbers in a division as fp32 scalars."""

    def visit_BinOp(self, node: ast.BinOp) -> ast.expr:
        node = self.generic_visit(node)
        if not isinstance(node.op, ast.Div):
            return node
        return _call("tl.math.div_rn", [_fp32(node.left), _fp32(node.right)])


def _fp32(e: ast.expr) -> ast.expr:
    """A number (``2``, ``-1.0``) as an fp32 scalar tensor: ``div_rn`` takes tensors, not Python numbers."""
    return _call("tl.full", [ast.List([], ast.Load()), e, _attr("tl.float32")]) if not names_in(e) else e


def _attr(dotted: str) -> ast.expr:
    """``a.b.c`` as an expression."""
    first, *rest = dotted.split(".")
    out: ast.expr = ast.Name(first, ast.Load())
    for name in rest:
        out = ast.Attribute(out, name, ast.Load())
    return out


def _call(fn: str, args: list[ast.expr]) -> ast.Call:
    return ast.Call(_attr(fn), args, [])


def _src(expr: ast.expr, triton: bool) -> str:
    expr = ast.fix_missing_locations(expr)
    if triton:
        expr = ast.fix_missing_locations(_TritonDialect().visit(ast.parse(ast.unparse(expr), mode="eval").body))
    return ast.unparse(expr)


def _statement(ir: StepIR, target: str, expr: ast.expr, triton: bool) -> str:
    """``target = expr``; the spike per dialect; a state assigned only from scalars is broadcast to a tensor."""
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == HEAVISIDE:
        return f"{SPK} = tl.where({LHS} >= {RHS}, 1.0, 0.0)" if triton else f"{SPK} = spike({LHS}, {RHS})"
    text = _src(expr, triton)
    if target.startswith("S") and not (names_in(expr) & ir.tensors()):
        text = f"{ZERO} + ({text})"
    return f"{target} = {text}"


def _comment(ir: StepIR) -> list[str]:
    n = ir.neuron
    lines = [f"# neuron {n.name!r}: " + ", ".join(f"P{i} = {p!r}" for i, (p, _) in enumerate(n.params))]
    lines.append("# states: " + ", ".join(f"S{j} = {st!r}" for j, st in enumerate(n.states)))
    return lines


def twin_source(neuron: Neuron) -> str:
    """Python source of ``step(x, states, P, spike) -> (out, h, states)`` in torch: the neuron's torch twin."""
    ir = step_ir(neuron)
    k = ir.n_states
    lines = _comment(ir) + ["", "", "def step(x, states, P, spike):"]
    if ir.n_params:
        lines.append(f"    {', '.join(f'P{i}' for i in range(ir.n_params))}, = P")
    lines.append(f"    {', '.join(f'S{j}_0' for j in range(k))}, = states")
    body = [f"    {_statement(ir, t, e, False)}" for t, e in ir.assigns]
    if any(f"{ZERO} +" in line for line in body):
        lines.append(f"    {ZERO} = zeros_like(x)")
    lines += body
    lines.append(f"    return {ir.out}, {ir.h}, ({', '.join(ir.post)},)")
    return "\n".join(lines) + "\n"


def _triton_step(ir: StepIR, indent: str) -> list[str]:
    return [f"{indent}{_statement(ir, t, e, True)}" for t, e in ir.assigns]


def triton_source(neuron: Neuron) -> str:
    """Source of the module holding ``forward_kernel`` and ``backward_kernel`` for ``neuron``."""
    ir = step_ir(neuron)
    k, p = ir.n_states, ir.n_params
    consts = "".join(f"C{i}: tl.constexpr, " for i in range(p))
    fp32 = [f"    P{i} = tl.full([], C{i}, tl.float32)" for i in range(p)]
    zeros = [f"    S{j}_0 = tl.zeros([BLOCK], dtype=tl.float32)" for j in range(k)]
    out_store = ("tl.store(out_ptrs, spk.to(tl.uint8), mask=mask)" if neuron.spiking
                 else f"tl.store(out_ptrs, {ir.out}, mask=mask)")
    fwd = [
        "@triton.jit",
        f"def forward_kernel(x_ptr, out_ptr, h_ptr, T, M, {consts}BLOCK: tl.constexpr, RETURN_H: tl.constexpr):",
        "    pid = tl.program_id(0)",
        "    offs = pid * BLOCK + tl.arange(0, BLOCK)",
        "    mask = offs < M",
        *fp32, *zeros,
        f"    {ZERO} = tl.zeros([BLOCK], dtype=tl.float32)",
        "    # pointers advance one time row per step: 64-bit pointer arithmetic, no int32 overflow of t * M",
        "    x_ptrs, out_ptrs, h_ptrs = x_ptr + offs, out_ptr + offs, h_ptr + offs",
        "    for _ in range(T):",
        "        x = tl.load(x_ptrs, mask=mask, other=0.0)",
        *_triton_step(ir, "        "),
        f"        {out_store}",
        "        if RETURN_H:",
        f"            tl.store(h_ptrs, {ir.h}, mask=mask)",
        *[f"        S{j}_0 = {ir.post[j]}" for j in range(k)],
        "        x_ptrs += M",
        "        out_ptrs += M",
        "        h_ptrs += M",
    ]
    return "\n".join(_comment(ir) + ["", "import triton", "import triton.language as tl", "", ""] + fwd
                     + ["", ""] + _backward_lines(ir, consts, fp32, zeros)) + "\n"


def _backward_lines(ir: StepIR, consts: str, fp32: list[str], zeros: list[str]) -> list[str]:
    """The backward kernel: a forward sweep storing each step's incoming states, then the reverse sweep."""
    k = ir.n_states
    code, results = adjoint(ir)
    store_states = [f"        tl.store(scr_ptrs + {j} * M, S{j}_0, mask=mask)" for j in range(k)]
    load_states = [f"        S{j}_0 = tl.load(scr_ptrs + {j} * M, mask=mask, other=0.0)" for j in range(k)]
    surrogate = []
    if ir.neuron.spiking:   # atan: alpha / (2 (1 + (pi alpha d / 2)^2)), as kernels/ref/lif.py
        surrogate = [f"        z = tl.full([], {math.pi!r}, tl.float32) * ALPHA * ({LHS} - {RHS}) / 2.0",
                     "        sg = ALPHA / (2.0 * (1.0 + z * z))"]
    adj = [f"        {name} = {_src(expr, True)}" for name, expr in code]
    gx = results[INPUT]
    carry = [f"        A{j} = {_src(results[f'S{j}_0'], True) if results[f'S{j}_0'] is not None else '0.0 * A' + str(j)}"
             for j in range(k)]
    return [
        "@triton.jit",
        f"def backward_kernel(x_ptr, x_last_ptr, gout_last_ptr, gh_last_ptr, gx_last_ptr, scr_ptr, scr_last_ptr, T, M, "
        f"{consts}ALPHA: tl.constexpr, BLOCK: tl.constexpr, HAS_GOUT: tl.constexpr, HAS_GH: tl.constexpr):",
        "    pid = tl.program_id(0)",
        "    offs = pid * BLOCK + tl.arange(0, BLOCK)",
        "    mask = offs < M",
        *fp32, *zeros,
        f"    {ZERO} = tl.zeros([BLOCK], dtype=tl.float32)",
        "    x_ptrs, scr_ptrs = x_ptr + offs, scr_ptr + offs",
        "    for _ in range(T):   # forward sweep: the states entering each step",
        *store_states,
        "        x = tl.load(x_ptrs, mask=mask, other=0.0)",
        *_triton_step(ir, "        "),
        *[f"        S{j}_0 = {ir.post[j]}" for j in range(k)],
        "        x_ptrs += M",
        f"        scr_ptrs += {k} * M",
        *[f"    A{j} = tl.zeros([BLOCK], dtype=tl.float32)" for j in range(k)],
        "    x_ptrs, scr_ptrs = x_last_ptr + offs, scr_last_ptr + offs",
        "    gout_ptrs, gh_ptrs, gx_ptrs = gout_last_ptr + offs, gh_last_ptr + offs, gx_last_ptr + offs",
        "    for _ in range(T):   # reverse sweep, t = T-1 .. 0",
        *load_states,
        "        x = tl.load(x_ptrs, mask=mask, other=0.0)",
        *_triton_step(ir, "        "),
        *surrogate,
        "        G_out = tl.zeros([BLOCK], dtype=tl.float32)",
        "        G_h = tl.zeros([BLOCK], dtype=tl.float32)",
        "        if HAS_GOUT:",
        "            G_out = tl.load(gout_ptrs, mask=mask, other=0.0)",
        "        if HAS_GH:",
        "            G_h = tl.load(gh_ptrs, mask=mask, other=0.0)",
        *adj,
        f"        tl.store(gx_ptrs, {_src(gx, True) if gx is not None else 'G_h * 0.0'}, mask=mask)",
        *carry,
        "        x_ptrs -= M",
        f"        scr_ptrs -= {k} * M",
        "        gout_ptrs -= M",
        "        gh_ptrs -= M",
        "        gx_ptrs -= M",
    ]


# ---------------------------------------------------------------------------------------------------- loading


def _cache_dir() -> Path:
    base = env.XDG_CACHE_HOME.get() or (str(Path(env.HOME.get()) / ".cache") if env.HOME.get() else "")
    return Path(base or tempfile.gettempdir()) / "bsdgraph" / "neurons"


def _load(source: str, stem: str, namespace: str):
    """Import ``source`` from a cached file named by its hash (Triton reads a kernel's source from its file)."""
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = _cache_dir() / f"{stem}-{key}.py"
    if not path.exists() or path.read_text() != source:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"bsdgraph_{namespace}_{stem}_{key}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def twin_step(neuron: Neuron):
    """The compiled twin ``step`` function of ``neuron`` (see ``twin_source``)."""
    namespace: dict = {"zeros_like": torch.zeros_like}
    exec(compile(twin_source(neuron), f"<bsdgraph neuron {neuron.name}>", "exec"), namespace)  # noqa: S102
    return namespace["step"]


@functools.lru_cache(maxsize=None)
def triton_module(neuron: Neuron):
    """The generated Triton module of ``neuron`` (imported from the cache directory)."""
    return _load(triton_source(neuron), neuron.name, "triton")
