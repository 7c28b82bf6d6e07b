"""Derived backward network B: valid, independent, shape-exact mirrors, and one local loss per weight."""

import pytest
from hypothesis import given

from bsdgraph import BSDConfig, GraphBuilder, GraphError, Op, Stream, derive_feedback, pairing, segment, validate
from bsdgraph.compiler.feedback import check_locality, local_params, mirrors_of
from bsdgraph.ir.graph import Edge, GroupOp
from tests.strategies import any_graph, conv_graphs, decoder_graphs


def mirrors(bsd):
    """(F synapse, its mirror in B) pairs; a synapse reading a residual sum has one mirror per operand of it."""
    out = []
    for n in bsd.nodes:
        if n.stream == Stream.F and n.op in GroupOp.SYNAPSE:
            copies = mirrors_of(bsd, n.name)
            assert copies, f"{n.name} has no mirror"
            out += [(n, bsd[m]) for m in copies]
    return out


@given(any_graph)
def test_derived_graph_is_valid_and_every_mirror_restores_the_exact_shape(f):
    bsd = derive_feedback(f)
    assert validate(bsd, forward=False) is bsd
    for syn, theta in mirrors(bsd):
        f_in, f_out = bsd.inputs(syn.name)[0].shape, syn.shape
        assert bsd.inputs(theta.name)[0].shape == f_out, (syn.name, theta.name)
        assert theta.shape == f_in, f"{theta.name} gives {theta.shape}, {syn.name} reads {f_in}"


@given(conv_graphs())
def test_conv_mirrors_are_transposed_convolutions_and_pools_become_exact_upsampling(f):
    bsd = derive_feedback(f)
    for syn, theta in mirrors(bsd):
        if syn.op == Op.CONV2D:
            assert theta.op == Op.CONV_T2D and theta.attrs["kernel"] == syn.attrs["kernel"]
            assert all(0 <= p < s for p, s in zip(theta.attrs["output_padding"], theta.attrs["stride"]))
    for pool in bsd.by_op(*GroupOp.POOL):
        up = bsd[f"{pool.name}_b"]
        assert up.op == Op.UPSAMPLE2D and up.shape == bsd.inputs(pool.name)[0].shape


@given(decoder_graphs())
def test_decoder_mirrors_are_convolutions_and_upsampling_becomes_average_pooling(f):
    bsd = derive_feedback(f)
    for syn, theta in mirrors(bsd):
        if syn.op == Op.CONV_T2D:  # B's conv reads the transposed conv's output and restores its input exactly
            assert theta.op == Op.CONV2D and theta.attrs["stride"] == syn.attrs["stride"]
            assert theta.shape == bsd.inputs(syn.name)[0].shape
    ups = bsd.by_op(Op.UPSAMPLE2D)
    for up in (n for n in ups if n.stream == Stream.F):
        pool = bsd[f"{up.name}_b"]
        assert pool.op == Op.AVGPOOL2D and pool.shape == bsd.inputs(up.name)[0].shape


def test_upsampling_by_a_fraction_is_diagnosed():
    g = GraphBuilder("m", T=2)
    h = g.lif(g.conv2d(g.input((1, 6, 6)), 2, kernel=3, stride=2, padding=1))  # 3x3
    h = g.lif(g.conv2d(g.upsample2d(h, (8, 8)), 2, kernel=3, padding=1))
    g.output(g.linear(g.flatten(h), 3))
    with pytest.raises(GraphError, match=r"node 'up1' \(upsample2d\): upsamples 3x3 to 8x8, not an integer multiple"):
        derive_feedback(g.build())


@given(any_graph)
def test_every_weight_learns_from_exactly_one_loss_and_every_synapse_input_is_detached(f):
    bsd = derive_feedback(f)
    check_locality(bsd)
    for e in bsd.edges:
        assert e.detach == (bsd[e.dst].op in GroupOp.SYNAPSE), e
    layers = segment(f)
    pairs = pairing(bsd)
    assert [p.layer for p in pairs] == list(range(len(layers) + 1))  # recall at 0, hidden, top


