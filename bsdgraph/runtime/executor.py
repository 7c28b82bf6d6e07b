"""Runs a compiled ``Program`` on a ``Backend``: binds the generated step functions to the backend's kernels.

A backend is data (``Backend``): a table ``kernel name -> fn(ctx, *inputs) -> outputs`` and the primitives its
kernels call. Binding builds each launch's context once (``runtime/context.py``) and compiles the program's
generated source (``compiler/codegen.py``); a step is then one call of straight-line code. The executor owns
what lives across steps: parameters, running statistics, the optimiser, the step counter.

``observe(fn)`` calls ``fn(launch, inputs, outputs)`` after every launch (tests, memory probes, and the shadow
validation of ``BSDGRAPH_VALIDATE=1``, ``runtime/validate.py``), without changing the generated code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from bsdgraph.compiler.codegen import StepCode
from bsdgraph.compiler.plan import LABELS, SEED, STIMULUS, Kind, Launch, Ref
from bsdgraph.compiler.program import Program, as_program
from bsdgraph.env import validate_launches
from bsdgraph.ir.graph import Op
from bsdgraph.ir.params import Params, init_params, init_state
from bsdgraph.runtime.common import (
    ExecutionError, OptimConfig, StepResult, lr_scales, make_optimizer, readout, set_group_lrs, step_seed,
)
from bsdgraph.runtime.context import Ctx, Kernel
from bsdgraph.runtime.neurons import prepare as prepare_neurons

Observer = Callable[[Launch, tuple, tuple], None]


@dataclass(frozen=True)
class Backend:
    """A backend as data: its name, kernel table, primitives, and the device it runs on."""

    name: str
    kernels: Mapping[str, Kernel]
    prims: Mapping[str, Callable]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def with_kernels(self, name: str, **overrides: Kernel) -> Backend:
        return Backend(name, {**self.kernels, **overrides}, self.prims, self.device)


class MemoryProbe:
    """An observer that follows the plan's lifetimes (the generated step's ``del``s) and records the peak bytes
    of the activation buffers alive at once: what ``Plan.peak_live`` predicts, measured on real storages."""

    def __init__(self, plan):
        self.plan = plan
        self.tracked = {b.ref for b in plan.activations()}
        self.live: dict[Ref, torch.Tensor] = {}
        self.peak = 0

    def __call__(self, la: Launch, ins: tuple, outs: tuple) -> None:
        for r, v in (*zip(la.reads, ins), *zip(la.writes, outs)):
            if r in self.tracked and isinstance(v, torch.Tensor):
                self.live[r] = v
        storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in self.live.values()}
        self.peak = max(self.peak, sum(storages.values()))
        self.live = {r: v for r, v in self.live.items() if self.plan.buffer(r).last > la.index}


# --compile: "off" runs the generated code eagerly; "inductor" compiles each entry point into one graph with
# torch.compile(fullgraph=True) (the proof that a step makes no host read and has no graph break); "aot_eager"
# traces the same graph without generating code (tests: seconds instead of minutes); "auto" picks per device.
COMPILE_MODES = ("off", "auto", "inductor", "aot_eager")


def resolve_compile(mode: str, device: torch.device) -> tuple[str, str]:
    """(the mode to use, why). Measured on this project's 2-core CPU (bench/RESULTS.md): Inductor compiles the
    fmnist_mlp step in 72.5 s (7.8 s from its cache) and runs it in 0.92-0.99x the eager step's time (the step
    is GEMM-bound and the eager kernels are already fused), so "auto" does not compile on a CPU."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode, "as asked"
    return "off", (f"auto on {device.type}: eager (Inductor measured no faster on a GEMM-bound CPU step, after "
                   "a compile of about a minute)")


def traceable_prims() -> dict[str, Callable]:
    """Primitives torch.compile can trace on the CPU: the torch twins (the native LIF is a ctypes call) and the
    Poisson encoder with a tensor seed."""
    from bsdgraph.runtime.philox import poisson_encode_traced
    from bsdgraph.runtime.torch_kernels import TWIN_PRIMS

    return {**TWIN_PRIMS, "poisson_encode": poisson_encode_traced}


