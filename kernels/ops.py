"""The launchers as torch custom ops (``torch.ops.bsdgraph.*``), so code under ``torch.compile`` does not break
its graph at a Triton launch: Dynamo sees an opaque op whose output shapes come from the ``register_fake``
functions below, and calls the launcher at run time.

Custom ops cannot return ``None``, so these are fixed-arity versions of the launchers: an output that was not
requested (h, V, db) comes back as an empty float32 tensor of shape [0] instead of ``None``. Everything else —
arguments, dtypes, checks, results — is the launcher's (``kernels.<name>``); import this module explicitly
(``import kernels.ops``) to register the ops. No autograd formula is registered: the engine computes its
local gradients explicitly (``lif_backward``, ``reco_loss_grad``, ``weight_grad``), never through autograd.
"""

from typing import Optional

import torch
from torch import Tensor

from kernels import encode, lif, linear_lif, local_update, reco


def _absent(like: Tensor) -> Tensor:
    """Stand-in for an output that was not requested."""
    return like.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("bsdgraph::lif_forward", mutates_args=())
def lif_forward(
    current: Tensor, tau: float, v_th: float, v_reset: float, soft_reset: bool, v_init: Optional[Tensor],
    return_h: bool,
) -> tuple[Tensor, Tensor]:
    """``kernels.lif.lif_forward``; h is an empty tensor unless ``return_h``."""
    spikes, h = lif.lif_forward(current, tau, v_th, v_reset, soft_reset, v_init, return_h)
    return spikes, (_absent(current) if h is None else h)


@lif_forward.register_fake
def _(current, tau, v_th, v_reset, soft_reset, v_init, return_h):
    h = torch.empty_like(current) if return_h else _absent(current)
    return torch.empty_like(current, dtype=torch.uint8), h


@torch.library.custom_op("bsdgraph::lif_backward", mutates_args=())
def lif_backward(
    grad_h: Tensor, h: Tensor, tau: float, v_th: float, v_reset: float, soft_reset: bool, alpha: float
) -> Tensor:
    """``kernels.lif.lif_backward``."""
    return lif.lif_backward(grad_h, h, tau, v_th, v_reset, soft_reset, alpha)


@lif_backward.register_fake
def _(grad_h, h, tau, v_th, v_reset, soft_reset, alpha):
    return torch.empty_like(h)


@torch.library.custom_op("bsdgraph::linear_lif_forward", mutates_args=())
def linear_lif_forward(
    s_in: Tensor, weight: Tensor, bias: Optional[Tensor], tau: float, v_th: float, v_reset: float,
    soft_reset: bool, return_v: bool, return_h: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``kernels.linear_lif.linear_lif_forward``; V and h are empty tensors unless requested."""
    spikes, v, h = linear_lif.linear_lif_forward(
        s_in, weight, bias, tau, v_th, v_reset, soft_reset, return_v, return_h
    )
    return spikes, (_absent(weight) if v is None else v), (_absent(weight) if h is None else h)


@linear_lif_forward.register_fake
def _(s_in, weight, bias, tau, v_th, v_reset, soft_reset, return_v, return_h):
    shape = (s_in.shape[0], s_in.shape[1], weight.shape[0])
    potential = weight.new_empty(shape)
    return (
        s_in.new_empty(shape, dtype=torch.uint8),
        potential.clone() if return_v else _absent(weight),
        potential.clone() if return_h else _absent(weight),
    )


@torch.library.custom_op("bsdgraph::reco_loss_grad", mutates_args=())
def reco_loss_grad(
    v: Tensor, v_hat: Tensor, labels: Optional[Tensor], lam: float, negatives: str, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``kernels.reco.reco_loss_grad``."""
    return reco.reco_loss_grad(v, v_hat, labels, lam, negatives, eps)


@reco_loss_grad.register_fake
def _(v, v_hat, labels, lam, negatives, eps):
    return v.new_empty(()), torch.empty_like(v), torch.empty_like(v_hat)


@torch.library.custom_op("bsdgraph::weight_grad", mutates_args=())
def weight_grad(grad_out: Tensor, inp: Tensor, with_bias: bool) -> tuple[Tensor, Tensor]:
    """``kernels.local_update.weight_grad``; db is an empty tensor unless ``with_bias``."""
    dw, db = local_update.weight_grad(grad_out, inp, with_bias)
    return dw, (_absent(grad_out) if db is None else db)


@weight_grad.register_fake
def _(grad_out, inp, with_bias):
    n = grad_out.shape[-1]
    db = grad_out.new_empty((n,)) if with_bias else _absent(grad_out)
    return grad_out.new_empty((n, inp.shape[-1])), db


@torch.library.custom_op("bsdgraph::poisson_encode", mutates_args=())
def poisson_encode(x: Tensor, T: int, seed: int) -> Tensor:
    """``kernels.encode.poisson_encode``."""
    return encode.poisson_encode(x, T, seed)


@poisson_encode.register_fake
def _(x, T, seed):
    return x.new_empty((T, *x.shape), dtype=torch.uint8)
