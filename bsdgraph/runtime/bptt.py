"""The BPTT baseline ("BP on SNN" in the paper): the same forward network F trained with surrogate-gradient
backpropagation through time, CE (or MSE) on the top layer. Runs on the reference interpreter, with autograd over
the whole unrolled network: the global backward pass that BSD avoids."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bsdgraph.ir import Graph, Op, Stream
from bsdgraph.losses import class_scores
from bsdgraph.params import Params, init_params, init_state
from bsdgraph.runtime.common import OptimConfig, StepResult, clip_per_node, make_optimizer, rates_of, readout, step_seed
from bsdgraph.runtime.reference import Ctx, run_graph


class BPTTRuntime:
    name = "bptt"

    def __init__(self, f: Graph, params: Params | None = None, opt: OptimConfig | None = None, seed: int = 0,
                 state: dict[str, torch.Tensor] | None = None):
        if any(e.detach for e in f.edges):
            raise ValueError("BPTT trains the forward network F: pass the graph from build(), not the BSD graph")
        self.graph, self.opt_cfg, self.seed = f, opt or OptimConfig(), seed
        base = params if params is not None else init_params(f, seed)
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in base.items()}
        self.state = {k: v.clone() for k, v in (state or init_state(f)).items()}
        self.optimizer = make_optimizer(self.params, self.opt_cfg)
        self.steps = 0
        self.out = f.by_op(Op.OUTPUT)[0]

    def _ctx(self, x, y, training: bool) -> Ctx:
        return Ctx(self.params, self.state, self.graph.T, x, y, training, step_seed(self.seed, self.steps))

    def loss(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.out.attrs["task"] == "classification":
            return F.cross_entropy(class_scores(v, self.out.attrs["population"]), y)
        return F.mse_loss(v.mean(0).reshape(y.shape), y.to(v.dtype))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        env = run_graph(self.graph, self._ctx(x, y, True), frozenset({Stream.F}))
        loss = self.loss(env[self.out.name], y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_per_node(self.params, self.opt_cfg.clip)
        self.optimizer.step()
        self.steps += 1
        return StepResult({"bptt": float(loss.detach())}, rates_of(self.graph, env))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        env = run_graph(self.graph, self._ctx(x, None, False), frozenset({Stream.F}))
        return readout(self.out, env[self.out.name])
