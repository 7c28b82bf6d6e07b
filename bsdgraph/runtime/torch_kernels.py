"""The kernel table of the cpu backend: every kernel name a plan can launch, implemented with torch.

Each kernel is ``fn(ctx, *inputs) -> outputs`` (``runtime/context.py``): the tensors of its launch's reads in,
one value per write out. Synapses run as one GEMM (or convolution) over all T*B rows; a time-invariant input
(direct encoding) is multiplied once and its current broadcast over T. Gradients are explicit and local: the
ReCo gradient in closed form, dW = dV^T s as one GEMM, the LIF backward through its recurrence, and for ops
between a loss and its weights (batchnorm, pooling, upsampling) a local vector-Jacobian product of that one op.
No input gradient of any synapse is ever computed.

Spikes are stored as uint8; a buffer whose plan shape has no ``T`` axis is time-invariant and stored once as
``[rows, ...]``; B's buffers hold one row per class present when the plan deduplicates them (``Grouping``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from bsdgraph.compiler.plan import GROUPING, LABELS, Kind, Ref, param, value
from bsdgraph.ir.graph import Op
from bsdgraph.registry import registrar
from bsdgraph.runtime.common import encode_input, encode_target
from bsdgraph.runtime.context import Ctx, Grouping
from bsdgraph.runtime.local_adamw import adamw_step
from bsdgraph.runtime.losses import (
    CODE_SCALE, band_split, class_codes, class_loss, class_scores, per_sample, per_step, smoothed_targets,
)
from bsdgraph.runtime.reco_dedup import reco_loss_grad_dedup
from kernels.ref.encode import poisson_encode
from bsdgraph.ir.neurons import neuron_of
from bsdgraph.runtime.neurons import twin_backward, twin_forward, twin_step_fn
from kernels.ref.lif import lif_backward, lif_forward
from kernels.ref.linear_lif import rec_lif_backward, rec_lif_forward
from kernels.ref.local_update import weight_grad
from kernels.ref.reco import reco_loss_grad, reco_loss_grad_each_step

# The primitives a backend plugs in (same signatures as the launchers in kernels/): the torch twins here, the
# Triton launchers in the triton backend. Kernels call them as ``ctx.prims.<name>``.
TWIN_PRIMS = dict(lif_forward=lif_forward, lif_backward=lif_backward, weight_grad=weight_grad,
                  neuron_forward=twin_forward, neuron_backward=twin_backward,
                  reco_loss_grad=reco_loss_grad, poisson_encode=poisson_encode, rec_lif_forward=rec_lif_forward,
                  rec_lif_backward=rec_lif_backward)

KERNELS: dict = {}
kernel = registrar(KERNELS)


# ---------------------------------------------------------------------------------------------------- reading


def steps(ctx: Ctx, ref: Ref, v: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A buffer as [T, rows, ...] float32 (a time-invariant one expanded as a view, not copied).

    ``shape`` is the per-sample shape the reader expects: a view node (flatten, unflatten) shares its
    producer's buffer, so the buffer may be stored in the producer's shape."""
    if ctx.time_invariant(ref):
        v = v.unsqueeze(0).expand(ctx.T, *v.shape)
    # spikes: torch's uint8 -> float32 cast (4x128x1024, 2 threads: 82-91 us; numpy's astype 144-184 us,
    # 1 thread 140 vs 155 us; re-measured after an earlier build had favoured numpy)
    if v.dtype != torch.float32:
        v = v.to(torch.float32)
    return v if shape is None else v.reshape(ctx.T, -1, *shape)


def to_samples(ctx: Ctx, ref: Ref, v: torch.Tensor, grouping: Grouping | None) -> torch.Tensor:
    """[T, R, ...] per-class rows -> [T, B, ...] per sample (other buffers unchanged)."""
    return v.index_select(1, grouping.inverse) if ctx.per_class(ref) else v


def to_rows(ctx: Ctx, ref: Ref, g: torch.Tensor, grouping: Grouping | None) -> torch.Tensor:
    """A per-sample gradient for buffer ``ref``, summed per class if that buffer is per class (exact: B's rows
    for one class are identical, so their gradients add)."""
    if not ctx.per_class(ref):
        return g
    out = torch.zeros((g.shape[0], len(grouping.classes), *g.shape[2:]), dtype=g.dtype, device=g.device)
    return out.index_add_(1, grouping.inverse, g)


def row_mean(ctx: Ctx, ref: Ref, v: torch.Tensor, grouping: Grouping | None):
    """Mean over samples of a [T, rows, ...] buffer (per-class rows weighted by their sample counts). Eager on the
    CPU a float (counting spikes with numpy: 59 vs 252 us, measured); otherwise a 0-d tensor, read back only
    where the results are (a compiled step makes no host read)."""
    host = v.device.type == "cpu" and not torch.compiler.is_compiling()
    if not ctx.per_class(ref):
        if host and v.dtype == torch.uint8:  # 0/1 spikes: count them
            return int(np.count_nonzero(v.numpy())) / max(v.numel(), 1)
        mean = v.float().mean()
        return float(mean) if host else mean
    per_row = v.float().transpose(0, 1).reshape(v.shape[1], -1).mean(1)
    mean = (per_row * grouping.counts).sum() / grouping.counts.sum()
    return float(mean) if host else mean


