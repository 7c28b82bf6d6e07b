"""The one mutable object of the IR: ``GraphBuilder``, which models call to declare a forward network."""

from __future__ import annotations

import math
import numbers
from typing import Any

from bsdgraph.ir.diagnostics import Diagnostic, GraphError
from bsdgraph.ir.graph import Edge, FrozenAttrs, Graph, Node, Op, Stream, default_attrs
from bsdgraph.ir.infer import infer_node_shape
from bsdgraph.ir.validate import validate as validate_graph


def _plain(v: Any) -> Any:
    """numpy integers and floats (a width from ``np.prod``, a T from an array's shape) as Python numbers, which
    validation and the graph's JSON expect; tuples and lists element by element."""
    if isinstance(v, (tuple, list)):
        return type(v)(_plain(x) for x in v)
    if isinstance(v, bool) or v is None or isinstance(v, (int, float, str)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


class GraphBuilder:
    """The one mutable object of the IR: models call its methods in topological order, then ``build()``.

    Each method returns the new node's name. Shapes are inferred as nodes are added, so a mistake is reported
    at the line that made it (a ``GraphError`` naming the node), and ``build()`` validates the whole graph.
    """

    def __init__(self, name: str, T: int = 4, dt: float = 1.0):
        self.name, self.T, self.dt = name, _plain(T), _plain(dt)
        self._nodes: dict[str, Node] = {}
        self._edges: list[Edge] = []
        self._counts: dict[str, int] = {}

    # -- generic
    def add(self, op: Op, inputs: list[str] | tuple[str, ...] = (), name: str | None = None,
            stream: Stream = Stream.F, shape: tuple[int, ...] | None = None, detach: bool = False,
            **attrs: Any) -> str:
        """Add a node. Its shape is inferred from its inputs unless given (sources give theirs)."""
        name = name or self._fresh(op.value)
        if name in self._nodes:
            raise GraphError([Diagnostic(name, op, "a node of this name already exists", "choose another name")])
        for i in inputs:
            if i not in self._nodes:
                    raise GraphError([Diagnostic(name, op, f"input {i!r} does not exist", "add it before its consumer")])
        attrs = {k: _plain(v) for k, v in attrs.items()}
        node = Node(name, op, FrozenAttrs(default_attrs(op, **attrs)), _plain(tuple(shape or ())), stream)
        if shape is None:
            node = node.replace(shape=infer_node_shape(node, [self._nodes[i] for i in inputs]))
        self._nodes[name] = node
        self._edges += [Edge(src, name, port, 0, detach) for port, src in enumerate(inputs)]
        return name

    def connect(self, src: str, dst: str, port: int, delay: int = 0, detach: bool = False) -> None:
        """Add an extra operand edge (e.g. a recurrent one with ``delay >= 1``)."""
        self._edges.append(Edge(src, dst, port, delay, detach))

    def shape(self, name: str) -> tuple[int, ...]:
        """The per-sample shape of node ``name`` (what a layer's width or channels are read from)."""
        return self._nodes[name].shape

    def build(self, validate: bool = True) -> Graph:
        """The frozen graph, validated (every problem at once, as a ``GraphError`` naming each node)."""
        g = Graph(self.name, list(self._nodes.values()), list(self._edges), self.T, self.dt)
        if validate:
            validate_graph(g)
        return g

    def _fresh(self, stem: str) -> str:
        self._counts[stem] = self._counts.get(stem, 0) + 1
        return f"{stem}{self._counts[stem]}"

    # -- sugar used by models/*.py
    def input(self, shape: tuple[int, ...], encoding: str = "direct", name: str = "x") -> str:
        """The stimulus, per sample ``shape`` (e.g. ``(1, 28, 28)``). ``encoding``: ``direct`` (the value is the
        input current of every step), ``poisson`` (Bernoulli spikes with p = x per step) or ``sequence`` (samples
        ``[T, *shape]``, step t reads slice t)."""
        return self.add(Op.INPUT, [], name=name, shape=tuple(shape), encoding=encoding)

    def linear(self, x: str, out_features: int, bias: bool = True, name: str | None = None) -> str:
        """A fully connected synapse from the flat ``x`` [D] to ``out_features``; B mirrors it with its own
        Linear(out_features -> D)."""
        in_shape = self._nodes[x].shape
        in_features = in_shape[-1] if in_shape else 0  # a non-flat input is diagnosed by the shape rule
        return self.add(Op.LINEAR, [x], name=name or self._fresh("fc"), in_features=in_features,
                        out_features=out_features, bias=bias)

    def conv2d(self, x: str, out_channels: int, kernel: int | tuple[int, int], stride: int | tuple[int, int] = 1,
               padding: int | tuple[int, int] = 0, bias: bool = True, name: str | None = None) -> str:
        """A 2-D convolution of ``x`` [C, H, W]; B mirrors it with a ConvTranspose2d that restores the exact input
        size."""
        in_shape = self._nodes[x].shape
        return self.add(Op.CONV2D, [x], name=name or self._fresh("conv"), in_channels=in_shape[0] if in_shape else 0,
                        out_channels=out_channels, kernel=_pair(kernel), stride=_pair(stride),
                        padding=_pair(padding), bias=bias)

    def conv_transpose2d(self, x: str, out_channels: int, kernel: int | tuple[int, int],
                         stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                         output_padding: int | tuple[int, int] = 0, bias: bool = True, name: str | None = None) -> str:
        """A decoder synapse (e.g. an autoencoder's upsampling path); B mirrors it with a Conv2d that restores its
        input shape exactly."""
        in_shape = self._nodes[x].shape
        return self.add(Op.CONV_T2D, [x], name=name or self._fresh("deconv"),
                        in_channels=in_shape[0] if in_shape else 0, out_channels=out_channels, kernel=_pair(kernel),
                        stride=_pair(stride), padding=_pair(padding), output_padding=_pair(output_padding), bias=bias)

    def avgpool2d(self, x: str, kernel: int | tuple[int, int], stride=None, name: str | None = None) -> str:
        """Average pooling (stride defaults to the kernel); B mirrors it with nearest upsampling to the exact size."""
        return self.add(Op.AVGPOOL2D, [x], name=name or self._fresh("pool"), kernel=_pair(kernel),
                        stride=None if stride is None else _pair(stride))

    def maxpool2d(self, x: str, kernel: int | tuple[int, int], stride=None, name: str | None = None) -> str:
        """Max pooling (of spikes: their OR over the window); B mirrors it with nearest upsampling."""
        return self.add(Op.MAXPOOL2D, [x], name=name or self._fresh("pool"), kernel=_pair(kernel),
                        stride=None if stride is None else _pair(stride))

    def upsample2d(self, x: str, size: int | tuple[int, int] | None = None, name: str | None = None,
                   scale: int | tuple[int, int] | None = None) -> str:
        """Nearest-neighbour upsampling to ``size``, or by an integer ``scale`` factor (the size must be an integer
        multiple of the input's height and width, so that B's mirror, an average pool, restores the input shape)."""
        if (size is None) == (scale is None):
            raise GraphError([Diagnostic(name or x, Op.UPSAMPLE2D, "give either size=(H, W) or scale=k", "")])
        if scale is not None:
            h, w = self._nodes[x].shape[-2:] if len(self._nodes[x].shape) >= 2 else (0, 0)
            sh, sw = _pair(_plain(scale))
            size = (h * sh, w * sw)
        return self.add(Op.UPSAMPLE2D, [x], name=name or self._fresh("up"), size=_pair(size))

    def flatten(self, x: str, name: str | None = None) -> str:
        """[C, H, W] -> [C*H*W] (a view); B mirrors it with the inverse reshape."""
        return self.add(Op.FLATTEN, [x], name=name or self._fresh("flat"))

    def batchnorm(self, x: str, eps: float = 1e-5, momentum: float = 0.1, name: str | None = None) -> str:
        """Batch normalisation of a synapse's current (statistics over all T*B rows), placed right before the
        layer's neurons; B gets its own in front of the same layer's neurons."""
        shape = self._nodes[x].shape
        return self.add(Op.BATCHNORM, [x], name=name or self._fresh("bn"), num_features=shape[0] if shape else 0,
                        eps=eps, momentum=momentum)

    def lif(self, x: str, tau: float = 2.0, v_th: float = 0.3, v_reset: float = 0.0, reset: str = "hard",
            surrogate: str = "atan", alpha: float = 2.0, name: str | None = None) -> str:
        """Leaky integrate-and-fire neurons on the current ``x``: h[t] = v[t-1] + (x[t] - (v[t-1] - v_reset)) / tau,
        a spike when h >= v_th, then a ``hard`` reset to v_reset or a ``soft`` one (subtract v_th); the atan
        surrogate's ``alpha`` shapes the gradient through them (docs/bsd.md, "The neuron and the surrogate
        gradient")."""
        return self.add(Op.LIF, [x], name=name or self._fresh("h"), tau=tau, v_th=v_th, v_reset=v_reset,
                        reset=reset, surrogate=surrogate, alpha=alpha)

    def neuron(self, model: str, x: str, alpha: float = 2.0, name: str | None = None, **params: float) -> str:
        """Neurons of a declared type (``if``, ``li``, ``lif``, ``lif_soft``, ``cuba_lif``, ``cuba_li``, ``alif``, or
        one declared with ``bsdgraph.declare_neuron``); ``params`` override the declaration's defaults."""
        return self.add(Op.NEURON, [x], name=name or self._fresh("h"), model=model, params=params, alpha=alpha)

    def sum(self, *xs: str, name: str | None = None) -> str:
        """The elementwise sum of same-shaped values: spikes (a residual merge, read by the synapses after it) or
        the currents of several synapses driving one layer. B mirrors a sum with a fan-out and a fan-out with a
        sum, so a skip connection in F is one in B."""
        return self.add(Op.ADD, list(xs), name=name or self._fresh("sum"))

    def residual_block(self, x: str, channels: int | None = None, stride: int = 1, kernel: int = 3,
                       name: str | None = None, **lif: Any) -> str:
        """A SEW-ResNet basic block (Fang et al. 2021, connect function ADD) on the spikes ``x``:
        ``lif(bn(conv(lif(bn(conv(x)))))) + shortcut``, where the shortcut is ``x`` itself, or, when the block
        changes the channels or strides, the projection ``lif(bn(conv1x1(x, stride)))``. The sum (0, 1 or 2 per
        neuron and step) is what the next synapse reads. A flat ``x`` [D] gets the same block of linear layers
        (``channels`` is then the width; ``stride`` must be 1). ``lif`` are the neurons' parameters (tau, v_th,
        ...). Returns the sum's node."""
        shape = self._nodes[x].shape
        name = name or self._fresh("res")
        flat = len(shape) == 1
        if not flat and len(shape) != 3:
            raise GraphError([Diagnostic(name, Op.ADD, f"a residual block reads [C, H, W] or [D] spikes, got "
                                         f"{list(shape)}", "")])
        if flat and _plain(stride) != 1:
            raise GraphError([Diagnostic(name, Op.ADD, "a residual block of linear layers has no stride",
                                         "leave stride=1, or use conv layers")])
        width = shape[0] if channels is None else _plain(channels)

        def unit(h: str, k: int, s: int, part: str) -> str:
            syn = (self.linear(h, width, name=f"{name}_{part}") if flat else
                   self.conv2d(h, width, kernel=k, stride=s, padding=k // 2, name=f"{name}_{part}"))
            return self.lif(self.batchnorm(syn, name=f"{name}_{part}_bn"), name=f"{name}_{part}_h", **lif)

        h = unit(unit(x, kernel, stride, "a"), kernel, 1, "b")
        skip = x if (width == shape[0] and _plain(stride) == 1) else unit(x, 1, stride, "down")
        return self.sum(h, skip, name=name)

    def recurrent_lif(self, current: str, tau: float = 2.0, v_th: float = 0.3, v_reset: float = 0.0,
                      reset: str = "hard", alpha: float = 2.0, name: str | None = None, rec_kernel: int = 3) -> str:
        """A recurrent layer's neurons: ``lif(current + rec(s[t-1]))``, where ``rec`` is a bias-free synapse from the
        layer's own spikes through a delay-1 edge: a Linear on a flat current [width], a ``rec_kernel`` x
        ``rec_kernel`` Conv2d (stride 1, padding keeping the size) on a [C, H, W] current. Returns the LIF node;
        ``rec``'s weight is learned like any other."""
        return self._recurrent(current, name, rec_kernel, lambda total, lif: self.lif(
            total, tau=tau, v_th=v_th, v_reset=v_reset, reset=reset, alpha=alpha, name=lif))

    def recurrent_neuron(self, model: str, current: str, alpha: float = 2.0, name: str | None = None,
                         rec_kernel: int = 3, **params: float) -> str:
        """``recurrent_lif`` for any declared neuron: ``neuron(current + rec(value[t-1]))``."""
        return self._recurrent(current, name, rec_kernel, lambda total, lif: self.neuron(
            model, total, alpha=alpha, name=lif, **params))

    def _recurrent(self, current: str, name: str | None, rec_kernel: int, neurons) -> str:
        shape, rec_kernel = self._nodes[current].shape, _plain(rec_kernel)
        lif = name or self._fresh("h")
        rec = f"{lif}_rec"
        if len(shape) == 1:
            op, attrs = Op.LINEAR, dict(in_features=shape[0], out_features=shape[0], bias=False)
        elif len(shape) == 3 and isinstance(rec_kernel, int) and rec_kernel >= 1 and rec_kernel % 2 == 1:
            k = rec_kernel
            op, attrs = Op.CONV2D, dict(in_channels=shape[0], out_channels=shape[0], kernel=(k, k), stride=(1, 1),
                                        padding=(k // 2, k // 2), bias=False)
        else:
            why = (f"rec_kernel must be an odd whole number >= 1 (the size is kept), got {rec_kernel!r}"
                   if len(shape) == 3 else f"a recurrent layer's current is [width] or [C, H, W], got {list(shape)}")
            raise GraphError([Diagnostic(current, self._nodes[current].op, why, "")])
        # rec reads the neurons that do not exist yet: declare it with its known shape, wire its delayed edge last
        self._nodes[rec] = Node(rec, op, FrozenAttrs(default_attrs(op, **attrs)), tuple(shape))
        total = self.add(Op.ADD, [current, rec], name=f"{lif}_in")
        neurons(total, lif)
        self.connect(lif, rec, 0, delay=1)
        return lif

    def output(self, x: str, task: str = "classification", target: str | None = None, population: int = 1,
               name: str = "out", classes: int | None = None, code: int = 0, code_seed: int = 0) -> str:
        """F's concept: the current ``x`` of the top synapse, read out as its mean over steps. ``task``:
        ``classification`` (CE; ``target`` onehot, ``population`` with ``population=k`` neurons per class, or
        ``sequence`` for a class per step) or ``regression`` (MSE; ``analog``, or ``sequence`` per step). The target
        code is what drives B. ``code=k`` with ``classes=C``: a distributed code, each class a fixed random pattern
        of k active neurons of the top width (drawn by ``code_seed``), read out by the cosine of the top current to
        each pattern (the paper's Figure 1)."""
        width = math.prod(self._nodes[x].shape)
        if code:
            target = target or "code"
        target = target or ("analog" if task != "classification" else "population" if population > 1 else "onehot")
        n_classes = classes or (width // max(population, 1) if task == "classification" else 0)
        return self.add(Op.OUTPUT, [x], name=name, task=task, target=target, n_classes=n_classes,
                        population=population, code_active=code, code_seed=code_seed)
