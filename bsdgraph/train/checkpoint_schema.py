"""What a sound training checkpoint holds, field by field: ``problems(doc)`` lists what is wrong, in words.

A checkpoint can load (torch reads it, its checksum matches: it is what was written) and still be unusable: a
file written by another program with our format tag, an edited one, one whose training diverged just before it
was written. Found by fuzzing (docs/reliability.md): a NaN weight evaluated to a meaningless accuracy, and a bad
``rng``, ``epoch``, ``history``, ``optimizer`` or ``params`` ended in tracebacks inside torch. Each check here
recomputes what it can from the checkpoint's own graph instead of trusting the stored value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from bsdgraph.registry import registrar


def brief(value: Any) -> str:
    """A value quoted briefly in a message (a tensor's repr can run to pages)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


Check = Callable[[Any], str | None]
FIELDS: dict[str, Check] = {}


field = registrar(FIELDS)  # @field(key): the check of that checkpoint field


def problems(doc: dict[str, Any]) -> list[str]:
    """Every problem of the fields ``doc`` holds, then of how they fit together (only if each field is sound)."""
    found = [f"{key} {why}" for key, check in FIELDS.items() if key in doc for why in [check(doc[key])] if why]
    if not found:
        found += _fit(doc)
    return found


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@field("model")
def _model(v):
    return None if isinstance(v, str) else f"must be the model file's path, got {type(v).__name__}"


@field("rule")
def _rule(v):
    return None if v in ("bsd", "bptt") else f"must be bsd or bptt, got {brief(v)}"


@field("target")
def _target(v):
    return None if v in ("labels", "input") else f"must be labels or input, got {brief(v)}"


@field("graph")
def _graph(v):
    from bsdgraph.ir.printer import from_json

    if not isinstance(v, str):
        return f"must be the graph's JSON text, got {type(v).__name__}"
    try:
        from_json(v)
    except Exception as err:  # noqa: BLE001 -- any failure to read the graph back means the field is unusable
        return f"is not a valid graph ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return None


@field("train")
def _train(v):
    from bsdgraph.train.config import TrainConfig, TrainingError

    if not (isinstance(v, dict) and all(isinstance(k, str) for k in v)):
        return "must be a dict of training options"
    try:
        TrainConfig.from_model(v)
    except (TrainingError, TypeError) as err:
        return f"holds invalid training options ({err})"
    return None


def _tensors(v, what: str) -> str | None:
    if not (isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())):
        return f"must map names to tensors ({what})"
    for key, t in v.items():
        if t.dtype != torch.float32:  # every bsdgraph runtime computes in float32; another dtype fails in a matmul
            return f"{key} is {t.dtype}, not float32"
        if not bool(torch.isfinite(t).all()):
            return f"{key} (layer {key.rsplit('.', 1)[0]}) holds NaN or infinite values"
    return None


@field("params")
def _params(v):
    return _tensors(v, "the weights")


@field("state")
def _state(v):
    why = _tensors(v, "batchnorm running statistics")
    if why is None:
        negative = [k for k, t in v.items() if k.endswith("running_var") and bool((t < 0).any())]
        why = f"{negative[0]} holds negative variances" if negative else None
    return why


@field("input_stats")
def _input_stats(v):
    if not (isinstance(v, dict) and set(v) == {"mean", "std"}):
        return "must be the stimulus's mean and std (train/prepare.py)"
    why = _tensors(v, "input statistics")
    if why is None and not bool((v["std"] > 0).all()):
        why = "std holds values <= 0"
    if why is None and v["mean"].shape != v["std"].shape:
        why = f"mean {list(v['mean'].shape)} and std {list(v['std'].shape)} differ in shape"
    return why


@field("rng")
def _rng(v):
    size = torch.Generator().get_state().numel()
    if not (isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and tuple(v.shape) == (size,)):
        return f"must be a CPU generator state (uint8[{size}])"
    try:
        torch.Generator().set_state(v)
    except RuntimeError as err:
        return f"is not a generator state torch accepts ({str(err).splitlines()[0]})"
    return None


@field("epoch")
def _epoch(v):
    return None if _is_int(v) and v >= 0 else f"must be a whole number >= 0, got {brief(v)}"


@field("steps")
def _steps(v):
    return None if _is_int(v) and v >= 0 else f"must be a whole number >= 0, got {brief(v)}"


@field("history")
def _history(v):
    from bsdgraph.train.records import is_epoch_record

    if not isinstance(v, list):
        return f"must be a list of epoch records, got {type(v).__name__}"
    for i, rec in enumerate(v, 1):
        if not (is_epoch_record(rec, v[0]) and rec["epoch"] == i):
            return (f"record {i} is not the epoch record of epoch {i} (epoch, test_accuracy or test_mse, losses and "
                    "rates, the same layers as the first)")
    return None


@field("backend")
def _backend(v):
    from bsdgraph.train.config import BACKENDS

    return None if v in BACKENDS else f"must be one of {', '.join(BACKENDS)}, got {brief(v)}"


# The AdamW settings bsdgraph writes (runtime/common.py make_optimizer), each with what a sound value is: a
# damaged one used to pass, then stopped --resume mid-epoch blaming a node, or resumed with the damage.
_ADAMW = {
    "lr": lambda x: _is_number(x) and math.isfinite(x) and x > 0,
    "betas": lambda x: (isinstance(x, (tuple, list)) and len(x) == 2
                        and all(_is_number(b) and math.isfinite(b) and 0 <= b < 1 for b in x)),
    "eps": lambda x: _is_number(x) and math.isfinite(x) and x > 0,
    "weight_decay": lambda x: _is_number(x) and math.isfinite(x) and x >= 0,
    "lr_scale": lambda x: x is None or (_is_number(x) and math.isfinite(x) and x > 0),  # layer_lr's multiplier
    "amsgrad": lambda x: x is False,
    "maximize": lambda x: x is False,
}


