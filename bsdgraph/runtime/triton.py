"""The triton backend: the plan executed with the fused Triton kernels of ``kernels/``.

It is the cpu backend's kernel table with the primitives swapped for the Triton launchers (LIF forward and
backward, ReCo loss + gradients, weight gradient, Poisson encoding) and the Linear+LIF pair run as one fused
launch. Convolutions, batchnorm, pooling and the optimiser step stay torch calls (on the GPU: cuDNN and fused
AdamW). On CUDA tensors the kernels are compiled; on CPU tensors they run in Triton's interpreter, which is for
tests only and needs ``TRITON_INTERPRET=1`` before ``kernels`` is imported.
"""

from __future__ import annotations

import os

import torch

from bsdgraph.compiler.lower import Launch
from bsdgraph.runtime.executor import Executor
from bsdgraph.runtime.torch_kernels import KERNELS as TORCH_KERNELS, store_lif


def available() -> tuple[bool, str]:
    """Whether this process can run the triton backend, and why not."""
    if torch.cuda.is_available():
        return True, "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "cpu (Triton interpreter: slow, for tests)"
    return False, "the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 to run kernels interpreted on CPU)"


def _prims() -> dict:
    from kernels.encode import poisson_encode
    from kernels.lif import lif_backward, lif_forward
    from kernels.local_update import weight_grad
    from kernels.reco import reco_loss_grad

    return dict(lif_forward=lif_forward, lif_backward=lif_backward, weight_grad=weight_grad,
                reco_loss_grad=reco_loss_grad, poisson_encode=poisson_encode)


def _spikes_in(ex, la: Launch, in_features: int) -> torch.Tensor:
    """The launch's input as the contiguous [T, B, K] uint8 or float32 tensor the fused kernels take (a
    time-invariant stimulus is expanded over T)."""
    s_in = ex.buf[la.reads[0]]
    s_in = s_in.unsqueeze(0).expand(ex.T, *s_in.shape) if ex.is_time_invariant(la.reads[0]) else s_in
    s_in = s_in.reshape(ex.T, -1, in_features).contiguous()
    return s_in if s_in.dtype in (torch.uint8, torch.float32) else s_in.to(torch.float32)


def _linear_lif(ex, la: Launch):
    """One fused launch: I[t] = s[t] W^T + b and the LIF update in registers; V (and h) stored only if a loss
    reads them. Without fusion (the default on CUDA, see ``TritonRuntime``): one torch GEMM over all T*B rows
    (or one over B rows for a time-invariant stimulus), then the Triton LIF kernel."""
    from kernels.linear_lif import linear_lif_forward

    if not ex.fuse_linear_lif:
        return TORCH_KERNELS["linear_lif_forward"](ex, la)
    syn, lif = la.nodes
    a = ex.node(lif).attrs
    spikes, v, h = linear_lif_forward(_spikes_in(ex, la, ex.node(syn).attrs["in_features"]),
                                      ex.params[f"{syn}.weight"], ex.params.get(f"{syn}.bias"), a["tau"],
                                      a["v_th"], a["v_reset"], a["reset"] == "soft", syn in la.writes,
                                      f"h:{lif}" in la.writes)
    store_lif(ex, lif, spikes, h, syn, v)


def _linear_lif_rec(ex, la: Launch):
    """A recurrent layer in one launch: feedforward and recurrent GEMM tiles and the LIF update inside the kernel's
    time loop (kernels/linear_lif.py, ``linear_lif_rec_forward``)."""
    from kernels.linear_lif import linear_lif_rec_forward

    ff, rec, add, lif = la.nodes
    a = ex.node(lif).attrs
    spikes, v, h = linear_lif_rec_forward(
        _spikes_in(ex, la, ex.node(ff).attrs["in_features"]), ex.params[f"{ff}.weight"], ex.params.get(f"{ff}.bias"),
        ex.params[f"{rec}.weight"], ex.params.get(f"{rec}.bias"), a["tau"], a["v_th"], a["v_reset"],
        a["reset"] == "soft", add in la.writes, f"h:{lif}" in la.writes)
    store_lif(ex, lif, spikes, h, add, v)


KERNELS = {**TORCH_KERNELS, "linear_lif_forward": _linear_lif, "linear_lif_rec_forward": _linear_lif_rec}


class TritonRuntime(Executor):
    """``fuse_linear_lif``: run each Linear+LIF pair as the fused kernel (True) or as a torch GEMM followed by the
    Triton LIF kernel (False). Default: unfused on CUDA, fused elsewhere (the interpreter, i.e. the CPU tests).
    Measured on an H200 (bench/out/gpu_run_h200_1.txt): the fused kernel's ``tl.dot`` in IEEE fp32 runs on FMA
    units at 2.5-2.9 TFLOP/s for T=4, B=128, 784->1024, while cuBLAS's fp32 GEMM reaches ~50 TFLOP/s; the spike
    tensor it saves writing is small beside that. The unfused path also computes a time-invariant first layer
    once instead of T times."""

    name = "triton"

    def __init__(self, g, device: str | None = None, fuse_linear_lif: bool | None = None, **kwargs):
        ok, why = available()
        if not ok:
            raise RuntimeError(why)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.fuse_linear_lif = device.type != "cuda" if fuse_linear_lif is None else fuse_linear_lif
        super().__init__(g, KERNELS, _prims(), device=device, **kwargs)
