"""IR: builder, frozen nodes and graphs, the stable text printer, JSON round-trips."""

import copy
import dataclasses
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bsdgraph import GraphBuilder, GraphError, Op, derive_feedback, format_graph, from_json, to_json
from bsdgraph.ir.graph import FrozenAttrs, Graph, Node
from tests.strategies import any_graph


def tiny():
    g = GraphBuilder("tiny", T=2)
    h = g.lif(g.linear(g.input((3,)), 4), v_th=0.6)
    g.output(g.linear(h, 2))
    return g.build()


def test_printer_is_stable_and_shows_shapes_attrs_and_operands():
    assert format_graph(tiny()) == "\n".join([
        "graph tiny(T=2, dt=1.0) {",
        "  %x : f32[T,B,3] = input[encoding=direct]()",
        "  %fc1 : f32[T,B,4] = linear[in_features=3, out_features=4, bias=True](%x)",
        "  %h1 : f32[T,B,4] = lif[tau=2.0, v_th=0.6, v_reset=0.0, reset=hard, surrogate=atan, alpha=2.0](%fc1)",
        "  %fc2 : f32[T,B,2] = linear[in_features=4, out_features=2, bias=True](%h1)",
        "  %out : f32[T,B,2] = output[task=classification, target=onehot, n_classes=2, population=1, code_active=0, "
        "code_seed=0](%fc2)",
        "}",
    ])


def test_printer_marks_stop_gradients_and_sections():
    text = format_graph(derive_feedback(tiny()))
    assert "linear[in_features=3, out_features=4, bias=True](sg(%x))" in text
    assert "# backward network B" in text and "# layer-local losses" in text


def test_nodes_and_graphs_are_frozen():
    g = tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        g["fc1"].shape = (5,)
    with pytest.raises(Exception):
        g.nx.add_node("extra")
    with pytest.raises(TypeError):
        g["fc1"].attrs["out_features"] = 5  # type: ignore[index]


def test_frozen_attrs_hash_and_equality():
    a, b = FrozenAttrs({"k": [1, 2]}), FrozenAttrs({"k": (1, 2)})
    assert a == b and hash(a) == hash(b) and a["k"] == (1, 2)


# ---------------------------------------------------------------------------------------------------- FrozenAttrs

# What attributes hold: numbers, bools, None, strings, and tuples (lists) and mappings of them, nested.
_leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4)
_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=3) | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
attr_dicts = st.dictionaries(st.text(max_size=8), _values, max_size=5)


@st.composite
def an_equal_value(draw, v):
    """A value ``== v`` of possibly another type: 2 <-> 2.0, True <-> 1 <-> 1.0, list <-> tuple, nested."""
    if isinstance(v, (list, tuple)):
        return draw(st.sampled_from([list, tuple]))(draw(an_equal_value(x)) for x in v)
    if isinstance(v, dict):
        return {k: draw(an_equal_value(x)) for k, x in v.items()}
    if isinstance(v, bool):
        return draw(st.sampled_from([v, int(v), float(v)]))
    if isinstance(v, int) and abs(v) <= 2**53:  # exactly representable as a float
        return draw(st.sampled_from([v, float(v)]))
    if isinstance(v, float) and v.is_integer():
        return draw(st.sampled_from([v, int(v)]))
    return v


@pytest.mark.parametrize("a, b", [
    ({"tau": 2}, {"tau": 2.0}),
    ({"kernel": (3, 3)}, {"kernel": (3.0, 3.0)}),
    ({"kernel": ((3, 1), 2)}, {"kernel": [[3.0, True], 2.0]}),
    ({"bias": True, "v_reset": 0}, {"bias": 1, "v_reset": -0.0}),
    ({"stride": None, "reset": "hard"}, {"reset": "hard", "stride": None}),
    ({"inner": {"x": 1}}, {"inner": {"x": 1.0}}),
])
def test_equal_attrs_hash_alike(a, b):
    assert FrozenAttrs(a) == FrozenAttrs(b) and hash(FrozenAttrs(a)) == hash(FrozenAttrs(b))