def test_pairing_of_the_mlp_follows_the_spec():
    g = GraphBuilder("m", T=2)
    h = g.lif(g.linear(g.input((6,)), 5))
    h = g.lif(g.linear(h, 4))
    g.output(g.linear(h, 3))
    bsd = derive_feedback(g.build())
    got = [(p.layer, p.loss, p.f_side, p.b_side, p.f_params, p.b_params) for p in pairing(bsd)]
    assert got == [
        (0, "mse0", "x", "fc1_b", (), ("fc1_b",)),           # L_0 = MSE(encode(x), V̂_0) updates θ_1
        (1, "reco1", "fc1", "fc2_b", ("fc1",), ("fc2_b",)),  # L_l updates syn_l and θ_{l+1}
        (2, "reco2", "fc2", "fc3_b", ("fc2",), ("fc3_b",)),
        (3, "ce3", "out", None, ("fc3",), ()),               # top: CE on mean_t V_L
    ]
    assert bsd["h1_b"].attrs == bsd["h1"].attrs and bsd["target"].attrs["n_classes"] == 3


def test_options_reach_the_loss_nodes():
    g = GraphBuilder("m", T=2)
    g.output(g.linear(g.lif(g.linear(g.input((1, 4, 4)) and g.flatten("x"), 5)), 3))
    cfg = BSDConfig(lam=0.2, negatives="other_class", distill_on="membrane", recall=False)
    bsd = derive_feedback(g.build(), cfg)
    reco = bsd["reco1"]
    assert (reco.attrs["lam"], reco.attrs["negatives"], reco.attrs["distill_on"]) == (0.2, "other_class", "membrane")
    assert [i.op for i in bsd.inputs("reco1")] == [Op.LIF, Op.LIF]  # membrane mode reads the neurons' h
    assert "reco0" not in bsd and "fc1_b" not in bsd  # without recall B stops at layer 1: θ_1 has no loss
    check_locality(bsd)


def test_recall_off_on_a_single_layer_network_leaves_no_backward_network():
    g = GraphBuilder("m", T=2)
    g.output(g.linear(g.input((4,)), 3))
    bsd = derive_feedback(g.build(), BSDConfig(recall=False))
    assert [n.stream for n in bsd.nodes].count(Stream.B) == 0 and [p.loss for p in pairing(bsd)] == ["ce1"]


def test_frequency_split_only_on_spatial_layers():
    g = GraphBuilder("c", T=2)
    h = g.lif(g.conv2d(g.input((1, 6, 6)), 2, kernel=3, padding=1))
    g.output(g.linear(g.lif(g.linear(g.flatten(h), 4)), 2))
    bsd = derive_feedback(g.build(), BSDConfig(freq=True, recall_loss="reco"))
    assert bsd["reco0"].attrs["freq"] and bsd["reco1"].attrs["freq"] and not bsd["reco2"].attrs["freq"]


@pytest.mark.parametrize("edit, match", [
    ("branch", r"node 'side' \(lif\): is dangling"),  # with single-operand ops a branch can only dangle
    ("two_synapses", r"node 'fc2' \(linear\): follows a synapse without a neuron"),
    ("lif_first", r"node 'h1' \(lif\): has no synapse in its layer"),
    ("output_after_lif", r"node 'out' \(output\): must read a synapse's current"),
])
def test_shapes_bsd_cannot_pair_are_diagnosed(edit, match):
    g = GraphBuilder("m", T=2)
    x = g.input((4,))
    if edit == "branch":
        h = g.lif(g.linear(x, 4))
        g.lif(g.linear(h, 3), name="side")
        g.output(g.linear(h, 2))
    elif edit == "two_synapses":
        g.output(g.linear(g.linear(x, 4), 2))
    elif edit == "lif_first":
        g.output(g.linear(g.lif(x), 2))
    else:
        g.output(g.lif(g.linear(x, 2)))
    with pytest.raises(GraphError, match=match):
        derive_feedback(g.build(validate=False))


def test_bad_bsd_options():
    with pytest.raises(GraphError, match=r"unknown BSD option\(s\) \['lambda'\]"):
        BSDConfig.from_dict({"lambda": 0.6})
    g = GraphBuilder("m")
    g.output(g.linear(g.input((4,)), 2))
    with pytest.raises(GraphError, match="negatives='some' is not one of"):
        derive_feedback(g.build(), BSDConfig(negatives="some"))
    with pytest.raises(GraphError, match="lam must be a finite number >= 0"):
        derive_feedback(g.build(), BSDConfig(lam=-1))


