"""Shadow validation (``BSDGRAPH_VALIDATE=1``): every launch's reference twin runs beside it, and the first launch
whose outputs differ stops the step, named (tinygrad's ``VALIDATE_WITH_CPU`` habit).

The twin of a launch is the same kernel name in the torch table (``runtime/torch_kernels.py``) with the torch
twins as primitives (``kernels/ref/``), on CPU copies of the launch's inputs: what the backend computed is
checked against the executable specification of that one launch, so a wrong kernel is found where it goes
wrong instead of as a loss that drifts many launches later. Launches that only update state in place (the
optimiser) are not run twice; batchnorm's running statistics are copied for the twin.

Tolerances: float outputs agree to rtol 1e-3, atol 1e-5 (a fused kernel sums in another order than torch's
GEMM); spikes (uint8) are equal except where that order tips a membrane that sits on the threshold, which is
allowed for at most 0.1 % of them. Data-parallel collectives ("dp:" launches) have no twin and are not checked.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bsdgraph.compiler.plan import Kind, Launch
from bsdgraph.errors import UserError
from bsdgraph.runtime.context import Ctx, Grouping
from bsdgraph.runtime.torch_kernels import KERNELS, TWIN_PRIMS

SPIKE_MISMATCH = 1e-3   # largest fraction of spikes allowed to differ (threshold ties)
RTOL, ATOL = 1e-3, 1e-5
SKIPPED = {"torch.adamw_step"}  # updates parameters and optimiser state in place: not re-run


class ValidationError(UserError):
    """A launch's outputs differ from its reference twin's; the message names the launch."""


def _cpu(v):
    if isinstance(v, torch.Tensor):
        return v.detach().to("cpu").clone()
    if isinstance(v, Grouping):
        return Grouping(*(_cpu(t) for t in v))
    return v


def _differs(got, want) -> str | None:
    """Why ``got`` is not ``want`` (None: they agree)."""
    if isinstance(want, Grouping):
        for name, g, w in zip(Grouping._fields, got, want):
            if not torch.equal(g.cpu(), w):
                return f"{name} differs"
        return None
    if not isinstance(want, torch.Tensor):
        return None if got == want or abs(float(got) - float(want)) <= ATOL + RTOL * abs(float(want)) else \
            f"{float(got)} against {float(want)}"
    got = torch.as_tensor(got).detach().cpu()
    if got.shape != want.shape:
        return f"shape {list(got.shape)} against {list(want.shape)}"
    if want.dtype == torch.uint8:
        frac = float((got != want).float().mean()) if want.numel() else 0.0
        return None if frac <= SPIKE_MISMATCH else f"{100 * frac:.2f} % of the spikes differ"
    got, want = got.float(), want.float()
    if torch.allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True):
        return None
    err = (got - want).abs().max()
    return f"largest difference {float(err):.3g} (values up to {float(want.abs().max()):.3g})"


class ShadowValidator:
    """An observer (``Executor.observe``) that re-runs each launch with the torch twins and compares."""

    def __init__(self, executor):
        self.ex = executor
        self.prims = SimpleNamespace(**TWIN_PRIMS)
        self.checked = 0

    def __call__(self, la: Launch, ins: tuple, outs: tuple) -> None:
        twin = KERNELS.get(la.kernel)
        if twin is None or la.kernel in SKIPPED:
            return
        ctx = self.ex.context(la, training=True)
        ctx = Ctx(la, ctx.graph, ctx.plan, self.prims, torch.device("cpu"), self._training(la, outs), ctx.owned)
        # in-place state (batchnorm's running statistics) was already updated by the launch: the twin gets the
        # values from before, which the launch's inputs no longer hold, so only its outputs are compared
        want = twin(ctx, *(_cpu(v) for v in ins))
        for ref, got, w in zip(la.writes, outs, want):
            if w is None or got is None or ref.kind in (Kind.PARAM, Kind.STATE):
                continue
            why = _differs(got, w)
            if why:
                nodes = "+".join(la.nodes) or "-"
                raise ValidationError(f"BSDGRAPH_VALIDATE: launch {la.index} ({la.kernel} of {nodes}) differs from "
                                      f"its reference twin in {ref}: {why}")
        self.checked += 1

    @staticmethod
    def _training(la: Launch, outs: tuple) -> bool:
        """A batchnorm launch trained (batch statistics) iff it wrote its statistics."""
        stats = [o for w, o in zip(la.writes, outs) if w.kind == Kind.STATS]
        return not stats or stats[0] is not None