@given(st.data())
def test_equal_attrs_always_hash_alike(data):
    d = data.draw(attr_dicts, label="attrs")
    e = {k: data.draw(an_equal_value(v), label=repr(k)) for k, v in reversed(d.items())}
    a, b = FrozenAttrs(d), FrozenAttrs(e)
    assert a == b and hash(a) == hash(b)
    assert FrozenAttrs(a) == a and hash(FrozenAttrs(a)) == hash(a)


def _plain(v):
    """An independent model of frozen equality: lists read as tuples, mappings as dicts."""
    if isinstance(v, (list, tuple)):
        return tuple(_plain(x) for x in v)
    return {k: _plain(x) for k, x in v.items()} if isinstance(v, dict) else v


@given(attr_dicts, attr_dicts)
def test_attrs_equal_only_as_dicts_are(d, e):
    a, b = FrozenAttrs(d), FrozenAttrs(e)
    assert (a == b) == (_plain(d) == _plain(e)) and (a != b) == (not a == b)
    if a == b:
        assert hash(a) == hash(b)


def _attempts(a: FrozenAttrs, key):
    """Every way a caller might try to change ``a`` in place."""
    yield lambda: a.__setitem__(key, 1)
    yield lambda: a.__delitem__(key)
    yield lambda: a._items.__setitem__(key, 1)
    yield lambda: a._items.__delitem__(key)
    yield lambda: setattr(a, "_items", {key: 1})
    yield lambda: setattr(a, "extra", 1)
    yield lambda: delattr(a, "_items")
    for method in ("update", "pop", "popitem", "clear", "setdefault"):
        yield lambda method=method: getattr(a, method)({key: 1})


@given(attr_dicts, st.text(max_size=8))
def test_frozen_attrs_cannot_be_changed(d, key):
    a, expected = FrozenAttrs(d), FrozenAttrs(copy.deepcopy(d))
    before = hash(a)
    for attempt in _attempts(a, key):
        with pytest.raises((TypeError, AttributeError)):
            attempt()
    with pytest.raises(TypeError):
        a[key] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        del a[key]  # type: ignore[attr-defined]
    a.__init__({key: "changed"})  # re-running the constructor on a built object changes nothing either
    assert a == expected and hash(a) == before


def test_frozen_attrs_do_not_share_the_callers_containers():
    d = {"kernel": [3, 3], "inner": {"x": [1]}}
    a = FrozenAttrs(d)
    d["kernel"].append(4)
    d["inner"]["x"].append(2)
    d["new"] = 1
    assert a == {"kernel": (3, 3), "inner": {"x": (1,)}}
    with pytest.raises(TypeError):
        a["inner"]["x"] = 2  # a nested mapping is frozen too


@given(attr_dicts)
def test_frozen_attrs_survive_pickle_and_copy(d):
    a = FrozenAttrs(d)
    for b in (pickle.loads(pickle.dumps(a)), copy.copy(a), copy.deepcopy(a)):
        assert isinstance(b, FrozenAttrs) and b == a and hash(b) == hash(a)


@given(attr_dicts)
def test_attrs_round_trip_through_json(d):
    a = FrozenAttrs(d)
    g = Graph("g", [Node("n", Op.FLATTEN, a, (1,))], [], T=1)  # FLATTEN has no attributes: none are defaulted
    back = from_json(to_json(g))["n"].attrs
    assert isinstance(back, FrozenAttrs) and back == a and hash(back) == hash(a)


def test_node_replace_returns_a_new_node():
    n = Node("a", Op.LINEAR, FrozenAttrs({"in_features": 1}), (2,))
    m = n.replace(attrs={"in_features": 3})
    assert n.attrs["in_features"] == 1 and m.attrs["in_features"] == 3 and isinstance(m.attrs, FrozenAttrs)


@given(any_graph)
def test_json_round_trips_forward_and_bsd_graphs(g):
    assert from_json(to_json(g)) == g
    bsd = derive_feedback(g)
    back = from_json(to_json(bsd))
    assert back == bsd and format_graph(back) == format_graph(bsd)


@given(any_graph)
def test_text_printer_is_deterministic(g):
    assert format_graph(g) == format_graph(from_json(to_json(g)))


