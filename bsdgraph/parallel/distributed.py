"""Several processes on torch.distributed: the communicator (timeouts, clear errors, byte counts) and exact
data-parallel BSD on the plan executor (``cpu`` and ``triton`` backends). Layer-parallel: ``layer_parallel.py``.

Data-parallel, and why it is exact. Every rank holds the whole batch (the same shuffling generator everywhere),
computes F on its contiguous shard of the samples, and applies the same summed gradients, so the replicas never
drift. What keeps one step on N ranks equal to one step on the full batch:

- ReCo couples a batch (its B x B cosine matrix). With B driven by class codes (deduplicated, ``lower.can_dedup``)
  every rank computes B's rows for the classes of the *full* batch (labels are known everywhere) and the
  deduplicated ReCo is a sum of per-sample terms given the full batch's class counts: each rank's gradient of B's
  rows is its share of a sum, and no activation is sent at all (B's batchnorms take count-weighted statistics
  of those rows, the same on every rank). Otherwise (analog targets, the frequency-aware ReCo) the two
  operands are all-gathered ([T, B, D] floats per ReCo layer), every rank computes the full ReCo and keeps the
  gradient rows of its own samples.
- Losses are means over the full batch: CE, MSE and the deduplicated ReCo are scaled from 1/B_local to 1/B.
- F's batchnorms use the full batch's statistics (two all-reduces of per-channel sums in the forward, one in the
  backward); their running statistics stay identical on all ranks.
- Weight gradients are sums over samples: one all-reduce (SUM) per local loss ("bucket": the parameters it owns,
  flattened into one tensor), issued asynchronously and waited for at the next loss, so layer l's traffic
  overlaps layer l+1's compute (exact: the plan never reads a weight after its update within a step). Per-node
  clipping and AdamW then run on identical sums on every rank.
- Poisson encoding draws the full batch's random numbers (counter offsets of the rank's own samples).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from bsdgraph import env
from bsdgraph.compiler.plan import Kind, Launch, Plan, Ref, value
from bsdgraph.compiler.program import Program, as_program, transformed
from bsdgraph.registry import registrar
from bsdgraph.runtime.common import ExecutionError
from bsdgraph.runtime.executor import Backend, Executor
from bsdgraph.runtime.philox import philox_uniform
from bsdgraph.runtime.torch_kernels import _reco_terms, loss_operands, loss_outputs, steps
from bsdgraph.train.config import TrainingError

TIMEOUT_ENV = "BSDGRAPH_DIST_TIMEOUT"  # seconds a rank waits for its peers (init and every collective)
DEFAULT_TIMEOUT = 300.0


class DistributedError(TrainingError):
    """A collective or message failed (a peer died, hung past the timeout, or the rendezvous failed); the
    command line reports it as one line and exits 1, like any other reason training cannot go on."""


def launched() -> bool:
    """Whether this process was started by torchrun (or anything else that sets RANK and WORLD_SIZE)."""
    return env.RANK.is_set() and env.WORLD_SIZE.is_set()


def timeout_s() -> float:
    raw = env.DIST_TIMEOUT.raw()
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


class Comm:
    """One process group: rank, world size, device, and every collective guarded by the timeout.

    ``traffic`` counts per kind the bytes this rank hands to the network. A ring all-reduce of S bytes sends
    2 (N-1)/N S per rank, an all-gather (N-1) times the local part, a broadcast S from the root only; p2p sends
    count their exact size."""

    def __init__(self, rank: int, world: int, device: torch.device, timeout: float):
        self.rank, self.world, self.device, self.timeout = rank, world, torch.device(device), timeout
        self.traffic: Counter[str] = Counter()
        self.blocked_s = 0.0  # time spent inside collectives and waits (for bench/distributed.py)

    @classmethod
    def from_env(cls, want_cuda: bool = False) -> Comm:
        """Join the group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
        gloo on CPU, NCCL with CUDA tensors."""
        timeout = timeout_s()
        rank, world = env.RANK.get(), env.WORLD_SIZE.get()
        device = torch.device("cpu")
        if want_cuda:
            device = torch.device("cuda", env.LOCAL_RANK.get())
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), rank=rank,
                                        world_size=world, **({"device_id": device} if want_cuda else {}))
            except (RuntimeError, ValueError) as err:
                raise DistributedError(f"rank {rank}/{world}: could not join the process group at "
                                       f"{env.MASTER_ADDR.raw()}:{env.MASTER_PORT.raw()} within "
                                       f"{timeout:g} s ({_first_line(err)}); check that every rank was started "
                                       f"and reaches that address, or raise {TIMEOUT_ENV}") from None
        return cls(rank, world, device, timeout)

    # -- sharding
    def sizes(self, n: int) -> list[int]:
        """Contiguous shard sizes of n samples (torch.tensor_split's: the first n % N ranks get one more)."""
        return [n // self.world + (1 if r < n % self.world else 0) for r in range(self.world)]

    def shard(self, n: int) -> tuple[int, int]:
        sizes = self.sizes(n)
        lo = sum(sizes[:self.rank])
        return lo, lo + sizes[self.rank]

    # -- collectives
    def guard(self, what: str, fn: Callable):
        start = time.perf_counter()
        try:
            return fn()
        except (RuntimeError, ValueError) as err:
            raise DistributedError(f"rank {self.rank}/{self.world}: {what} failed ({_first_line(err)}). A peer "
                                   f"rank has probably exited or hung for more than {self.timeout:g} s "
                                   f"({TIMEOUT_ENV}); its own error message says why") from None
        finally:
            self.blocked_s += time.perf_counter() - start

    def all_reduce(self, t: torch.Tensor, what: str, async_op: bool = False):
        self.traffic["all_reduce"] += 2 * (self.world - 1) * t.numel() * t.element_size() // self.world
        return self.guard(f"all-reduce of {what}", lambda: dist.all_reduce(t, async_op=async_op))

    def wait(self, work, what: str) -> None:
        self.guard(f"all-reduce of {what}", work.wait)

    def all_gather_rows(self, t: torch.Tensor, sizes: list[int], what: str, dim: int = 1) -> torch.Tensor:
        """Concatenate every rank's ``t`` along ``dim``; shards may differ in size (padded to the largest)."""
        pad = max(sizes) - t.shape[dim]
        if pad:
            t = torch.cat([t, t.new_zeros((*t.shape[:dim], pad, *t.shape[dim + 1:]))], dim)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self.traffic["all_gather"] += (self.world - 1) * t.numel() * t.element_size()
        self.guard(f"all-gather of {what}", lambda: dist.all_gather(parts, t))
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)

    def broadcast_(self, tensors: list[torch.Tensor], what: str, src: int = 0) -> None:
        for t in tensors:
            if self.rank == src:
                self.traffic["broadcast"] += t.numel() * t.element_size()
            self.guard(f"broadcast of {what}", lambda t=t: dist.broadcast(t, src))

    def broadcast_object(self, obj, what: str, src: int = 0):
        box = [obj]
        self.guard(f"broadcast of {what}", lambda: dist.broadcast_object_list(box, src))
        return box[0]

    def all_gather_object(self, obj, what: str) -> list:
        out = [None] * self.world
        self.guard(f"all-gather of {what}", lambda: dist.all_gather_object(out, obj))
        return out

    def recv(self, t: torch.Tensor, src: int, what: str) -> torch.Tensor:
        self.guard(f"receive of {what} from rank {src}", lambda: dist.recv(t, src))
        return t

    def barrier(self, what: str) -> None:
        self.guard(f"barrier ({what})", lambda: dist.barrier())


@contextlib.contextmanager
def unwrap_distributed_errors():
    """A collective fails inside a kernel, which the executor reports as that node's failure; the node is not
    the cause, the peer is: re-raise the DistributedError itself."""
    try:
        yield
    except ExecutionError as err:
        if isinstance(err.cause, DistributedError):
            raise err.cause from None
        raise


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__


# ---------------------------------------------------------------------------------------------------- data-parallel
# The data-parallel plan is a transform of the one-process plan (``data_parallel_plan``, pure): every launch with
# a data-parallel form runs as "dp:<kernel>" and also reads the step's shard; each optimizer launch starts the
# all-reduce of its gradients and applies the previous one's (a PENDING buffer carries the bucket from one to the
# next); the losses and rates are summed over the ranks by one last launch.

SHARD = Ref(Kind.INPUT, "shard")
DP = "dp:"
FINISH, REDUCE = "dp:apply_pending", "dp:reduce_results"


@dataclass(frozen=True)
class Shard:
    """This rank's samples [lo, hi) of a global batch of ``n_full``, whose labels are ``labels``."""

    lo: int
    hi: int
    n_full: int
    labels: torch.Tensor | None

    @property
    def share(self) -> float:
        return (self.hi - self.lo) / self.n_full


DP_KERNELS: dict[str, Callable] = {}  # kernel name -> fn(base kernel, ctx, *inputs, shard) -> outputs
dp_kernel = registrar(DP_KERNELS)


def data_parallel_plan(plan: Plan) -> Plan:
    """``plan`` as one rank of a data-parallel run (see the module docstring)."""
    launches: list[Launch] = []
    declare = {SHARD: ("obj", ())}
    pending: Ref | None = None
    for la in plan.launches:
        if la.kernel == "torch.adamw_step":
            bucket = Ref(Kind.PENDING, "+".join(la.nodes))
            declare[bucket] = ("obj", ())
            grads = tuple(r for r in la.reads if r.kind == Kind.PARAM_GRAD)
            # the previous bucket's parameters are updated here, this launch's at the next one
            applied = _bucket_params(launches, pending)
            launches.append(Launch(0, DP + la.kernel, la.phase, la.nodes,
                                   grads + applied + ((pending,) if pending else ()), (bucket, *applied)))
            pending = bucket
        elif la.kernel in DP_KERNELS:
            launches.append(replace(la, kernel=DP + la.kernel, reads=la.reads + (SHARD,)))
        else:
            launches.append(la)
    if pending:
        applied = _bucket_params(launches, pending)
        launches.append(Launch(0, FINISH, "optimizer", (), applied + (pending,), applied))
    results = tuple(dict.fromkeys(w for la in launches for w in la.writes if w.kind in (Kind.LOSS, Kind.RATE)))
    launches.append(Launch(0, REDUCE, "collective", (), results + (SHARD,), results))
    return plan.replace(launches, declare)


def _bucket_params(launches: list[Launch], bucket: Ref | None) -> tuple[Ref, ...]:
    if bucket is None:
        return ()
    (la,) = [la for la in launches if bucket in la.writes]
    return tuple(Ref(Kind.PARAM, r.node, r.part) for r in la.reads if r.kind == Kind.PARAM_GRAD)


def dp_backend(base: Backend, comm: Comm) -> Backend:
    """``base`` with the data-parallel kernels: each "dp:<name>" wraps the base kernel of that name."""
    kernels = {DP + name: functools.partial(fn, base.kernels.get(name)) for name, fn in DP_KERNELS.items()}
    kernels[FINISH], kernels[REDUCE] = _apply_pending, _reduce_results
    return Backend(f"{base.name} (data-parallel)", {**base.kernels, **kernels}, base.prims, comm.device)


class DataParallelExecutor(Executor):
    """``step(x, y)`` takes the *global* batch (the same on every rank), runs this rank's shard of the
    data-parallel plan, and leaves weights identical on all ranks and equal to a one-process step on (x, y)."""

    def __init__(self, program: Program, backend: Backend, *, comm: Comm, **kwargs):
        self.comm = comm
        lowering = {k: kwargs.pop(k) for k in ("dedup", "time_invariant") if k in kwargs}
        program = transformed(as_program(program, **lowering), data_parallel_plan)
        super().__init__(program, dp_backend(backend, comm), **kwargs)
        comm.broadcast_([*self.params.values(), *self.state.values()], "the initial weights")
        self.shard = Shard(0, 0, 0, None)

    def owned(self) -> dict:
        return {**super().owned(), "comm": self.comm}

    def given(self, x, y):
        return {**super().given(x, y), SHARD: self.shard}

    def _shard(self, x: torch.Tensor, y: torch.Tensor | None):
        lo, hi = self.comm.shard(len(x))
        labels = None if y is None else y.to(self.device)
        self.shard = Shard(lo, hi, len(x), labels)
        return x[lo:hi], None if labels is None else labels[lo:hi]

    def _step(self, x: torch.Tensor, y: torch.Tensor):
        if len(y) < self.comm.world:
            raise DistributedError(f"a batch of {len(y)} samples cannot be split over {self.comm.world} ranks: "
                                   "every rank needs at least one sample (use a larger batch or fewer processes)")
        with unwrap_distributed_errors():
            return super()._step(*self._shard(x, y))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        xs, _ = self._shard(x, None)
        local = super().predict(xs)
        return self.comm.all_gather_rows(local, self.comm.sizes(len(x)), "predictions", dim=0)


# ---------------------------------------------------------------------------------------------------- kernels
# Each wraps the backend's kernel of the same name: fn(base, ctx, *inputs, shard) -> outputs.


def _scaled(outs: tuple, share: float) -> tuple:
    return tuple(None if v is None else v * share for v in outs)


@dp_kernel("group_classes")
def _group(base, ctx, y, shard: Shard):
    """B's rows for every class with the *full* batch's counts (labels are known everywhere), this rank's samples
    mapped to them."""
    (full,) = base(ctx, shard.labels)
    return (full._replace(inverse=full.inverse[shard.lo:shard.hi]),)


@dp_kernel("torch.cross_entropy_grad", "torch.mse_grad")
def _mean_loss(base, ctx, *ins):
    """A mean over the batch, computed on this rank's samples and rescaled from 1/B_local to 1/B."""
    *ins, shard = ins
    return _scaled(base(ctx, *ins), shard.share)


@dp_kernel("reco_loss_grad")
def _reco(base, ctx, *ins):
    *ins, shard = ins
    n = ctx.node
    if ctx.per_class(ctx.launch.reads[1]) and not n.attrs["freq"]:
        # deduplicated B (rows of the full batch's classes, counts of the full batch): a per-sample sum
        return _scaled(base(ctx, *ins), shard.share)
    (a, b), args = loss_operands(ctx, ins)
    comm = ctx.owned["comm"]
    sizes = comm.sizes(shard.n_full)
    full_a = comm.all_gather_rows(a, sizes, f"the F operand of {n.name}")
    full_b = comm.all_gather_rows(b, sizes, f"the B operand of {n.name}")
    labels = shard.labels if n.attrs["negatives"] == "other_class" else None
    loss, da, db = _reco_terms(n, full_a, full_b, labels, ctx.prims.reco_loss_grad)
    own = slice(shard.lo, shard.hi)
    return loss_outputs(ctx, loss / comm.world, [da[:, own], db[:, own]], args)


def _bn_rows(ctx, ref: Ref, v: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    rows = steps(ctx, ref, v, ctx.node.shape)
    rows = rows.reshape(-1, *rows.shape[2:])
    return rows, [0, *range(2, rows.dim())]


def _values_per_channel(ctx, rows: torch.Tensor, shard: Shard) -> int:
    return ctx.T * shard.n_full * math.prod(rows.shape[2:])


@dp_kernel("torch.batch_norm")
def _batchnorm(base, ctx, *ins):
    """Batch statistics of the full batch: per-channel sums, then sums of squared deviations (two passes, as
    precise as one process's). B's per-class rows (deduplicated) are the full batch's on every rank already:
    their count-weighted statistics need no communication and come out identical everywhere."""
    *ins, shard = ins
    if not ctx.training or ctx.per_class(ctx.launch.reads[0]):
        return base(ctx, *ins)
    n, comm, args = ctx.node, ctx.owned["comm"], ctx.args(ins)
    rows, dims = _bn_rows(ctx, ctx.launch.reads[0], ins[0])
    shape = [1, -1] + [1] * (rows.dim() - 2)
    total = _values_per_channel(ctx, rows, shard)
    sums = rows.sum(dims)
    comm.all_reduce(sums, f"the batch statistics of {n.name}")
    mean = sums / total
    sq = (rows - mean.view(shape)).pow(2).sum(dims)
    comm.all_reduce(sq, f"the batch statistics of {n.name}")
    var = sq / total
    invstd = torch.rsqrt(var + n.attrs["eps"])
    w, b = args[Ref(Kind.PARAM, n.name, "weight")], args[Ref(Kind.PARAM, n.name, "bias")]
    out = (rows - mean.view(shape)) * (invstd * w).view(shape) + b.view(shape)
    m = n.attrs["momentum"]
    args[Ref(Kind.STATE, n.name, "running_mean")].mul_(1 - m).add_(m * mean)
    args[Ref(Kind.STATE, n.name, "running_var")].mul_(1 - m).add_(m * var * total / max(total - 1, 1))
    return ctx.outputs({value(n.name): out.reshape(ctx.T, -1, *rows.shape[1:]),
                        Ref(Kind.STATS, n.name): torch.stack([mean, invstd])})


@dp_kernel("torch.batch_norm_backward")
def _batchnorm_backward(base, ctx, *ins):
    """The batch-statistics backward with the full batch's sums of dY and dY * x_hat (which are also the
    gradients of the weight and bias: already reduced, so the optimizer's bucket leaves them out, ``_reduced``).

    B's per-class rows: each rank's gradient rows are its samples' share, and the count-weighted backward is
    linear in them, so each rank computes it on its share and the sums happen where every gradient's does: in
    the weight gradients' all-reduce (this batchnorm's own weight and bias included)."""
    *ins, shard = ins
    if ctx.per_class(ctx.launch.reads[1]):
        return base(ctx, *ins)
    n, comm, args = ctx.node, ctx.owned["comm"], ctx.args(ins)
    grad_ref, src_ref = ctx.launch.reads[:2]
    mean, invstd = args[Ref(Kind.STATS, n.name)]
    grad, dims = _bn_rows(ctx, grad_ref, args[grad_ref])
    src, _ = _bn_rows(ctx, src_ref, args[src_ref])
    total = _values_per_channel(ctx, src, shard)
    shape = [1, -1] + [1] * (src.dim() - 2)
    xhat = (src - mean.view(shape)) * invstd.view(shape)
    sums = torch.cat([grad.sum(dims), (grad * xhat).sum(dims)])
    comm.all_reduce(sums, f"the batchnorm gradient of {n.name}")
    g_b, g_w = sums.chunk(2)
    w = args[Ref(Kind.PARAM, n.name, "weight")]
    g_in = (w * invstd).view(shape) * (grad - (g_b / total).view(shape) - xhat * (g_w / total).view(shape))
    return ctx.outputs({Ref(Kind.PARAM_GRAD, n.name, "weight"): g_w, Ref(Kind.PARAM_GRAD, n.name, "bias"): g_b,
                        Ref(Kind.GRAD, src_ref.node): g_in.reshape(ctx.T, -1, *src.shape[1:])})


@dp_kernel("poisson_encode")
def _poisson(base, ctx, x, seed, shard: Shard):
    """The full batch's Philox stream (offset t * numel(batch) + index), read at this rank's samples."""
    x = x.to(torch.float32).contiguous()
    per_sample = x[0].numel() if len(x) else 0
    t = torch.arange(ctx.T, dtype=torch.int64, device=x.device)[:, None]
    idx = torch.arange(x.numel(), dtype=torch.int64, device=x.device)[None, :] + shard.lo * per_sample
    offset = (t * (shard.n_full * per_sample) + idx).reshape(ctx.T, *x.shape)
    return ((philox_uniform(seed, offset) < x).to(torch.uint8),)


def _reduced(ctx, ref: Ref) -> bool:
    """Whether a parameter gradient is summed over the ranks already (by an F batchnorm's backward)."""
    la = ctx.plan.launches[ctx.plan.buffer(ref).producer]
    return la.kernel == DP + "torch.batch_norm_backward" and not ctx.per_class(la.reads[1])


@dp_kernel("torch.adamw_step")
def _adamw(base, ctx, *ins):
    """Start the all-reduce of this loss's gradients (one flat bucket), then finish the previous bucket: layer
    l's traffic overlaps layer l+1's compute (exact: the plan never reads a weight after its update)."""
    comm, args = ctx.owned["comm"], ctx.args(ins)
    grads = {r: v for r, v in args.items() if r.kind == Kind.PARAM_GRAD}
    previous = args.get(ctx.launch.reads[-1]) if ctx.launch.reads[-1].kind == Kind.PENDING else None
    send = [r for r in grads if not _reduced(ctx, r)]
    flat = torch.cat([grads[r].reshape(-1) for r in send]) if send else torch.zeros(0, device=ctx.device)
    what = f"the gradients of {'+'.join(ctx.launch.nodes)}"
    work = comm.all_reduce(flat, what, async_op=True) if send else None
    applied = _finish_bucket(ctx, previous, args) if previous is not None else ()
    return ((work, flat, send, grads, what), *applied)


def _finish_bucket(ctx, bucket, args) -> tuple:
    """Wait for a bucket's all-reduce, then clip and step AdamW on the summed gradients; its parameters (in
    ``args``), updated in place."""
    from bsdgraph.runtime.local_adamw import adamw_step

    work, flat, send, grads, what = bucket
    if work is not None:
        ctx.owned["comm"].wait(work, what)
    grads = dict(grads)
    offset = 0
    for r in send:
        n = grads[r].numel()
        grads[r] = flat[offset:offset + n].view_as(grads[r])
        offset += n
    owned = {r.key: args[Ref(Kind.PARAM, r.node, r.part)] for r in grads}
    adamw_step(ctx.owned["optimizer"], owned, {r.key: g for r, g in grads.items()}, ctx.owned["clip"])
    return tuple(owned[r.key] for r in grads)


def _apply_pending(ctx, *ins):
    """The last bucket of the step."""
    return _finish_bucket(ctx, ins[-1], ctx.args(ins))


def _reduce_results(ctx, *ins):
    """Losses (each rank holds its share of the sum) and firing rates of the full batch, in one all-reduce."""
    *vals, shard = ins
    refs = ctx.launch.writes
    # per-class rows (B) are the full batch's already; per-sample rates are weighted by the shard size
    comm = ctx.owned["comm"]
    vec = [float(v) if r.kind == Kind.LOSS else
           float(v) / comm.world if ctx.per_class(value(r.node)) else float(v) * shard.share
           for r, v in zip(refs, vals)]
    out = torch.tensor(vec, dtype=torch.float64, device=comm.device)
    comm.all_reduce(out, "the step's losses and firing rates")
    return tuple(out.tolist())
