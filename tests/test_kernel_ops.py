"""kernels/ops.py: each custom op equals its launcher, passes torch.library.opcheck, and compiles without a
graph break."""

import pytest
import torch

import kernels
import kernels.ops as ops


def _spikes(*shape, seed=0):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.4).to(torch.uint8)


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


EMPTY = torch.empty(0)

# (op, launcher, args, how the launcher's Optional outputs map to the op's fixed-arity outputs)
CASES = {
    "lif_forward": (ops.lif_forward, kernels.lif_forward, (_randn(3, 4, 5), 2.0, 0.3, 0.0, False, None, True)),
    "lif_forward_no_h": (
        ops.lif_forward, kernels.lif_forward, (_randn(3, 4, 5), 2.0, 0.3, 0.1, True, _randn(4, 5, seed=1), False)
    ),
    "lif_backward": (
        ops.lif_backward, kernels.lif_backward, (_randn(3, 6), _randn(3, 6, seed=1), 2.0, 0.3, 0.0, False, 2.0)
    ),
    "linear_lif_forward": (
        ops.linear_lif_forward, kernels.linear_lif_forward,
        (_spikes(2, 3, 7), _randn(5, 7), _randn(5, seed=1), 2.0, 0.3, 0.0, False, True, False),
    ),
    "reco_loss_grad": (
        ops.reco_loss_grad, kernels.reco_loss_grad,
        (_randn(3, 8), _randn(3, 8, seed=1), torch.tensor([0, 1, 0]), 0.6, "other_class", 1e-8),
    ),
    "weight_grad": (ops.weight_grad, kernels.weight_grad, (_randn(2, 3, 5), _spikes(2, 3, 7), False)),
    "poisson_encode": (ops.poisson_encode, kernels.poisson_encode, (torch.rand(3, 4), 2, 5)),
}


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("case", CASES)
def test_op_equals_launcher(case):
    op, launcher, args = CASES[case]
    got, expected = _as_tuple(op(*args)), _as_tuple(launcher(*args))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert torch.equal(g, EMPTY if e is None else e)


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    op, _, args = CASES[case]
    torch.library.opcheck(op, args)


def test_compiles_without_graph_break():
    # fullgraph=True makes any graph break an error; aot_eager needs no C++ compiler on this machine.
    def step(x, s_in, weight):
        spikes, v, _ = torch.ops.bsdgraph.linear_lif_forward(s_in, weight, None, 2.0, 0.3, 0.0, False, True, False)
        dw, _ = torch.ops.bsdgraph.weight_grad(v, s_in, False)
        enc = torch.ops.bsdgraph.poisson_encode(x, 2, 3)
        return spikes.sum() + dw.sum() + enc.sum()

    args = (torch.rand(3, 4), _spikes(2, 3, 7), _randn(5, 7))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), step(*args))
