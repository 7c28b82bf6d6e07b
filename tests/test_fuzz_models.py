"""Fuzzing model files: mutated valid models and random Python that is not a model at all.

Every case goes through ``bsdgraph compile`` in-process and must end in exit 0 (still a valid model) or exit 1 with
every stderr line naming the file (``GraphError`` diagnostics or a ``ModelError`` line); any other exception escapes
``main`` and fails the test with its traceback. A mutation that is certainly wrong (a NaN, a cycle, a missing node,
an exception in ``build()``) must give exit 1: accepting it silently is a failure too.
"""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz_helpers import FUZZ, assert_clean, case_dir, cli, write

NAN, INF = float("nan"), float("inf")


def lit(v) -> str:
    """Python source for a value (repr, except for non-finite floats)."""
    if isinstance(v, float) and not math.isfinite(v):
        return f"float({str(v)!r})"
    if isinstance(v, tuple):
        return "(" + "".join(f"{lit(x)}, " for x in v) + ")"
    if isinstance(v, list):
        return "[" + ", ".join(lit(x) for x in v) + "]"
    return repr(v)


# ---------------------------------------------------------------------------------------------------- valid models


@st.composite
def lif_kwargs(draw) -> dict:
    v_reset = draw(st.sampled_from([0.0, -0.2]))
    return dict(tau=draw(st.sampled_from([1.5, 2.0, 4.0])), v_th=round(draw(st.floats(v_reset + 0.1, 1.0)), 3),
                v_reset=v_reset, reset=draw(st.sampled_from(["hard", "soft"])), alpha=2.0)


@st.composite
def valid_specs(draw) -> dict:
    """A valid forward network as plain data: every leaf is a place a mutation can put a bad value."""
    image = draw(st.booleans())
    spec = {
        "graph": {"name": "fz", "T": draw(st.integers(1, 4)), "dt": draw(st.sampled_from([1.0, 1e-3]))},
        "input": {"shape": (draw(st.integers(1, 2)), draw(st.integers(4, 7)), draw(st.integers(4, 7))) if image
                  else (draw(st.integers(2, 12)),), "encoding": draw(st.sampled_from(["direct", "poisson"]))},
        "convs": [],
        "hidden": [],
        "output": {"classes": draw(st.integers(2, 5))},
    }
    size = min(spec["input"]["shape"][1:]) if image else 0
    for _ in range(draw(st.integers(1, 2)) if image else 0):
        padding = draw(st.integers(0, 1))
        kernel = draw(st.integers(1, min(3, size + 2 * padding)))
        size += 2 * padding - kernel + 1  # stride 1: never below 1
        spec["convs"].append({"out_channels": draw(st.integers(1, 4)), "kernel": kernel, "stride": 1,
                              "padding": padding, "bn": draw(st.booleans()), "lif": draw(lif_kwargs())})
    for _ in range(draw(st.integers(0, 2))):
        spec["hidden"].append({"width": draw(st.integers(1, 10)), "bias": draw(st.booleans()),
                               "bn": draw(st.booleans()), "lif": draw(lif_kwargs())})
    return spec


def render(spec: dict, extra: tuple[str, ...] = (), top: tuple[str, ...] = (), ret: str = "return g.build()") -> str:
    g, i = spec["graph"], spec["input"]
    body = [f"g = GraphBuilder({lit(g['name'])}, T={lit(g['T'])}, dt={lit(g['dt'])})",
            f"h = g.input({lit(i['shape'])}, encoding={lit(i['encoding'])})"]
    for c in spec["convs"]:
        body.append(f"h = g.conv2d(h, {lit(c['out_channels'])}, kernel={lit(c['kernel'])}, stride={lit(c['stride'])}, "
                    f"padding={lit(c['padding'])})")
        body += ["h = g.batchnorm(h)"] if c["bn"] else []
        body.append(f"h = g.lif(h, {', '.join(f'{k}={lit(v)}' for k, v in c['lif'].items())})")
    if spec["convs"] or (isinstance(i["shape"], tuple) and len(i["shape"]) == 3):
        body.append("h = g.flatten(h)")
    for layer in spec["hidden"]:
        body.append(f"h = g.linear(h, {lit(layer['width'])}, bias={lit(layer['bias'])})")
        body += ["h = g.batchnorm(h)"] if layer["bn"] else []
        body.append(f"h = g.lif(h, {', '.join(f'{k}={lit(v)}' for k, v in layer['lif'].items())})")
    body.append(f"top = g.linear(h, {lit(spec['output']['classes'])})")
    body.append("g.output(top)")
    body += list(extra)
    body.append(ret)
    head = ['"""A model written by the fuzzer."""', "import sys", "from bsdgraph import GraphBuilder, GraphError, Op",
            *top, "", "", "def build():"]
    return "\n".join(head + [f"    {line}" for line in body]) + "\n"


