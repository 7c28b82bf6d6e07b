"""Shape inference: one rule per ``Op`` in ``SHAPE_RULES``.

A rule takes the node and the per-sample shapes of its operands (in port order) and returns the node's shape,
or raises ``ShapeError`` saying what it expected, what it got and how to fix it. Validation calls the same rules
on the declared shapes of the producers and compares the result with the node's declared shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from bsdgraph.ir.graph import Node, Op
from bsdgraph.registry import registrar

Shape = tuple[int, ...]


class ShapeError(Exception):
    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message, self.hint = message, hint


SHAPE_RULES: dict[Op, Callable[[Node, list[Shape]], Shape]] = {}

# How many operands each op takes (validate checks it before any shape rule runs).
ARITY: dict[Op, tuple[int, ...] | range] = {
    Op.INPUT: (0,), Op.TARGET: (0,), Op.LINEAR: (1,), Op.CONV2D: (1,), Op.CONV_T2D: (1,), Op.AVGPOOL2D: (1,),
    Op.MAXPOOL2D: (1,), Op.UPSAMPLE2D: (1,), Op.FLATTEN: (1,), Op.UNFLATTEN: (1,), Op.BATCHNORM: (1,),
    Op.ADD: range(2, 1 << 16),  # a sum of any number of same-shaped operands (a residual merge, B's fan-in)
    Op.LIF: (1,), Op.NEURON: (1,), Op.OUTPUT: (1,), Op.RECO: (2,), Op.CE: (1,), Op.MSE: (1, 2),
}


def arity_text(counts: tuple[int, ...] | range) -> str:
    """How many operands an op takes, in words: "1 or 2", "2 or more"."""
    return f"{counts.start} or more" if isinstance(counts, range) else " or ".join(map(str, counts))


rule = registrar(SHAPE_RULES)  # @rule(*ops): the shape rule of those ops


def infer_node_shape(node: Node, operands: list[Node]) -> Shape:
    """Infer ``node``'s shape from its operand nodes; raise ``GraphError`` naming the node on failure."""
    from bsdgraph.ir.diagnostics import Diagnostic, GraphError

    try:
        if len(operands) not in ARITY[node.op]:
            raise ShapeError(f"takes {arity_text(ARITY[node.op])} operand(s), got {len(operands)}")
        return SHAPE_RULES[node.op](node, [o.shape for o in operands])
    except ShapeError as err:
        raise GraphError([Diagnostic(node.name, node.op, err.message, err.hint)]) from None


def _spatial(shape: Shape, what: str = "input") -> Shape:
    if len(shape) != 3:
        raise ShapeError(f"expects a [C, H, W] {what}, got {list(shape)}",
                         "conv/pool layers need image-shaped input: declare the input as (C, H, W)")
    return shape


def _channels(node: Node, shape: Shape, key: str) -> None:
    if shape[0] != node.attrs[key]:
        raise ShapeError(f"{key}={node.attrs[key]} but its input has {shape[0]} channels (shape {list(shape)})",
                         f"set {key}={shape[0]} or change the producer")


