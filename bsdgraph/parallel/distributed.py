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
import os
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist

from bsdgraph.runtime.common import ExecutionError, StepResult
from bsdgraph.runtime.executor import Executor
from bsdgraph.runtime.philox import philox_uniform
from bsdgraph.runtime.torch_kernels import _loss_inputs, _reco_terms, _store_loss_grads
from bsdgraph.train.config import TrainingError

TIMEOUT_ENV = "BSDGRAPH_DIST_TIMEOUT"  # seconds a rank waits for its peers (init and every collective)
DEFAULT_TIMEOUT = 300.0


class DistributedError(TrainingError):
    """A collective or message failed (a peer died, hung past the timeout, or the rendezvous failed); the
    command line reports it as one line and exits 1, like any other reason training cannot go on."""


def launched() -> bool:
    """Whether this process was started by torchrun (or anything else that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT))
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
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        device = torch.device("cpu")
        if want_cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), rank=rank,
                                        world_size=world, **({"device_id": device} if want_cuda else {}))
            except (RuntimeError, ValueError) as err:
                raise DistributedError(f"rank {rank}/{world}: could not join the process group at "
                                       f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
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


class DataParallel:
    """Mixin over an Executor backend: ``step(x, y)`` takes the *global* batch (the same on every rank), runs
    this rank's shard, and leaves weights identical on all ranks and equal to a one-process step on (x, y)."""

    def __init__(self, g, *, comm: Comm, **kwargs):
        self.comm, self.full_labels, self.lo, self.hi, self.n_full = comm, None, 0, 0, 0
        self.reduced: set[str] = set()
        self.pending: list = []
        self.bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        super().__init__(g, **kwargs)
        base = self.kernels
        self.kernels = {**base, **{k: functools.partial(fn, base[k]) for k, fn in DP_KERNELS.items() if k in base}}
        comm.broadcast_([*self.params.values(), *self.state.values()], "the initial weights")

    @property
    def n_local(self) -> int:
        return self.hi - self.lo

    def _reset(self, x, y, training: bool) -> None:
        super()._reset(x, y, training)
        self.reduced, self.pending, self.bn_stats = set(), [], {}
        if training and y is not None and self.plan.dedup:  # B's rows: the classes of the *full* batch
            classes, inverse, counts = torch.unique(self.full_labels, return_inverse=True, return_counts=True)
            self.classes, self.counts, self.inverse = classes, counts, inverse[self.lo:self.hi]

    def _shard(self, x: torch.Tensor, y: torch.Tensor | None):
        self.lo, self.hi = self.comm.shard(len(x))
        self.n_full = len(x)
        self.full_labels = None if y is None else y.to(self.device)
        return x[self.lo:self.hi], None if y is None else self.full_labels[self.lo:self.hi]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        if len(y) < self.comm.world:
            raise DistributedError(f"a batch of {len(y)} samples cannot be split over {self.comm.world} ranks: "
                                   "every rank needs at least one sample (use a larger batch or fewer processes)")
        xs, ys = self._shard(x, y)
        self._reset(xs, ys, True)
        with unwrap_distributed_errors():
            self._run()
            self.complete_pending()
        self.steps += 1
        return self._global_result()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        xs, _ = self._shard(x, None)
        local = super().predict(xs)
        return self.comm.all_gather_rows(local, self.comm.sizes(len(x)), "predictions", dim=0)

    def complete_pending(self) -> None:
        """Wait for the gradient buckets in flight, then clip and step AdamW on the summed gradients."""
        for work, flat, keys, nodes in self.pending:
            if work is not None:
                self.comm.wait(work, f"the gradients of {'+'.join(nodes)}")
            offset = 0
            for k in keys:
                n = self.grads[k].numel()
                self.grads[k] = flat[offset:offset + n].view_as(self.grads[k])
                offset += n
            self.apply(nodes)
        self.pending = []

    def _global_result(self) -> StepResult:
        """Losses (each rank holds its share of the sum) and firing rates of the full batch, in one all-reduce."""
        names, rates = list(self.losses), list(self.rates)
        share = self.n_local / self.n_full
        vals = [float(self.losses[k]) for k in names]
        # per-class rows (B) are the full batch's already; per-sample rates are weighted by the shard size
        vals += [self.rates[k] / self.comm.world if self.is_per_class(k) else self.rates[k] * share
                 for k in rates]
        vec = torch.tensor(vals, dtype=torch.float64, device=self.comm.device)
        self.comm.all_reduce(vec, "the step's losses and firing rates")
        out = vec.tolist()
        return StepResult(dict(zip(names, out[:len(names)])), dict(zip(rates, out[len(names):])))