def test_local_params_stop_at_detach_edges():
    g = GraphBuilder("m", T=2)
    h = g.lif(g.linear(g.input((4,)), 4))
    g.output(g.linear(h, 2))
    bsd = derive_feedback(g.build())
    assert local_params(bsd, "ce2") == ["fc2"]
    leaky = bsd.replace(edges=[Edge(e.src, e.dst, e.port, e.delay, False) if e.dst == "fc2" else e
                               for e in bsd.edges])
    assert local_params(leaky, "ce2") == ["fc1", "fc2"]
    with pytest.raises(GraphError, match=r"node 'fc1' \(linear\): is updated by 2 losses"):
        check_locality(leaky)


def test_the_recall_loss_trains_only_bs_bottom_synapse():
    # recall_loss='mse' vs 'reco' changes L_0 only, and L_0 owns only θ_1 (C2): after several steps F and every
    # other B weight must be bit-identical, so a model may pick its recall loss for the picture B generates
    # without any effect on what F learns.
    import torch

    from bsdgraph.runtime.cpu import cpu_runtime

    g = GraphBuilder("m", T=3)
    h = g.lif(g.linear(g.flatten(g.input((1, 5, 5))), 16))
    g.output(g.linear(g.lif(g.linear(h, 12)), 4))
    f = g.build()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 5, 5, generator=gen) * 2, torch.arange(8) % 4
    runs = {}
    for loss in ("reco", "mse"):
        rt = cpu_runtime(derive_feedback(f, BSDConfig(recall_loss=loss)), seed=0)
        for _ in range(4):
            rt.step(x, y)
        runs[loss] = rt.params
    assert runs["reco"].keys() == runs["mse"].keys()
    differ = sorted(k for k in runs["reco"] if not torch.equal(runs["reco"][k], runs["mse"][k]))
    assert differ == ["fc1_b.bias", "fc1_b.weight"], differ  # θ_1 only (and it did learn differently)


# ---------------------------------------------------------------------------------------------------- branches


def _sew(flat: bool = False):
    """stem -> SEW block (identity shortcut) -> SEW block (projection) -> head."""
    g = GraphBuilder("r", T=2)
    if flat:
        h = g.lif(g.linear(g.input((5,)), 6), name="h1")
    else:
        h = g.lif(g.batchnorm(g.conv2d(g.input((1, 6, 6)), 3, kernel=3, padding=1)), name="h1")
    h = g.residual_block(h, name="r1")
    h = g.residual_block(h, 4, stride=1 if flat else 2, name="r2")
    g.output(g.linear(h if flat else g.flatten(h), 3))
    return g.build()


@pytest.mark.parametrize("flat", [False, True], ids=["conv", "linear"])
def test_a_skip_in_f_is_a_skip_in_b(flat):
    f = _sew(flat)
    bsd = derive_feedback(f)
    # F: the identity shortcut sums the block's output with its input h1; the projection is its own layer
    assert [i.name for i in f.inputs("r1")] == ["r1_b_h", "h1"] and "r2_down_h" in f
    assert [layer.neuron for layer in segment(f)] == ["h1", "r1_a_h", "r1_b_h", "r2_a_h", "r2_b_h", "r2_down_h",
                                                      None]
    # B: h1 feeds r1_a and (through r1) r2_a and r2_down, so B's current into h1 sums the three mirrors
    parts = {i.name for i in bsd.inputs("h1_b_sum")}
    assert parts == {"r1_a_b", "r1_b_sum_via_h1"}
    assert {i.name for i in bsd.inputs("r1_b_sum_via_h1")} == {"r2_a_b_via_h1", "r2_down_b_via_h1"}
    # ... and every weight still learns from exactly one loss: the mirrors behind the sum r1 are built once per
    # operand (via h1, via r1_b_h), each trained by the loss of the layer it feeds
    check_locality(bsd)
    owner = {p: pair.loss for pair in pairing(bsd) for p in pair.b_params}
    assert owner["r2_a_b_via_h1"] == owner["r2_down_b_via_h1"] == owner["r1_a_b"] == "reco1"
    assert owner["r2_a_b_via_r1_b_h"] == owner["r2_down_b_via_r1_b_h"] == "reco3"
    # a mirror restores its synapse's input shape, whatever copy it is
    for syn, theta in mirrors(bsd):
        assert theta.shape == bsd.inputs(syn.name)[0].shape and bsd.in_edges(theta.name)[0].detach


