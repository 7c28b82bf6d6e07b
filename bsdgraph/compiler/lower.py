"""Lowering: a BSD graph -> a ``Plan`` of kernel launches, buffers with lifetimes, and a schedule.

Per op, ``LOWERING`` names the kernel of its forward, of the gradient flowing through it (only between a loss
and the parameters it updates: local learning needs no input gradient of any synapse), and of its local weight
update. ``FUSIONS`` merges a synapse with the neuron it feeds into one launch that loops over all T steps.

Schedule (why this order): B depends only on the labels, so it runs first, top-down. F then runs bottom-up one
layer at a time, and right after layer l's forward come its local loss, the gradient path, the weight gradients
and the AdamW step of every parameter that loss owns. Applying a layer's update early is exact: nothing later in
the step reads those weights. Layer l's activations die as soon as layer l+1's forward has read them, so live
activation memory does not grow with depth (see ``Plan.peak_live``).
"""

from __future__ import annotations

from dataclasses import dataclass

from bsdgraph.compiler.feedback import local_params
from bsdgraph.compiler.plan import (
    GROUPING, LABELS, SEED, STIMULUS, Kind, Launch, Plan, Ref, finish, param, value,
)
from bsdgraph.ir.graph import GroupOp, Graph, Node, Op, Stream
from bsdgraph.ir.neurons import is_spiking
from bsdgraph.ir.params import param_shapes


@dataclass(frozen=True)
class Lowering:
    forward: str                # kernel computing the op's output ("view" = no launch, aliases its input)
    grad: str | None = None     # kernel passing a loss gradient back through the op (None: not needed)
    update: str | None = None   # kernel computing the op's parameter gradients (parametric ops)


# Triton kernels are named by their launcher in kernels/; "torch.*" are torch library calls.
LOWERING: dict[Op, Lowering] = {
    Op.INPUT: Lowering("encode_direct"),  # materialised [T, B, ...]; by default the plan reads it as a view
    Op.TARGET: Lowering("torch.one_hot"),
    Op.LINEAR: Lowering("torch.linear", update="weight_grad"),
    Op.CONV2D: Lowering("torch.conv2d", update="torch.conv2d_weight_grad"),
    Op.CONV_T2D: Lowering("torch.conv_transpose2d", update="torch.conv_transpose2d_weight_grad"),
    Op.AVGPOOL2D: Lowering("torch.avg_pool2d", grad="torch.avg_pool2d_backward"),
    Op.MAXPOOL2D: Lowering("torch.max_pool2d", grad="torch.max_pool2d_backward"),
    Op.UPSAMPLE2D: Lowering("torch.upsample_nearest2d", grad="torch.upsample_nearest2d_backward"),
    Op.FLATTEN: Lowering("view", grad="view"),
    Op.UNFLATTEN: Lowering("view", grad="view"),
    Op.BATCHNORM: Lowering("torch.batch_norm", grad="torch.batch_norm_backward", update="torch.batch_norm_backward"),
    # a sum passes its gradient unchanged to every operand; a recurrent layer's sum runs inside RECURRENT_FUSION
    Op.ADD: Lowering("torch.add", grad="view"),
    Op.LIF: Lowering("lif_forward", grad="lif_backward"),
    # a declared neuron's backward recomputes its states from the input current (compiler/neuron_gen.py)
    Op.NEURON: Lowering("neuron_forward", grad="neuron_backward"),
    Op.OUTPUT: Lowering("view", grad="view"),
    Op.RECO: Lowering("reco_loss_grad"),
    Op.CE: Lowering("torch.cross_entropy_grad"),
    Op.MSE: Lowering("torch.mse_grad"),
}

# (producer op, consumer op) -> fused kernel; the producer's only consumer must be the consumer.
FUSIONS: dict[tuple[Op, Op], str] = {(Op.LINEAR, Op.LIF): "linear_lif_forward"}

# A recurrent layer (feedforward linear, recurrent linear, their sum, the LIF) is one launch that loops over T:
# step t needs the layer's own spikes of step t-1, so the recurrent GEMM cannot be hoisted out of the time loop.
RECURRENT_FUSION = "linear_lif_rec_forward"
RECURRENT_NEURON = "neuron_rec_forward"   # the same for a declared neuron (its generated twin step in the loop)
RECURRENT_CONV = "rec_conv_forward"       # a recurrent layer of convolutions (or any synapse but two Linears)
# recurrent_credit='through_time': the layer's loss gradient dL/dV carried back through the recurrent synapse and
# the LIF (kernels/ref/linear_lif.rec_lif_backward); both synapses' weight gradients then read the result
RECURRENT_TIME_GRAD = "rec_lif_time_grad"