def data_parallel(runtime_cls: type) -> type:
    """``runtime_cls`` (an Executor backend) made data-parallel; other runtimes are refused by name."""
    if not issubclass(runtime_cls, Executor):
        raise DistributedError(f"data-parallel training runs the plan executor (backends cpu, triton); "
                               f"{runtime_cls.__name__} is not one: use --backend cpu")
    return type(f"DataParallel{runtime_cls.__name__}", (DataParallel, runtime_cls), {})


# ---------------------------------------------------------------------------------------------------- kernels
# Each wraps the backend's kernel of the same name: fn(base, ex, launch).

DP_KERNELS: dict[str, Callable] = {}


def dp_kernel(*names: str):
    def register(fn):
        for name in names:
            DP_KERNELS[name] = fn
        return fn

    return register


@dp_kernel("torch.cross_entropy_grad", "torch.mse_grad")
def _mean_loss(base, ex, la) -> None:
    """A mean over the batch, computed on this rank's samples and rescaled from 1/B_local to 1/B."""
    base(ex, la)
    share = ex.n_local / ex.n_full
    name = la.nodes[0]
    ex.losses[name] = ex.losses[name] * share
    for w in la.writes:
        if w in ex.buf:
            ex.buf[w] = ex.buf[w] * share


@dp_kernel("reco_loss_grad")
def _reco(base, ex, la) -> None:
    n = ex.node(la.nodes[0])
    if ex.is_per_class(la.reads[1]) and not n.attrs["freq"]:
        # deduplicated B (rows of the full batch's classes, counts of the full batch): a per-sample sum
        _mean_loss(base, ex, la)
        return
    a, b = _loss_inputs(ex, la)
    sizes = ex.comm.sizes(ex.n_full)
    full_a = ex.comm.all_gather_rows(a, sizes, f"the F operand of {n.name}")
    full_b = ex.comm.all_gather_rows(b, sizes, f"the B operand of {n.name}")
    labels = ex.full_labels if n.attrs["negatives"] == "other_class" else None
    loss, da, db = _reco_terms(n, full_a, full_b, labels, ex.prims.reco_loss_grad)
    own = slice(ex.lo, ex.hi)
    _store_loss_grads(ex, la, loss / ex.comm.world, [da[:, own], db[:, own]])


def _bn_rows(ex, name: str, buf: str) -> tuple[torch.Tensor, list[int]]:
    n = ex.node(name)
    v = ex.read(buf, n.shape)
    rows = v.reshape(-1, *v.shape[2:])
    return rows, [0, *range(2, rows.dim())]


