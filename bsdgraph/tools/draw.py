"""Pictures of a BSD graph: F and its derived backward network B side by side, the local losses between them.

``draw(bsd, path)`` writes a matplotlib figure (PNG, SVG, PDF by suffix); ``to_dot(g)`` returns Graphviz DOT
text. Both read the same per-op ``STYLE`` table and the same layout rule: F runs bottom-up (stimulus at the bottom,
concept at the top), B top-down beside it, each B node on the row of the F node it mirrors, so that a layer's
pairing reads horizontally; each loss sits between its two operands. Dashed edges are stop-gradients (BSD's
detach), dotted red edges feed a loss, blue loops labelled t-1 are recurrent (delayed) edges, purple arcs beside
a column are branches that skip rows (residual shortcuts in F, their mirrors in B).
"""

from __future__ import annotations

import math
from pathlib import Path

from bsdgraph.ir.graph import GroupOp, Graph, Node, Op, Stream

# Per-op look: (fill colour, DOT shape). Losses are diamonds; sources and the output are ellipses.
STYLE: dict[Op, tuple[str, str]] = {
    Op.INPUT: ("#d9d2e9", "ellipse"), Op.TARGET: ("#d9d2e9", "ellipse"), Op.OUTPUT: ("#d9d2e9", "ellipse"),
    Op.LINEAR: ("#cfe2f3", "box"), Op.CONV2D: ("#cfe2f3", "box"), Op.CONV_T2D: ("#cfe2f3", "box"),
    Op.AVGPOOL2D: ("#eeeeee", "box"), Op.MAXPOOL2D: ("#eeeeee", "box"), Op.UPSAMPLE2D: ("#eeeeee", "box"),
    Op.FLATTEN: ("#eeeeee", "box"), Op.UNFLATTEN: ("#eeeeee", "box"),
    Op.BATCHNORM: ("#d9ead3", "box"), Op.ADD: ("#eeeeee", "circle"), Op.LIF: ("#fce5cd", "box"), Op.NEURON: ("#fce5cd", "box"),
    Op.RECO: ("#f4cccc", "diamond"), Op.CE: ("#f4cccc", "diamond"), Op.MSE: ("#f4cccc", "diamond"),
}
COLUMN = {Stream.F: 0.0, Stream.LOSS: 1.0, Stream.B: 2.0}
SIDE = 0.45             # x offset of a recurrent synapse beside its column
RECURRENT = "#1f5fbf"   # recurrent (delayed) edges, drawn as a loop labelled t-d
SKIP = "#7a3fb0"        # edges that skip rows (branches, residual shortcuts), drawn as arcs beside the column
TITLES = {Stream.F: "F: stimulus -> concept", Stream.LOSS: "local losses",
          Stream.B: "B: concept -> stimulus (own weights)"}


def _shape(n: Node) -> str:
    return "x".join(map(str, n.shape))


def _label(n: Node) -> str:
    if n.op in GroupOp.LOSS:
        return f"{n.name}\n{n.op.value} (layer {n.attrs['layer']})"
    return f"{n.name}\n{n.op.value}"


