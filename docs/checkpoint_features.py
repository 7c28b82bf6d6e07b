"""Shared by the diagnostics docs/layer_readout.py and docs/linear_probe.py: open a checkpoint for probing and
collect named nodes' activity over a data set."""

from __future__ import annotations

import sys

import torch

from bsdgraph.train.checkpoint import load_checkpoint
from bsdgraph.ir.graph import Stream
from bsdgraph.ir.printer import from_json
from bsdgraph.runtime.reference import ReferenceRuntime, run_graph


def open_checkpoint(path: str, nodes: str, streams: frozenset[Stream]) -> tuple[ReferenceRuntime, dict, list[str]]:
    """The checkpoint's graph in the reference runtime, its document, and the node names asked for (exits with
    the nodes there are when one of them is not in ``streams``)."""
    torch.set_num_threads(1)
    doc = load_checkpoint(path)
    g = from_json(doc["graph"])
    names, known = nodes.split(","), {n.name for n in g.nodes if n.stream in streams}
    if any(k not in known for k in names):
        sys.exit(f"{path}: no node {[k for k in names if k not in known]} to read; nodes: {', '.join(sorted(known))}")
    return ReferenceRuntime(g, doc["params"], state=doc["state"]), doc, names


def features(rt: ReferenceRuntime, x: torch.Tensor, y: torch.Tensor | None, nodes: list[str],
             streams: frozenset[Stream], dtype: torch.dtype, all_steps: bool = False,
             batch: int = 500) -> dict[str, torch.Tensor]:
    """[N, D] per node (evaluation mode): its activity averaged over time, or with ``all_steps`` every step's side
    by side. B needs ``y`` (the sample's target)."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in nodes}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            yb = None if y is None else y[i:i + batch]
            env = run_graph(rt.graph, rt._ctx(x[i:i + batch], yb, False), streams)
            for k in nodes:
                v = env[k].to(dtype)  # [T, B, ...]
                out[k].append(v.transpose(0, 1).reshape(v.shape[1], -1) if all_steps else
                              v.mean(0).reshape(v.shape[1], -1))
    return {k: torch.cat(v) for k, v in out.items()}