@field("optimizer")
def _optimizer(v):
    if not (isinstance(v, dict) and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in v["param_groups"])):
        return "must be an optimizer state_dict (state, param_groups with params)"
    for group in v["param_groups"]:
        bad = [k for k, ok in _ADAMW.items() if not ok(group.get(k))]
        # the rest are switches of torch's implementation (foreach, fused, capturable, ...): True, False or None
        bad += [k for k, x in group.items()
                if k not in _ADAMW and k != "params" and not (x is None or isinstance(x, bool))]
        if bad:
            return f"param_groups holds an unusable {bad[0]} ({brief(group.get(bad[0]))})"
    for i, st in v["state"].items():
        why = _adamw_state(i, st)
        if why:
            return why
    return None


def _adamw_state(i, st) -> str | None:
    """One parameter's AdamW state: a step count >= 0 and two float32 moments, the second one >= 0."""
    if not (_is_int(i) and isinstance(st, dict) and {"step", "exp_avg", "exp_avg_sq"} <= set(st)):
        return f"state of parameter {i!r} is not AdamW's (step, exp_avg, exp_avg_sq)"
    step = st["step"]
    step = float(step) if isinstance(step, torch.Tensor) and step.numel() == 1 else step
    if not (_is_number(step) and math.isfinite(step) and step >= 0):
        return f"step of parameter {i} must be a count >= 0, got {brief(st['step'])}"
    for key in ("exp_avg", "exp_avg_sq"):
        x = st[key]
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())):
            return f"{key} of parameter {i} must be finite float32 values"
    if bool((st["exp_avg_sq"] < 0).any()):
        return f"exp_avg_sq of parameter {i} holds negative values (a mean of squares)"
    return None


def _fit(doc: dict[str, Any]) -> list[str]:
    """How the sound fields fit together: epochs against the history, weights against the graph's nodes, the
    optimiser's state against the weights."""
    out = []
    if "epoch" in doc and "history" in doc and doc["epoch"] != len(doc["history"]):
        out.append(f"epoch {doc['epoch']} but the history holds {len(doc['history'])} epoch(s)")
    if "graph" in doc and "params" in doc:
        out += _fit_graph(doc)
    if "optimizer" in doc and "params" in doc:
        out += _fit_optimizer(doc["optimizer"], _in_optimizer_order(doc))
    return out


def _in_optimizer_order(doc: dict[str, Any]) -> list[torch.Tensor]:
    """The weights in the order the optimiser numbers them: that of its parameter groups, one per ``layer_lr``
    multiplier of the run (runtime/common.py param_groups), else the weights' own order."""
    params = list(doc["params"].values())
    layer_lr = (doc.get("train") or {}).get("layer_lr") if isinstance(doc.get("train"), dict) else None
    if not layer_lr or "graph" not in doc:
        return params
    from bsdgraph.ir.printer import from_json
    from bsdgraph.runtime.common import OptimConfig, param_groups

    try:
        groups = param_groups(doc["params"], OptimConfig(layer_lr=tuple(layer_lr)), from_json(doc["graph"]))
    except (ValueError, KeyError):  # multipliers that do not fit the graph: _fit_optimizer names the mismatch
        return params
    return [p for g in groups for p in g["params"]]


def _fit_graph(doc: dict[str, Any]) -> list[str]:
    from bsdgraph.ir.graph import Op
    from bsdgraph.ir.params import param_shapes
    from bsdgraph.ir.printer import from_json

    graph, params, state = from_json(doc["graph"]), doc["params"], doc.get("state", {})
    # the saved graph is the one trained: F + B for BSD, F alone for BPTT; every weight of it, and nothing else
    want = {f"{n.name}.{k}": tuple(s) for n in graph.nodes for k, s in param_shapes(n).items()}
    out = [f"params lacks {k} (shape {list(s)})" for k, s in want.items() if k not in params]
    out += [f"params has {k}, which no node of the graph has" for k in params if k not in want]
    out += [f"params {k} has shape {list(params[k].shape)}, the graph needs {list(s)}" for k, s in want.items()
            if k in params and tuple(params[k].shape) != s]
    stats = {f"{n.name}.{k}": (n.attrs["num_features"],) for n in graph.by_op(Op.BATCHNORM)
             for k in ("running_mean", "running_var")}
    out += [f"state lacks {k} of shape {list(s)}" for k, s in stats.items()
            if k not in state or tuple(state[k].shape) != s]
    out += [f"state has {k}, which no batchnorm of the graph has" for k in state if k not in stats]
    return out


def _fit_optimizer(opt: dict, params: list[torch.Tensor]) -> list[str]:
    indices = [i for g in opt["param_groups"] for i in g["params"]]
    if sorted(indices) != list(range(len(params))):
        return [f"optimizer covers parameters {indices[:6]}{'...' if len(indices) > 6 else ''}, not the "
                f"{len(params)} weights"]
    out = []
    for i, st in opt["state"].items():
        if not 0 <= i < len(params):
            out.append(f"optimizer has state for parameter {i}, beyond the {len(params)} weights")
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            x = st.get(key)
            if isinstance(x, torch.Tensor) and tuple(x.shape) != tuple(params[i].shape):
                out.append(f"optimizer {key} of parameter {i} has shape {list(x.shape)}, the weight "
                           f"{list(params[i].shape)}")
    return out