OPTIMIZER_KERNEL = "torch.adamw_step"


# ---------------------------------------------------------------------------------------------------- lowering


def _fusion_groups(g: Graph) -> dict[str, tuple[str, ...]]:
    """node -> the nodes of its launch (itself alone, a fused producer+consumer pair, or a recurrent layer)."""
    groups = {n.name: (n.name,) for n in g.nodes}
    for add in g.by_op(Op.ADD):
        if any(any(e.delay for e in g.in_edges(i.name)) for i in g.inputs(add.name)):  # a recurrent layer's sum
            group = _recurrent_group(g, add)
            groups.update({m: group for m in group})
    for n in g.nodes:
        if len(groups[n.name]) > 1:
            continue
        # losses may read the producer too: the fused kernel then also writes the producer's value
        outs = [e for e in g.out_edges(n.name) if g[e.dst].op not in GroupOp.LOSS]
        if len(outs) == 1 and outs[0].delay == 0 and (n.op, g[outs[0].dst].op) in FUSIONS:
            groups[n.name] = groups[outs[0].dst] = (n.name, outs[0].dst)
    return groups


def _recurrent_group(g: Graph, add: Node) -> tuple[str, ...]:
    """(feedforward linear, recurrent linear, sum, LIF) of a recurrent layer; the LIF last (it names the launch's
    main output). derive_feedback guarantees the structure (feedback._recurrent_problems)."""
    ff, rec = (e.src for e in g.in_edges(add.name))
    (lif,) = [c.name for c in g.consumers(add.name) if c.op not in GroupOp.LOSS]
    if g[ff].op not in GroupOp.SYNAPSE or g[rec].op not in (Op.LINEAR, Op.CONV2D) or (
            [e.delay for e in g.in_edges(rec)] != [1]):
        raise ValueError(f"recurrent sum {add.name!r}: expected synapse + linear/conv2d(lif[t-1]) operands")
    return ff, rec, add.name, lif


def _forward_kernel(g: Graph, group: tuple[str, ...], time_invariant: bool) -> str:
    if len(group) == 4:
        if g[group[0]].op != Op.LINEAR or g[group[1]].op != Op.LINEAR:
            return RECURRENT_CONV
        return RECURRENT_FUSION if g[group[3]].op == Op.LIF else RECURRENT_NEURON
    if len(group) == 2:
        return FUSIONS[(g[group[0]].op, g[group[1]].op)]
    n = g[group[0]]
    if n.op == Op.INPUT and n.attrs["encoding"] == "poisson":
        return "poisson_encode"
    if n.op == Op.INPUT and n.attrs["encoding"] == "direct":
        # direct encoding is time-invariant: the stimulus is read as [B, ...], never copied T times
        return "view" if time_invariant else LOWERING[n.op].forward
    return LOWERING[n.op].forward


def can_dedup(g: Graph) -> bool:
    """B can run once per class present when it is a deterministic function of the label: driven by a class
    code (not an analog target). B's batchnorms then take the full batch's statistics as sums over the class rows
    weighted by their counts (runtime/torch_kernels.py)."""
    targets = g.by_op(Op.TARGET)
    # per-step ReCo rows (one contrast over all T*B rows, or one per step) have no per-class form
    per_step = any(n.attrs["rows"] != "sample" for n in g.by_op(Op.RECO))
    return bool(targets) and targets[0].attrs["encoding"] in ("onehot", "population", "code") and not per_step


GROUP_KERNEL = "group_classes"
BATCHNORM_KERNELS = frozenset({"torch.batch_norm", "torch.batch_norm_backward"})
# parameter-gradient kernels that read the parameters themselves (their shapes, or the batchnorm scale)
READS_WEIGHTS = frozenset({"torch.conv2d_weight_grad", "torch.conv_transpose2d_weight_grad",
                           "torch.batch_norm_backward"})