def test_a_layer_driven_by_two_synapses_pairs_their_summed_current():
    g = GraphBuilder("d", T=2)
    x = g.input((5,))
    h1 = g.lif(g.linear(x, 6))
    h2 = g.lif(g.linear(h1, 4))
    total = g.sum(g.linear(h2, 3), g.linear(h1, 3), name="v3")
    g.output(g.linear(g.lif(total, name="h3"), 2))
    bsd = derive_feedback(g.build())
    pair = next(p for p in pairing(bsd) if p.layer == 3)
    assert pair.f_side == "v3" and set(pair.f_params) == {"fc3", "fc4"}  # one loss trains both synapses
    # B's spikes of layer 3 drive both mirrors; h1's B current sums the mirror of fc2 and of the skip fc4
    assert bsd.inputs("fc3_b")[0].name == bsd.inputs("fc4_b")[0].name == "h3_b"
    assert {i.name for i in bsd.inputs("h1_b_sum")} == {"fc2_b", "fc4_b"}
    check_locality(bsd)


@pytest.mark.parametrize("edit, match", [
    ("bn_before_sum", r"node 'bn1' \(batchnorm\): must directly feed a neuron"),
    ("current_fan_out", r"node 'fc2' \(linear\): its current feeds 2 consumers"),
    ("mixed_sum", r"node 'mix' \(add\): adds spikes to a current"),
    ("sum_shapes", r"node 'mix' \(add\): adds \[3\] \(port 1\) to \[4\] \(port 0\)"),
])
def test_branches_bsd_cannot_pair_are_diagnosed(edit, match):
    g = GraphBuilder("m", T=2)
    h = g.lif(g.linear(g.input((4,)), 4))
    if edit == "bn_before_sum":
        v = g.sum(g.batchnorm(g.linear(h, 4)), g.linear(h, 4))
    elif edit == "current_fan_out":
        c = g.linear(h, 4)
        v = g.sum(c, g.linear(g.lif(c), 4))
    elif edit == "mixed_sum":
        v = g.add(Op.ADD, [h, g.linear(h, 4)], name="mix")
    else:
        v = g.add(Op.ADD, [g.linear(h, 4), g.linear(h, 3)], name="mix", shape=(4,))
    g.output(g.linear(g.lif(v), 2))
    with pytest.raises(GraphError, match=match):
        derive_feedback(g.build(validate=edit != "sum_shapes"))


def test_residual_block_picks_identity_or_projection_and_refuses_what_it_cannot_build():
    g = GraphBuilder("b", T=2)
    h = g.lif(g.conv2d(g.input((2, 8, 8)), 4, 3, padding=1))
    same = g.residual_block(h, name="same", tau=3.0)
    assert [i.name for i in g.build(validate=False).inputs(same)] == ["same_b_h", h]
    assert g._nodes["same_a_h"].attrs["tau"] == 3.0  # neuron parameters reach both units
    wide = g.residual_block(same, 6, name="wide")
    down = g.residual_block(wide, stride=2, name="down")
    assert g.shape(wide) == (6, 8, 8) and g.shape(down) == (6, 4, 4) and "wide_down" in g._nodes
    assert g._nodes["down_down"].attrs["kernel"] == (1, 1) and g._nodes["down_a"].attrs["stride"] == (2, 2)
    flat = GraphBuilder("f", T=2)
    with pytest.raises(GraphError, match="a residual block of linear layers has no stride"):
        flat.residual_block(flat.input((4,)), stride=2)
    with pytest.raises(GraphError, match=r"reads \[C, H, W\] or \[D\] spikes"):
        flat.residual_block(flat.input((2, 4), name="x2"))
