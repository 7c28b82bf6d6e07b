"""The same forward network trained with snnTorch BPTT (Leaky neurons, a Python loop over T, CE on the mean top
current), for ``bsdgraph bench --compare``. Needs the optional ``snntorch`` package.

snnTorch's Leaky computes mem = beta * mem + I (reset by zeroing, applied from the previous step's spike);
beta = 1 - 1/tau and I scaled by 1/tau make it the same leak as our LIF (exact spike equality is the NIR
cross-check's business, not this benchmark's: here only the work per step must match).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SnnTorchBPTT(nn.Module):
    def __init__(self, widths: list[int], T: int, tau: float = 2.0, v_th: float = 0.3, lr: float = 1e-3):
        import snntorch as snn

        super().__init__()
        self.T, self.tau = T, tau
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.lif = nn.ModuleList(snn.Leaky(beta=1 - 1 / tau, threshold=v_th, reset_mechanism="zero")
                                 for _ in widths[1:-1])
        self.opt = torch.optim.AdamW(self.parameters(), lr=lr)

    @classmethod
    def from_graph(cls, g, device: str | torch.device = "cpu") -> SnnTorchBPTT:
        from bsdgraph.tools.bench import baseline_widths

        return cls(baseline_widths(g, "snnTorch baseline"), g.T).to(device)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        device = next(self.parameters()).device
        x, y = x.to(device), y.to(device)
        x = x.flatten(1)
        mems = [lif.init_leaky() for lif in self.lif]
        out = 0
        for _ in range(self.T):
            s = x
            for i, lif in enumerate(self.lif):
                s, mems[i] = lif(self.fc[i](s) / self.tau, mems[i])
            out = out + self.fc[-1](s)
        loss = F.cross_entropy(out / self.T, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.detach())
