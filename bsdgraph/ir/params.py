"""Weights live outside the graph, bound by name: ``"<node>.weight"``, ``"<node>.bias"`` (torch.fx ``get_attr``).

``init_params`` draws them for every parametric node of a graph (F and B alike: B's weights are drawn
independently, never copied from F: criterion C1). Batchnorm running statistics are state, not parameters.
"""

from __future__ import annotations

import math

import torch

from bsdgraph.ir.graph import Graph, Node, Op

Params = dict[str, torch.Tensor]


def _synapse(weight: tuple[int, ...], out: int):
    return lambda a: {"weight": weight_of(a, weight), **({"bias": (a[out],)} if a["bias"] else {})}


def weight_of(a, keys) -> tuple[int, ...]:
    return tuple(x for k in keys for x in (a[k] if isinstance(a[k], tuple) else (a[k],)))


# Parameter tensors per op, by name. ConvTranspose uses torch's layout [in, out, kh, kw].
PARAM_SHAPES = {
    Op.LINEAR: _synapse(("out_features", "in_features"), "out_features"),
    Op.CONV2D: _synapse(("out_channels", "in_channels", "kernel"), "out_channels"),
    Op.CONV_T2D: _synapse(("in_channels", "out_channels", "kernel"), "out_channels"),
    Op.BATCHNORM: lambda a: {"weight": (a["num_features"],), "bias": (a["num_features"],)},
}


def param_shapes(n: Node) -> dict[str, tuple[int, ...]]:
    """The parameter tensors of one node, by name (empty for ops without weights)."""
    rule = PARAM_SHAPES.get(n.op)
    return rule(n.attrs) if rule else {}


def _fan_in(n: Node, weight_shape: tuple[int, ...]) -> int:
    if n.op == Op.CONV_T2D:  # torch computes the fan-in of ConvTranspose from weight.shape[1]
        return weight_shape[1] * math.prod(weight_shape[2:])
    return math.prod(weight_shape[1:])


def init_params(g: Graph, seed: int = 0) -> Params:
    """PyTorch's default initialisation (kaiming-uniform with a = sqrt(5), bias U(+-1/sqrt(fan_in))), seeded.

    Node order is fixed, so the same graph and seed give the same weights on every backend.
    """
    gen = torch.Generator().manual_seed(seed)
    params: Params = {}
    for n in g.nodes:
        shapes = param_shapes(n)
        if n.op == Op.BATCHNORM:
            params[f"{n.name}.weight"] = torch.ones(shapes["weight"])
            params[f"{n.name}.bias"] = torch.zeros(shapes["bias"])
            continue
        if not shapes:
            continue
        bound = 1.0 / math.sqrt(_fan_in(n, shapes["weight"]))
        # kaiming_uniform_(a=sqrt(5)) has bound sqrt(6 / ((1 + 5) fan_in)) = 1/sqrt(fan_in): same as the bias
        params[f"{n.name}.weight"] = (torch.rand(shapes["weight"], generator=gen) * 2 - 1) * bound
        if "bias" in shapes:
            params[f"{n.name}.bias"] = (torch.rand(shapes["bias"], generator=gen) * 2 - 1) * bound
    return params


def init_state(g: Graph) -> dict[str, torch.Tensor]:
    """Non-learned state: batchnorm running statistics."""
    state = {}
    for n in g.by_op(Op.BATCHNORM):
        c = n.attrs["num_features"]
        state[f"{n.name}.running_mean"] = torch.zeros(c)
        state[f"{n.name}.running_var"] = torch.ones(c)
    return state


def node_params(params: Params, node: str) -> list[str]:
    """Names of the parameters bound to ``node`` (weight first)."""
    return [k for k in (f"{node}.weight", f"{node}.bias") if k in params]