def _wb(args, node: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    return args[param(node, "weight")], args.get(param(node, "bias"))


def _rows(ctx: Ctx, ref: Ref, v: torch.Tensor, sample_shape) -> tuple[torch.Tensor, bool]:
    """A buffer as rows [R, *sample_shape]: B rows when time-invariant, else T*B rows."""
    if ctx.time_invariant(ref):
        v = v.to(torch.float32)
        return v.reshape(v.shape[0], *sample_shape), True
    return steps(ctx, ref, v).reshape(-1, *sample_shape), False


def _per_rows(ctx: Ctx, ref: Ref, v: torch.Tensor, in_shape, fn) -> torch.Tensor:
    """Apply a per-sample op to all rows; a time-invariant input is processed once and broadcast over T."""
    rows, invariant = _rows(ctx, ref, v, in_shape)
    out = fn(rows)
    if invariant:
        return out.unsqueeze(0).expand(ctx.T, *out.shape)
    return out.reshape(ctx.T, -1, *out.shape[1:])


# ---------------------------------------------------------------------------------------------------- forward


@kernel("group_classes")
def group_classes(ctx: Ctx, y):
    """B's rows: one per class, present in the batch or not, each sample's row its label, and the counts (0 for a
    class the batch lacks, whose row then weighs nothing: results are those of the classes present). No value is
    read back to the host and the shapes do not depend on the batch (``torch.unique`` did both). Without labels (a
    layer-parallel pipeline's fill) every class counts once."""
    n = ctx.graph.by_op(Op.TARGET)[0].attrs["n_classes"]
    classes = torch.arange(n, device=ctx.device)
    if y is None:
        return (Grouping(classes, classes, torch.ones(n, dtype=torch.int64, device=ctx.device)),)
    return (Grouping(classes, y, class_counts(y, n)),)


def class_counts(y: torch.Tensor, n: int) -> torch.Tensor:
    """Samples per class, int64 [n] (a scatter: static shape, no host read, unlike bincount)."""
    return torch.zeros(n, dtype=torch.int64, device=y.device).scatter_add_(0, y, torch.ones_like(y))


@kernel("torch.one_hot")
def one_hot(ctx: Ctx, labels):
    labels = labels.classes if isinstance(labels, Grouping) else labels
    return (encode_target(ctx.node, labels, ctx.T),)


@kernel("encode_direct")
def encode_direct(ctx: Ctx, x):
    """The stimulus repeated over T (materialised: only when the time-invariance pass is switched off), or a
    sequence stimulus [B, T, ...] as [T, B, ...]."""
    return (encode_input(ctx.node, x, ctx.T, 0).contiguous(),)


@kernel("poisson_encode")
def poisson(ctx: Ctx, x, seed):
    return (ctx.prims.poisson_encode(x.to(torch.float32).contiguous(), ctx.T, seed),)


def synapse(ctx: Ctx, node: str, ref: Ref, v: torch.Tensor, w, b) -> torch.Tensor:
    n = ctx.graph[node]
    a = n.attrs
    fns = {
        Op.LINEAR: lambda r: F.linear(r, w, b),
        Op.CONV2D: lambda r: F.conv2d(r, w, b, a["stride"], a["padding"]),
        Op.CONV_T2D: lambda r: F.conv_transpose2d(r, w, b, a["stride"], a["padding"], a["output_padding"]),
    }
    return _per_rows(ctx, ref, v, ctx.in_shape(node), fns[n.op])


@kernel("torch.linear", "torch.conv2d", "torch.conv_transpose2d")
def synapse_launch(ctx: Ctx, src, *ps):
    (node,) = ctx.launch.nodes
    return (synapse(ctx, node, ctx.launch.reads[0], src, *_wb(ctx.args((src, *ps)), node)),)


@kernel("torch.add")
def add(ctx: Ctx, *srcs):
    """A sum of same-shaped values: a residual merge of spikes (uint8 in, float32 out: 0, 1, 2...) or of currents,
    and B's fan-in. A time-invariant operand is broadcast over T; operands add in port order."""
    (name,) = ctx.launch.nodes
    shape = ctx.graph[name].shape
    total = steps(ctx, ctx.launch.reads[0], srcs[0], shape)
    for ref, v in zip(ctx.launch.reads[1:], srcs[1:]):
        total = total + steps(ctx, ref, v, shape)
    return (total.contiguous(),)


def neuron_outputs(ctx: Ctx, lif: str, spikes, h=None, current_node: str | None = None, current=None,
                   grouping=None) -> tuple:
    """A neuron launch's outputs: its spikes and firing rate, h and the current V when a loss reads them (a
    time-invariant current, identical over T, is stored once)."""
    out = {value(lif): spikes, Ref(Kind.MEMBRANE, lif): h}
    if ctx.wants(Ref(Kind.RATE, lif)):
        out[Ref(Kind.RATE, lif)] = row_mean(ctx, value(lif), spikes, grouping)
    if current is not None and current_node is not None and ctx.wants(value(current_node)):
        out[value(current_node)] = current[0] if ctx.time_invariant(value(current_node)) else current
    return ctx.outputs(out)


def _lif_attrs(ctx: Ctx, lif: str):
    a = ctx.graph[lif].attrs
    return a["tau"], a["v_th"], a["v_reset"], a["reset"] == "soft"


def _grouping(ins) -> Grouping | None:
    return ins[-1] if ins and isinstance(ins[-1], Grouping) else None


@kernel("lif_forward")
def lif(ctx: Ctx, current, *rest):
    (name,) = ctx.launch.nodes
    cur = steps(ctx, ctx.launch.reads[0], current, ctx.graph[name].shape)
    spikes, h = ctx.prims.lif_forward(cur.contiguous(), *_lif_attrs(ctx, name), None,
                                      ctx.wants(Ref(Kind.MEMBRANE, name)))
    return neuron_outputs(ctx, name, spikes, h, grouping=_grouping(rest))


@kernel("linear_lif_forward")
def linear_lif(ctx: Ctx, src, *rest):
    syn, name = ctx.launch.nodes
    args = ctx.args((src, *rest))
    current = synapse(ctx, syn, ctx.launch.reads[0], src, *_wb(args, syn))
    spikes, h = ctx.prims.lif_forward(current.contiguous(), *_lif_attrs(ctx, name), None,
                                      ctx.wants(Ref(Kind.MEMBRANE, name)))
    return neuron_outputs(ctx, name, spikes, h, syn, current, _grouping(rest))


@kernel("linear_lif_rec_forward")
def linear_lif_rec(ctx: Ctx, src, *rest):
    """A recurrent layer: the feedforward GEMM over all T*B rows at once (or once, for a time-invariant input),
    then the time loop, where step t adds s[t-1] Uᵀ before the LIF update."""
    ff, rec, add, name = ctx.launch.nodes
    args = ctx.args((src, *rest))
    current = synapse(ctx, ff, ctx.launch.reads[0], src, *_wb(args, ff)).contiguous()
    spikes, v, h = ctx.prims.rec_lif_forward(current, *_wb(args, rec), *_lif_attrs(ctx, name),
                                             ctx.wants(value(add)), ctx.wants(Ref(Kind.MEMBRANE, name)))
    return neuron_outputs(ctx, name, spikes, h, add, v, _grouping(rest))


@kernel("neuron_forward")
def neuron(ctx: Ctx, current, *rest):
    """A declared neuron over T (ir/neurons.py): the generated twin on the cpu, the generated kernel on Triton."""
    (name,) = ctx.launch.nodes
    cur = steps(ctx, ctx.launch.reads[0], current, ctx.graph[name].shape)
    decl, values = neuron_of(ctx.graph[name])
    out, h = ctx.prims.neuron_forward(decl, values, cur.contiguous(), ctx.wants(Ref(Kind.MEMBRANE, name)))
    return neuron_outputs(ctx, name, out, h, grouping=_grouping(rest))


@kernel("neuron_rec_forward", "rec_conv_forward")
def neuron_rec(ctx: Ctx, src, *rest):
    """A recurrent layer of a declared neuron, or of convolutions: the feedforward synapse over all rows at once,
    then the time loop of the neuron's generated twin step (for the lif op, bitwise kernels/ref/lif.py), where
    step t adds rec(value[t-1]) (the reference's expression, in its order)."""
    ff, rec, add, name = ctx.launch.nodes
    args = ctx.args((src, *rest))
    current = synapse(ctx, ff, ctx.launch.reads[0], src, *_wb(args, ff)).contiguous()
    w, b = _wb(args, rec)
    a = ctx.graph[rec].attrs
    recurrent = {Op.LINEAR: lambda v: F.linear(v, w, b),
                 Op.CONV2D: lambda v: F.conv2d(v, w, b, a["stride"], a["padding"])}[ctx.graph[rec].op]
    decl, values = neuron_of(ctx.graph[name])
    step = twin_step_fn(decl, values, current, 2.0, grad=False)
    prev, states, outs, hs, currents = torch.zeros_like(current[0]), None, [], [], []
    with torch.no_grad():
        for t in range(ctx.T):
            i = current[t] + recurrent(prev)
            prev, h, states = step(i, states)
            outs.append(prev)
            hs.append(h)
            currents.append(i)
    out = torch.stack(outs)
    out = out.to(torch.uint8) if decl.spiking else out
    want_h = ctx.wants(Ref(Kind.MEMBRANE, name))
    return neuron_outputs(ctx, name, out, torch.stack(hs) if want_h else None, add,
                          torch.stack(currents) if ctx.wants(value(add)) else None, _grouping(rest))


@kernel("torch.batch_norm")
def batch_norm(ctx: Ctx, src, *rest):
    (name,) = ctx.launch.nodes
    n = ctx.graph[name]
    args = ctx.args((src, *rest))
    w, b = _wb(args, name)
    rm, rv = args[Ref(Kind.STATE, name, "running_mean")], args[Ref(Kind.STATE, name, "running_var")]
    v = steps(ctx, ctx.launch.reads[0], src, n.shape)
    if ctx.per_class(ctx.launch.reads[0]):  # B on one row per class present: statistics weighted by the counts
        out, mean, invstd = class_weighted_batch_norm(v, args[GROUPING].counts, w, b, rm, rv, ctx.training,
                                                      n.attrs["momentum"], n.attrs["eps"])
    else:
        # F.batch_norm's own CPU path, keeping the batch mean and 1/std that its backward needs (saves the
        # backward a forward re-run: fmnist_cnn's four batchnorm backwards took 170 ms per step with
        # torch.func.vjp, 58 now)
        out, mean, invstd = torch.ops.aten.native_batch_norm(v.reshape(-1, *v.shape[2:]), w, b, rm, rv,
                                                             ctx.training, n.attrs["momentum"], n.attrs["eps"])
        out = out.reshape(v.shape)
    return ctx.outputs({value(name): out, Ref(Kind.STATS, name): torch.stack([mean, invstd]) if ctx.training
                        else None})


def _class_layout(v: torch.Tensor, counts: torch.Tensor):
    """For a [T, R, C, ...] buffer of per-class rows: the per-row weights shaped to broadcast, the number of values
    per channel of the full batch they stand for (T * B * spatial), the broadcast shape of a per-channel vector,
    and the dimensions a per-channel sum runs over."""
    wts = counts.to(v.dtype).view(1, -1, *[1] * (v.dim() - 2))
    n = (counts.sum() * (v.shape[0] * math.prod(v.shape[3:]))).to(v.dtype)  # a tensor: no host read
    return wts, n, (1, 1, v.shape[2], *[1] * (v.dim() - 3)), [d for d in range(v.dim()) if d != 2]


def class_weighted_batch_norm(v, counts, w, b, rm, rv, training, momentum, eps):
    """Batchnorm of per-class rows [T, R, C, ...] that stand for ``counts[r]`` identical samples each: the batch
    statistics of the full batch, as sums over the R rows weighted by their counts (exact up to summation order:
    tests/test_class_batchnorm.py against torch's batchnorm of the expanded batch, tests/test_cpu_backend.py a
    whole step against the plain plan). This is what lets a backward network with batchnorm (every conv
    classifier) run once per class. Returns (out, mean, invstd) per channel."""
    wts, n, shape, dims = _class_layout(v, counts)
    if not training:
        mean, invstd = rm, (rv + eps).rsqrt()
    else:
        # the mean as a shift (each channel's first value) plus the weighted mean of the differences: exact for a
        # constant channel (a silent layer's bias), whose output must then be exactly the bias, as torch's is;
        # a plain weighted sum leaves rounding noise that 1/sqrt(eps) turns into a visible signal
        first = v[(0, 0, slice(None)) + (0,) * (v.dim() - 3)].view(shape)
        mean = (first + ((v - first) * wts).sum(dims).view(shape) / n).view(-1)
        var = ((v - mean.view(shape)).pow(2) * wts).sum(dims) / n
        invstd = (var + eps).rsqrt()
        if rm is not None:  # running statistics as F.batch_norm keeps them: the unbiased variance
            rm.mul_(1 - momentum).add_(momentum * mean)
            rv.mul_(1 - momentum).add_(momentum * var * (n / (n - 1).clamp(min=1)))
    out = (v - mean.view(shape)) * (invstd * (w if w is not None else 1)).view(shape)
    return (out + b.view(shape) if b is not None else out), mean, invstd


def class_weighted_batch_norm_backward(grad, v, counts, w, mean, invstd):
    """Backward of ``class_weighted_batch_norm`` for gradients that are already per-class sums (as every
    gradient of a deduplicated B buffer is). Per sample, dx_k = w invstd (dy_k - S/n - x̂_k S'/n) with
    S = sum dy, S' = sum dy x̂ over the full batch; summed over the counts[r] samples of class r this is
    w invstd (g_r - counts[r] (S + x̂_r S') / n), and S, S' are plain sums over the rows of g."""
    wts, n, shape, dims = _class_layout(v, counts)
    xhat = (v - mean.view(shape)) * invstd.view(shape)
    g_b, g_w = grad.sum(dims), (grad * xhat).sum(dims)
    scale = invstd * (w if w is not None else 1)
    g_in = (grad - wts * (g_b.view(shape) + xhat * g_w.view(shape)) / n) * scale.view(shape)
    return g_in, g_w, g_b


def _upsample_nearest(size):
    """F.interpolate(mode="nearest") to ``size``; for whole-number factors a broadcast copy with the same values
    (tests/test_cpu_backend.py), measured 37 -> 24 ms for [512, 32, 14, 14] -> 28 x 28."""
    def up(r: torch.Tensor) -> torch.Tensor:
        (h, w), (hh, ww) = r.shape[-2:], size
        if hh % h or ww % w:
            return F.interpolate(r, size=size, mode="nearest")
        lead = r.shape[:-2]
        return r[..., :, None, :, None].expand(*lead, h, hh // h, w, ww // w).reshape(*lead, hh, ww)
    return up


_TRANSFORMS = {
    Op.AVGPOOL2D: lambda a: lambda r: F.avg_pool2d(r, a["kernel"], a["stride"] or a["kernel"]),
    Op.MAXPOOL2D: lambda a: lambda r: F.max_pool2d(r, a["kernel"], a["stride"] or a["kernel"]),
    Op.UPSAMPLE2D: lambda a: _upsample_nearest(tuple(a["size"])),
}


def _maxpool_spikes(s: torch.Tensor, kernel, stride) -> torch.Tensor:
    """Max-pooling of 0/1 spikes kept as uint8: the elementwise max of the kh*kw strided views (exact, and spikes
    again). [512, 32, 28, 28], 2x2, 2 threads: 6 ms against 32-48 ms for F.max_pool2d on their float copy."""
    (kh, kw), (sh, sw) = _pair(kernel), _pair(stride)
    (h, w) = s.shape[-2:]
    ends = (sh * ((h - kh) // sh) + 1, sw * ((w - kw) // sw) + 1)
    out = None
    for i in range(kh):
        for j in range(kw):
            view = s[..., i:i + ends[0]:sh, j:j + ends[1]:sw]
            out = view.clone() if out is None else torch.maximum(out, view, out=out)
    return out


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@kernel("torch.avg_pool2d", "torch.max_pool2d", "torch.upsample_nearest2d")
def transform(ctx: Ctx, src):
    (name,) = ctx.launch.nodes
    n = ctx.graph[name]
    if n.op == Op.MAXPOOL2D and src.dtype == torch.uint8:  # spikes (lower.py declares the result u8 too)
        a = n.attrs
        return (_maxpool_spikes(src, a["kernel"], a["stride"] or a["kernel"]),)
    return (_per_rows(ctx, ctx.launch.reads[0], src, ctx.in_shape(name), _TRANSFORMS[n.op](n.attrs)),)


# ---------------------------------------------------------------------------------------------------- losses


def _reco_terms(n, a, b, labels, reco_loss_grad):
    """(loss, dA, dB) on [T, B, ...] inputs; the frequency-aware variant sums ReCo over the two FFT bands.

    The band split P (a real, radially symmetric 0/1 mask in Fourier space) is an orthogonal projection, so the
    gradient of the low-band term maps back through P and the high-band one through (1 - P): P g_lo + (1 - P) g_hi.
    Each band's ReCo gradient is a combination of that band's rows (h @ b_lo - coef * a_lo, ...), i.e. it already
    lies in the band: P g_lo = g_lo and (1 - P) g_hi = g_hi, so the sum needs no split at all. (Splitting it
    again, as before, cost two of the four band splits: 1.39x / 1.33x per call on fmnist_ae's [8, 128, 16, 14, 14]
    and [8, 128, 32, 7, 7] operands, interleaved, 2 threads; gradients equal to 8e-7 relative.)"""
    at = n.attrs
    if at["rows"] == "each_step":  # T independent B x B problems, batched in torch (no Triton kernel)
        return reco_loss_grad_each_step(a, b, labels, at["lam"], at["negatives"], at["eps"])
    if at["rows"] == "step":
        loss, da, db = reco_loss_grad(per_step(a), per_step(b), labels, at["lam"], at["negatives"], at["eps"])
        return loss, da.reshape(a.shape), db.reshape(b.shape)
    if not at["freq"]:
        loss, da, db = reco_loss_grad(per_sample(a), per_sample(b), labels, at["lam"], at["negatives"], at["eps"])
        return loss, _unsample(da, a), _unsample(db, b)
    (al, ah), (bl, bh) = band_split(a, at["freq_r"]), band_split(b, at["freq_r"])
    lo = reco_loss_grad(per_sample(al), per_sample(bl), labels, at["lam_low"], at["negatives"], at["eps"])
    hi = reco_loss_grad(per_sample(ah), per_sample(bh), labels, at["lam_high"], at["negatives"], at["eps"])
    return lo[0] + hi[0], _unsample(lo[1] + hi[1], a), _unsample(lo[2] + hi[2], b)


def _unsample(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of per_sample: [B, T*D] -> [T, B, ...] shaped like ``like``."""
    return rows.reshape(like.shape[1], like.shape[0], *like.shape[2:]).transpose(0, 1)


def loss_operands(ctx: Ctx, ins) -> tuple[list[torch.Tensor], dict[Ref, torch.Tensor]]:
    """The loss's node operands as [T, B, *node shape] per sample (a view's buffer may be stored flat), and all
    its inputs by ref."""
    args = ctx.args(ins)
    (name,) = ctx.launch.nodes
    operands = ctx.operands()
    grouping = args.get(GROUPING)
    vals = [to_samples(ctx, r, steps(ctx, r, args[r], n.shape), grouping)
            for r, n in zip(operands, ctx.inputs_of(name))]
    return vals, args


def loss_outputs(ctx: Ctx, loss, grads: list[torch.Tensor | None], args) -> tuple:
    """A loss launch's outputs: its value and the gradient of each operand it writes (a time-invariant operand's
    gradient is the sum over the steps that read it; a per-class operand's is summed per class)."""
    (name,) = ctx.launch.nodes
    out = {Ref(Kind.LOSS, name): loss}
    operands = ctx.operands()
    for r, g in zip(operands, grads):
        ref = Ref(Kind.GRAD, r.node)
        if g is not None and ctx.wants(ref):
            out[ref] = g.sum(0) if ctx.time_invariant(r) else to_rows(ctx, r, g, args.get(GROUPING))
    return ctx.outputs(out)


@kernel("reco_loss_grad")
def reco(ctx: Ctx, *ins):
    n = ctx.node
    if ctx.per_class(ctx.launch.reads[1]) and not n.attrs["freq"]:
        return reco_dedup(ctx, *ins)
    (a, b), args = loss_operands(ctx, ins)
    # labels only matter for negatives='other_class'; a regression model's targets are not class labels
    labels = args.get(LABELS)
    loss, da, db = _reco_terms(n, a, b, labels, ctx.prims.reco_loss_grad)
    return loss_outputs(ctx, loss, [da, db], args)


def reco_dedup(ctx: Ctx, *ins):
    """F rows per sample against B rows per class: the B x R form, whose B gradient is already per class."""
    n = ctx.node
    args = ctx.args(ins)
    f_ref, b_ref = ctx.launch.reads[:2]
    f_node, b_node = ctx.inputs_of(n.name)
    grouping = args[GROUPING]
    if ctx.time_invariant(f_ref):  # the direct stimulus: no T copies, and it has no gradient to take
        a = args[f_ref].to(torch.float32).reshape(args[f_ref].shape[0], -1)
    else:
        a = steps(ctx, f_ref, args[f_ref], f_node.shape).reshape(ctx.T, -1, math.prod(f_node.shape))
    u = steps(ctx, b_ref, args[b_ref], b_node.shape).reshape(ctx.T, -1, math.prod(b_node.shape))
    at = n.attrs
    f_grad, b_grad = Ref(Kind.GRAD, f_ref.node), Ref(Kind.GRAD, b_ref.node)
    loss, da, du = reco_loss_grad_dedup(a, u, grouping.inverse, grouping.counts, at["lam"], at["negatives"],
                                        at["eps"], need_da=ctx.wants(f_grad))
    return ctx.outputs({Ref(Kind.LOSS, n.name): loss, f_grad: da, b_grad: du})


@kernel("torch.cross_entropy_grad")
def cross_entropy(ctx: Ctx, *ins):
    n = ctx.node
    (v,), args = loss_operands(ctx, ins)
    labels = args[LABELS]
    k, s = n.attrs["population"], n.attrs["smoothing"]
    if n.attrs["per_step"]:  # step t's current classified against y[:, t]; the loss is the mean over B*T steps
        z = v.transpose(0, 1)
        loss = class_loss(v, labels, 1, True, s)
        dz = (torch.softmax(z, -1) - smoothed_targets(labels, z.shape[-1], s, z.dtype)) / labels.numel()
        return loss_outputs(ctx, loss, [dz.transpose(0, 1).contiguous()], args)
    codes = class_codes(n.attrs, v.shape[-1], v.device)
    z = class_scores(v, k, codes=codes)
    loss = F.cross_entropy(z, labels, label_smoothing=s)
    dz = (torch.softmax(z, 1) - smoothed_targets(labels, z.shape[1], s, z.dtype)) / z.shape[0]
    if codes is not None:  # z = S cos(m, c) of the time-mean current m: back through the cosine to m, then to V
        dm = cosine_scores_grad(v.mean(0), codes, dz)
        return loss_outputs(ctx, loss, [(dm / ctx.T).unsqueeze(0).expand_as(v).contiguous()], args)
    # z = mean over T and over each class's k neurons: every contributing V element gets dz / (T k)
    dv = dz.repeat_interleave(k, dim=1) / (ctx.T * k)
    return loss_outputs(ctx, loss, [dv.unsqueeze(0).expand_as(v).contiguous()], args)


def cosine_scores_grad(m: torch.Tensor, codes: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """dL/dm of z = CODE_SCALE * (m / |m|) . (c / |c|) given dL/dz [B, C]: with u = m / |m| and cos = u . ĉ,
    d cos / dm = (ĉ - cos u) / |m|."""
    norm = m.norm(dim=1, keepdim=True).clamp_min(1e-12)
    chat = F.normalize(codes.to(m), dim=1)
    cos = (m / norm) @ chat.T
    return CODE_SCALE * (dz @ chat - (dz * cos).sum(1, keepdim=True) * (m / norm)) / norm


def mse_recall_per_class(ctx: Ctx, *ins):
    """The recall MSE mean((u[t, r_k] - a[t, k])^2) against B's per-class rows u [T, R, D], without expanding u
    to samples. With c_r samples of class r (on this process), their sum S_r and mean m_r = S_r / c_r:

        dL/du[t, r] = 2 (c_r u[t, r] - S_r[t]) / N           (the per-class sum of the per-sample gradients)
        N L = sum_{t,r} c_r |u[t, r] - m_r[t]|^2 + sum_{t,k} |a[t, k] - m_{r_k}[t]|^2

    (the second form, not |u|^2 - 2 u.a + |a|^2, has no cancellation when u is close to the stimulus). A
    time-invariant stimulus is grouped once, not T times. fmnist_mlp, B = 128, per-launch timer in a step: 1.3 ms
    -> 0.6 ms."""
    args = ctx.args(ins)
    a_ref, u_ref = ctx.launch.reads[:2]
    a_node, u_node = ctx.inputs_of(ctx.launch.nodes[0])
    inverse = args[GROUPING].inverse
    d = math.prod(u_node.shape)
    u = steps(ctx, u_ref, args[u_ref], u_node.shape).reshape(ctx.T, -1, d)
    steady = ctx.time_invariant(a_ref)
    a = args[a_ref].to(u.dtype).reshape(1, -1, d) if steady else steps(ctx, a_ref, args[a_ref],
                                                                         a_node.shape).reshape(ctx.T, -1, d)
    counts = class_counts(inverse, u.shape[1]).to(u.dtype)[None, :, None]
    sums = torch.zeros((a.shape[0], u.shape[1], d), dtype=u.dtype, device=u.device).index_add_(1, inverse, a)
    means = sums / counts.clamp(min=1)
    spread = (a - means.index_select(1, inverse)).pow(2).sum() * (ctx.T if steady else 1)
    n = ctx.T * a.shape[1] * d
    grad = Ref(Kind.GRAD, u_ref.node)
    return ctx.outputs({Ref(Kind.LOSS, ctx.node.name): ((counts * (u - means).pow(2)).sum() + spread) / n,
                        grad: (2 / n) * (counts * u - sums) if ctx.wants(grad) else None})


@kernel("torch.mse_grad")
def mse(ctx: Ctx, *ins):
    operands = ctx.operands()
    if len(operands) == 2 and ctx.per_class(operands[1]):
        return mse_recall_per_class(ctx, *ins)
    vals, args = loss_operands(ctx, ins)
    if len(vals) == 2:  # bottom recall: mean((b - a)^2), a is the (fixed) encoded stimulus
        a, b = vals
        diff = b - a
        return loss_outputs(ctx, (diff ** 2).mean(), [None, 2 * diff / diff.numel()], args)
    (v,) = vals
    labels = args[LABELS]
    if ctx.node.attrs["per_step"]:  # V[t] predicts y[:, t]
        diff = v - labels.to(v.dtype).reshape(v.shape[1], v.shape[0], *v.shape[2:]).transpose(0, 1)
        return loss_outputs(ctx, (diff ** 2).mean(), [(2 * diff / diff.numel()).contiguous()], args)
    y = labels.to(v.dtype).reshape(v.shape[1:])
    diff = v.mean(0) - y
    dv = (2 * diff / diff.numel() / ctx.T).unsqueeze(0).expand_as(v).contiguous()
    return loss_outputs(ctx, (diff ** 2).mean(), [dv], args)


# ---------------------------------------------------------------------------------------------------- gradients


@kernel("lif_backward")
def lif_back(ctx: Ctx, grad_h, h):
    n = ctx.node
    grad_h, h = steps(ctx, ctx.launch.reads[0], grad_h, n.shape), steps(ctx, ctx.launch.reads[1], h, n.shape)
    return (ctx.prims.lif_backward(grad_h.contiguous(), h.contiguous(), *_lif_attrs(ctx, n.name),
                                   n.attrs["alpha"]),)


@kernel("rec_lif_time_grad")
def rec_lif_time_grad(ctx: Ctx, grad_v, h, rec_weight):
    """recurrent_credit='through_time': the layer's dL/dV with the credit of every later step (through the
    recurrent synapse and the LIF), which both synapses' weight gradients then read."""
    _, _, lif = ctx.launch.nodes
    return (ctx.prims.rec_lif_backward(grad_v.contiguous(), h.contiguous(), rec_weight, *_lif_attrs(ctx, lif),
                                       ctx.graph[lif].attrs["alpha"]),)


@kernel("neuron_backward")
def neuron_back(ctx: Ctx, grad_h, current):
    """dL/d current of a declared neuron from dL/dh, recomputing its forward from the saved input current."""
    n = ctx.node
    grad_h = steps(ctx, ctx.launch.reads[0], grad_h, n.shape)
    current = steps(ctx, ctx.launch.reads[1], current, n.shape)
    decl, values = neuron_of(n)
    return (ctx.prims.neuron_backward(decl, values, n.attrs["alpha"], current.contiguous(), None,
                                      grad_h.contiguous()),)


@kernel("torch.avg_pool2d_backward", "torch.max_pool2d_backward", "torch.upsample_nearest2d_backward")
def transform_backward(ctx: Ctx, grad, src):
    n = ctx.node
    grad = steps(ctx, ctx.launch.reads[0], grad, n.shape)
    src = steps(ctx, ctx.launch.reads[1], src, ctx.in_shape(n.name))
    rows = src.reshape(-1, *src.shape[2:])
    if n.op == Op.UPSAMPLE2D:  # autograd's own backward of nearest upsampling, without re-running the forward
        g = torch.ops.aten.upsample_nearest2d_backward(grad.reshape(-1, *n.shape).contiguous(), list(n.shape[-2:]),
                                                       list(rows.shape), None, None)
    else:
        _, vjp = torch.func.vjp(_TRANSFORMS[n.op](n.attrs), rows)
        (g,) = vjp(grad.reshape(-1, *n.shape))
    return (g.reshape(ctx.T, -1, *rows.shape[1:]),)


@kernel("torch.batch_norm_backward")
def batch_norm_backward(ctx: Ctx, *ins):
    n = ctx.node
    args = ctx.args(ins)
    grad_ref, src_ref = ctx.launch.reads[:2]
    w, _ = _wb(args, n.name)
    grad, src = steps(ctx, grad_ref, args[grad_ref], n.shape), steps(ctx, src_ref, args[src_ref], n.shape)
    rows = src.reshape(-1, *src.shape[2:])
    stats = args.get(Ref(Kind.STATS, n.name))
    if ctx.per_class(src_ref):  # B's per-class rows: their forward always stored its statistics
        g_in, g_w, g_b = class_weighted_batch_norm_backward(grad, src, args[GROUPING].counts, w, stats[0],
                                                            stats[1])
    else:  # autograd's own batchnorm backward, with the statistics of this step's forward
        g_in, g_w, g_b = torch.ops.aten.native_batch_norm_backward(
            grad.reshape(rows.shape).contiguous(), rows, w, None, None, stats[0], stats[1], True, n.attrs["eps"],
            [True, True, True])
    return ctx.outputs({Ref(Kind.PARAM_GRAD, n.name, "weight"): g_w, Ref(Kind.PARAM_GRAD, n.name, "bias"): g_b,
                        Ref(Kind.GRAD, src_ref.node): g_in.reshape(src.shape)})


def _param_grads(ctx: Ctx, node: str, dw, db) -> tuple:
    return ctx.outputs({Ref(Kind.PARAM_GRAD, node, "weight"): dw, Ref(Kind.PARAM_GRAD, node, "bias"): db})


@kernel("weight_grad")
def linear_weight_grad(ctx: Ctx, grad, src):
    (node,) = ctx.launch.nodes
    n = ctx.graph[node]
    grad_ref, src_ref = ctx.launch.reads[:2]
    delay = ctx.delay(node)
    if ctx.time_invariant(src_ref):  # same input every step: dW = (sum_t dV[t])^T x, T times fewer FLOPs
        # a time-invariant current's gradient is stored already summed over t (lower.py)
        grad = grad if ctx.time_invariant(grad_ref) else steps(ctx, grad_ref, grad).sum(0)
        grad = grad.reshape(-1, n.attrs["out_features"])
        inp = src.reshape(grad.shape[0], -1)
    else:
        grad = steps(ctx, grad_ref, grad).reshape(ctx.T, -1, n.attrs["out_features"])
        # on the CPU spikes are cast to float32 here (a vectorised cast); a GPU kernel reads the uint8 bytes
        inp = (steps(ctx, src_ref, src) if ctx.device.type == "cpu" else src).reshape(ctx.T, grad.shape[1], -1)
        if delay:  # a recurrent synapse reads s[t - delay]: dU = sum_t dV[t]^T s[t - delay]
            grad, inp = grad[delay:], inp[:-delay]
        grad, inp = grad.reshape(-1, grad.shape[-1]), inp.reshape(-1, inp.shape[-1])
    dw, db = ctx.prims.weight_grad(grad.contiguous(), inp.contiguous(), n.attrs["bias"])
    return _param_grads(ctx, node, dw, db)


@kernel("torch.conv2d_weight_grad", "torch.conv_transpose2d_weight_grad")
def conv_weight_grad(ctx: Ctx, *ins):
    (node,) = ctx.launch.nodes
    n = ctx.graph[node]
    args = ctx.args(ins)
    grad_ref, src_ref = ctx.launch.reads[:2]
    a, (w, b) = n.attrs, _wb(args, node)
    grad = steps(ctx, grad_ref, args[grad_ref], n.shape)
    delay = ctx.delay(node)
    if ctx.time_invariant(src_ref):
        grad, inp = grad.sum(0), args[src_ref].to(torch.float32).reshape(-1, *ctx.in_shape(node))
    else:
        inp = steps(ctx, src_ref, args[src_ref], ctx.in_shape(node))
        if delay:  # a recurrent convolution reads s[t - delay]: dU = sum_t conv_grad(dV[t], s[t - delay])
            grad, inp = grad[delay:], inp[:-delay]
        grad, inp = grad.reshape(-1, *grad.shape[2:]), inp.reshape(-1, *ctx.in_shape(node))
    transposed = n.op == Op.CONV_T2D
    _, dw, db = torch.ops.aten.convolution_backward(
        grad.contiguous(), inp.contiguous(), w, [w.shape[1 if transposed else 0]] if b is not None else None,
        list(a["stride"]), list(a["padding"]), [1, 1], transposed,
        list(a["output_padding"]) if transposed else [0, 0], 1, [False, True, b is not None])
    return _param_grads(ctx, node, dw, db if b is not None else None)


@kernel("torch.adamw_step")
def adamw(ctx: Ctx, *ins):
    """AdamW on the parameters of the launch's nodes with the gradients just computed, clipped per node; the
    parameters are updated in place and returned."""
    args = ctx.args(ins)
    owned = {r.key: args[r] for r in ctx.launch.writes}
    grads = {r.key: args[Ref(Kind.PARAM_GRAD, r.node, r.part)] for r in ctx.launch.writes}
    adamw_step(ctx.owned["optimizer"], owned, grads, ctx.owned["clip"], ctx.owned.get("lr"), ctx.owned.get("hyper"))
    return tuple(owned[r.key] for r in ctx.launch.writes)
