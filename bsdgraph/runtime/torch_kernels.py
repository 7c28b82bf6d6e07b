"""The kernel table of the cpu backend: every kernel name a plan can launch, implemented with torch.

Synapses run as one GEMM (or convolution) over all T*B rows; a time-invariant input (direct encoding) is
multiplied once and its current broadcast over T. Gradients are explicit and local: the ReCo gradient in closed
form, dW = dV^T s as one GEMM, the LIF backward through its recurrence, and for ops between a loss and its weights
(batchnorm, pooling, upsampling) a local vector-Jacobian product of that one op. No input gradient of any synapse
is ever computed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bsdgraph.ir.graph import Op
from bsdgraph.runtime.losses import band_split, class_scores, per_sample
from bsdgraph.compiler.lower import Launch
from bsdgraph.runtime.common import encode_input, encode_target
from bsdgraph.runtime.reco_dedup import reco_loss_grad_dedup
from kernels.ref.encode import poisson_encode
from kernels.ref.lif import lif_backward, lif_forward
from kernels.ref.linear_lif import rec_lif_forward
from kernels.ref.local_update import weight_grad
from kernels.ref.reco import reco_loss_grad

# The primitives a backend plugs in (same signatures as the launchers in kernels/): the cpu backend uses the torch
# twins, the triton backend the Triton launchers. Kernels below call them as ``ex.prims.<name>``.
TWIN_PRIMS = dict(lif_forward=lif_forward, lif_backward=lif_backward, weight_grad=weight_grad,
                  reco_loss_grad=reco_loss_grad, poisson_encode=poisson_encode, rec_lif_forward=rec_lif_forward)

KERNELS: dict = {}


def kernel(*names: str):
    def register(fn):
        for name in names:
            KERNELS[name] = fn
        return fn

    return register


def _wb(ex, node: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    return ex.params[f"{node}.weight"], ex.params.get(f"{node}.bias")


def _rows(ex, name: str, sample_shape) -> tuple[torch.Tensor, bool]:
    """A buffer as rows [R, *sample_shape]: B rows when time-invariant, else T*B rows."""
    if ex.is_time_invariant(name):
        v = ex.buf[name].to(torch.float32)
        return v.reshape(v.shape[0], *sample_shape), True
    v = ex.read(name)
    return v.reshape(-1, *sample_shape), False


def _per_rows(ex, src: str, in_shape, fn) -> torch.Tensor:
    """Apply a per-sample op to all rows; a time-invariant input is processed once and broadcast over T."""
    rows, invariant = _rows(ex, src, in_shape)
    out = fn(rows)
    if invariant:
        return out.unsqueeze(0).expand(ex.T, *out.shape)
    return out.reshape(ex.T, -1, *out.shape[1:])


def _in_shape(ex, node: str):
    return ex.graph.inputs(node)[0].shape


# ---------------------------------------------------------------------------------------------------- forward


@kernel("torch.one_hot")
def _target(ex, la: Launch):
    labels = ex.classes if ex.is_per_class(la.writes[0]) else ex.labels
    ex.buf[la.writes[0]] = encode_target(ex.node(la.nodes[0]), labels, ex.T)


@kernel("encode_direct")
def _direct(ex, la: Launch):
    """The stimulus repeated over T (materialised: only when the time-invariance pass is switched off)."""
    ex.buf[la.writes[0]] = encode_input(ex.node(la.nodes[0]), ex.x, ex.T, ex.run_seed).contiguous()


@kernel("poisson_encode")
def _poisson(ex, la: Launch):
    ex.buf[la.writes[0]] = ex.prims.poisson_encode(ex.x.to(torch.float32).contiguous(), ex.T, ex.run_seed)


def _synapse(ex, node: str, src: str) -> torch.Tensor:
    n = ex.node(node)
    w, b = _wb(ex, node)
    a = n.attrs
    fns = {
        Op.LINEAR: lambda r: F.linear(r, w, b),
        Op.CONV2D: lambda r: F.conv2d(r, w, b, a["stride"], a["padding"]),
        Op.CONV_T2D: lambda r: F.conv_transpose2d(r, w, b, a["stride"], a["padding"], a["output_padding"]),
    }
    return _per_rows(ex, src, _in_shape(ex, node), fns[n.op])


@kernel("torch.linear", "torch.conv2d", "torch.conv_transpose2d")
def _synapse_launch(ex, la: Launch):
    ex.buf[la.writes[0]] = _synapse(ex, la.nodes[0], la.reads[0])


def store_lif(ex, lif: str, spikes, h=None, current_node: str | None = None, current=None) -> None:
    """A neuron launch's outputs: its spikes and firing rate, h and the current V when a loss reads them."""
    ex.buf[lif] = spikes
    if h is not None:
        ex.buf[f"h:{lif}"] = h
    if current is not None:  # a time-invariant current ([T, B, ...] identical over T) is stored once
        ex.buf[current_node] = current[0] if ex.is_time_invariant(current_node) else current
    ex.rates[lif] = ex.row_mean(lif, spikes)


