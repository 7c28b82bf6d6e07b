"""Torch twins of the Triton kernels in ``kernels/``: same signatures, plain torch, any float dtype.

They are the executable specification: every kernel is tested against its twin (in float64 where a
tolerance is involved), and the CPU runtime may call them directly.
"""

from kernels.ref.encode import poisson_encode
from kernels.ref.lif import lif_backward, lif_forward
from kernels.ref.linear_lif import linear_lif_forward
from kernels.ref.local_update import weight_grad
from kernels.ref.reco import reco_loss_grad

__all__ = ["lif_backward", "lif_forward", "linear_lif_forward", "poisson_encode", "reco_loss_grad", "weight_grad"]
