"""Running a declared neuron (ir/neurons.py) over time: the generated torch twin (the specification, with autograd
for the reference runtime and BPTT) and the generated Triton kernels (compiler/neuron_gen.py).

Every function takes the declaration and its parameter values; inputs are ``[T, *]`` currents. Spikes come back as
0/1 in the input's dtype from the twin and as uint8 from the kernel; a non-spiking neuron returns its membrane.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from bsdgraph.compiler.neuron_gen import triton_module, twin_step
from bsdgraph.ir.neurons import Neuron
from kernels.ref.lif import as_float32


class Heaviside(torch.autograd.Function):
    """spk = [lhs >= rhs]; backward: the atan surrogate at d = lhs - rhs, +sg to lhs and -sg to rhs.

    At rhs = v_th this is kernels/ref/lif.py's SpikeFn (same d, same expression), so gradients match it bitwise."""

    @staticmethod
    def forward(ctx, lhs: torch.Tensor, rhs, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(lhs - rhs)
        ctx.alpha, ctx.rhs_tensor = alpha, isinstance(rhs, torch.Tensor) and rhs.dim() > 0
        return (lhs >= rhs).to(lhs.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (d,) = ctx.saved_tensors
        z = math.pi * ctx.alpha * d / 2
        g = grad * (ctx.alpha / (2 * (1 + z * z)))
        return g, (-g if ctx.needs_input_grad[1] and ctx.rhs_tensor else None), None


def _params(neuron: Neuron, values: Mapping[str, float], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Parameters as fp32-rounded 0-dim tensors in ``like``'s dtype: the kernel's scalars exactly."""
    vals = neuron.param_values(values)
    return tuple(torch.tensor(as_float32(vals[p]), dtype=like.dtype, device=like.device) for p, _ in neuron.params)


def _zeros(neuron: Neuron, x0: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros_like(x0) for _ in neuron.states)


# (name, parameter values, dtype, device) -> (declaration, twin step, parameter tensors). A plain dict with a
# constant key, filled by prepare() before torch.compile traces a step: Dynamo reads a hit as a constant, while it
# would trace into the code generation (and exec) behind a functools cache.
_PREPARED: dict[tuple, tuple] = {}


def _prepared(neuron: Neuron, values: Mapping[str, float], like: torch.Tensor):
    key = (neuron.name, tuple(sorted(values.items())), like.dtype, str(like.device))
    hit = _PREPARED.get(key)
    if hit is None or hit[0] is not neuron:
        hit = _PREPARED[key] = (neuron, twin_step(neuron), _params(neuron, values, like))
    return hit[1], hit[2]


def prepare(graph, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """Generate (once) the twin of every declared neuron of ``graph``, ahead of a traced step."""
    from bsdgraph.ir.graph import Op
    from bsdgraph.ir.neurons import neuron_of

    like = torch.empty(0, dtype=dtype, device=device)
    for n in graph.by_op(Op.NEURON):
        _prepared(*neuron_of(n), like)


def twin_step_fn(neuron: Neuron, values: Mapping[str, float], like: torch.Tensor, alpha: float, grad: bool):
    """``step(x_t, states) -> (out, h, states)`` for one time step (the reference's recurrent loop uses it)."""
    fn, P = _prepared(neuron, values, like)
    spike = (lambda lhs, rhs: Heaviside.apply(lhs, rhs, alpha)) if grad else (
        lambda lhs, rhs: (lhs >= rhs).to(lhs.dtype))
    return lambda x, states: fn(x, states if states is not None else _zeros(neuron, x), P, spike)


def twin_scan(neuron: Neuron, values: Mapping[str, float], x: torch.Tensor, alpha: float = 2.0,
              grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, membrane h), both ``[T, *]`` in x's dtype, by the generated twin; ``grad`` puts the surrogate in."""
    step = twin_step_fn(neuron, values, x, alpha, grad)
    states, outs, hs = None, [], []
    for t in range(x.shape[0]):
        out, h, states = step(x[t], states)
        outs.append(out)
        hs.append(h)
    return torch.stack(outs), torch.stack(hs)


def twin_forward(neuron: Neuron, values: Mapping[str, float], x: torch.Tensor,
                 return_h: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel's contract on the twin: spikes as uint8 (or the membrane of a non-spiking neuron), h if asked."""
    with torch.no_grad():
        out, h = twin_scan(neuron, values, x, grad=False)
    return (out.to(torch.uint8) if neuron.spiking else out), (h if return_h else None)


def twin_backward(neuron: Neuron, values: Mapping[str, float], alpha: float, x: torch.Tensor,
                  grad_out: torch.Tensor | None, grad_h: torch.Tensor | None) -> torch.Tensor:
    """dL/dx given dL/d value and/or dL/dh (``[T, *]``), by autograd through the twin from the input current."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out, h = twin_scan(neuron, values, xg, alpha, grad=True)
        pairs = [(t, g) for t, g in ((out, grad_out), (h, grad_h)) if g is not None]
        if not pairs:
            return torch.zeros_like(x)
        (gx,) = torch.autograd.grad([t for t, _ in pairs], xg, [g for _, g in pairs], allow_unused=True)
    return gx if gx is not None else torch.zeros_like(x)


# ---------------------------------------------------------------------------------------------------- Triton


def _consts(neuron: Neuron, values: Mapping[str, float]) -> dict[str, float]:
    vals = neuron.param_values(values)
    return {f"C{i}": as_float32(vals[p]) for i, (p, _) in enumerate(neuron.params)}


def _grid(m: int, block: int) -> tuple[int]:
    return (max(1, -(-m // block)),)   # one program per block of neurons


def triton_forward(neuron: Neuron, values: Mapping[str, float], x: torch.Tensor,
                   return_h: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generated forward kernel: one program per block of neurons walks T with the states in registers."""
    from kernels.lif import MAX_BLOCK, block_size, check_tensor

    mod = triton_module(neuron)
    check_tensor("neuron_forward", "x", x, (torch.float32,), mod.forward_kernel, min_ndim=1)
    T, M = x.shape[0], x[0].numel() if x.dim() > 1 else 1
    out = torch.empty(x.shape, dtype=torch.uint8 if neuron.spiking else torch.float32, device=x.device)
    h = torch.empty_like(x) if return_h else out
    if T and M:
        block = block_size(M, 16, MAX_BLOCK)
        mod.forward_kernel[_grid(M, block)](x, out, h, T, M, **_consts(neuron, values), BLOCK=block,
                                            RETURN_H=return_h)
    return out, (h if return_h else None)


def triton_backward(neuron: Neuron, values: Mapping[str, float], alpha: float, x: torch.Tensor,
                    grad_out: torch.Tensor | None, grad_h: torch.Tensor | None) -> torch.Tensor:
    """The generated backward kernel: dL/dx from dL/d value and/or dL/dh, recomputing the forward from x."""
    from kernels.lif import MAX_BLOCK, block_size, check_tensor

    mod = triton_module(neuron)
    check_tensor("neuron_backward", "x", x, (torch.float32,), mod.backward_kernel, min_ndim=1)
    for name, g in (("grad_out", grad_out), ("grad_h", grad_h)):
        if g is not None:
            check_tensor("neuron_backward", name, g, (torch.float32,), mod.backward_kernel)
            if g.shape != x.shape:
                raise ValueError(f"neuron_backward: {name} has shape {tuple(g.shape)}, x {tuple(x.shape)}")
    T, M = x.shape[0], x[0].numel() if x.dim() > 1 else 1
    gx = torch.empty_like(x)
    if not (T and M):
        return gx
    scratch = torch.empty((T, len(neuron.states), M), dtype=torch.float32, device=x.device)
    last = lambda t: (t if t is not None else x)[T - 1:]  # noqa: E731 -- the pointer to the last time row
    block = block_size(M, 16, MAX_BLOCK)
    mod.backward_kernel[_grid(M, block)](
        x, last(x), last(grad_out), last(grad_h), gx[T - 1:], scratch, scratch[T - 1:], T, M,
        **_consts(neuron, values), ALPHA=as_float32(alpha), BLOCK=block, HAS_GOUT=grad_out is not None,
        HAS_GH=grad_h is not None)
    return gx
