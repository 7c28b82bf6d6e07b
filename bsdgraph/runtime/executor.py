"""Executes a ``Plan``: walks its launches in order, dispatching each kernel name to a backend's kernel table.

A backend is a table ``kernel name -> fn(ex, launch)``; the cpu backend maps every name to torch code, the triton
backend overrides the names it has Triton kernels for. Buffers are freed after their last reader (the plan's
lifetimes), so live activation memory follows the plan's schedule. There is no autograd graph over time: every
gradient is explicit and local.

Buffer conventions: spikes are stored as uint8; a buffer whose plan shape has no ``T`` axis (the direct-encoded
stimulus) is time-invariant and stored once as ``[B, ...]``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
import numpy as np
import torch

from bsdgraph.ir.graph import Graph, Node, Op
from bsdgraph.compiler.lower import Launch, Plan, lower
from bsdgraph.ir.params import Params, init_params, init_state
from bsdgraph.runtime.common import (
    ExecutionError, OptimConfig, StepResult, make_optimizer, readout, step_seed,
)
from bsdgraph.runtime.local_adamw import adamw_step

Kernel = Callable[["Executor", Launch], None]


class Executor:
    """Runs a BSD graph's plan with explicit local gradients; ``kernels`` chooses the implementation."""

    name = "executor"

    def __init__(self, g: Graph, kernels: dict[str, Kernel], prims: dict[str, Callable], params: Params | None = None,
                 opt: OptimConfig | None = None, seed: int = 0, state: dict[str, torch.Tensor] | None = None,
                 device: str | torch.device = "cpu", dedup: bool | None = None, time_invariant: bool = True):
        self.graph, self.kernels, self.seed = g, kernels, seed
        self.prims = SimpleNamespace(**prims)
        self.plan: Plan = lower(g, dedup, time_invariant)
        self.device = torch.device(device)
        missing = sorted(set(la.kernel for la in self.plan.launches) - set(kernels))
        if missing:
            raise ValueError(f"backend {self.name!r} has no implementation of kernel(s) {missing}")
        self.opt_cfg = opt or OptimConfig()
        base = params if params is not None else init_params(g, seed)
        self.params = {k: v.detach().to(self.device, torch.float32).clone() for k, v in base.items()}
        self.state = {k: v.to(self.device).clone() for k, v in (state or init_state(g)).items()}
        self.optimizer = make_optimizer(self.params, self.opt_cfg)
        self.steps = 0
        self._last_use = {b.name: b.last for b in self.plan.buffers}
        self._time_invariant = {b.name for b in self.plan.buffers if "T" not in b.shape}
        self._per_class = {b.name for b in self.plan.buffers if "R" in b.shape}
        self._alias = dict(self.plan.aliases)
        self._reset(None, None, False)

    # -- state of one run
    def _reset(self, x, y, training: bool) -> None:
        self.buf: dict[str, torch.Tensor] = {}
        self.x, self.labels, self.training = x, y, training
        self.losses: dict[str, torch.Tensor] = {}
        self.rates: dict[str, float] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.apply_updates = True
        self.peak_bytes = 0  # largest total size of live activation/gradient buffers during the run
        self.run_seed = step_seed(self.seed, self.steps)
        if y is not None and self.plan.dedup:  # B's rows: the distinct classes; inverse maps samples to them
            self.classes, self.inverse, self.counts = torch.unique(y, return_inverse=True, return_counts=True)
        if x is not None:
            inp = self.graph.by_op(Op.INPUT)[0]
            if inp.name in self._time_invariant:
                self.buf[inp.name] = x.to(self.device, torch.float32)
            self.x = x.to(self.device)

    @property
    def T(self) -> int:
        return self.graph.T

    def node(self, name: str) -> Node:
        return self.graph[name]

    def read(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """A buffer as [T, B, ...] float32 (time-invariant buffers are expanded as a view, not copied).

        ``shape`` is the per-sample shape the reader expects: a view node (flatten, unflatten) shares its
        producer's buffer, so the buffer may be stored in the producer's shape."""
        v = self.buf[name]
        if name in self._time_invariant:
            v = v.unsqueeze(0).expand(self.T, *v.shape)
        # spikes: torch's uint8 -> float32 cast (4x128x1024, 2 threads: 82-91 us; numpy's astype 144-184 us,
        # 1 thread 140 vs 155 us; re-measured after an earlier build had favoured numpy)
        if v.dtype != torch.float32:
            v = v.to(torch.float32)
        return v if shape is None else v.reshape(self.T, -1, *shape)

    def is_time_invariant(self, name: str) -> bool:
        return name in self._time_invariant

    def is_per_class(self, name: str) -> bool:
        return name in self._per_class

    def to_samples(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """[T, R, ...] per-class rows -> [T, B, ...] per sample (other buffers unchanged)."""
        return v.index_select(1, self.inverse) if name in self._per_class else v

    def to_rows(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """A per-sample gradient for buffer ``name``, summed per class if that buffer is per class (exact: B's
        rows for one class are identical, so their gradients add)."""
        if name not in self._per_class:
            return g
        out = torch.zeros((g.shape[0], len(self.classes), *g.shape[2:]), dtype=g.dtype, device=g.device)
        return out.index_add_(1, self.inverse, g)

    def row_mean(self, name: str, v: torch.Tensor) -> float:
        """Mean over samples of a [T, rows, ...] buffer (per-class rows weighted by their sample counts)."""
        if name not in self._per_class:
            if v.dtype == torch.uint8 and v.device.type == "cpu":  # 0/1 spikes: count them (59 vs 252 us, measured)
                return int(np.count_nonzero(v.numpy())) / max(v.numel(), 1)
            return float(v.float().mean())
        per_row = v.float().transpose(0, 1).reshape(v.shape[1], -1).mean(1)
        return float((per_row * self.counts).sum() / self.counts.sum())

    def plan_buffer(self, node: str) -> str:
        """The buffer holding ``node``'s value (views alias their input's buffer)."""
        while node in self._alias:
            node = self._alias[node]
        return node

    # -- running
    def _run(self, phases: frozenset[str] | None = None, free: bool = True) -> None:
        for la in self.plan.launches:
            if phases is not None and la.phase not in phases:
                continue
            if la.phase == "optimizer" and not self.apply_updates:
                continue
            try:
                self.kernels[la.kernel](self, la)
            except ExecutionError:
                raise
            except Exception as err:
                node = self.graph[la.nodes[-1]]
                raise ExecutionError(node.name, node.op, err) from err
            live = sum(v.untyped_storage().nbytes() for v in self.buf.values())
            self.peak_bytes = max(self.peak_bytes, live)
            if free:
                for r in la.reads:
                    if self._last_use.get(r) == la.index and "." not in r:
                        self.buf.pop(r, None)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        self._reset(x, y.to(self.device), True)
        self._run()
        self.steps += 1
        return StepResult({k: float(v) for k, v in self.losses.items()}, dict(self.rates))

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Per-parameter gradients of one step, without applying them (for tests against the reference)."""
        self._reset(x, y.to(self.device), True)
        self.apply_updates = False
        self._run()
        return dict(self.grads), {k: float(v) for k, v in self.losses.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self._reset(x, None, False)
        self._run(frozenset({"forward-F"}), free=False)
        out = self.graph.by_op(Op.OUTPUT)[0]
        return readout(out, self.read(self.plan_buffer(out.name)))

    # -- helpers for kernels
    def write_grads(self, owner: str, grads: dict[str, torch.Tensor]) -> None:
        for key, g in grads.items():
            self.grads[f"{owner}.{key}"] = g

    def apply(self, nodes: list[str]) -> None:
        """AdamW on the parameters of ``nodes`` with the gradients just computed, clipped per node."""
        owned = {k: p for k, p in self.params.items() if k.rsplit(".", 1)[0] in nodes}
        adamw_step(self.optimizer, owned, self.grads, self.opt_cfg.clip)