class _Lowerer:
    def __init__(self, g: Graph, dedup: bool, time_invariant: bool):
        self.g, self.groups, self.dedup, self.time_invariant = g, _fusion_groups(g), dedup, time_invariant
        self.launches: list[Launch] = []
        self.done: set[str] = set()
        self.alias: dict[str, Ref] = {}
        self.declared: dict[Ref, tuple[str, tuple]] = {}
        self.membrane_losses = {e.src for n in g.by_op(*GroupOp.LOSS) if n.attrs.get("distill_on") == "membrane"
                                for e in g.in_edges(n.name)}
        # recurrent sums whose layer takes credit through time (a delayed edge without a stop-gradient, from the
        # layer's neurons into its recurrent synapse): sum -> (recurrent synapse, neurons)
        self.through_time = {g.consumers(e.dst)[0].name: (e.dst, e.src) for e in g.edges if e.delay and not e.detach}
        self.saved_membrane = self.membrane_losses | {lif for _, lif in self.through_time.values()}
        inp = g.by_op(Op.INPUT)[0]
        steps = ("T",) if inp.attrs["encoding"] == "sequence" else ()
        self.declare(STIMULUS, "f32", ("B", *steps, *inp.shape))
        out = g.by_op(Op.OUTPUT)[0]
        if out.attrs["task"] == "classification":  # a class per sample, or per step of a sequence
            self.declare(LABELS, "i64", ("B", *(("T",) if out.attrs["target"] == "sequence" else ())))
        else:  # regression targets: a value per sample, or per step of a sequence
            self.declare(LABELS, "f32", ("B", *(("T",) if out.attrs["target"] == "sequence" else ()), *out.shape))
        self.declare(SEED, "obj", ())
        for n in g.nodes:
            for part, shape in param_shapes(n).items():
                self.declare(param(n.name, part), "f32", shape)
            if n.op == Op.BATCHNORM:
                for part in ("running_mean", "running_var"):
                    self.declare(Ref(Kind.STATE, n.name, part), "f32", (n.attrs["num_features"],))
        if dedup:  # B's rows are the classes present: found once per step, read by whatever mixes rows
            self.declare(GROUPING, "obj", ())
            self.emit(GROUP_KERNEL, "prepare", (), [LABELS], [GROUPING])

    # -- bookkeeping
    def rows(self, node: str) -> str:
        """The batch axis of a node's buffers: R (one row per class present) for B when deduplicated."""
        return "R" if self.dedup and self.g[node].stream == Stream.B else "B"

    def buf(self, node: str) -> Ref:
        return self.alias.get(node, value(node))

    def per_class(self, ref: Ref) -> bool:
        return "R" in self.declared[ref][1]

    def time_invariant_ref(self, ref: Ref) -> bool:
        return "T" not in self.declared[ref][1]

    def emit(self, kernel: str, phase: str, nodes, reads, writes) -> None:
        reads = list(reads)
        # what mixes rows (a loss, batch statistics, a firing rate) weighs B's per-class rows by the class counts
        mixes = phase == "loss" or kernel in BATCHNORM_KERNELS or any(w.kind == Kind.RATE for w in writes)
        if mixes and GROUPING in self.declared and GROUPING not in reads and any(
                self.per_class(r) for r in (*reads, *writes) if r in self.declared and r.kind != Kind.RATE):
            reads.append(GROUPING)
        self.launches.append(Launch(len(self.launches), kernel, phase, tuple(nodes), tuple(reads), tuple(writes)))

    def declare(self, ref: Ref, dtype: str, shape: tuple) -> Ref:
        self.declared[ref] = (dtype, tuple(shape))
        return ref

    def params(self, nodes) -> list[Ref]:
        return [param(n, p) for n in nodes for p in param_shapes(self.g[n])]

    def state(self, node: str) -> list[Ref]:
        return [Ref(Kind.STATE, node, "running_mean"), Ref(Kind.STATE, node, "running_var")]

    # -- forward
    def forward(self, name: str) -> None:
        group = self.groups[name]
        if group[0] in self.done:
            return
        outside = [e for m in group for e in self.g.in_edges(m) if e.src not in group]
        for e in outside:
            self.forward(e.src)
        self.done.update(group)
        kernel, last = _forward_kernel(self.g, group, self.time_invariant), self.g[group[-1]]
        if kernel == "view":
            # a direct stimulus read as given ([B, ...], no T copies); any other view shares its input's buffer
            self.alias[last.name] = STIMULUS if last.op == Op.INPUT else self.buf(self.g.in_edges(last.name)[0].src)
            return
        rows = self.rows(last.name)
        out = self.declare(value(last.name), "u8" if self._spikes(last, outside) else "f32",
                           ("T", rows, *last.shape))
        writes = [out]
        # a synapse of a time-invariant input (the direct stimulus) has the same current at every step: stored once
        steady = len(group) == 2 and all(self.time_invariant_ref(self.buf(e.src)) for e in outside)
        for n in group[:-1]:  # a fused producer's value is stored only when a loss (or a backward) reads it
            if any(c.op in GroupOp.LOSS for c in self.g.consumers(n)) or self._saved_current(n, last):
                writes.append(self.declare(value(n), "f32", (() if steady else ("T",)) + (self.rows(n),
                                                                                         *self.g[n].shape)))
        if last.op in GroupOp.NEURON:
            if last.name in self.saved_membrane:
                writes.append(self.declare(Ref(Kind.MEMBRANE, last.name), "f32", ("T", rows, *last.shape)))
            if is_spiking(last):  # a firing rate; a leaky integrator's value is not one
                writes.append(self.declare(Ref(Kind.RATE, last.name), "f32", ()))
        if last.op == Op.INPUT:
            reads = [STIMULUS, SEED] if kernel == "poisson_encode" else [STIMULUS]
        elif last.op == Op.TARGET:
            reads = [GROUPING] if rows == "R" else [LABELS]
        else:
            reads = [self.buf(e.src) for e in outside] + self.params(group)
        if last.op == Op.BATCHNORM:
            reads += self.state(last.name)
            writes.append(self.declare(Ref(Kind.STATS, last.name), "f32", (2, last.attrs["num_features"])))
        phase = "forward-B" if last.stream == Stream.B else "forward-F"
        self.emit(kernel, phase, group, reads, writes)

    def _saved_current(self, n: str, neuron: Node) -> bool:
        """Whether ``n`` is the input current a declared neuron's backward recomputes from (membrane losses)."""
        return (neuron.op == Op.NEURON and neuron.name in self.membrane_losses
                and self.g.in_edges(neuron.name)[0].src == n)

    def _spikes(self, node: Node, inputs) -> bool:
        """Whether ``node``'s value is 0/1 spikes (stored as uint8): a neuron's, or the max-pool of spikes."""
        if node.op in GroupOp.NEURON:
            return is_spiking(node)
        return node.op == Op.MAXPOOL2D and all(self.declared[self.buf(e.src)][0] == "u8" for e in inputs)

    # -- losses and the gradient paths to the parameters each owns
    def loss(self, loss: Node) -> None:
        for e in self.g.in_edges(loss.name):
            self.forward(e.src)
        membrane = loss.attrs.get("distill_on") == "membrane"
        reads = [Ref(Kind.MEMBRANE, e.src) if membrane and self.g[e.src].op in GroupOp.NEURON else self.buf(e.src)
                 for e in self.g.in_edges(loss.name)]
        top = loss.op == Op.CE or (loss.op == Op.MSE and len(reads) == 1)
        if top or (loss.op == Op.RECO and loss.attrs["negatives"] == "other_class"):
            reads.append(LABELS)  # the classes or targets, or the other-class mask of the negatives
        owned = local_params(self.g, loss.name)  # graph order: a stable printout
        needs_grad = [e.src for e in self.g.in_edges(loss.name) if self._reaches(e.src, set(owned))]
        # the gradient of a time-invariant value (stored once) is the derivative w.r.t. that one value: [B, ...]
        writes = [self.declare(Ref(Kind.LOSS, loss.name), "f32", ())]
        writes += [self.declare(Ref(Kind.GRAD, self.buf(s).node), "f32",
                                self._time_axis(s) + (self.rows(s), *self.g[s].shape)) for s in needs_grad]
        self.emit(LOWERING[loss.op].forward, "loss", [loss.name], reads, writes)
        for s in needs_grad:
            self._grad_path(s)
        if owned:
            names = self.params(owned)
            grads = [Ref(Kind.PARAM_GRAD, r.node, r.part) for r in names]
            self.emit(OPTIMIZER_KERNEL, "optimizer", owned, names + grads, names)

    def _time_axis(self, node: str) -> tuple[str, ...]:
        return ("T",) if not self.time_invariant_ref(self.buf(node)) else ()

    def _reaches(self, node: str, owned: set[str]) -> bool:
        # a delayed edge closes a loop inside a recurrent layer: what lies behind it is reached without it
        return node in owned or any(self._reaches(e.src, owned) for e in self.g.in_edges(node)
                                    if not e.detach and not e.delay)

    def _grad_path(self, name: str, grad_in: Ref | None = None) -> None:
        """Emit the launches carrying d(name) (or ``grad_in``) back to the parameters that produced ``name``."""
        n = self.g[name]
        # a delayed edge without a stop-gradient is the credit through time, carried by RECURRENT_TIME_GRAD below
        ins = [e for e in self.g.in_edges(name) if not e.detach and not e.delay]
        grad_in = grad_in or Ref(Kind.GRAD, self.buf(name).node)
        if name in self.through_time:  # dL/dV of the loss alone -> with the credit of every later step
            rec, lif = self.through_time[name]
            total = self.declare(Ref(Kind.GRAD, rec), "f32", ("T", self.rows(name), *n.shape))
            self.emit(RECURRENT_TIME_GRAD, "grad", [name, rec, lif],
                      [grad_in, Ref(Kind.MEMBRANE, lif), *self.params([rec])], [total])
            grad_in = total
        if n.op in GroupOp.PARAMETRIC:
            src = self.g.in_edges(name)[0].src
            params = self.params([name])
            writes = [self.declare(Ref(Kind.PARAM_GRAD, r.node, r.part), "f32", self.declared[r][1]) for r in params]
            reads = [grad_in, self.buf(src), *(params if LOWERING[n.op].update in READS_WEIGHTS else ())]
            if ins:  # batchnorm: one backward call gives its parameter gradients and the gradient of its input
                writes.append(self.declare(Ref(Kind.GRAD, self.buf(src).node), "f32",
                                           ("T", self.rows(src), *self.g[src].shape)))
                reads.append(Ref(Kind.STATS, name))
            self.emit(LOWERING[n.op].update, "update", [name], reads, writes)
        elif LOWERING[n.op].grad not in (None, "view"):
            src = ins[0].src
            out = self.declare(Ref(Kind.GRAD, self.buf(src).node), "f32", ("T", self.rows(src), *self.g[src].shape))
            saved = Ref(Kind.MEMBRANE, name) if n.op == Op.LIF else self.buf(src)
            self.emit(LOWERING[n.op].grad, "grad", [name], [grad_in, saved], [out])
        for e in ins:  # a view or a sum hands its gradient on unchanged
            self._grad_path(e.src, grad_in if LOWERING[n.op].grad == "view" else None)


