"""Pictures of BSD graphs: the layout rule, the PNG, the DOT text, and `bsdgraph draw`."""

import re
from pathlib import Path

import pytest

from bsdgraph import GraphBuilder, Op, Stream, derive_feedback
from bsdgraph.tools.draw import STYLE, draw, layout, to_dot
from bsdgraph.ir.graph import GroupOp
from bsdgraph.compiler.model_file import load_model

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["fmnist_mlp", "fmnist_cnn", "cifar_cnn"]


def bsd_of(model: str):
    return derive_feedback(load_model(ROOT / "models" / f"{model}.py").graph)


def test_every_op_has_a_style():
    assert not [op for op in Op if op not in STYLE]


@pytest.mark.parametrize("model", MODELS)
def test_layout_puts_f_bottom_up_b_top_down_and_losses_between_their_operands(model):
    g = bsd_of(model)
    pos = layout(g)
    assert len(set(pos.values())) == len(g.nodes), "two nodes share a position"
    for e in g.edges:
        src, dst = g[e.src], g[e.dst]
        if dst.stream == Stream.LOSS:
            continue
        assert (pos[e.dst][1] > pos[e.src][1]) == (src.stream == Stream.F), f"{e.src} -> {e.dst} runs backwards"
    for n in g.nodes:
        if n.op in GroupOp.LOSS:
            ys = [pos[i.name][1] for i in g.inputs(n.name)]
            assert min(ys) <= pos[n.name][1] <= max(ys)
        elif n.stream == Stream.B and n.op == Op.BATCHNORM:  # a layer's pairing reads horizontally
            assert pos[n.name][1] == pos[n.name[:-2]][1]


@pytest.mark.parametrize("model", ["fmnist_cnn", "cifar_cnn"])
def test_draw_writes_a_png(tmp_path, model):
    path = draw(bsd_of(model), tmp_path / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_draw_takes_a_forward_network_alone(tmp_path):
    f = load_model(ROOT / "models" / "fmnist_mlp.py").graph
    assert draw(f, tmp_path / "f.svg").read_text().lstrip().startswith("<?xml")


def test_dot_has_clusters_losses_and_dashed_stop_gradients():
    g = bsd_of("fmnist_cnn")
    dot = to_dot(g)
    assert dot.count("{") == dot.count("}") and "subgraph cluster_F {" in dot and "subgraph cluster_B {" in dot
    for n in g.nodes:
        assert f'"{n.name}" [label=' in dot
    losses = [n for n in g.nodes if n.op in GroupOp.LOSS]
    assert len(re.findall(r"shape=diamond", dot)) == len(losses)
    assert dot.count("style=dashed") == sum(e.detach for e in g.edges)
    assert dot.count("[dir=back") == sum(g[e.src].stream == g[e.dst].stream == Stream.B for e in g.edges)
    conv1 = "x".join(map(str, g["conv1"].shape))  # edges are labelled with the shape they carry
    assert conv1.endswith("x28x28") and f'"conv1" -> "bn1" [label="{conv1}"];' in dot
    assert '"x" -> "conv1" [label="1x28x28", style=dashed];' in dot


def test_dot_quotes_awkward_names():
    g = GraphBuilder('say "hi"', T=1)
    g.output(g.linear(g.input((3,), name='in\\put "x"'), 2))
    dot = to_dot(g.build())
    assert 'digraph "say \\"hi\\"" {' in dot and '"in\\\\put \\"x\\"" -> "fc1"' in dot


def test_draw_command(cli, tmp_path):
    code, _, err = cli("draw", ROOT / "models" / "fmnist_cnn.py", "-o", tmp_path / "cnn.png")
    assert code == 0 and (tmp_path / "cnn.png").stat().st_size > 20_000
    code, _, _ = cli("draw", ROOT / "models" / "fmnist_cnn.py", "-o", tmp_path / "cnn.dot")
    assert code == 0 and (tmp_path / "cnn.dot").read_text().startswith('digraph "fmnist_cnn" {')
    code, _, err = cli("draw", tmp_path / "missing.py", "-o", tmp_path / "x.png")
    assert code == 1 and err.strip() == f"error: {tmp_path / 'missing.py'}: model file not found"


def test_epoch_axes_tick_whole_epochs():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bsdgraph.tools.plot import epoch_axis

    fig, ax = plt.subplots()
    ax.plot([1, 2], [0.5, 0.6])
    before = [t for t in ax.get_xticks() if 1 <= t <= 2]
    epoch_axis(ax)
    fig.canvas.draw()
    after = [t for t in ax.get_xticks() if 1 <= t <= 2]
    plt.close(fig)
    assert any(t != int(t) for t in before)          # the default: 1.0, 1.2, ... for two epochs
    assert after == [1.0, 2.0]


def test_recurrent_edges_are_loops_labelled_with_their_delay(tmp_path):
    """A recurrent layer's delayed edge is marked t-1 and kept out of the layout's ranking (in DOT and PNG)."""
    from bsdgraph.tools.draw import draw, to_dot

    bsd = derive_feedback(load_model(ROOT / "models" / "mackey_glass_rnn.py").graph)
    dot = to_dot(bsd)
    delayed = [line for line in dot.splitlines() if 'label="t-1"' in line]
    assert len(delayed) == 2 and all("constraint=false" in line for line in delayed)   # F's loop and B's
    assert all('"h1" -> "h1_rec"' in line or '"h1_b" -> "h1_rec_b"' in line for line in delayed), delayed
    out = draw(bsd, tmp_path / "rnn.png")
    assert out.stat().st_size > 0


def test_residual_shortcuts_are_arcs_beside_their_column(tmp_path, monkeypatch):
    """An edge that skips rows (a SEW shortcut in F, the mirrors of it in B) is drawn as an arc beside its column
    (F's on the left, B's on the right), never straight through the boxes between its ends."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from bsdgraph.tools import draw as drawing

    bsd = derive_feedback(load_model(ROOT / "models" / "fmnist_resnet.py").graph)
    pos = drawing.layout(bsd)
    skips = {(e.src, e.dst) for e in bsd.edges if bsd[e.dst].stream != Stream.LOSS and not e.delay
             and pos[e.src][0] == pos[e.dst][0] and abs(pos[e.src][1] - pos[e.dst][1]) > 1}
    assert ("pool1", "block1") in skips and ("block1", "block2_down") in skips  # F's shortcut and projection
    arcs = []
    real = Axes.annotate

    def spy(self, text, xy, *args, **kwargs):
        props = kwargs.get("arrowprops", {})
        if props.get("color") == drawing.SKIP:
            arcs.append((xy, kwargs["xytext"], props["connectionstyle"]))
        return real(self, text, xy, *args, **kwargs)

    monkeypatch.setattr(Axes, "annotate", spy)
    drawing.draw(bsd, tmp_path / "res.png")
    assert len(arcs) == len(skips) and all(c.startswith("arc3,rad=-") for _, _, c in arcs)
    f_side = {(xy[0], xt[0]) for xy, xt, _ in arcs}
    assert f_side == {(0.0, 0.0), (1.0, 1.0)}  # box-relative: left sides in F, right sides in B
