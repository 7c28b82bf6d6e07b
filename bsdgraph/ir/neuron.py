"""The discrete LIF neuron of the spec, in plain torch with autograd: the contract kernels are tested against.

Per step t, per neuron (tau in steps):

    h[t] = v[t-1] + (I[t] - (v[t-1] - v_reset)) / tau
    s[t] = 1 if h[t] >= v_th else 0
    v[t] = v_reset if s[t] else h[t]        (hard reset)      v[t] = h[t] - v_th s[t]   (soft reset)
    v[-1] = 0

The spike's gradient is the atan surrogate ds/dh = alpha / (2 (1 + (pi alpha (h - v_th) / 2)^2)); it only matters
where a loss is taken through a spike (``distill_on=membrane``). The reset is differentiated through the
surrogate too (the "reset path").
"""

from __future__ import annotations

import torch

from kernels.ref.lif import SpikeFn, lif_recurrence


def lif_scan(current: torch.Tensor, tau: float, v_th: float, v_reset: float, soft_reset: bool,
             alpha: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the LIF over ``current`` [T, ...]; returns (spikes as 0/1 floats, pre-reset membrane h), both [T, ...].

    The recurrence is the kernels' torch twin (one definition of the neuron in the project); spikes carry the
    surrogate gradient."""
    return lif_recurrence(current, tau, v_th, v_reset, soft_reset, None, lambda h: SpikeFn.apply(h, v_th, alpha))