def layout(g: Graph) -> dict[str, tuple[float, float]]:
    """Node -> (x, y): F's chain bottom-up, one row per node; each B node on the row of its F twin (``<f>_b``; the
    target on the output's row), or one row below its predecessor where B's order differs from F's (a layer's
    batchnorm comes before its neuron in both, so B, running the other way, meets them reversed); each loss
    between its operands. A recurrent synapse (it reads its layer through a delay) sits beside the column, on the
    row of the sum it feeds, so that the chain's edges do not run through it."""
    beside = {n.name for n in g.nodes if any(e.delay for e in g.in_edges(n.name))}
    f_nodes = [n for n in g.topo_order() if n.stream == Stream.F and n.name not in beside]
    pos = {n.name: (COLUMN[Stream.F], float(i)) for i, n in enumerate(f_nodes)}
    top = float(len(f_nodes) - 1)
    prev = math.inf
    for n in (n for n in g.topo_order() if n.stream == Stream.B and n.name not in beside):
        twin = n.name[:-2] if n.name.endswith("_b") else None
        y = pos[twin][1] if twin in pos else (top if n.op == Op.TARGET else prev - 1)
        y = min(y, prev - 1)
        pos[n.name] = (COLUMN[Stream.B], y)
        prev = y
    for name in beside:
        n, (consumer,) = g[name], [c for c in g.consumers(name) if c.stream != Stream.LOSS]
        # half a row below the sum in F (above it in B, which runs down): clear of the loss edge on the sum's row
        shift = -0.5 if n.stream == Stream.F else 0.5
        pos[name] = (COLUMN[n.stream] + SIDE, pos[consumer.name][1] + shift)
    for n in g.nodes:
        if n.stream == Stream.LOSS:
            ys = [pos[i.name][1] for i in g.inputs(n.name) if i.name in pos]
            pos[n.name] = (COLUMN[Stream.LOSS], sum(ys) / len(ys) if ys else top)
    return pos