@dp_kernel("torch.batch_norm")
def _batchnorm(base, ex, la) -> None:
    """Batch statistics of the full batch: per-channel sums, then sums of squared deviations (two passes, as
    precise as one process's). B's per-class rows (deduplicated) are the full batch's on every rank already:
    their count-weighted statistics need no communication and come out identical everywhere."""
    if not ex.training or ex.is_per_class(la.reads[0]):
        return base(ex, la)
    n = ex.node(la.nodes[0])
    rows, dims = _bn_rows(ex, n.name, la.reads[0])
    shape = [1, -1] + [1] * (rows.dim() - 2)
    total = ex.T * ex.n_full * math.prod(rows.shape[2:])  # values per channel in the full batch
    sums = rows.sum(dims)
    ex.comm.all_reduce(sums, f"the batch statistics of {n.name}")
    mean = sums / total
    sq = (rows - mean.view(shape)).pow(2).sum(dims)
    ex.comm.all_reduce(sq, f"the batch statistics of {n.name}")
    var = sq / total
    invstd = torch.rsqrt(var + n.attrs["eps"])
    w, b = ex.params[f"{n.name}.weight"], ex.params[f"{n.name}.bias"]
    out = (rows - mean.view(shape)) * (invstd * w).view(shape) + b.view(shape)
    m = n.attrs["momentum"]
    ex.state[f"{n.name}.running_mean"].mul_(1 - m).add_(m * mean)
    ex.state[f"{n.name}.running_var"].mul_(1 - m).add_(m * var * total / max(total - 1, 1))
    ex.bn_stats[n.name] = (mean, invstd, total)
    ex.buf[la.writes[0]] = out.reshape(ex.T, -1, *rows.shape[1:])


@dp_kernel("torch.batch_norm_backward")
def _batchnorm_backward(base, ex, la) -> None:
    """The batch-statistics backward with the full batch's sums of dY and dY * x_hat (which are also the
    gradients of the weight and bias: already reduced, so the optimizer bucket skips them).

    B's per-class rows: each rank's gradient rows are its samples' share, and the count-weighted backward is linear
    in them, so each rank computes it on its share and the sums happen where every gradient's does: in the weight
    gradients' all-reduce (this batchnorm's own weight and bias included)."""
    if ex.is_per_class(la.reads[1]):
        return base(ex, la)
    n = ex.node(la.nodes[0])
    mean, invstd, total = ex.bn_stats[n.name]
    grad, dims = _bn_rows(ex, n.name, la.reads[0])
    src, _ = _bn_rows(ex, n.name, la.reads[1])
    shape = [1, -1] + [1] * (src.dim() - 2)
    xhat = (src - mean.view(shape)) * invstd.view(shape)
    sums = torch.cat([grad.sum(dims), (grad * xhat).sum(dims)])
    ex.comm.all_reduce(sums, f"the batchnorm gradient of {n.name}")
    g_b, g_w = sums.chunk(2)
    w = ex.params[f"{n.name}.weight"]
    g_in = (w * invstd).view(shape) * (grad - (g_b / total).view(shape) - xhat * (g_w / total).view(shape))
    ex.write_grads(n.name, {"weight": g_w, "bias": g_b})
    ex.reduced.update({f"{n.name}.weight", f"{n.name}.bias"})
    ex.buf[la.writes[-1]] = g_in.reshape(ex.T, -1, *src.shape[1:])


@dp_kernel("poisson_encode")
def _poisson(base, ex, la) -> None:
    """The full batch's Philox stream (offset t * numel(batch) + index), read at this rank's samples."""
    x = ex.x.to(torch.float32).contiguous()
    per_sample = x[0].numel() if len(x) else 0
    t = torch.arange(ex.T, dtype=torch.int64, device=x.device)[:, None]
    idx = torch.arange(x.numel(), dtype=torch.int64, device=x.device)[None, :] + ex.lo * per_sample
    offset = (t * (ex.n_full * per_sample) + idx).reshape(ex.T, *x.shape)
    ex.buf[la.writes[0]] = (philox_uniform(ex.run_seed, offset) < x).to(torch.uint8)


@dp_kernel("torch.adamw_step")
def _adamw(base, ex, la) -> None:
    """Start the all-reduce of this loss's gradients (one flat bucket), then finish the previous bucket."""
    nodes = list(la.nodes)
    keys = [k for k in ex.params if k.rsplit(".", 1)[0] in set(nodes) and k not in ex.reduced and k in ex.grads]
    flat = torch.cat([ex.grads[k].reshape(-1) for k in keys]) if keys else torch.zeros(0, device=ex.device)
    work = ex.comm.all_reduce(flat, f"the gradients of {'+'.join(nodes)}", async_op=True) if keys else None
    ex.complete_pending()
    ex.pending.append((work, flat, keys, nodes))

