"""The BPTT baseline ("BP on SNN" in the paper): the same forward network F trained with surrogate-gradient
backpropagation through time, CE (or MSE) on the top layer. Runs on the reference interpreter, with autograd over
the whole unrolled network: the global backward pass that BSD avoids."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bsdgraph.ir.graph import Graph, Op, Stream
from bsdgraph.runtime.losses import class_codes, class_loss
from bsdgraph.runtime.common import StepResult, clip_per_node, rates_of, readout
from bsdgraph.runtime.heap import keep_freed_memory
from bsdgraph.runtime.reference import ReferenceRuntime, run_graph


class BPTTRuntime(ReferenceRuntime):
    """Same weights, state, optimiser and ``predict`` as the reference runtime; only the step differs."""

    name = "bptt"

    def __init__(self, f: Graph, *args, smoothing: float = 0.0, **kwargs):
        """``smoothing``: label smoothing of the top CE (BSD's ``label_smoothing``, so both rules learn one loss)."""
        if any(e.detach for e in f.edges):
            raise ValueError("BPTT trains the forward network F: pass the graph from build(), not the BSD graph")
        keep_freed_memory()  # as the cpu backend does: timings of BSD and BPTT compare like with like
        super().__init__(f, *args, **kwargs)
        self.out, self.smoothing = f.by_op(Op.OUTPUT)[0], smoothing

    def loss(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.out.attrs["task"] == "classification":
            return class_loss(v, y, self.out.attrs["population"], self.out.attrs["target"] == "sequence",
                              self.smoothing, class_codes(self.out.attrs, v.shape[-1], v.device))
        pred = readout(self.out, v)
        return F.mse_loss(pred, y.to(v.dtype).reshape(pred.shape))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        y = y.to(self.device)
        env = run_graph(self.graph, self._ctx(x, y, True), frozenset({Stream.F}))
        loss = self.loss(env[self.out.name], y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_per_node(self.params, self.opt_cfg.clip)
        self.optimizer.step()
        self.steps += 1
        return StepResult({"bptt": float(loss.detach())}, rates_of(self.graph, env))
