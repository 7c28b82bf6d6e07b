"""Fuzzing NIR files: random corruptions of valid exports (fields, arrays, edges, node types, metadata, bytes) go
through ``bsdgraph import-nir`` and must end in exit 0 or exit 1 with a message, never a traceback; a corruption that
is certainly wrong (a NaN weight, a cycle, a missing node, a shape that does not fit) must give exit 1. Whatever
imports must also run (``bsdgraph run``) and draw (``bsdgraph draw``) without a traceback.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import event, given, reject
from hypothesis import strategies as st

from tests.fuzz_helpers import FUZZ, TINY_MODEL, assert_clean, case_dir, cli, write

nir = pytest.importorskip("nir", reason="the `nir` package is not installed (pip install -e '.[test]')")

CONV_MODEL = '''"""A tiny CNN for NIR fuzzing: conv, batchnorm, LIF, max-pooling of spikes, flatten, linear."""
from bsdgraph import GraphBuilder


def build():
    g = GraphBuilder("tiny_cnn", T=2, dt=1e-3)
    h = g.lif(g.batchnorm(g.conv2d(g.input((1, 6, 6)), 2, kernel=3, padding=1)))
    h = g.flatten(g.maxpool2d(h, 2))
    g.output(g.linear(h, 4))
    return g.build()
'''


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Valid NIR exports of an MLP and a CNN, and an input for each."""
    root = tmp_path_factory.mktemp("nir-fuzz")
    out = {}
    for name, source, shape in (("mlp", TINY_MODEL, (3, 16)), ("cnn", CONV_MODEL, (3, 1, 6, 6))):
        model = write(root / f"{name}.py", source)
        assert_clean(cli("export-nir", model, "-o", root / f"{name}.nir"), codes=(0,))
        np.savez(root / f"{name}_x.npz", x=np.random.default_rng(0).random(shape, np.float32))
        out[name] = (nir.read(root / f"{name}.nir"), root / f"{name}_x.npz")
    return out


# ---------------------------------------------------------------------------------------------------- corruptions


def _array_values(v: np.ndarray, field: str):
    """(new value, certainly invalid?) for an array field."""
    flat = v.reshape(-1)
    return [
        (np.full(v.shape, np.nan), True), (np.full(v.shape, np.inf), True), (-np.abs(v) - 1, None),
        (np.zeros_like(v), None), (flat[:1].copy(), None), (np.array([]), True),
        # one value short (a pair cut to one value reads as a scalar: kernel_size [2] is 2x2); an extra axis (import
        # reads biases flat, as it always has; anything else must refuse it)
        (flat[:-1].copy(), True if flat.size > 2 else None), (v[None].copy(), None if field == "bias" else True),
        (v.astype(np.int64), None), (v * 1e30, None),
        # beyond float32: a weight becomes Inf; a time constant or threshold of 1e300 is merely extreme
        (np.full(v.shape, 1e300), True if field in ("weight", "bias") else None),
    ]


SCALARS = [0, -1, 2.5, np.nan, np.inf, "same", "weird", (1, 2, 3), None, 10 ** 12]
# node type -> (its replacement, verdict). An IF in place of a LIF is a valid network since IF imports: it imports
# after an Affine (its dt·r folds into it) and is refused after a batchnorm, which cannot take that factor.
SWAPS = {"LIF": (lambda n: nir.IF(r=n.r, v_threshold=n.v_threshold), None),
         "Affine": (lambda n: nir.Scale(n.bias), True), "Conv2d": (lambda n: nir.Delay(np.ones(1)), True),
         "Flatten": (lambda n: nir.Threshold(np.ones(1)), True)}
META = {  # node metadata["bsdgraph"] edits no import may accept: key -> (value, the NIR type whose rule reads it)
    "encoding": ("morse", "Input"), "surrogate": (5, "LIF"), "alpha": ("x", "LIF"), "task": ("bogus", "Output"),
    "population": (0, "Output"), "op": ("target", "Input"),
}


# Each corruption edits a deep copy of a valid graph ``g`` at node ``name`` and returns (must_fail, what): True
# (must be refused), False (must import), None (either is right), or "no --dt" / "no --steps" (refused unless the
# command line gives that value).


def _field(draw, g, name):
    node = g.nodes[name]
    fields = [f for f in node.__dataclass_fields__ if f not in ("input_type", "output_type", "metadata")]
    arrays = [f for f in fields if isinstance(getattr(node, f), np.ndarray)]
    use_array = bool(arrays) and draw(st.booleans())
    pool = arrays if use_array else [f for f in fields if f not in arrays]
    if not pool:
        reject()
    field = draw(st.sampled_from(sorted(pool)))
    value, must_fail = (draw(st.sampled_from(_array_values(getattr(node, field), field))) if use_array
                        else (draw(st.sampled_from(SCALARS)), None))
    setattr(node, field, value)
    return must_fail, f"{name}.{field} = {str(value)[:40]}"


def _io_type(draw, g, name):
    node, key = g.nodes[name], draw(st.sampled_from(["input_type", "output_type"]))
    value = draw(st.sampled_from([np.array([0]), np.array([-1]), np.array([99]), np.array([]), np.array([np.nan]),
                                  np.array([2, 3, 4, 5])]))
    getattr(node, key)["input" if key == "input_type" else "output"] = value
    # only the Input node's declared shape is read; others are recomputed from the weights
    return (True if type(node).__name__ == "Input" and key == "input_type" else None), f"{name}.{key} = {value}"


def _delete_node(draw, g, name):
    del g.nodes[name]  # its edges now name a missing node
    return True, f"delete node {name}"


def _delete_edge(draw, g, name):
    g.edges.pop(draw(st.integers(0, len(g.edges) - 1)))  # a node without its input
    return True, "delete an edge"