@pytest.mark.parametrize("text, match", [
    ("{", "does not parse"),
    ("[]", "must be an object"),
    ('{"format": "other", "version": 1}', "not a bsdgraph.graph v1 document"),
    ('{"format": "bsdgraph.graph", "version": 1, "name": "g", "T": 1, "dt": 1.0, "nodes": [], '
     '"edges": [{"src": "a", "dst": "b", "port": 0, "delay": 0, "detach": false}]}', "names a node that does not"),
    ('{"format": "bsdgraph.graph", "version": 1, "name": "g", "T": 1, "dt": 1.0, "nodes": [{"name": "a", '
     '"op": "bogus", "stream": "F", "shape": [], "attrs": {}}], "edges": []}', "'bogus' is not a valid Op"),
    ('{"format": "bsdgraph.graph", "version": 1}', "missing field"),
])
def test_malformed_json_is_a_graph_error(text, match):
    with pytest.raises(GraphError, match=match):
        from_json(text)


def test_builder_reports_the_line_that_went_wrong():
    g = GraphBuilder("bad")
    x = g.input((1, 4, 4))
    with pytest.raises(GraphError, match=r"node 'fc1' \(linear\): expects a flat \[D\] input.*g.flatten"):
        g.linear(x, 3)
    with pytest.raises(GraphError, match="already exists"):
        g.input((2,))
    with pytest.raises(GraphError, match="input 'nope' does not exist"):
        g.lif("nope")


def test_a_graph_saved_before_an_attribute_existed_loads_with_its_default():
    # MSE gained `per_step` after checkpoints of regression models had been written: those must keep loading
    # (from_json fills defaults) and must still match their model (train.same_graph compares normalised graphs)
    import json

    from bsdgraph.train.trainer import same_graph

    g = GraphBuilder("r", T=2)
    g.output(g.linear(g.lif(g.linear(g.input((3,)), 4)), 1), task="regression")
    bsd = derive_feedback(g.build())
    doc = json.loads(to_json(bsd))
    for n in doc["nodes"]:
        if n["op"] == "mse":
            del n["attrs"]["per_step"]
    old = json.dumps(doc)
    assert from_json(old) == bsd and same_graph(old, bsd)
    assert not same_graph(old.replace('"T": 2', '"T": 3'), bsd) and not same_graph("{", bsd)


def test_the_builder_takes_numpy_numbers_and_upsampling_by_a_factor():
    """Widths from np.prod, T from an array's shape: stored as Python numbers (validation and JSON expect them)."""
    import numpy as np

    from bsdgraph.ir.printer import from_json, to_json

    g = GraphBuilder("n", T=np.int64(4))
    h = g.lif(g.linear(g.input((np.int64(6),)), np.int64(8)), tau=np.float32(2.5))
    g.output(g.linear(h, 3))
    built = g.build()
    assert built.T == 4 and type(built.T) is int and type(built["fc1"].attrs["out_features"]) is int
    assert type(built["h1"].attrs["tau"]) is float and from_json(to_json(built)) == built
    u = GraphBuilder("u", T=2)
    assert u.shape(u.upsample2d(u.input((1, 4, 5)), scale=(2, 3))) == (1, 8, 15)
    with pytest.raises(GraphError, match="give either size=\\(H, W\\) or scale=k"):
        u.upsample2d("x", size=4, scale=2)


def test_recurrence_needs_a_flat_or_an_image_current():
    g = GraphBuilder("c", T=2)
    conv = g.conv2d(g.input((1, 8, 8)), 4, 3, padding=1)
    assert g.shape(g.recurrent_lif(conv)) == (4, 8, 8)  # a conv layer recurs through a conv (tests/test_recurrent.py)
    odd = g.add(Op.FLATTEN, [g.input((2, 3), name="x2")], name="odd", shape=(2, 3))
    with pytest.raises(GraphError, match=r"node 'odd' \(flatten\): a recurrent layer's current is \[width\] or "
                                         r"\[C, H, W\], got \[2, 3\]"):
        g.recurrent_lif(odd)
