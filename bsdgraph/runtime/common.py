"""What every runtime backend shares: encodings, optimiser set-up, per-layer clipping, step results, errors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bsdgraph.errors import UserError
from bsdgraph.ir.graph import Graph, GroupOp, Node, Op
from bsdgraph.ir.neurons import is_spiking
from bsdgraph.runtime.losses import class_codes, class_scores, regression_prediction
from bsdgraph.ir.params import Params


class ExecutionError(UserError, RuntimeError):
    """A failure while executing one node; names the node so the user can find it in ``bsdgraph compile``.

    Still a RuntimeError: code that guards a step against torch's errors (the communicator's) sees it as one."""

    def __init__(self, node: str, op: Op, cause: BaseException):
        self.node, self.op, self.cause = node, op, cause
        super().__init__(f"while executing node '{node}' ({op.value}): {type(cause).__name__}: {cause}")

    def lines(self, source: str | None = None) -> list[str]:
        # torch's text can run on for a page (an overload list): its first line says what failed
        return [f"error: {str(self).splitlines()[0]}"]


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3            # AdamW; 3e-4 and 1e-4 fail to start within one epoch (spec, measured)
    weight_decay: float = 1e-4  # TrainConfig's default, what the shipped models use (torch's AdamW default: 0.01)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8           # torch's AdamW default
    clip: float = 1.0           # max gradient norm per parametric node ("per layer"); 0 disables
    layer_lr: tuple[float, ...] = ()  # lr multipliers of F's layers 1..L (and of B's mirrors of each); () all 1


@dataclass(frozen=True)
class StepResult:
    losses: dict[str, float]   # loss node -> value
    rates: dict[str, float]    # LIF node (F and B) -> firing rate in [0, 1]


def step_seed(seed: int, step: int) -> int:
    """The counter-based RNG seed of one training step (Poisson encoding): distinct per step, reproducible."""
    return (seed * 1_000_003 + step) % (2**31 - 1)


def encode_input(n: Node, x: torch.Tensor, T: int, seed: int) -> torch.Tensor:
    """Stimulus [B, ...] -> [T, B, ...]: direct (the analog value every step) or Poisson spikes with p = x; a
    sequence stimulus is [B, T, ...] already and step t reads its slice t."""
    if n.attrs["encoding"] == "sequence":
        if x.dim() != len(n.shape) + 2 or x.shape[1] != T or tuple(x.shape[2:]) != tuple(n.shape):
            raise ValueError(f"a sequence input of T={T} steps of shape {list(n.shape)} needs samples "
                             f"[N, {T}, {', '.join(map(str, n.shape))}], got {list(x.shape)}")
        return x.to(torch.float32).transpose(0, 1)
    if n.attrs["encoding"] == "poisson":
        from kernels.ref.encode import poisson_encode

        return poisson_encode(x.contiguous().float(), T, seed).to(torch.float32)
    return x.to(torch.float32).unsqueeze(0).expand(T, *x.shape)


def encode_target(n: Node, y: torch.Tensor, T: int) -> torch.Tensor:
    """Labels -> the concept code [T, B, D_L]: one-hot (or a block of ``population`` neurons, or the class's
    pattern of a distributed code) at every step;
    analog targets (regression) are the top layer's input value at every step, sequence targets [B, T, ...] give
    step t its own value."""
    enc = n.attrs["encoding"]
    if enc == "sequence" and n.attrs["n_classes"]:  # one class per step: y is [B, T] class indices
        return F.one_hot(y.long(), n.attrs["n_classes"]).to(torch.float32).transpose(0, 1)
    if enc == "sequence":  # one target per step: y is [B, T, ...]
        return y.to(torch.float32).reshape(y.shape[0], T, *n.shape).transpose(0, 1)
    if enc == "code":  # each class's pattern of active neurons
        code = class_codes(n.attrs, n.shape[0], y.device)[y.long()]
    elif enc == "analog":
        code = y.to(torch.float32).reshape(y.shape[0], *n.shape)
    else:
        code = F.one_hot(y.long(), n.attrs["n_classes"]).to(torch.float32)
        if enc == "population":
            code = code.repeat_interleave(n.attrs["population"], dim=1)
    return code.unsqueeze(0).expand(T, *code.shape)


def readout(out: Node, v: torch.Tensor) -> torch.Tensor:
    """Top current [T, B, ...] -> predictions: class scores (argmax = class) or regression values."""
    if out.attrs["task"] == "classification":
        return class_scores(v, out.attrs["population"], out.attrs["target"] == "sequence",
                            class_codes(out.attrs, v.shape[-1], v.device))
    return regression_prediction(v, out.attrs["target"] == "sequence")


def make_optimizer(params: Params, cfg: OptimConfig, graph: Graph | None = None) -> torch.optim.Optimizer:
    """torch's AdamW with its state created now (``create_state``); with ``cfg.layer_lr``, one parameter group per
    layer of ``graph`` whose ``lr`` is the base rate times the layer's multiplier, kept as its ``lr_scale``.

    fused: one kernel per parameter instead of ~10 elementwise ops; measured 3.1x faster on CPU than the default
    single-tensor AdamW (8 tensors of 1024x784, 1 thread: 73 -> 23 ms per step)."""
    optimizer = torch.optim.AdamW(param_groups(params, cfg, graph), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=True)
    create_state(optimizer)
    return optimizer


def param_groups(params: Params, cfg: OptimConfig, graph: Graph | None) -> list[dict]:
    """AdamW's parameter groups: all in one, or one per ``cfg.layer_lr`` multiplier (ValueError when the count of
    multipliers is not the graph's count of layers)."""
    if not cfg.layer_lr:
        return [{"params": list(params.values()), "lr_scale": 1.0}]
    from bsdgraph.compiler.feedback import layer_of_params

    layers = layer_of_params(graph)
    count = max(layers.values(), default=0)
    if len(cfg.layer_lr) != count:
        raise ValueError(f"layer_lr has {len(cfg.layer_lr)} multiplier(s), but {graph.name} has {count} layer(s): "
                         "give one per layer, bottom to top")
    groups: dict[float, list] = {}
    for name, p in params.items():
        groups.setdefault(cfg.layer_lr[layers[name.rsplit(".", 1)[0]] - 1], []).append(p)
    return [{"params": ps, "lr": cfg.lr * m, "lr_scale": m} for m, ps in groups.items()]


