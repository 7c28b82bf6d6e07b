"""Discrete LIF neuron: fused forward over time and its surrogate-gradient backward.

Contract (the engine calls exactly these; the torch twin in ``kernels/ref/lif.py`` is the specification):

    lif_forward(current, tau, v_th, v_reset, soft_reset, v_init=None, return_h=False) -> (spikes, h | None)
        current  float32 [T, *] contiguous (trailing dims are flattened to M neurons)
        v_init   None (zeros) or float32 of shape current.shape[1:]
        spikes   uint8 [T, *];  h (pre-reset membrane) float32 [T, *] only when return_h

        h[t] = v[t-1] + (I[t] - (v[t-1] - v_reset)) / τ ;  s[t] = [h[t] >= v_th]
        v[t] = v_reset if s[t] else h[t]   (hard)   |   v[t] = h[t] - v_th s[t]   (soft)

    lif_backward(grad_h, h, tau, v_th, v_reset, soft_reset, alpha=2.0) -> grad_current   (float32 [T, *])
        σ'(h) = α / (2 (1 + (π α (h - v_th) / 2)^2))                        (atan surrogate)
        dv/dh = (1 - s) + (v_reset - h) σ'(h)   (hard)   |   1 - v_th σ'(h)   (soft)
        g_h[t] = grad_h[t] + g_h[t+1] (1 - 1/τ) dv[t]/dh[t],  g_h[T] = 0;   dL/dI[t] = g_h[t] / τ

One program owns a block of neurons and walks the time axis with the membrane in registers, so each input
element is read once and each output written once: the kernels are memory bound by design.

This module also holds the launcher checks shared by every kernel file (``check_tensor`` and friends) and the
one-step neuron update ``lif_step`` that ``linear_lif`` fuses after its matmul, so the neuron equations exist
once.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import triton
import triton.language as tl

from kernels.ref.lif import as_float32  # noqa: F401 -- the launchers' (and linear_lif's) scalar rounding

# One block of neurons per program: 1024 lanes = 4 warps x 32 threads x 8 elements, the block of Triton's
# vector-add tutorial for streaming kernels (not tuned here: no GPU). Under the interpreter one big block keeps
# the program count, and so the Python overhead, low.
MAX_BLOCK = 1024


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated while TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_tensor(
    fn: str,
    name: str,
    t,
    dtypes: Iterable[torch.dtype],
    kernel,
    ndim: Optional[int] = None,
    min_ndim: Optional[int] = None,
) -> None:
    """Raise ``ValueError`` naming ``fn`` and ``name`` unless ``t`` is a launchable tensor of one of ``dtypes``."""
    dtypes = tuple(dtypes)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{fn}: {name} must have dtype {want}, got {t.dtype}; convert it with .to({dtypes[0]})")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{fn}: {name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{fn}: {name} must be contiguous (got strides {t.stride()}); call .contiguous() first")
    if t.device.type == "cpu" and not is_interpreted(kernel):
        raise ValueError(
            f"{fn}: {name} is a CPU tensor but Triton is compiling for a GPU; move it to CUDA, or set "
            "TRITON_INTERPRET=1 before `kernels` is first imported to run the kernels on CPU"
        )


def check_same_device(fn: str, **tensors: Optional[torch.Tensor]) -> None:
    """Raise ``ValueError`` unless all given (non-None) tensors live on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{fn}: all tensors must be on one device, got {listing}")