def _lif(ex, lif: str, current: torch.Tensor, writes, current_node: str | None = None) -> None:
    """The neuron over ``current``; ``current_node``'s value is stored too when a loss reads it (distill_on=current)."""
    a = ex.node(lif).attrs
    spikes, h = ex.prims.lif_forward(current.contiguous(), a["tau"], a["v_th"], a["v_reset"], a["reset"] == "soft",
                                     None, f"h:{lif}" in writes)
    keep = current_node in writes
    store_lif(ex, lif, spikes, h, current_node if keep else None, current if keep else None)


@kernel("linear_lif_forward")
def _linear_lif(ex, la: Launch):
    syn, lif = la.nodes
    _lif(ex, lif, _synapse(ex, syn, la.reads[0]), la.writes, syn)


@kernel("linear_lif_rec_forward")
def _linear_lif_rec(ex, la: Launch):
    """A recurrent layer: the feedforward GEMM over all T*B rows at once (or once, for a time-invariant input),
    then the time loop, where step t adds s[t-1] Uᵀ before the LIF update."""
    ff, rec, add, lif = la.nodes
    a = ex.node(lif).attrs
    current = _synapse(ex, ff, la.reads[0]).contiguous()
    spikes, v, h = ex.prims.rec_lif_forward(current, *_wb(ex, rec), a["tau"], a["v_th"], a["v_reset"],
                                            a["reset"] == "soft", add in la.writes, f"h:{lif}" in la.writes)
    store_lif(ex, lif, spikes, h, add, v)


@kernel("lif_forward")
def _lif_launch(ex, la: Launch):
    _lif(ex, la.nodes[0], ex.read(la.reads[0], ex.node(la.nodes[0]).shape), la.writes)


@kernel("torch.batch_norm")
def _batchnorm(ex, la: Launch):
    n = ex.node(la.nodes[0])
    w, b = _wb(ex, n.name)
    rm, rv = ex.state[f"{n.name}.running_mean"], ex.state[f"{n.name}.running_var"]
    v = ex.read(la.reads[0], n.shape)
    if ex.is_per_class(la.reads[0]):  # B on one row per class present: statistics weighted by the class counts
        out, mean, invstd = _class_weighted_batch_norm(v, ex.counts, w, b, rm, rv, ex.training, n.attrs["momentum"],
                                                       n.attrs["eps"])
        if ex.training:
            ex.buf[f"bnstats:{n.name}"] = torch.stack([mean, invstd])
        ex.buf[la.writes[0]] = out
        return
    # F.batch_norm's own CPU path, keeping the batch mean and 1/std that its backward needs (saves the backward
    # a forward re-run: fmnist_cnn's four batchnorm backwards took 170 ms per step with torch.func.vjp, 58 now)
    out, mean, invstd = torch.ops.aten.native_batch_norm(v.reshape(-1, *v.shape[2:]), w, b, rm, rv, ex.training,
                                                         n.attrs["momentum"], n.attrs["eps"])
    if ex.training:
        ex.buf[f"bnstats:{n.name}"] = torch.stack([mean, invstd])
    ex.buf[la.writes[0]] = out.reshape(v.shape)


def _class_layout(v: torch.Tensor, counts: torch.Tensor):
    """For a [T, R, C, ...] buffer of per-class rows: the per-row weights shaped to broadcast, the number of values
    per channel of the full batch they stand for (T * B * spatial), the broadcast shape of a per-channel vector,
    and the dimensions a per-channel sum runs over."""
    wts = counts.to(v.dtype).view(1, -1, *[1] * (v.dim() - 2))
    n = float(v.shape[0] * int(counts.sum()) * math.prod(v.shape[3:]))
    return wts, n, (1, 1, v.shape[2], *[1] * (v.dim() - 3)), [d for d in range(v.dim()) if d != 2]


def _class_weighted_batch_norm(v, counts, w, b, rm, rv, training, momentum, eps):
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
            rv.mul_(1 - momentum).add_(momentum * var * (n / max(n - 1, 1)))
    out = (v - mean.view(shape)) * (invstd * (w if w is not None else 1)).view(shape)
    return (out + b.view(shape) if b is not None else out), mean, invstd