def lr_scales(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """id(parameter) -> its group's learning-rate multiplier (1 without ``layer_lr``)."""
    return {id(p): group.get("lr_scale", 1.0) for group in optimizer.param_groups for p in group["params"]}


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate from the base rate ``lr`` (times the group's ``lr_scale``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def create_state(optimizer: torch.optim.Optimizer) -> None:
    """The state AdamW creates at its first step (step counter 0, zero moments, as torch's fused AdamW makes them),
    created before it: every update of the plan executor then takes the same per-node path
    (``runtime/local_adamw.py``), the first one too, and a compiled step never meets torch.optim's own code."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state.get(p):
                optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The joint L2 norm of ``grads`` as sqrt(sum of g.g): torch.dot is ~3x faster than torch.norm /
    _foreach_norm on this CPU (1024 x 784, 2 threads: 0.05 vs 0.15 ms); the same value up to float rounding."""
    return torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads]).sum().sqrt()


def clip_per_node(params: Params, max_norm: float) -> None:
    """Clip the gradient norm of each node's parameters (weight and bias together) to ``max_norm``."""
    if max_norm <= 0:
        return
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in params.items():
        if p.grad is not None:
            groups.setdefault(name.rsplit(".", 1)[0], []).append(p)
    for ps in groups.values():
        # torch.nn.utils.clip_grad_norm_'s arithmetic, but on CPU the gradients are only rewritten when they are
        # actually clipped: its unconditional multiply by a coefficient clamped to 1.0 changes no bit and costs a
        # pass over them. On a GPU the comparison would be a host sync per layer, so there it always multiplies.
        grads = [p.grad for p in ps]
        coef = max_norm / (grad_norm(grads) + 1e-6)
        if coef.device.type != "cpu":
            torch._foreach_mul_(grads, coef.clamp(max=1.0))
        elif coef < 1:
            torch._foreach_mul_(grads, coef)


def rates_of(g: Graph, env: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n.name: float(env[n.name].detach().float().mean()) for n in g.by_op(*GroupOp.NEURON)
            if n.name in env and is_spiking(n)}
