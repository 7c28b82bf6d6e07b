"""Memory a command will need, estimated from the graph and its plan before any weight is allocated.

Why: a model too large for the machine otherwise fails after minutes of allocating (or is killed by the kernel's
OOM killer without a word). ``estimate`` reads only shapes (``param_shapes``, the plan's buffers); ``check_fits``
compares the estimate with what this process can still allocate (``available``) and refuses, in one line, a model
that does not fit. ``BSDGRAPH_MEMORY_CHECK=0`` turns the refusal off (the estimate may be wrong for a runtime
it does not know).

The estimate counts what the runtimes allocate for the model and leaves out torch's own footprint, the data set
and short-lived temporaries, so it is close to a lower bound. Measured: building a cpu runtime and taking its
first step grows resident memory by 1.07-1.38x the estimate (fmnist_mlp 1.07x) once torch has set itself up (the
first step of a process adds ~160 MB of that, which no estimate counts). One known overcount: the plan shapes a
convolution of the direct stimulus [T, B, ...], which the cpu backend stores once (a small CNN: the plan's peak
is 13 % above the executor's own).
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from bsdgraph import env
from bsdgraph.errors import UserError
from bsdgraph.ir.graph import Graph, Op, Stream
from bsdgraph.compiler.plan import STIMULUS, Kind, Plan
from bsdgraph.compiler.program import Program
from bsdgraph.ir.params import param_shapes

F32 = 4  # bytes; weights, optimiser state and every float buffer are float32

# Where the figures of ``available`` come from; module-level so that tests can point them at fake files.
MEMINFO = Path("/proc/meminfo")
PROC_CGROUP = Path("/proc/self/cgroup")
PROC_STATUS = Path("/proc/self/status")
CGROUP_ROOT = Path("/sys/fs/cgroup")

# hierarchy -> (mount below CGROUP_ROOT, limit file, usage file, reclaimable page cache in memory.stat)
_CGROUP_FILES = {"v2": ("", "memory.max", "memory.current", "inactive_file"),
                 "v1": ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}

# BPTT (reference interpreter, autograd over all T steps) keeps more than each node's [T, B, ...] value: a LIF
# node also holds its pre-reset membrane h (stacked, and saved per step by the spike function), the (1 - s) of
# its hard reset per step, and the backward adds gradients of the same size. Measured as the growth of resident
# memory during one step (bench.PeakRSS, optimiser state already created, gradient bytes subtracted) divided by
# _node_bytes, on 784-W-W-10 MLPs, T = 4 unless noted, 1 thread: W=2048 B=256 4.27, W=1024 B=512 4.80,
# W=2048 B=128 T=8 4.62, W=4096 B=256 4.58, W=2048 B=512 5.00, W=512 B=1024 5.07 (autograd's saved tensors
# alone: 1.7-2.5x). The smallest is kept, rounded down: the estimate stays a lower bound.
BPTT_FACTOR = 4.0
# The reference interpreter's forward without autograd (BPTT's evaluation, ``bsdgraph run``) keeps every node's
# value for the whole run, and each LIF also its stacked membrane h and per-step temporaries. Measured the same
# way (``predict`` at B = 1000): W=2048 T=4 2.55, W=4096 T=4 2.48, W=1024 T=8 2.33; kept: 2.
FORWARD_FACTOR = 2.0


class MemoryBudgetError(UserError):
    """The estimated memory exceeds what this process can allocate; the message is one line."""


@dataclass(frozen=True)
class Estimate:
    """Bytes per part of what one command keeps allocated at its peak."""

    parameters: int    # F's and B's weights and biases (batchnorm's affine parameters included)
    gradients: int     # one gradient per parameter: the cpu backend holds all of a step's until its end
    optimizer: int     # AdamW's exp_avg and exp_avg_sq (its per-tensor step counters, 4 bytes each, ignored)
    state: int         # batchnorm running mean and variance
    activations: int   # the peak of live activation/gradient buffers (training step or evaluation)
    batch: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.state + self.activations

    def describe(self) -> str:
        parts = [("parameters", self.parameters), ("AdamW state", self.optimizer), ("gradients", self.gradients),
                 ("batchnorm statistics", self.state), ("activations", self.activations)]
        shown = ", ".join(f"{k} {size(v)}" for k, v in parts if v or k in ("parameters", "activations"))
        return f"about {size(self.total)} ({shown})"


def size(n: int | float) -> str:
    """Bytes in decimal units with one decimal: 38.2 GB, 217.6 MB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def estimate(program: Program, batch: int, optimizer: bool = True, eval_batch: int | None = None) -> Estimate:
    """The memory of training (``optimizer``) or evaluating ``program`` at ``batch``; shapes only, nothing
    allocated.

    A BSD program runs on the plan executor (cpu, triton), which holds the plan's buffers; a BPTT program on the
    reference interpreter over F (autograd when training; also F alone under ``bsdgraph run``, with
    ``optimizer=False``). ``eval_batch``: training also evaluates F at that batch."""
    graph, plan = program.graph, program.plan
    params = sum(math.prod(s) * F32 for n in graph.nodes for s in param_shapes(n).values())
    state = sum(2 * n.attrs["num_features"] * F32 for n in graph.by_op(Op.BATCHNORM))

    def forward(b: int) -> int:
        return _plan_forward(plan, graph, b) if plan else int(FORWARD_FACTOR * _node_bytes(graph, b))

    if optimizer:
        step = plan.peak_live(batch) if plan else int(BPTT_FACTOR * _node_bytes(graph, batch))
        acts = max(step, forward(eval_batch) if eval_batch else 0)
    else:
        acts = forward(batch)
    return Estimate(params, params if optimizer else 0, 2 * params if optimizer else 0, state, acts, batch)