# ---------------------------------------------------------------------------------------------------- mutations

# Values that no parameter accepts: non-finite numbers and wrong types.
ALWAYS_BAD = [NAN, INF, -INF, "3", [3], {"a": 1}, 1j, True]
# Values that some parameters accept (v_reset = -1, momentum = 0, a huge but finite width at compile time).
EDGE = [0, -1, -0.5, 1e308, 10 ** 12, None, ""]


def _leaves(spec: dict) -> list[tuple]:
    paths = [("graph", k) for k in ("name", "T", "dt")] + [("input", "shape"), ("input", "encoding"),
                                                          ("output", "classes")]
    for j, c in enumerate(spec["convs"]):
        paths += [("convs", j, k) for k in ("out_channels", "kernel", "stride", "padding")]
        paths += [("convs", j, "lif", k) for k in c["lif"]]
    for j, layer in enumerate(spec["hidden"]):
        paths += [("hidden", j, k) for k in ("width", "bias")] + [("hidden", j, "lif", k) for k in layer["lif"]]
    return paths


def _set(spec: dict, path: tuple, value) -> None:
    node = spec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


BAD_SHAPES = [(0,), (-1,), (), (2.5,), ("a",), (NAN,), 5, None, (4, 0, 4)]


@st.composite
def bad_parameter(draw, spec: dict):
    path = draw(st.sampled_from(_leaves(spec)))
    if path == ("input", "shape"):
        return path, draw(st.sampled_from(BAD_SHAPES)), True
    value = draw(st.sampled_from(ALWAYS_BAD + EDGE))
    bad = any(value is v or (isinstance(v, float) and isinstance(value, float) and math.isnan(v) and math.isnan(value))
              for v in ALWAYS_BAD)
    if path == ("graph", "name"):
        bad = not isinstance(value, str)  # any string names a graph
    return path, value, bad


# (statements inserted before `return`, must the model be refused?)
STRUCTURAL = {
    "ghost operand": ("g.lif('ghost')",),
    "edge to a ghost": ("g.connect(h, 'ghost', 0)",),
    "cycle without delay": ("g.connect(top, 'x', 0)",),
    "recurrent edge": ("g.connect(h, top, 1, delay=1)",),
    "bad delay": ("g.connect(h, top, 1, delay=-1)",),
    "fractional delay": ("g.connect(h, top, 1, delay=1.5)",),
    "port not an int": ("g.connect(h, top, 'a')",),
    "port None": ("g.connect(h, top, None)",),
    "second output": ("g.output(g.linear(h, 3), name='out2')",),
    "dangling branch": ("g.lif(g.linear(h, 3))",),
    "duplicate name": ("g.linear(h, 3, name='x')",),
    "backward op in F": ("g.add(Op.UNFLATTEN, [top], shape=(1, g.shape(top)[0]))",),
    "loss op in F": ("g.add(Op.CE, [top], layer=1)",),
    "declared shape lie": ("g.add(Op.LIF, [top], shape=(99,))",),
    "raise ValueError": ("raise ValueError('boom')",),
    "zero division": ("1 / 0",),
    "sys.exit": ("sys.exit(3)",),
    "SystemExit(0)": ("raise SystemExit(0)",),
    "assert": ("assert False, 'no'",),
    "missing method": ("g.no_such_method()",),
    "missing module": ("import no_such_module_for_bsdgraph",),
    "recursion": ("build()",),
    "GeneratorExit": ("raise GeneratorExit('odd')",),
    "empty GraphError": ("raise GraphError([])",),
    "empty exception": ("raise Exception()",),
}

# Module-level additions: (source lines, must the model be refused by `compile`?)
TOP_LEVEL = {
    "TRAIN not a dict": (("TRAIN = 3",), True),
    "TRAIN int keys": (("TRAIN = {1: 2, 'epochs': 1}",), True),
    "TRAIN unknown key": (("TRAIN = {'epochz': 1}",), False),  # only `train` reads TRAIN
    "BSD not a dict": (("BSD = [1]",), True),
    "BSD mixed keys": (("BSD = {1: 2, 'lam': 3}",), True),
    "BSD unknown key": (("BSD = {'lamda': 0.5}",), True),
    "BSD NaN lam": (("BSD = {'lam': float('nan')}",), True),
    "BSD bad negatives": (("BSD = {'negatives': 'none'}",), True),
    "BSD string lam": (("BSD = {'lam': 'x'}",), True),
    "docstring not a string": (("__doc__ = 5",), False),
    "exit at import": (("sys.exit(0)",), True),
    "raise at import": (("raise RuntimeError('at import')",), True),
}

