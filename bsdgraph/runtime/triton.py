"""The triton backend: the plan executed with the fused Triton kernels of ``kernels/``.

It is the cpu backend's kernel table with the primitives swapped for the Triton launchers (LIF forward and
backward, ReCo loss + gradients, weight gradient, Poisson encoding) and the Linear+LIF pair run as one fused
launch. Convolutions, batchnorm, pooling and the optimiser step stay torch calls (on the GPU: cuDNN and fused
AdamW). On CUDA tensors the kernels are compiled; on CPU tensors they run in Triton's interpreter, which is for
tests only and needs ``TRITON_INTERPRET=1`` before ``kernels`` is imported.
"""

from __future__ import annotations

import torch

from bsdgraph import env
from bsdgraph.compiler.plan import Kind, Ref, value
from bsdgraph.runtime.executor import Backend, Executor
from bsdgraph.runtime.torch_kernels import KERNELS as TORCH_KERNELS, _grouping, _wb, neuron_outputs


def available() -> tuple[bool, str]:
    """Whether this process can run the triton backend, and why not."""
    if torch.cuda.is_available():
        return True, "cuda"
    if env.TRITON_INTERPRET.get():
        return True, "cpu (Triton interpreter: slow, for tests)"
    return False, "the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 to run kernels interpreted on CPU)"


def _prims() -> dict:
    from kernels.encode import poisson_encode
    from kernels.lif import lif_backward
    from kernels.local_update import weight_grad
    from kernels.reco import reco_loss_grad
    from kernels.ref.linear_lif import rec_lif_backward

    from bsdgraph.runtime.neurons import triton_backward, triton_forward

    # rec_lif_backward (recurrent_credit='through_time') has no Triton kernel yet: its closed form in torch ops
    return dict(lif_forward=_generated_lif, lif_backward=lif_backward, weight_grad=weight_grad,
                reco_loss_grad=reco_loss_grad, poisson_encode=poisson_encode, neuron_forward=triton_forward,
                neuron_backward=triton_backward, rec_lif_backward=rec_lif_backward)


def _generated_lif(current, tau, v_th, v_reset, soft_reset, v_init=None, return_h=False):
    """The LIF forward from the ``lif``/``lif_soft`` declaration's generated kernel (compiler/neuron_gen.py), which
    replaced the hand-written kernels/lif.py forward (kept as the test oracle; spikes and h are bitwise equal,
    tests/test_neurons.py). ``v_init`` is not part of the generated contract: no engine launch passes one."""
    from bsdgraph.ir.neurons import NEURONS
    from bsdgraph.runtime.neurons import triton_forward

    if v_init is not None:
        raise ValueError("lif_forward: the generated LIF kernel starts from v = 0; v_init is not supported")
    out, h = triton_forward(NEURONS["lif_soft" if soft_reset else "lif"], {"tau": tau, "v_th": v_th,
                                                                           "v_reset": v_reset},
                            current, return_h)
    return out, h


def _spikes_in(ctx, src, in_features: int) -> torch.Tensor:
    """The launch's input as the contiguous [T, B, K] uint8 or float32 tensor the fused kernels take (a
    time-invariant stimulus is expanded over T)."""
    s_in = src.unsqueeze(0).expand(ctx.T, *src.shape) if ctx.time_invariant(ctx.launch.reads[0]) else src
    s_in = s_in.reshape(ctx.T, -1, in_features).contiguous()
    return s_in if s_in.dtype in (torch.uint8, torch.float32) else s_in.to(torch.float32)


def _linear_lif(ctx, src, *rest):
    """One fused launch: I[t] = s[t] W^T + b and the LIF update in registers; V (and h) stored only if a loss
    reads them."""
    from kernels.linear_lif import linear_lif_forward

    syn, lif = ctx.launch.nodes
    a = ctx.graph[lif].attrs
    w, b = _wb(ctx.args((src, *rest)), syn)
    spikes, v, h = linear_lif_forward(_spikes_in(ctx, src, ctx.graph[syn].attrs["in_features"]), w, b, a["tau"],
                                      a["v_th"], a["v_reset"], a["reset"] == "soft", ctx.wants(value(syn)),
                                      ctx.wants(Ref(Kind.MEMBRANE, lif)))
    return neuron_outputs(ctx, lif, spikes, h, syn, v, _grouping(rest))


def _linear_lif_rec(ctx, src, *rest):
    """A recurrent layer in one launch: feedforward and recurrent GEMM tiles and the LIF update inside the kernel's
    time loop (kernels/linear_lif.py, ``linear_lif_rec_forward``)."""
    from kernels.linear_lif import linear_lif_rec_forward

    ff, rec, add, lif = ctx.launch.nodes
    a = ctx.graph[lif].attrs
    args = ctx.args((src, *rest))
    spikes, v, h = linear_lif_rec_forward(
        _spikes_in(ctx, src, ctx.graph[ff].attrs["in_features"]), *_wb(args, ff), *_wb(args, rec), a["tau"],
        a["v_th"], a["v_reset"], a["reset"] == "soft", ctx.wants(value(add)), ctx.wants(Ref(Kind.MEMBRANE, lif)))
    return neuron_outputs(ctx, lif, spikes, h, add, v, _grouping(rest))


def triton_backend(device: str | torch.device | None = None, fuse_linear_lif: bool | None = None) -> Backend:
    """The torch kernel table with the primitives swapped for the Triton launchers, and the recurrent layer (and,
    if ``fuse_linear_lif``, each Linear+LIF pair) as one fused launch.

    ``fuse_linear_lif`` defaults to unfused on CUDA, fused elsewhere (the interpreter, i.e. the CPU tests).
    Measured on an H200 (bench/out/gpu_run_h200_1.txt): the fused kernel's ``tl.dot`` in IEEE fp32 runs on FMA
    units at 2.5-2.9 TFLOP/s for T=4, B=128, 784->1024, while cuBLAS's fp32 GEMM reaches ~50 TFLOP/s; the spike
    tensor it saves writing is small beside that. The unfused path (a torch GEMM over all T*B rows, then the
    Triton LIF kernel) also computes a time-invariant first layer once instead of T times."""
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fuse = device.type != "cuda" if fuse_linear_lif is None else fuse_linear_lif
    kernels = {**TORCH_KERNELS, "linear_lif_rec_forward": _linear_lif_rec,
               **({"linear_lif_forward": _linear_lif} if fuse else {})}
    return Backend("triton", kernels, _prims(), device)


def triton_runtime(program, device: str | None = None, fuse_linear_lif: bool | None = None, **kwargs) -> Executor:
    return Executor(program, triton_backend(device, fuse_linear_lif), **kwargs)
