"""Hypothesis strategies that build valid random forward graphs by construction (in topological order)."""

from __future__ import annotations

from hypothesis import strategies as st

from bsdgraph import GraphBuilder


@st.composite
def lif_params(draw) -> dict:
    v_reset = draw(st.sampled_from([0.0, -0.2]))
    return dict(
        tau=draw(st.sampled_from([1.5, 2.0, 3.0, 5.0])),
        v_th=draw(st.floats(v_reset + 0.1, 1.0).map(lambda v: round(v, 3))),
        v_reset=v_reset,
        reset=draw(st.sampled_from(["hard", "soft"])),
    )


@st.composite
def mlp_graphs(draw, max_hidden: int = 3, max_width: int = 24):
    """input -> [flatten] -> (linear -> lif)* -> linear -> output, random widths, T and LIF parameters."""
    g = GraphBuilder("mlp", T=draw(st.integers(1, 5)))
    if draw(st.booleans()):
        h = g.flatten(g.input((1, draw(st.integers(2, 6)), draw(st.integers(2, 6)))))
    else:
        # width >= 3: with a 1-wide stimulus every sample is a multiple of one vector, all ReCo cosines are
        # +-1 and the gradient is pure float cancellation (measured 1e-3 relative differences between backends)
        h = g.input((draw(st.integers(3, max_width)),))
    for _ in range(draw(st.integers(0, max_hidden))):
        h = g.lif(g.linear(h, draw(st.integers(1, max_width)), bias=draw(st.booleans())), **draw(lif_params()))
    g.output(g.linear(h, draw(st.integers(2, 6))))
    return g.build()


@st.composite
def conv_layer(draw, g: GraphBuilder, h: str) -> str:
    c, H, W = g.shape(h)
    k = draw(st.integers(1, min(4, H + 2, W + 2)))
    p = draw(st.integers(0, k - 1))
    s = draw(st.integers(1, 3))
    if (H + 2 * p - k) < 0 or (W + 2 * p - k) < 0:
        p = k  # enough padding for a non-empty output; still a legal (if odd) geometry
    v = g.conv2d(h, draw(st.integers(1, 6)), kernel=k, stride=s, padding=p)
    if draw(st.booleans()):
        v = g.batchnorm(v)
    h = g.lif(v, **draw(lif_params()))
    _, H, W = g.shape(h)
    if min(H, W) >= 2 and draw(st.booleans()):
        pool = draw(st.sampled_from([g.maxpool2d, g.avgpool2d]))
        h = pool(h, 2)
    return h


@st.composite
def conv_graphs(draw, max_conv: int = 3):
    """input (C, H, W) with odd sizes -> conv stack (random kernel/stride/padding, BN, pooling) -> linear head."""
    g = GraphBuilder("cnn", T=draw(st.integers(1, 3)))
    h = g.input((draw(st.integers(1, 3)), draw(st.integers(3, 13)), draw(st.integers(3, 13))))
    for _ in range(draw(st.integers(1, max_conv))):
        h = draw(conv_layer(g, h))
    h = g.flatten(h)
    if draw(st.booleans()):
        h = g.lif(g.linear(h, draw(st.integers(1, 12))))
    g.output(g.linear(h, draw(st.integers(2, 5))))
    return g.build()


