"""The BSD step as a researcher would write it from the paper: nn.Linear layers, a Python loop over T, the LIF
update written out, every local loss built with autograd and ``detach()`` at each layer's input, one backward
over the summed losses, one AdamW step. No structure exploited: B runs on all 128 samples, the direct input is
multiplied T times, ReCo is the B x B formula. It is the baseline ``bsdgraph bench --compare`` measures against.

Only Linear + LIF stacks (MLPs) are supported: ``NaiveBSD.from_graph`` raises ValueError otherwise.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, v_th):
        ctx.save_for_backward(h)
        ctx.v_th = v_th
        return (h >= v_th).float()

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        return g * 2 / (2 * (1 + (torch.pi * 2 * (h - ctx.v_th) / 2) ** 2)), None


def lif(current, tau=2.0, v_th=0.3):
    v, out = torch.zeros_like(current[0]), []
    for t in range(current.shape[0]):
        h = v + (current[t] - v) / tau
        s = Spike.apply(h, v_th)
        v = h * (1 - s)
        out.append(s)
    return torch.stack(out)


def reco(v, v_hat, lam=0.6):
    v, v_hat = v.transpose(0, 1).flatten(1), v_hat.transpose(0, 1).flatten(1)
    cos = (v @ v_hat.T) / (v.norm(dim=1)[:, None] * v_hat.norm(dim=1)[None, :] + 1e-8)
    off = ~torch.eye(len(v), dtype=torch.bool, device=v.device)
    return (((1 - cos.diagonal()) ** 2).sum() + lam * (F.relu(cos[off]) ** 2).sum()) / len(v)


class NaiveBSD(nn.Module):
    def __init__(self, widths: list[int], T: int, lr: float = 1e-3):
        super().__init__()
        self.T, self.widths = T, widths
        self.f = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.b = nn.ModuleList(nn.Linear(b, a) for a, b in zip(widths[:-1], widths[1:]))
        self.opt = torch.optim.AdamW(self.parameters(), lr=lr)

    @classmethod
    def from_graph(cls, g, device: str | torch.device = "cpu") -> NaiveBSD:
        from bsdgraph.tools.bench import baseline_widths

        return cls(baseline_widths(g, "naive baseline"), g.T).to(device)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        device = next(self.parameters()).device
        x, y = x.to(device), y.to(device)
        T, L = self.T, len(self.f)
        s = x.flatten(1).unsqueeze(0).repeat(T, 1, 1)  # direct encoding: the image at every step
        target = F.one_hot(y, self.widths[-1]).float().unsqueeze(0).repeat(T, 1, 1)
        # backward network: concept -> stimulus, every layer's input detached
        v_hat, s_b = [None] * L, target
        for l in reversed(range(L)):
            v_hat[l] = torch.stack([self.b[l](s_b[t].detach()) for t in range(T)])
            s_b = lif(v_hat[l]) if l > 0 else None
        losses = [reco(s, v_hat[0])]  # recall at the bottom
        for l in range(L):
            v = torch.stack([self.f[l](s[t].detach()) for t in range(T)])
            if l < L - 1:
                losses.append(reco(v, v_hat[l + 1]))
                s = lif(v)
            else:
                losses.append(F.cross_entropy(v.mean(0), y))
        self.opt.zero_grad()
        total = sum(losses)
        total.backward()
        self.opt.step()
        return float(total.detach())