def lower(g: Graph, dedup: bool | None = None, time_invariant: bool = True) -> Plan:
    """Lower a BSD graph (from ``derive_feedback``) to a plan.

    ``dedup`` (default: whenever ``can_dedup``) runs B on the R distinct classes of the batch instead of all B
    samples: B's forward and weight-gradient GEMMs shrink from 128 rows to at most 10 (Fashion-MNIST), and the
    losses expand B's rows to samples and sum B's gradients back per class, which is exact.

    Measured with bench/passes.py (fmnist_mlp, B = 128, 2 threads, bench/RESULTS.md): without dedup a step takes
    1.73x as long (5.45 vs 2.02 GFLOP); without ``time_invariant`` (the direct stimulus materialised T times, and
    the current it drives stored T times) 1.20x (3.28 GFLOP); without both 2.00x.
    """
    dedup = can_dedup(g) if dedup is None else dedup
    if dedup and not can_dedup(g):
        raise ValueError("this graph's backward network cannot be deduplicated per class (see can_dedup)")
    lw = _Lowerer(g, dedup, time_invariant)
    for n in g.topo_order():
        if n.stream == Stream.B:
            lw.forward(n.name)
    for loss in sorted(g.by_op(*GroupOp.LOSS), key=lambda n: n.attrs["layer"]):
        lw.loss(loss)
    return finish(g.name, g.T, lw.launches, lw.declared, tuple(sorted(lw.alias.items())), lw.dedup)
