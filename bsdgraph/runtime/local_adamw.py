"""One loss's AdamW update on the CPU: torch's fused AdamW kernel called per node, the node's gradient clipping
folded into it.

``Executor.apply`` (clip each node's gradients to ``max_norm``, then ``optimizer.step()``) spends, per BSD step of
fmnist_mlp (2 threads, measured): ~1.2 ms multiplying clipped gradients (a pass over 11.6 MB) and ~0.1 ms per
``optimizer.step()`` call in Python bookkeeping over all 16 parameters, against ~0.02 ms for the kernel call
itself. Here each node is one call of ``torch._fused_adamw_`` on the optimizer's own state tensors (so its
``state_dict``, checkpoints and learning-rate changes are untouched) with ``grad_scale`` = 1 / clip coefficient:
the kernel divides the gradient by it as it reads it, so clipping costs no extra pass.

Exactness: unclipped nodes are bit-identical to ``optimizer.step()`` (same kernel, same arguments; tested);
clipped ones differ by the rounding of g / (1 / c) against g * c (relative ~1e-7 on the gradient).

The fast path applies to float32 CPU parameters whose state torch has already created (from the second update
on; the first goes through ``optimizer.step()``), and no amsgrad; otherwise, or on a
torch without the private op, ``step_per_node`` returns False and the caller takes the plain path. Parameter groups
(``layer_lr``: one per layer) differ only in their learning rate, which each node's call takes from its group.
"""

from __future__ import annotations

import torch

from bsdgraph.runtime.common import clip_per_node, grad_norm

_FUSED = getattr(torch, "_fused_adamw_", None)


def adamw_step(optimizer: torch.optim.Optimizer, owned: dict[str, torch.nn.Parameter],
               grads: dict[str, torch.Tensor], max_norm: float, lr: torch.Tensor | None = None,
               hyper: dict | None = None) -> None:
    """Clip each node's gradients to ``max_norm`` and step AdamW on ``owned``: per node through the fused kernel
    when ``step_per_node`` applies, else ``clip_per_node`` + ``optimizer.step()``; while torch.compile traces a
    step, as tensor operations it can fuse (``traced_step``)."""
    if torch.compiler.is_compiling():
        if lr is None or hyper is None:
            raise ValueError("a compiled AdamW step needs the learning rate as a tensor and the optimizer settings")
        traced_step(optimizer, owned, grads, max_norm, lr, hyper)
        return
    if step_per_node(optimizer, owned, grads, max_norm):
        return
    for k, p in owned.items():
        p.grad = grads[k]
    clip_per_node(owned, max_norm)
    optimizer.step()
    for p in owned.values():
        p.grad = None


def step_per_node(optimizer: torch.optim.Optimizer, owned: dict[str, torch.nn.Parameter],
                  grads: dict[str, torch.Tensor], max_norm: float) -> bool:
    """AdamW on ``owned`` (name -> parameter; ``grads`` by the same names), clipped per node; False if not done."""
    if not _applies(optimizer, owned):
        return False
    group = optimizer.param_groups[0]  # betas, eps and weight decay are every group's; lr is per group
    beta1, beta2 = group["betas"]
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]} if len(
        optimizer.param_groups) > 1 else None
    nodes: dict[str, list[str]] = {}
    for name in owned:
        nodes.setdefault(name.rsplit(".", 1)[0], []).append(name)
    for names in nodes.values():
        params, gs = [owned[k] for k in names], [grads[k] for k in names]
        lr = group["lr"] if lrs is None else lrs[id(params[0])]  # a node's parameters share their layer's group
        states = [optimizer.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        _FUSED(params, gs, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [], steps,
               amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
               eps=group["eps"], maximize=False, grad_scale=_inverse_clip(gs, max_norm), found_inf=None)
    return True


def traced_step(optimizer: torch.optim.Optimizer, owned: dict[str, torch.nn.Parameter],
                grads: dict[str, torch.Tensor], max_norm: float, lr_tensor: torch.Tensor, hyper: dict) -> None:
    """AdamW (torch's single-tensor algorithm, decoupled weight decay) per node, written as tensor operations so
    that a compiled step contains it: Inductor cannot functionalise ``_fused_adamw_`` on the optimizer's state
    (measured: "mutating a non-functional tensor with a functional tensor"). The same update up to float
    rounding of the fused kernel's order of operations. ``lr_tensor`` (``Executor.set_lr`` fills it) keeps a new
    learning rate from being a new constant, i.e. a recompile; the other settings come from ``hyper`` (the
    runtime's ``OptimConfig``), not from the optimizer's param group: torch.compile guards on the version of
    every dict it reads, and setting the group's lr would then recompile the step."""
    beta1, beta2 = hyper["betas"]
    wd, eps, lr_scale = hyper["weight_decay"], hyper["eps"], hyper.get("lr_scale", {})
    nodes: dict[str, list[str]] = {}
    for name in owned:
        nodes.setdefault(name.rsplit(".", 1)[0], []).append(name)
    for names in nodes.values():
        scale = _inverse_clip([grads[k] for k in names], max_norm)
        for k in names:
            lr = lr_tensor * lr_scale[k] if lr_scale.get(k, 1.0) != 1.0 else lr_tensor  # a layer_lr multiplier
            p, state = owned[k], optimizer.state[owned[k]]
            g = grads[k] if scale is None else grads[k] / scale
            state["step"].add_(1)
            p.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(g, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            correction1, correction2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
            denom = (state["exp_avg_sq"].sqrt() / correction2.sqrt()).add_(eps)
            p.sub_(state["exp_avg"] / denom * (lr / correction1))


def _inverse_clip(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor | None:
    """1 / torch's clip coefficient max_norm / (|g| + 1e-6), or 1 where the gradient is not clipped (the kernel's
    division by 1.0 is exact). A clamp, not a comparison: nothing is read back to the host."""
    if max_norm <= 0:
        return None
    return ((grad_norm(grads) + 1e-6) / max_norm).clamp(min=1.0).reshape(())



def _applies(optimizer: torch.optim.Optimizer, owned: dict[str, torch.nn.Parameter]) -> bool:
    if _FUSED is None or any(not group.get("fused") or group.get("amsgrad") or group.get("maximize")
                             for group in optimizer.param_groups):
        return False
    return all(p.device.type == "cpu" and p.dtype == torch.float32 and "exp_avg" in optimizer.state.get(p, {})
               for p in owned.values())