RETURNS = {  # build() returns something else
    "None": "return None",
    "the builder": "return g",
    "an int": "return 42",
    "the Graph class": "from bsdgraph import Graph; return Graph",
}


@st.composite
def mutated_models(draw):
    """(source, must_fail, what) for a valid model with one or two mutations."""
    spec = draw(valid_specs())
    kinds = draw(st.lists(st.sampled_from(["none", "parameter", "structural", "top", "return"]), min_size=1,
                          max_size=2, unique=True))
    extra, top, ret, must_fail, what = [], [], "return g.build()", False, []
    for kind in kinds:
        if kind == "parameter":
            path, value, bad = draw(bad_parameter(spec))
            _set(spec, path, value)
            must_fail |= bad
            what.append(f"{'.'.join(map(str, path))}={value!r}")
        elif kind == "structural":
            name = draw(st.sampled_from(sorted(STRUCTURAL)))
            extra += STRUCTURAL[name]
            must_fail = True
            what.append(name)
        elif kind == "top":
            name = draw(st.sampled_from(sorted(TOP_LEVEL)))
            lines, bad = TOP_LEVEL[name]
            top += lines
            must_fail |= bad
            what.append(name)
        elif kind == "return":
            name = draw(st.sampled_from(sorted(RETURNS)))
            ret = RETURNS[name]
            must_fail = True
            what.append(f"returns {name}")
    if draw(st.booleans()) and ret == "return g.build()":
        ret = "return g.build(validate=False)"  # the loader must validate what build() hands back
        what.append("validate=False")
    return render(spec, tuple(extra), tuple(top), ret), must_fail, ", ".join(what) or "none"


def _compile_checked(path, emit: str, as_json: bool):
    argv = ["compile", path, "--emit", emit] + (["--json"] if as_json else [])
    r = assert_clean(cli(*argv), codes=(0, 1))
    if r.code == 1:
        stray = [line for line in r.err.splitlines() if line.strip() and str(path) not in line]
        assert not stray, f"stderr lines that do not name the file:\n{r.err}"
    return r


EMITS = st.sampled_from(["ir", "backward", "plan", "dot", "all"])


@FUZZ
@given(case=mutated_models(), emit=EMITS, as_json=st.booleans())
def test_mutated_model_files_end_in_a_clean_error(tmp_path, case, emit, as_json):
    source, must_fail, what = case
    path = write(case_dir(tmp_path, source) / "model.py", source)
    r = _compile_checked(path, emit, as_json)
    if must_fail:
        assert r.code == 1, f"accepted a broken model ({what}):\n{source}"
    elif what == "none" or what == "validate=False":
        assert r.code == 0, f"refused a valid model:\n{source}\n{r.err}"


# ---------------------------------------------------------------------------------------------------- not a model

SNIPPETS = [
    "x = 1", "import math", "def f():\n    return 1", "class A:\n    pass", "print('hello')",
    "y = [i for i in range(3)]",
    "raise ValueError('top')", "def build(x):\n    return x", "build = 5", "def build():\n    yield 1",
    "def build():\n    return {}", "async def build():\n    return 1", "import sys\nsys.exit(7)", "del math",
    "def build(", "x = (", "\tindent = 1", "from os import *", "lambda: 0", "if True:\npass", "x = 1 +* 2",
    "from bsdgraph import GraphBuilder\ndef build():\n    return GraphBuilder('g').build()",
    "from bsdgraph import GraphBuilder\ndef build():\n    return GraphBuilder('g', T=0).build(validate=False)",
]
FILE_NAMES = ["model.py", "a.b.py", "my-model.py", "with space.py", "ünïcode.py", "model.txt", "model", "__init__.py"]


@st.composite
def not_models(draw) -> bytes:
    kind = draw(st.sampled_from(["snippets", "text", "bytes"]))
    if kind == "snippets":
        return "\n".join(draw(st.lists(st.sampled_from(SNIPPETS), min_size=1, max_size=4))).encode()
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    return draw(st.binary(max_size=200))


@FUZZ
@given(content=not_models(), name=st.sampled_from(FILE_NAMES), emit=EMITS)
def test_random_python_that_is_not_a_model_ends_in_a_clean_error(tmp_path, content, name, emit):
    path = write(case_dir(tmp_path, content, name) / name, content)
    r = _compile_checked(path, emit, False)
    if b"build" not in content:
        assert r.code == 1, f"compiled a file without build():\n{content!r}"