def draw(g: Graph, path: str | Path, title: str | None = None) -> Path:
    """Write a picture of ``g`` (a BSD graph from ``derive_feedback``, or a forward network alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = layout(g)
    rows = max(y for _, y in pos.values()) - min(y for _, y in pos.values()) + 1
    fig, ax = plt.subplots(figsize=(11, max(4.0, 0.55 * rows + 1.6)))
    boxes = {n.name: ax.text(*pos[n.name], _label(n), ha="center", va="center", fontsize=7, zorder=3,
                             bbox=dict(boxstyle="round,pad=0.35", fc=STYLE[n.op][0], ec="#444444", lw=0.7))
             for n in g.nodes}
    for e in g.edges:
        _edge(ax, g, e, boxes, pos)
    ymin, ymax = min(y for _, y in pos.values()), max(y for _, y in pos.values())
    for stream, x in COLUMN.items():
        if any(n.stream == stream for n in g.nodes):
            ax.text(x, ymax + 0.9, TITLES[stream], ha="center", fontsize=9, weight="bold")
    ax.set_xlim(-0.7, 2.7)
    ax.set_ylim(ymin - 0.8, ymax + 1.3)
    ax.axis("off")
    ax.set_title(title or f"{g.name}: T={g.T}; dashed = stop-gradient, dotted red = loss operand, "
                 "edge labels = per-sample shapes", fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _edge(ax, g: Graph, e, boxes, pos) -> None:
    src, dst = g[e.src], g[e.dst]
    if dst.stream == Stream.LOSS:  # from the side of an F or B node to the side of the loss
        side = (1.0, 0.5) if src.stream == Stream.F else (0.0, 0.5)
        dst_side = (0.0, 0.5) if src.stream == Stream.F else (1.0, 0.5)
        ax.annotate("", xy=dst_side, xycoords=boxes[e.dst], xytext=side, textcoords=boxes[e.src],
                    arrowprops=dict(arrowstyle="->", color="#cc0000", ls=":", lw=1.0))
        return
    (x0, y0), (x1, y1) = pos[e.src], pos[e.dst]
    if e.delay:  # a recurrent edge (the layer's own spikes of step t - delay): from the neuron's right side round
        # to the side of the recurrent synapse that faces it, labelled t-d
        bend = -0.4 if y1 < y0 else 0.4   # arc3 bends by the direction of travel: keep the loop on the right
        ax.annotate("", xy=(0.5, 1.0 if y0 > y1 else 0.0), xycoords=boxes[e.dst], xytext=(1.0, 0.5),
                    textcoords=boxes[e.src],
                    arrowprops=dict(arrowstyle="->", color=RECURRENT, lw=0.9, connectionstyle=f"arc3,rad={bend}"))
        ax.text(x1 + 0.12, (y0 + y1) / 2, f"t-{e.delay}", fontsize=7, color=RECURRENT, va="center", ha="left")
        return
    if x0 != x1:  # a recurrent synapse beside its column into the layer's sum: side to side
        ax.annotate("", xy=(1.0, 0.5), xycoords=boxes[e.dst], xytext=(0.0, 0.5), textcoords=boxes[e.src],
                    arrowprops=dict(arrowstyle="->", color="#333333", lw=0.9))
        return
    if abs(y1 - y0) > 1:  # a branch skipping rows (a residual shortcut, B's mirror of it): an arc beside the
        # column, F's on its left, B's on its right, clear of the chain's edges; arc3 bends by the direction of
        # travel, and by less for a longer skip so that it stays within the figure
        side = 0.0 if src.stream == Stream.F else 1.0
        rad = -min(0.4, 1.2 / abs(y1 - y0))
        ax.annotate("", xy=(side, 0.5), xycoords=boxes[e.dst], xytext=(side, 0.5), textcoords=boxes[e.src],
                    arrowprops=dict(arrowstyle="->", color=SKIP, lw=0.9, ls="--" if e.detach else "-",
                                    connectionstyle=f"arc3,rad={rad}"))
        return
    up = pos[e.dst][1] > pos[e.src][1]
    ax.annotate("", xy=(0.5, 0.0 if up else 1.0), xycoords=boxes[e.dst], xytext=(0.5, 1.0 if up else 0.0),
                textcoords=boxes[e.src],
                arrowprops=dict(arrowstyle="->", color="#333333", lw=0.9, ls="--" if e.detach else "-"))
    (x0, y0), (_, y1) = pos[e.src], pos[e.dst]
    ax.text(x0 + 0.06, (y0 + y1) / 2, _shape(src), fontsize=6, color="#666666", va="center", ha="left")


# ---------------------------------------------------------------------------------------------------- DOT


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_node(n: Node) -> str:
    fill, shape = STYLE[n.op]
    label = _label(n) + ("" if n.op in GroupOp.LOSS else f"\n[{', '.join(map(str, n.shape))}]")
    return f"    {_q(n.name)} [label={_q(label)}, shape={shape}, fillcolor={_q(fill)}];"


def to_dot(g: Graph) -> str:
    """Graphviz DOT text: F and B as clusters (F bottom-up, B top-down beside it), loss nodes between them;
    stop-gradient edges dashed, loss operands dotted red, F/B edges labelled with the producer's shape."""
    lines = [f"digraph {_q(g.name)} {{", "  rankdir=BT;  // F flows up; B's edges are drawn reversed (dir=back)",
             '  node [style="rounded,filled", fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=8];']
    for stream, name in ((Stream.F, "cluster_F"), (Stream.B, "cluster_B")):
        members = [n for n in g.nodes if n.stream == stream]
        if members:
            lines += [f"  subgraph {name} {{", f"    label={_q(TITLES[stream])};", '    color="#999999";']
            lines += [_dot_node(n) for n in members] + ["  }"]
    lines += [_dot_node(n).replace("    ", "  ", 1) for n in g.nodes if n.stream == Stream.LOSS]
    for e in g.edges:
        src, dst = g[e.src], g[e.dst]
        style = ["style=dashed"] if e.detach else []
        if e.delay:  # recurrent: kept out of the ranking (it would turn the layer upside down), labelled t-d
            lines.append(f"  {_q(e.src)} -> {_q(e.dst)} [label={_q(f't-{e.delay}')}, color={_q(RECURRENT)}, "
                         f"fontcolor={_q(RECURRENT)}, constraint=false];")
            continue
        if dst.stream == Stream.LOSS:
            style = ['style=dotted', 'color="#cc0000"', "constraint=false"]
            lines.append(f"  {_q(e.src)} -> {_q(e.dst)} [{', '.join(style)}];")
        elif src.stream == Stream.B:  # reversed so that B ranks top-down under rankdir=BT
            attrs = ", ".join(["dir=back", f"label={_q(_shape(src))}", *style])
            lines.append(f"  {_q(e.dst)} -> {_q(e.src)} [{attrs}];")
        else:
            lines.append(f"  {_q(e.src)} -> {_q(e.dst)} [{', '.join([f'label={_q(_shape(src))}', *style])}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