def _node_bytes(g: Graph, batch: int) -> int:
    """F's node values as float32 [T, B, *shape]; views (flatten, output) share their input's storage, and a
    direct stimulus is [B, ...] expanded over T without a copy."""
    total = 0
    for n in g.nodes:
        if n.stream != Stream.F or n.op in (Op.FLATTEN, Op.UNFLATTEN, Op.OUTPUT):
            continue
        steps = 1 if n.op == Op.INPUT and n.attrs["encoding"] == "direct" else g.T
        total += steps * batch * math.prod(n.shape) * F32
    return total


def _plan_forward(plan: Plan, g: Graph, batch: int) -> int:
    """F's forward buffers at ``batch``: ``Executor.predict`` frees none of them until it returns. Its reads of
    uint8 spikes as float32 copies are transient and left out: measured, predict at B = 1000 grows resident memory
    by 1.75-1.81x this figure (784-W-W-10, W = 1024 to 4096)."""
    refs = {w for la in plan.launches if la.phase == "forward-F" for w in la.writes if w.kind != Kind.RATE}
    refs.add(STIMULUS)  # the stimulus, given to the step as float32
    return sum(b.nbytes(plan.T, batch) for b in plan.buffers if b.ref in refs)


# ---------------------------------------------------------------------------------------------------- available


def available(device: str | torch.device = "cpu") -> tuple[int | None, str]:
    """(bytes this process can still allocate, where that figure comes from); (None, why) when none is readable."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0], f"free memory of {device} (torch.cuda.mem_get_info)"
        except (RuntimeError, AssertionError) as err:  # no driver, or a torch built without CUDA
            return None, f"torch.cuda.mem_get_info failed: {err}"
    figures = [f for f in (_meminfo(), *_cgroup_rooms(), *_rlimit_rooms()) if f is not None]
    if not figures:
        return None, f"none of {MEMINFO}, the cgroup memory limits or the rlimits could be read"
    return min(figures)


def _meminfo() -> tuple[int, str] | None:
    kb = _fields(MEMINFO).get("MemAvailable")
    return None if kb is None else (kb * 1024, f"MemAvailable of {MEMINFO}")


def _cgroup_rooms() -> list[tuple[int, str]]:
    """Room under the memory limit of this process's cgroup and of each ancestor (v2, or v1's memory
    controller). Reclaimable page cache (inactive files, e.g. a data set just read) counts as room."""
    rooms = []
    for line in _read(PROC_CGROUP).splitlines():
        _, controllers, path = line.split(":", 2)
        kind = "v2" if not controllers else "v1" if "memory" in controllers.split(",") else None
        if kind is None:
            continue
        mount, limit_file, usage_file, cache = _CGROUP_FILES[kind]
        rel = PurePosixPath(path)
        for level in (rel, *rel.parents):  # a parent may be stricter; in a container only some levels exist
            d = CGROUP_ROOT / mount / str(level).lstrip("/")
            limit = _number(d / limit_file)
            if limit is None:  # v1 writes "no limit" as ~2**63, which never wins the minimum
                continue
            used = (_number(d / usage_file) or 0) - _fields(d / "memory.stat").get(cache, 0)
            rooms.append((limit - max(used, 0), f"{limit_file} - {usage_file} of {d}"))
    return rooms


def _rlimit_rooms() -> list[tuple[int, str]]:
    """A soft address-space or data-segment limit, less what the process already maps."""
    status, rooms = _fields(PROC_STATUS), []
    for name, field in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        soft, _ = resource.getrlimit(getattr(resource, name))
        if soft != resource.RLIM_INFINITY and field in status:
            rooms.append((soft - status[field] * 1024, f"soft {name} minus {field} of {PROC_STATUS}"))
    return rooms


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _number(path: Path) -> int | None:
    text = _read(path).strip()
    return int(text) if text.isdigit() else None  # "max" (v2: no limit) or missing


def _fields(path: Path) -> dict[str, int]:
    """'Key: 123 kB' or 'key 123' lines -> {key: 123} (units as written: kB in /proc, bytes in memory.stat)."""
    out = {}
    for line in _read(path).splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


# ---------------------------------------------------------------------------------------------------- refusal


def check_enabled() -> bool:
    """``BSDGRAPH_MEMORY_CHECK=0`` turns the refusal off (the one place that reads it)."""
    return env.MEMORY_CHECK.get()


def check_fits(est: Estimate, device: str | torch.device = "cpu") -> None:
    """Raise ``MemoryBudgetError`` when ``est`` exceeds what ``available`` reports.

    No safety margin: the estimate leaves out torch's footprint and temporaries, so a model refused here would
    not fit, while one that passes may still fail late (as every model did before this check); a margin would
    refuse models that fit, and the user could then only turn the check off."""
    if not check_enabled():
        return
    room, source = available(device)
    if room is None or est.total <= room:
        return
    raise MemoryBudgetError(
        f"the model does not fit in memory: it needs {est.describe()} at batch {est.batch}, and "
        f"{size(max(room, 0))} are available ({source}). Fix: make it smaller (--batch-size, layer widths, T), "
        "or set BSDGRAPH_MEMORY_CHECK=0 to try anyway")
