"""The per-node fused AdamW (runtime/local_adamw.py) equals clip_per_node + optimizer.step()."""

import pytest
import torch

import bsdgraph.runtime.local_adamw as local_adamw
from bsdgraph import GraphBuilder
from bsdgraph.compiler.feedback import derive_feedback
from bsdgraph.runtime.common import OptimConfig
from bsdgraph.runtime.cpu import cpu_runtime
from bsdgraph.runtime.local_adamw import step_per_node


def _net():
    g = GraphBuilder("m", T=3)
    h = g.lif(g.linear(g.flatten(g.input((1, 6, 6))), 24))
    h = g.lif(g.linear(h, 16))
    g.output(g.linear(h, 4))
    return derive_feedback(g.build())


def _train(monkeypatch, fast: bool, clip: float, steps: int = 4):
    if not fast:
        monkeypatch.setattr(local_adamw, "step_per_node", lambda *a: False)
    calls = []
    real = local_adamw.step_per_node
    monkeypatch.setattr(local_adamw, "step_per_node", lambda *a: calls.append(real(*a)) or calls[-1])
    bsd = _net()
    rt = cpu_runtime(bsd, seed=3, opt=OptimConfig(lr=1e-2, clip=clip))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rt.step(torch.rand(16, 1, 6, 6, generator=gen) * 3, torch.randint(0, 4, (16,), generator=gen))
    monkeypatch.undo()
    return rt, calls


@pytest.mark.parametrize("clip", [0.0, 1e6], ids=["no clipping", "never clipped"])
def test_unclipped_updates_are_bit_identical_to_optimizer_step(monkeypatch, clip):
    fast, calls = _train(monkeypatch, True, clip)
    plain, plain_calls = _train(monkeypatch, False, clip)
    assert any(calls) and not any(plain_calls)  # the fast path ran (from each parameter's second update on)
    for k, p in plain.params.items():
        assert torch.equal(p, fast.params[k]), k
    for p, q in zip(plain.optimizer.param_groups[0]["params"], fast.optimizer.param_groups[0]["params"]):
        s, t = plain.optimizer.state[p], fast.optimizer.state[q]
        assert torch.equal(s["step"], t["step"]) and torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])


def test_clipped_updates_equal_optimizer_step_up_to_rounding(monkeypatch):
    # clip 1e-3: every node is clipped at every step; g / (1 / c) and g * c differ in the last bit at most
    fast, calls = _train(monkeypatch, True, 1e-3)
    plain, _ = _train(monkeypatch, False, 1e-3)
    assert any(calls)
    for k, p in plain.params.items():
        assert torch.allclose(p, fast.params[k], rtol=1e-5, atol=1e-7), k


def test_a_parameter_without_optimizer_state_goes_through_optimizer_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], fused=True)
    assert not step_per_node(opt, {"a.weight": p}, {"a.weight": torch.ones(3)}, 1.0)  # torch creates the state