def _add_edge(draw, g, name):
    g.edges.append((name, draw(st.sampled_from(sorted(g.nodes)))))  # a second input, or a cycle via the Input
    return True, f"add edge {g.edges[-1]}"


def _duplicate_edge(draw, g, name):
    g.edges.append(draw(st.sampled_from(g.edges)))
    return True, f"duplicate edge {g.edges[-1]}"


def _swap_type(draw, g, name):
    kind = type(g.nodes[name]).__name__
    if kind not in SWAPS:
        reject()
    make, verdict = SWAPS[kind]
    g.nodes[name] = make(g.nodes[name])
    return verdict, f"{name}: {kind} -> {type(g.nodes[name]).__name__}"


def _rename(draw, g, name):
    new = draw(st.sampled_from(["renamed", "a.b", "0", "with space"]))
    g.nodes[new] = g.nodes.pop(name)
    g.edges = [(new if a == name else a, new if b == name else b) for a, b in g.edges]
    return False, f"rename {name} -> {new!r}"


GRAPH_META = {  # key -> [(value, verdict)]
    "dt": [(v, "no --dt") for v in ("x", np.nan, -1.0, 0.0, np.inf, "drop")],
    "T": [("x", "no --steps"), (-1, "no --steps"), (0, "no --steps"), (2.5, None), ("drop", False)],
    "network": [("backward", True)],
    "name": [(5, False), ("renamed", False)],
}


def _graph_metadata(draw, g, name):
    key = draw(st.sampled_from(sorted(GRAPH_META)))
    value, verdict = draw(st.sampled_from(GRAPH_META[key]))
    if value == "drop":
        g.metadata.pop(key, None)
    else:
        g.metadata[key] = value
    return verdict, f"metadata {key} = {value!r}"


def _node_metadata(draw, g, name):
    node, key = g.nodes[name], draw(st.sampled_from(sorted(META)))
    node.metadata = {**(node.metadata or {}), "bsdgraph": {**node.metadata.get("bsdgraph", {}), key: META[key][0]}}
    # only the node type whose rule reads that key is bound to refuse it
    return (True if type(node).__name__ == META[key][1] else None), f"{name} metadata {key} = {META[key][0]!r}"


CORRUPTIONS = {
    "none": lambda draw, g, name: (False, "none"), "field": _field, "io type": _io_type, "delete node": _delete_node,
    "delete edge": _delete_edge, "add edge": _add_edge, "duplicate edge": _duplicate_edge, "swap type": _swap_type,
    "rename": _rename, "graph metadata": _graph_metadata, "node metadata": _node_metadata,
}


@st.composite
def corruptions(draw, graph):
    """(corrupted deep copy of ``graph``, must_fail, what)."""
    g = copy.deepcopy(graph)
    name = draw(st.sampled_from(sorted(g.nodes)))
    must_fail, what = CORRUPTIONS[draw(st.sampled_from(sorted(CORRUPTIONS)))](draw, g, name)
    return g, must_fail, what


def _write(g, path) -> bool:
    try:
        nir.write(path, g)
    except Exception:  # nir cannot even write some corruptions (None fields, ...): not a file a user can have
        return False
    return True


@FUZZ
@given(data=st.data(), which=st.sampled_from(["mlp", "cnn"]), dt=st.sampled_from([None, "1e-3"]),
       steps=st.sampled_from([None, "2"]))
def test_corrupted_nir_files_end_in_a_clean_error(exports, tmp_path, data, which, dt, steps):
    graph, x = exports[which]
    g, must_fail, what = data.draw(corruptions(graph), label="corruption")
    folder = case_dir(tmp_path, which, what, dt, steps, data.draw(st.integers(0, 3), label="salt"))
    path = folder / "net.nir"
    if not _write(g, path):
        reject()
    flags = (["--dt", dt] if dt else []) + (["--steps", steps] if steps else [])
    r = assert_clean(cli("import-nir", path, *flags, "-o", folder / "imported.py"), codes=(0, 1))
    event(f"exit {r.code}")
    if must_fail == "no --dt":
        must_fail = dt is None
    elif must_fail == "no --steps":
        must_fail = steps is None
    if must_fail:
        assert r.code == 1, f"imported a broken NIR file ({what})"
    elif must_fail is False:
        assert r.code == 0, f"refused a valid NIR file ({what}): {r.err}"
    if r.code == 0:  # what imports must run and draw
        assert_clean(cli("run", folder / "imported.py", "--input", x, "--steps", "2"), codes=(0, 1))
        assert_clean(cli("draw", path, *flags, "-o", folder / "net.dot"), codes=(0, 1))


@FUZZ
@given(which=st.sampled_from(["mlp", "cnn"]), cut=st.floats(0, 1), flips=st.lists(st.tuples(
    st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=4))
def test_truncated_or_flipped_nir_bytes_end_in_a_clean_error(exports, tmp_path, which, cut, flips):
    """HDF5 is robust to some damage (unused space, padding); the property is the clean exit, either way."""
    graph, x = exports[which]
    clean = tmp_path / f"{which}.nir"
    if not clean.exists():
        nir.write(clean, graph)
    raw = bytearray(clean.read_bytes())
    raw = raw[:max(1, int(len(raw) * cut))] if cut < 0.98 else raw
    for where, bits in flips:
        raw[int(where * len(raw))] ^= bits
    folder = case_dir(tmp_path, which, cut, flips)
    path = write(folder / "net.nir", bytes(raw))
    r = assert_clean(cli("import-nir", path, "--dt", "1e-3"), codes=(0, 1))
    event(f"exit {r.code}")
    if r.code == 0:
        assert_clean(cli("run", path, "--dt", "1e-3", "--input", x, "--steps", "2"), codes=(0, 1))
