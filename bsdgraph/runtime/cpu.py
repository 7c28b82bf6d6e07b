"""The cpu backend: the plan executed with torch kernels and explicit local gradients (no autograd over time)."""

from __future__ import annotations

import numpy as np
import torch

from bsdgraph.compiler.plan import LABELS
from bsdgraph.runtime import native
from bsdgraph.runtime.executor import Backend, Executor
from bsdgraph.runtime.heap import keep_freed_memory
from bsdgraph.runtime.philox import poisson_encode
from bsdgraph.runtime.reco_dedup import reco_loss_grad_steps
from bsdgraph.runtime.torch_kernels import KERNELS, TWIN_PRIMS, loss_operands, loss_outputs


@torch.no_grad()
def lif_forward(current, tau, v_th, v_reset, soft_reset, v_init=None, return_h=False):
    """The twin's LIF (kernels/ref/lif.py): the fused native kernel (runtime/native.py, bit-identical, ~7x faster)
    when it is built and takes these inputs, else the torch loop below with preallocated outputs."""
    if native.accepts(current, v_init):
        return native.lif_forward(current, tau, v_th, v_reset, soft_reset, v_init, return_h)
    spikes, _, hs = _lif_loop(lambda t, s_prev: current[t], current.shape, current.dtype, tau, v_th, v_reset,
                              soft_reset, v_init, return_h)
    return spikes, hs


@torch.no_grad()
def rec_lif_forward(ff, rec_weight, rec_bias, tau, v_th, v_reset, soft_reset, return_v=False, return_h=False):
    """A recurrent layer given its feedforward current ``ff`` [T, B, N]: I[t] = ff[t] + s[t-1] Uᵀ + b_U, then the
    LIF; bit-identical to kernels/ref/linear_lif.linear_lif_rec_forward (same expression, same order)."""
    currents = torch.empty(ff.shape, dtype=ff.dtype) if return_v else None

    def current_at(t, s_prev):
        i = ff[t] + torch.nn.functional.linear(s_prev, rec_weight, rec_bias)
        if currents is not None:
            currents[t] = i
        return i

    spikes, _, hs = _lif_loop(current_at, ff.shape, ff.dtype, tau, v_th, v_reset, soft_reset, None, return_h)
    return spikes, currents, hs


def _lif_loop(current_at, shape, dtype, tau, v_th, v_reset, soft_reset, v_init, return_h):
    """h is computed with the twin's exact expression (v - 0.0 is v exactly, so that subtraction is skipped for a
    zero reset), so spikes and h are bit-identical to the twin's. ``current_at(t, s[t-1])`` gives step t's current.

    Spikes are computed as float 0/1 (``ge`` into a float tensor) and the reset as arithmetic on them: measured on
    this CPU (torch 2.13, AVX-512, [128, 1024], one thread) a comparison into a float tensor takes 24 us against
    ~200 us into a bool tensor, and a bool-masked fill ~1 ms, so the loop was 6x slower with masks. Exactness:
    with s in {0, 1}, h * (1 - s) + v_reset * s is h or v_reset exactly (as the twin), and h - v_th * s is one
    rounding of h - v_th or h itself."""
    v = torch.zeros(shape[1:], dtype=dtype) if v_init is None else v_init.clone()
    spikes = torch.empty(shape, dtype=dtype)
    hs = torch.empty(shape, dtype=dtype) if return_h else None
    fired = torch.zeros(shape[1:], dtype=dtype)
    for t in range(shape[0]):
        leak = v if v_reset == 0 else v - v_reset
        h = torch.sub(current_at(t, fired), leak).div_(tau).add_(v)  # v + (I - (v - v_reset)) / tau, same rounding
        fired = torch.ge(h, v_th, out=spikes[t])
        if hs is not None:
            hs[t] = h
        if soft_reset:
            v = h.sub_(fired, alpha=v_th)
        elif v_reset == 0:
            v = h.sub_(h * fired)  # h - h = +0 where it fired, h - 0 = h elsewhere
        else:
            v = h.mul_(1 - fired).add_(fired, alpha=v_reset)
    return as_uint8(spikes), None, hs


def as_uint8(spikes: torch.Tensor) -> torch.Tensor:
    """0/1 floats -> uint8 on the CPU through numpy: measured 127 us against torch's 514 us for 4x128x1024 values
    (torch 2.13's float -> uint8 cast is not vectorised on this build); exact for 0 and 1."""
    return torch.from_numpy(spikes.numpy().astype(np.uint8))


def _reco(ctx, *ins):
    """ReCo against per-sample B rows in the runtime's [T, B, D] layout (the shared kernel hands the twin, and the
    triton backend its kernel, [B, T*D] rows, which costs two transposed copies of each operand); the
    frequency-aware, per-class and each-step forms are the shared kernel's."""
    n = ctx.node
    if n.attrs["freq"] or n.attrs["rows"] == "each_step" or ctx.per_class(ctx.launch.reads[1]):
        return KERNELS["reco_loss_grad"](ctx, *ins)
    (a, b), args = loss_operands(ctx, ins)
    # rows='step': every (step, sample) is a row, i.e. one "step" of T*B rows in the batched form
    T, B = (1, ctx.T * a.shape[1]) if n.attrs["rows"] == "step" else (ctx.T, a.shape[1])
    loss, da, db = reco_loss_grad_steps(a.reshape(T, B, -1), b.reshape(T, B, -1),
                                        args.get(LABELS), n.attrs["lam"], n.attrs["negatives"], n.attrs["eps"])
    return loss_outputs(ctx, loss, [da.reshape(a.shape), db.reshape(b.shape)], args)


def cpu_backend() -> Backend:
    """The torch kernels, the native LIF loop and the Philox Poisson encoder, on the CPU."""
    keep_freed_memory()  # large tensors would otherwise be paged in afresh at every step (runtime/heap.py)
    return Backend("cpu", {**KERNELS, "reco_loss_grad": _reco},
                   {**TWIN_PRIMS, "lif_forward": lif_forward, "rec_lif_forward": rec_lif_forward,
                    "poisson_encode": poisson_encode})


def cpu_runtime(program, **kwargs) -> Executor:
    """A program on the cpu backend (``Executor`` keywords: params, opt, seed, state, dedup, time_invariant)."""
    return Executor(program, cpu_backend(), **kwargs)