def check_neuron_params(fn: str, tau: float, v_th: float, v_reset: float) -> None:
    """Raise ``ValueError`` unless τ > 0 and all parameters are finite numbers."""
    for name, value in (("tau", tau), ("v_th", v_th), ("v_reset", v_reset)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{fn}: {name} must be a finite number, got {value!r}")
    if tau <= 0:
        raise ValueError(f"{fn}: tau must be > 0 (time constant in steps), got {tau}")


def block_size(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi]: fixed blocks, no autotuning."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


@triton.jit
def lif_step(v, current, tau, v_th, v_reset, SOFT_RESET: tl.constexpr):
    """One neuron step on a block: returns (spike mask, h, next v)."""
    # div_rn: Triton's `/` on fp32 lowers to div.full.f32 on NVIDIA (<= 2 ulp); IEEE division keeps h bitwise
    # equal to the torch twin, so a spike can only differ where the inputs themselves differ.
    h = v + tl.math.div_rn(current - (v - v_reset), tau)
    spike = h >= v_th
    if SOFT_RESET:
        v_next = h - tl.where(spike, v_th, 0.0)
    else:
        v_next = tl.where(spike, v_reset, h)
    return spike, h, v_next


@triton.jit
def _lif_forward_kernel(
    cur_ptr, v_init_ptr, spk_ptr, h_ptr,
    T, M, stride_t,
    tau, v_th, v_reset,
    BLOCK: tl.constexpr, SOFT_RESET: tl.constexpr, HAS_V_INIT: tl.constexpr, RETURN_H: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    if HAS_V_INIT:
        v = tl.load(v_init_ptr + offs, mask=mask, other=0.0)
    else:
        v = tl.zeros([BLOCK], dtype=tl.float32)
    # Pointers advance by one time row per step: 64-bit pointer arithmetic, no int32 overflow of t * stride_t.
    cur_ptrs, spk_ptrs, h_ptrs = cur_ptr + offs, spk_ptr + offs, h_ptr + offs
    for _ in range(T):
        current = tl.load(cur_ptrs, mask=mask, other=0.0)
        spike, h, v = lif_step(v, current, tau, v_th, v_reset, SOFT_RESET)
        tl.store(spk_ptrs, spike.to(tl.uint8), mask=mask)
        if RETURN_H:
            tl.store(h_ptrs, h, mask=mask)
        cur_ptrs += stride_t
        spk_ptrs += stride_t
        h_ptrs += stride_t


def lif_forward(
    current: torch.Tensor,
    tau: float,
    v_th: float,
    v_reset: float,
    soft_reset: bool,
    v_init: Optional[torch.Tensor] = None,
    return_h: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the LIF neuron over ``current`` [T, *]; see the module docstring for the contract."""
    fn = "lif_forward"
    check_tensor(fn, "current", current, [torch.float32], _lif_forward_kernel, min_ndim=1)
    check_neuron_params(fn, tau, v_th, v_reset)
    if v_init is not None:
        check_tensor(fn, "v_init", v_init, [torch.float32], _lif_forward_kernel)
        if v_init.shape != current.shape[1:]:
            raise ValueError(
                f"{fn}: v_init must have shape current.shape[1:] = {tuple(current.shape[1:])}, "
                f"got {tuple(v_init.shape)}"
            )
        check_same_device(fn, current=current, v_init=v_init)
    T = current.shape[0]
    M = math.prod(current.shape[1:])
    spikes = torch.empty(current.shape, dtype=torch.uint8, device=current.device)
    h = torch.empty_like(current) if return_h else None
    if T * M == 0:
        return spikes, h
    BLOCK = block_size(M, 16, MAX_BLOCK)
    _lif_forward_kernel[(triton.cdiv(M, BLOCK),)](
        current, current if v_init is None else v_init, spikes, spikes if h is None else h,
        T, M, M,
        as_float32(tau), as_float32(v_th), as_float32(v_reset),
        BLOCK=BLOCK, SOFT_RESET=bool(soft_reset), HAS_V_INIT=v_init is not None, RETURN_H=bool(return_h),
    )
    return spikes, h


@triton.jit
def _lif_backward_kernel(
    gh_ptr, h_ptr, gi_ptr,
    T, M, stride_t,
    tau, v_th, v_reset, alpha,
    BLOCK: tl.constexpr, SOFT_RESET: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    # Start at the last time row and walk back (reverse-mode through the recurrence).
    # tl.cast, not .to(): Triton specialises an int argument equal to 1 into a constexpr, which has no .to().
    last = tl.cast(T - 1, tl.int64) * stride_t
    gh_ptrs, h_ptrs, gi_ptrs = gh_ptr + last + offs, h_ptr + last + offs, gi_ptr + last + offs
    decay = 1.0 - 1.0 / tau
    g_next = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(T):
        grad_h = tl.load(gh_ptrs, mask=mask, other=0.0)
        h = tl.load(h_ptrs, mask=mask, other=0.0)
        x = 3.141592653589793 * alpha * (h - v_th) / 2.0
        surrogate = alpha / (2.0 * (1.0 + x * x))
        if SOFT_RESET:
            dv_dh = 1.0 - v_th * surrogate
        else:
            # The reset path: v = h(1 - s) + v_reset s, so dv/dh picks up (v_reset - h) ds/dh.
            dv_dh = tl.where(h >= v_th, 0.0, 1.0) + (v_reset - h) * surrogate
        g = grad_h + g_next * decay * dv_dh
        tl.store(gi_ptrs, g / tau, mask=mask)
        g_next = g
        gh_ptrs -= stride_t
        h_ptrs -= stride_t
        gi_ptrs -= stride_t


def lif_backward(
    grad_h: torch.Tensor,
    h: torch.Tensor,
    tau: float,
    v_th: float,
    v_reset: float,
    soft_reset: bool,
    alpha: float = 2.0,
) -> torch.Tensor:
    """dL/dI[t] from dL/dh[t] and the forward's h (both float32 [T, *]); see the module docstring."""
    fn = "lif_backward"
    check_tensor(fn, "grad_h", grad_h, [torch.float32], _lif_backward_kernel, min_ndim=1)
    check_tensor(fn, "h", h, [torch.float32], _lif_backward_kernel, min_ndim=1)
    if grad_h.shape != h.shape:
        raise ValueError(f"{fn}: grad_h and h must have the same shape, got {tuple(grad_h.shape)} and {tuple(h.shape)}")
    check_same_device(fn, grad_h=grad_h, h=h)
    check_neuron_params(fn, tau, v_th, v_reset)
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{fn}: alpha (surrogate sharpness) must be a number > 0, got {alpha!r}")
    grad_current = torch.empty_like(h)
    T = h.shape[0]
    M = math.prod(h.shape[1:])
    if h.numel() == 0:
        return grad_current
    BLOCK = block_size(M, 16, MAX_BLOCK)
    _lif_backward_kernel[(triton.cdiv(M, BLOCK),)](
        grad_h, h, grad_current,
        T, M, M,
        as_float32(tau), as_float32(v_th), as_float32(v_reset), as_float32(alpha),
        BLOCK=BLOCK, SOFT_RESET=bool(soft_reset),
    )
    return grad_current
