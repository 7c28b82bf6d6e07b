"""Fused Triton kernels of bsdgraph's ``triton`` runtime, each with a torch twin in ``kernels/ref/`` (same
signature; the twin is the specification the tests compare against).

    lif.py           lif_forward, lif_backward          LIF neuron over time; surrogate-gradient recurrence
    linear_lif.py    linear_lif_forward                 Linear synapse (tl.dot) fused with the LIF neuron
    reco.py          reco_loss_grad                     ReCo loss and both gradients in closed form
    local_update.py  weight_grad                        dW = grad_outᵀ inp, db = Σ grad_out of a Linear synapse
    encode.py        poisson_encode                     Bernoulli spikes from Triton's Philox stream
    split_gemm.py    spike_linear_split                 spikes x fp32 weights on bf16 tensor cores, the weight
                                                        split in 2-3 bf16 parts (fp32-level error; not yet used
                                                        by a backend, never run on a GPU)
    ops.py           torch.ops.bsdgraph.*               the same as torch custom ops, for torch.compile
                                                        (import ``kernels.ops`` explicitly to register them)

Launchers take float32 (spikes: uint8) contiguous tensors on one device, allocate their outputs there, and
raise ``ValueError`` on anything else. On CUDA tensors the kernels are compiled; on CPU tensors they run in
Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment before this package is first
imported (``tests/conftest.py`` does that, and hides CUDA: the test suite is the CPU suite).

The exports below are resolved lazily (PEP 562): importing ``kernels.ref`` (the torch twins, which the cpu
runtime uses) must neither import Triton nor decorate any kernel, since Triton fixes interpreted-or-compiled
when a kernel is decorated, and the twins need torch alone.
"""

import importlib

_EXPORTS = {
    "lif_backward": "kernels.lif",
    "lif_forward": "kernels.lif",
    "linear_lif_forward": "kernels.linear_lif",
    "poisson_encode": "kernels.encode",
    "reco_loss_grad": "kernels.reco",
    "spike_linear_split": "kernels.split_gemm",
    "weight_grad": "kernels.local_update",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