def _class_weighted_batch_norm_backward(grad, v, counts, w, mean, invstd):
    """Backward of ``_class_weighted_batch_norm`` for gradients that are already per-class sums (as every
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
def _transform(ex, la: Launch):
    n = ex.node(la.nodes[0])
    src = ex.buf[la.reads[0]]
    if n.op == Op.MAXPOOL2D and src.dtype == torch.uint8:  # spikes (lower.py declares the result u8 too)
        a = n.attrs
        ex.buf[la.writes[0]] = _maxpool_spikes(src, a["kernel"], a["stride"] or a["kernel"])
        return
    ex.buf[la.writes[0]] = _per_rows(ex, la.reads[0], _in_shape(ex, n.name), _TRANSFORMS[n.op](n.attrs))


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


def _loss_inputs(ex, la: Launch) -> list[torch.Tensor]:
    """The loss operands as [T, B, *node shape] (a view's buffer may be stored flat)."""
    return [ex.to_samples(r, ex.read(r, n.shape)) for r, n in zip(la.reads, ex.graph.inputs(la.nodes[0]))]


@kernel("reco_loss_grad")
def _reco(ex, la: Launch):
    n = ex.node(la.nodes[0])
    if ex.is_per_class(la.reads[1]) and not n.attrs["freq"]:
        return _reco_dedup(ex, la, n)
    a, b = _loss_inputs(ex, la)
    # labels only matter for negatives='other_class'; a regression model's targets are not class labels
    labels = ex.labels if n.attrs["negatives"] == "other_class" else None
    loss, da, db = _reco_terms(n, a, b, labels, ex.prims.reco_loss_grad)
    _store_loss_grads(ex, la, loss, [da, db])


def _reco_dedup(ex, la: Launch, n):
    """F rows per sample against B rows per class: the B x R form, whose B gradient is already per class."""
    f_node, b_node = ex.graph.inputs(n.name)
    f_buf, b_buf = la.reads
    if ex.is_time_invariant(f_buf):  # the direct stimulus: no T copies, and it has no gradient to take
        a = ex.buf[f_buf].to(torch.float32).reshape(ex.buf[f_buf].shape[0], -1)
    else:
        a = ex.read(f_buf, f_node.shape).reshape(ex.T, -1, math.prod(f_node.shape))
    u = ex.read(b_buf, b_node.shape).reshape(ex.T, -1, math.prod(b_node.shape))
    at = n.attrs
    f_grad, b_grad = f"grad:{ex.plan_buffer(f_node.name)}", f"grad:{ex.plan_buffer(b_node.name)}"
    loss, da, du = reco_loss_grad_dedup(a, u, ex.inverse, ex.counts, at["lam"], at["negatives"], at["eps"],
                                        need_da=f_grad in la.writes)
    ex.losses[n.name] = loss
    if da is not None:
        ex.buf[f_grad] = da
    if b_grad in la.writes:
        ex.buf[b_grad] = du


def _store_loss_grads(ex, la: Launch, loss, grads: list[torch.Tensor]) -> None:
    ex.losses[la.nodes[0]] = loss
    srcs = [e.src for e in ex.graph.in_edges(la.nodes[0])]
    for src, g in zip(srcs, grads):
        buf = ex.plan_buffer(src)
        if f"grad:{buf}" in la.writes:  # a time-invariant value's gradient: the sum over the steps that read it
            ex.buf[f"grad:{buf}"] = g.sum(0) if ex.is_time_invariant(buf) else ex.to_rows(buf, g)


@kernel("torch.cross_entropy_grad")
def _ce(ex, la: Launch):
    n = ex.node(la.nodes[0])
    (v,) = _loss_inputs(ex, la)
    k = n.attrs["population"]
    z = class_scores(v, k)
    loss = F.cross_entropy(z, ex.labels)
    dz = (torch.softmax(z, 1) - F.one_hot(ex.labels, z.shape[1]).to(z.dtype)) / z.shape[0]
    # z = mean over T and over each class's k neurons: every contributing V element gets dz / (T k)
    dv = dz.repeat_interleave(k, dim=1) / (ex.T * k)
    _store_loss_grads(ex, la, loss, [dv.unsqueeze(0).expand_as(v).contiguous()])


def _mse_recall_per_class(ex, la: Launch) -> None:
    """The recall MSE mean((u[t, r_k] - a[t, k])^2) against B's per-class rows u [T, R, D], without expanding u
    to samples. With c_r samples of class r (on this process), their sum S_r and mean m_r = S_r / c_r:

        dL/du[t, r] = 2 (c_r u[t, r] - S_r[t]) / N           (the per-class sum of the per-sample gradients)
        N L = sum_{t,r} c_r |u[t, r] - m_r[t]|^2 + sum_{t,k} |a[t, k] - m_{r_k}[t]|^2

    (the second form, not |u|^2 - 2 u.a + |a|^2, has no cancellation when u is close to the stimulus). A
    time-invariant stimulus is grouped once, not T times. fmnist_mlp, B = 128, per-launch timer in a step: 1.3 ms
    -> 0.6 ms."""
    a_buf, u_buf = la.reads
    a_node, u_node = ex.graph.inputs(la.nodes[0])
    d = math.prod(u_node.shape)
    u = ex.read(u_buf, u_node.shape).reshape(ex.T, -1, d)
    steady = ex.is_time_invariant(a_buf)
    a = ex.buf[a_buf].to(u.dtype).reshape(1, -1, d) if steady else ex.read(a_buf, a_node.shape).reshape(ex.T, -1, d)
    counts = torch.bincount(ex.inverse, minlength=u.shape[1]).to(u.dtype)[None, :, None]
    sums = torch.zeros((a.shape[0], u.shape[1], d), dtype=u.dtype, device=u.device).index_add_(1, ex.inverse, a)
    means = sums / counts.clamp(min=1)
    spread = (a - means.index_select(1, ex.inverse)).pow(2).sum() * (ex.T if steady else 1)
    n = ex.T * a.shape[1] * d
    ex.losses[la.nodes[0]] = ((counts * (u - means).pow(2)).sum() + spread) / n
    grad = f"grad:{ex.plan_buffer(u_node.name)}"
    if grad in la.writes:
        ex.buf[grad] = (2 / n) * (counts * u - sums)


@kernel("torch.mse_grad")
def _mse(ex, la: Launch):
    if len(la.reads) == 2 and ex.is_per_class(la.reads[1]):
        return _mse_recall_per_class(ex, la)
    vals = _loss_inputs(ex, la)
    if len(vals) == 2:  # bottom recall: mean((b - a)^2), a is the (fixed) encoded stimulus
        a, b = vals
        diff = b - a
        _store_loss_grads(ex, la, (diff ** 2).mean(), [None, 2 * diff / diff.numel()])
        return
    (v,) = vals
    if ex.node(la.nodes[0]).attrs["per_step"]:  # V[t] predicts y[:, t]
        diff = v - ex.labels.to(v.dtype).reshape(v.shape[1], v.shape[0], *v.shape[2:]).transpose(0, 1)
        _store_loss_grads(ex, la, (diff ** 2).mean(), [(2 * diff / diff.numel()).contiguous()])
        return
    y = ex.labels.to(v.dtype).reshape(v.shape[1:])
    diff = v.mean(0) - y
    dv = (2 * diff / diff.numel() / ex.T).unsqueeze(0).expand_as(v).contiguous()
    _store_loss_grads(ex, la, (diff ** 2).mean(), [dv])


# ---------------------------------------------------------------------------------------------------- gradients


@kernel("lif_backward")
def _lif_backward(ex, la: Launch):
    n = ex.node(la.nodes[0])
    a = n.attrs
    grad_h, h = ex.read(la.reads[0], n.shape), ex.read(la.reads[1], n.shape)
    ex.buf[la.writes[0]] = ex.prims.lif_backward(grad_h.contiguous(), h.contiguous(), a["tau"], a["v_th"],
                                                 a["v_reset"], a["reset"] == "soft", a["alpha"])


@kernel("torch.avg_pool2d_backward", "torch.max_pool2d_backward", "torch.upsample_nearest2d_backward")
def _transform_backward(ex, la: Launch):
    n = ex.node(la.nodes[0])
    grad, src = ex.read(la.reads[0], n.shape), ex.read(la.reads[1], _in_shape(ex, n.name))
    rows = src.reshape(-1, *src.shape[2:])
    if n.op == Op.UPSAMPLE2D:  # autograd's own backward of nearest upsampling, without re-running the forward
        g = torch.ops.aten.upsample_nearest2d_backward(grad.reshape(-1, *n.shape).contiguous(), list(n.shape[-2:]),
                                                       list(rows.shape), None, None)
    else:
        _, vjp = torch.func.vjp(_TRANSFORMS[n.op](n.attrs), rows)
        (g,) = vjp(grad.reshape(-1, *n.shape))
    ex.buf[la.writes[0]] = g.reshape(ex.T, -1, *rows.shape[1:])


@kernel("torch.batch_norm_backward")
def _batchnorm_backward(ex, la: Launch):
    n = ex.node(la.nodes[0])
    w, b = _wb(ex, n.name)
    grad, src = ex.read(la.reads[0], n.shape), ex.read(la.reads[1], n.shape)
    rows = src.reshape(-1, *src.shape[2:])
    stats = ex.buf.get(f"bnstats:{n.name}")
    if ex.is_per_class(la.reads[1]):  # B's per-class rows: their forward always stored its statistics
        g_in, g_w, g_b = _class_weighted_batch_norm_backward(grad, src, ex.counts, w, stats[0], stats[1])
    elif stats is not None:  # autograd's own batchnorm backward, with the statistics of this step's forward
        g_in, g_w, g_b = torch.ops.aten.native_batch_norm_backward(
            grad.reshape(rows.shape).contiguous(), rows, w, None, None, stats[0], stats[1], True, n.attrs["eps"],
            [True, True, True])
    else:  # batch statistics recomputed, no running-stat update: the forward already did that once
        fn = lambda r, w_, b_: F.batch_norm(r, None, None, w_, b_, True, 0.0, n.attrs["eps"])  # noqa: E731
        _, vjp = torch.func.vjp(fn, rows, w, b)
        g_in, g_w, g_b = vjp(grad.reshape(rows.shape))
    ex.write_grads(n.name, {"weight": g_w, "bias": g_b})
    ex.buf[la.writes[-1]] = g_in.reshape(src.shape)


@kernel("weight_grad")
def _weight_grad(ex, la: Launch):
    node = la.nodes[0]
    n = ex.node(node)
    grad_buf, src = la.reads
    delay = ex.graph.in_edges(node)[0].delay
    if ex.is_time_invariant(src):  # same input every step: dW = (sum_t dV[t])^T x, T times fewer FLOPs
        # a time-invariant current's gradient is stored already summed over t (lower.py)
        grad = ex.buf[grad_buf] if ex.is_time_invariant(grad_buf) else ex.read(grad_buf).sum(0)
        grad = grad.reshape(-1, n.attrs["out_features"])
        inp = ex.buf[src].reshape(grad.shape[0], -1)
    else:
        grad = ex.read(grad_buf).reshape(ex.T, -1, n.attrs["out_features"])
        # on the CPU spikes are cast to float32 here (ex.read's vectorised cast); a GPU kernel reads the uint8 bytes
        inp = (ex.read(src) if ex.device.type == "cpu" else ex.buf[src]).reshape(ex.T, grad.shape[1], -1)
        if delay:  # a recurrent synapse reads s[t - delay]: dU = sum_t dV[t]^T s[t - delay]
            grad, inp = grad[delay:], inp[:-delay]
        grad, inp = grad.reshape(-1, grad.shape[-1]), inp.reshape(-1, inp.shape[-1])
    dw, db = ex.prims.weight_grad(grad.contiguous(), inp.contiguous(), n.attrs["bias"])
    ex.write_grads(node, {"weight": dw, **({"bias": db} if db is not None else {})})


@kernel("torch.conv2d_weight_grad", "torch.conv_transpose2d_weight_grad")
def _conv_weight_grad(ex, la: Launch):
    node = la.nodes[0]
    n = ex.node(node)
    a, (w, b) = n.attrs, _wb(ex, node)
    grad = ex.read(la.reads[0], n.shape)
    if ex.is_time_invariant(la.reads[1]):
        grad, inp = grad.sum(0), ex.buf[la.reads[1]].to(torch.float32).reshape(-1, *_in_shape(ex, node))
    else:
        grad, inp = grad.reshape(-1, *grad.shape[2:]), ex.read(la.reads[1]).reshape(-1, *_in_shape(ex, node))
    transposed = n.op == Op.CONV_T2D
    _, dw, db = torch.ops.aten.convolution_backward(
        grad.contiguous(), inp.contiguous(), w, [w.shape[1 if transposed else 0]] if b is not None else None,
        list(a["stride"]), list(a["padding"]), [1, 1], transposed,
        list(a["output_padding"]) if transposed else [0, 0], 1, [False, True, b is not None])
    ex.write_grads(node, {"weight": dw, **({"bias": db} if b is not None else {})})


@kernel("torch.adamw_step")
def _adamw(ex, la: Launch):
    ex.apply(list(la.nodes))