def _window(size: Shape, kernel, stride, padding=(0, 0)) -> Shape:
    out = tuple((size[i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in range(2))
    if min(out) < 1:
        raise ShapeError(
            f"kernel {list(kernel)} with stride {list(stride)} and padding {list(padding)} on a "
            f"{size[0]}x{size[1]} input gives an empty {out[0]}x{out[1]} output",
            "use a smaller kernel or stride, more padding, or fewer pooling layers before this one")
    return out


@rule(Op.INPUT, Op.TARGET)
def _source(node: Node, shapes: list[Shape]) -> Shape:
    if not node.shape or min(node.shape) < 1:
        raise ShapeError(f"needs a non-empty shape of positive sizes, got {list(node.shape)}",
                         "e.g. g.input((784,)) or g.input((1, 28, 28))")
    return node.shape


@rule(Op.LINEAR)
def _linear(node: Node, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    if len(s) != 1:
        raise ShapeError(f"expects a flat [D] input, got {list(s)}", "insert g.flatten(...) before this linear")
    if s[0] != node.attrs["in_features"]:
        raise ShapeError(f"in_features={node.attrs['in_features']} but its input has width {s[0]}",
                         f"set in_features={s[0]} or change the producer")
    return (node.attrs["out_features"],)


@rule(Op.CONV2D)
def _conv2d(node: Node, shapes: list[Shape]) -> Shape:
    s = _spatial(shapes[0])
    _channels(node, s, "in_channels")
    a = node.attrs
    return (a["out_channels"], *_window(s[1:], a["kernel"], a["stride"], a["padding"]))


@rule(Op.CONV_T2D)
def _conv_t2d(node: Node, shapes: list[Shape]) -> Shape:
    s = _spatial(shapes[0])
    _channels(node, s, "in_channels")
    a = node.attrs
    out = tuple((s[1 + i] - 1) * a["stride"][i] - 2 * a["padding"][i] + a["kernel"][i] + a["output_padding"][i]
                for i in range(2))
    if min(out) < 1:
        raise ShapeError(f"gives an empty {out[0]}x{out[1]} output", "check kernel, stride and padding")
    return (a["out_channels"], *out)


@rule(Op.AVGPOOL2D, Op.MAXPOOL2D)
def _pool(node: Node, shapes: list[Shape]) -> Shape:
    s = _spatial(shapes[0])
    kernel = node.attrs["kernel"]
    stride = node.attrs["stride"] or kernel
    return (s[0], *_window(s[1:], kernel, stride))


@rule(Op.UPSAMPLE2D)
def _upsample(node: Node, shapes: list[Shape]) -> Shape:
    s = _spatial(shapes[0])
    return (s[0], *node.attrs["size"])


@rule(Op.FLATTEN)
def _flatten(node: Node, shapes: list[Shape]) -> Shape:
    return (math.prod(shapes[0]),)


@rule(Op.UNFLATTEN)
def _unflatten(node: Node, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    target = tuple(node.attrs["shape"])
    if len(s) != 1 or s[0] != math.prod(target):
        raise ShapeError(f"cannot unflatten {list(s)} to {list(target)} ({math.prod(s)} vs {math.prod(target)} "
                         "elements)", "the target shape must have as many elements as the flat input")
    return target


@rule(Op.BATCHNORM)
def _batchnorm(node: Node, shapes: list[Shape]) -> Shape:
    (s,) = shapes
    if len(s) not in (1, 3):
        raise ShapeError(f"expects a [D] or [C, H, W] input, got {list(s)}", "put batchnorm after a synapse")
    _channels(node, s, "num_features")
    return s


@rule(Op.ADD)
def _add(node: Node, shapes: list[Shape]) -> Shape:
    for port, s in enumerate(shapes[1:], 1):
        if s != shapes[0]:
            raise ShapeError(f"adds {list(s)} (port {port}) to {list(shapes[0])} (port 0)",
                             "every operand of a sum must have the same shape (a residual block whose width or "
                             "size changes needs a projection shortcut)")
    return shapes[0]


@rule(Op.LIF, Op.NEURON, Op.OUTPUT)
def _same(node: Node, shapes: list[Shape]) -> Shape:
    return shapes[0]


@rule(Op.RECO, Op.MSE)
def _pair_loss(node: Node, shapes: list[Shape]) -> Shape:
    if len(shapes) == 2 and shapes[0] != shapes[1]:
        raise ShapeError(f"compares {list(shapes[0])} (port 0) with {list(shapes[1])} (port 1)",
                         "a local loss pairs an F layer with the B layer of the same shape")
    return ()


@rule(Op.CE)
def _ce(node: Node, shapes: list[Shape]) -> Shape:
    if len(shapes[0]) != 1:
        raise ShapeError(f"expects flat class scores, got {list(shapes[0])}", "flatten before the top linear")
    return ()