@st.composite
def decoder_layer(draw, g: GraphBuilder, h: str) -> str:
    """One decoder layer: a transposed convolution (random kernel, stride, padding, output padding) or nearest
    upsampling by an integer factor followed by a convolution, then [batchnorm] -> LIF."""
    c, H, W = g.shape(h)
    out = draw(st.integers(1, 6))
    if draw(st.booleans()):
        k, s = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        op = draw(st.integers(0, s - 1))
        # keep the output non-empty: (H - 1) s - 2p + k + op >= 1
        p = draw(st.integers(0, max(0, min(k - 1, ((min(H, W) - 1) * s + k + op - 1) // 2))))
        v = g.conv_transpose2d(h, out, kernel=k, stride=s, padding=p, output_padding=op)
    else:
        f = draw(st.integers(2, 3))
        v = g.conv2d(g.upsample2d(h, (H * f, W * f)), out, kernel=3, padding=1)
    if draw(st.booleans()):
        v = g.batchnorm(v)
    return g.lif(v, **draw(lif_params()))


@st.composite
def decoder_graphs(draw):
    """Encoder-decoder: one conv layer down, one or two decoder layers up (transposed convolutions, or upsampling
    and a convolution), a linear head."""
    g = GraphBuilder("decoder", T=draw(st.integers(1, 3)))
    h = g.input((draw(st.integers(1, 2)), draw(st.integers(3, 9)), draw(st.integers(3, 9))))
    h = draw(conv_layer(g, h))
    for _ in range(draw(st.integers(1, 2))):
        h = draw(decoder_layer(g, h))
    g.output(g.linear(g.flatten(h), draw(st.integers(2, 5))))
    return g.build()


@st.composite
def rnn_graphs(draw, max_hidden: int = 3, max_width: int = 16):
    """An MLP whose hidden layers are each recurrent (a delay-1 Linear from its own spikes) or not."""
    g = GraphBuilder("rnn", T=draw(st.integers(1, 5)))
    h = g.input((draw(st.integers(3, max_width)),))
    for _ in range(draw(st.integers(1, max_hidden))):
        current = g.linear(h, draw(st.integers(1, max_width)), bias=draw(st.booleans()))
        recurrent = draw(st.booleans())
        h = (g.recurrent_lif if recurrent else g.lif)(current, **draw(lif_params()))
    g.output(g.linear(h, draw(st.integers(2, 6))))
    return g.build()


@st.composite
def conv_rnn_graphs(draw, max_conv: int = 3):
    """Conv layers each recurrent (a bias-free k x k conv from its own spikes through a delay-1 edge) or not; a
    recurrent layer is read by the next conv directly (B mirrors that conv into its own recurrent sum)."""
    g = GraphBuilder("crnn", T=draw(st.integers(1, 4)))
    h = g.input((draw(st.integers(1, 2)), draw(st.integers(3, 7)), draw(st.integers(3, 7))))
    n = draw(st.integers(1, max_conv))
    for i in range(n):
        current = g.conv2d(h, draw(st.integers(1, 4)), kernel=3, stride=draw(st.integers(1, 2)), padding=1)
        if i < n - 1 and draw(st.booleans()):
            h = g.recurrent_lif(current, rec_kernel=draw(st.sampled_from([1, 3])), **draw(lif_params()))
        else:
            h = g.lif(current, **draw(lif_params()))
    g.output(g.linear(g.flatten(h), draw(st.integers(2, 5))))
    return g.build()


@st.composite
def residual_graphs(draw, max_blocks: int = 2):
    """Branches and merges: SEW residual blocks (an identity shortcut, or a projection where the width, channels
    or stride change) on a flat or a conv stem, and optionally a layer driven by the sum of two synapses' currents
    (one reading the layer below, one skipping a layer), so that F fans out and merges both spikes and currents."""
    g = GraphBuilder("res", T=draw(st.integers(1, 3)))
    conv = draw(st.booleans())
    if conv:
        x = g.input((draw(st.integers(1, 2)), draw(st.integers(4, 7)), draw(st.integers(4, 7))))
        h = g.lif(g.batchnorm(g.conv2d(x, draw(st.integers(2, 4)), kernel=3, padding=1)), **draw(lif_params()))
    else:
        x = g.input((draw(st.integers(3, 12)),))
        h = x if draw(st.booleans()) else g.lif(g.linear(x, draw(st.integers(3, 12))), **draw(lif_params()))
    for _ in range(draw(st.integers(1, max_blocks))):
        width = draw(st.sampled_from([None, draw(st.integers(2, 6))]))
        stride = draw(st.integers(1, 2)) if conv and min(g.shape(h)[1:]) >= 4 else 1
        h = g.residual_block(h, width, stride=stride, **draw(lif_params()))
    if conv:
        h = g.flatten(g.avgpool2d(h, 2) if min(g.shape(h)[1:]) >= 2 and draw(st.booleans()) else h)
    if draw(st.booleans()):  # a dense skip: the next layer's current sums a synapse from h and one from below it
        below = h
        h = g.lif(g.linear(h, draw(st.integers(2, 8))), **draw(lif_params()))
        width = draw(st.integers(2, 8))
        h = g.lif(g.sum(g.linear(h, width), g.linear(below, width)), **draw(lif_params()))
    # >= 3 classes: B's batchnorm over 2 class rows maps them to +-1 whatever its input, so the gradients behind it
    # are 0 by that invariance and the runtimes return their own rounding noise (measured 5e-3 relative, dedup)
    g.output(g.linear(h, draw(st.integers(3, 5))))
    return g.build()


# what NIR can carry (recurrent layers and decoder ops are not exported yet), and every graph the engine compiles
feedforward_graph = st.one_of(mlp_graphs(), conv_graphs(), residual_graphs())
any_graph = st.one_of(mlp_graphs(), conv_graphs(), rnn_graphs(), decoder_graphs(), residual_graphs(),
                      conv_rnn_graphs())