class Executor:
    """Runs a program's generated steps with explicit local gradients; ``backend`` chooses the kernels."""

    def __init__(self, program: Program, backend: Backend, params: Params | None = None,
                 opt: OptimConfig | None = None, seed: int = 0, state: dict[str, torch.Tensor] | None = None,
                 dedup: bool | None = None, time_invariant: bool | None = None, compile: str = "off"):
        program = as_program(program, dedup=dedup, time_invariant=time_invariant)
        if program.plan is None:
            raise ValueError("the plan executor runs BSD programs; BPTT runs on the reference runtime")
        self.program, self.backend, self.seed = program, backend, seed
        self.graph, self.plan, self.device = program.graph, program.plan, backend.device
        missing = sorted(set(la.kernel for la in self.plan.launches) - set(backend.kernels))
        if missing:
            raise ValueError(f"backend {backend.name!r} has no implementation of kernel(s) {missing}")
        self.opt_cfg = opt or OptimConfig()
        base = params if params is not None else init_params(self.graph, seed)
        self.params = {k: v.detach().to(self.device, torch.float32).clone() for k, v in base.items()}
        self.state = {k: v.to(self.device).clone() for k, v in (state or init_state(self.graph)).items()}
        self.optimizer = make_optimizer(self.params, self.opt_cfg, self.graph)
        scales = lr_scales(self.optimizer)
        self._lr_scale = {k: scales[id(p)] for k, p in self.params.items()}
        self.steps = 0
        self.compile_mode, self.compile_why = resolve_compile(compile, self.device)
        if self.compile_mode != "off":
            prepare_neurons(self.graph, self.device)
            if {"lif_backward", "neuron_backward"} & set(self.plan.kernels()):
                raise ValueError(f"--compile {compile} does not cover distill_on=membrane yet: the neuron's "
                                 "surrogate backward runs autograd inside the step, which torch.compile cannot put "
                                 "in one graph")
            if self.device.type != "cpu":
                raise ValueError(f"--compile {compile} runs on the CPU only for now: the Triton kernels are not "
                                 "registered with torch.library yet, so Dynamo cannot trace them")
            if validate_launches():
                raise ValueError("BSDGRAPH_VALIDATE=1 checks launches one by one, which a compiled step does not "
                                 "expose: validate with --compile off")
            self.backend = Backend(backend.name, backend.kernels, {**backend.prims, **traceable_prims()},
                                   backend.device)
        self.compile_seconds = 0.0  # what compiling the entry points cost so far (their first calls)
        # what changes between steps lives in tensors a compiled step reads, filled in place (no recompile)
        self._seed = torch.zeros((), dtype=torch.int64, device=self.device)
        self._lr = torch.tensor(self.opt_cfg.lr, dtype=torch.float32, device=self.device)
        self.observers: list[Observer] = []
        self._bound: dict[str, Callable] = {}
        if validate_launches():
            from bsdgraph.runtime.validate import ShadowValidator

            self.observe(ShadowValidator(self))

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def T(self) -> int:
        return self.graph.T

    @property
    def kernels(self) -> Mapping[str, Kernel]:
        return self.backend.kernels

    # -- binding
    def owned(self) -> dict:
        """The objects kernels keep across steps (the optimiser's launches update it in place)."""
        cfg = self.opt_cfg
        return {"optimizer": self.optimizer, "clip": cfg.clip, "lr": self._lr if self.compile_mode != "off" else None,
                "hyper": {"betas": cfg.betas, "weight_decay": cfg.weight_decay, "eps": cfg.eps,
                          "lr_scale": self._lr_scale}}

    def set_lr(self, lr: float) -> None:
        """The learning rate from now on: the optimizer's group (its state_dict), and the tensor a compiled step
        reads (a Python float would be a constant of the graph: a new value, a new compile)."""
        set_group_lrs(self.optimizer, lr)
        self._lr.fill_(lr)

    def context(self, la: Launch, training: bool) -> Ctx:
        return Ctx(la, self.graph, self.plan, SimpleNamespace(**self.backend.prims), self.device, training,
                   self.owned())

    def observe(self, fn: Observer) -> None:
        """Call ``fn(launch, inputs, outputs)`` after each launch from now on (until removed from
        ``observers``)."""
        self.observers.append(fn)

    def bind(self, code: StepCode, training: bool) -> Callable:
        """The generated function of ``code`` with this backend's kernels and contexts, as ``fn(inputs)``."""
        fn = code.compile()
        K: dict[int, Callable] = {}
        C: dict[int, Ctx] = {}
        for i in code.launches:
            la = self.plan.launches[i]
            C[i], K[i] = self.context(la, training), self._guarded(la, self.kernels[la.kernel])
        values = lambda: [self.params[r.key] if r.kind == Kind.PARAM else self.state[r.key]  # noqa: E731
                          for r in code.params]
        if self.compile_mode == "off":
            return lambda inputs: fn(inputs, values(), K, C)
        return self._compiled(code, fn, values, training)

    def _compiled(self, code: StepCode, fn: Callable, values: Callable, training: bool) -> Callable:
        """``fn`` as one graph (fullgraph: a graph break or a host read is an error, not a slow path), with the raw
        kernels: no error wrapping and no observers inside a compiled step."""
        K = {i: self.kernels[self.plan.launches[i].kernel] for i in code.launches}
        C = {i: self.context(self.plan.launches[i], training) for i in code.launches}
        # ``fn`` itself, not a wrapper: Dynamo caches per code object, and every bind compiles the generated source
        # afresh (a shared wrapper's code would recompile per executor and hit Dynamo's recompile limit of 8)
        graph = torch.compile(fn, fullgraph=True, dynamic=False, backend=self.compile_mode)
        first = [True]

        def run(inputs):
            if not first[0]:
                return graph(inputs, values(), K, C)
            start = time.perf_counter()
            out = graph(inputs, values(), K, C)
            self.compile_seconds += time.perf_counter() - start
            first[0] = False
            return out

        return run

    def _guarded(self, la: Launch, kernel: Kernel) -> Kernel:
        """The kernel, reporting a failure as its node's (and telling the observers what it did)."""
        observers = self.observers  # the live list: observers added or removed later count
        node = self.graph[la.nodes[-1]] if la.nodes else None

        def run(ctx, *ins):
            try:
                outs = kernel(ctx, *ins)
            except ExecutionError:
                raise
            except Exception as err:
                if node is None:
                    raise
                raise ExecutionError(node.name, node.op, err) from err
            for obs in observers:
                obs(la, ins, outs)
            return outs

        return run

    def entry(self, name: str, training: bool) -> tuple[StepCode, Callable]:
        code = self.program.code[name]
        if name not in self._bound:
            self._bound[name] = self.bind(code, training)
        return code, self._bound[name]

    # -- running
    def given(self, x: torch.Tensor | None, y: torch.Tensor | None) -> dict[Ref, object]:
        """The step's inputs by ref (``inputs`` of the generated code are picked from these)."""
        seed = step_seed(self.seed, self.steps)
        if self.compile_mode != "off":  # a value of the compiled graph, not a constant baked into it
            seed = self._seed.fill_(seed)
        return {STIMULUS: self._stimulus(x), LABELS: None if y is None else y.to(self.device), SEED: seed}

    def _stimulus(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Direct encoding reads the stimulus as float32 [B, ...] (no launch: a view of the plan)."""
        if x is None:
            return None
        direct = dict(self.plan.aliases).get(self.graph.by_op(Op.INPUT)[0].name) == STIMULUS
        return x.to(self.device, torch.float32) if direct else x.to(self.device)

    def call(self, code: StepCode, fn: Callable, env: Mapping[Ref, object]) -> dict[Ref, object]:
        """Run a bound function on the inputs it needs from ``env``; its outputs by ref."""
        return dict(zip(code.outputs, fn([env[r] for r in code.inputs])))

    def run(self, name: str, x, y, training: bool) -> dict[Ref, object]:
        code, fn = self.entry(name, training)
        return self.call(code, fn, self.given(x, y))

    def results_of(self, out: Mapping[Ref, object]) -> StepResult:
        return StepResult({r.node: float(v) for r, v in out.items() if r.kind == Kind.LOSS},
                          {r.node: float(v) for r, v in out.items() if r.kind == Kind.RATE})

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        return self.results_of(self._step(x, y))

    def step_values(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, object], dict[str, object]]:
        """A step's (losses, rates) as the kernels left them: off the CPU 0-d device tensors, nothing read back."""
        out = self._step(x, y)
        return ({r.node: v for r, v in out.items() if r.kind == Kind.LOSS},
                {r.node: v for r, v in out.items() if r.kind == Kind.RATE})

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> dict[Ref, object]:
        out = self.run("step", x, y, True)
        self.steps += 1
        return out

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Per-parameter gradients of one step, without applying them (for tests against the reference)."""
        out = self.run("gradients", x, y, True)
        grads = {r.key: v for r, v in out.items() if r.kind == Kind.PARAM_GRAD}
        return grads, self.results_of(out).losses

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        (v,) = self.run("predict", x, None, False).values()
        out = self.graph.by_op(Op.OUTPUT)[0]
        return readout(out, v if "T" in self.plan.buffer(self.plan.value_of(out.name)).shape
                       else v.unsqueeze(0).expand(self.T, *v.shape))
