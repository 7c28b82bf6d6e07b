"""Control for docs/experiments.md: train only the top Linear of a model with BSD, its hidden layers frozen at their
initial weights (random features). If BSD's local learning helps, the full model must beat this.

Usage: python docs/frozen_features.py MODEL.py [EPOCHS] [SEED]   (the model must bring its own data: def data())
"""

from __future__ import annotations

import sys

import torch

from bsdgraph.train.data import batches
from bsdgraph.compiler.feedback import derive_feedback
from bsdgraph.ir.graph import Op, Stream
from bsdgraph.compiler.model_file import load_model
from bsdgraph.runtime.cpu import cpu_runtime
from bsdgraph.train.config import TrainConfig
from bsdgraph.train.trainer import evaluate


def main(path: str, epochs: int = 30, seed: int = 0) -> None:
    model = load_model(path)
    data = model.data()
    cfg = TrainConfig.from_model(model.train, seed=seed)
    rt = cpu_runtime(derive_feedback(model.graph, model.bsd), opt=cfg.optim(), seed=seed)
    top = rt.graph.inputs(rt.graph.by_op(Op.OUTPUT)[0].name)[0].name
    assert rt.graph[top].stream == Stream.F
    apply = rt.apply
    rt.apply = lambda nodes: apply([n for n in nodes if n == top])  # every other layer keeps its initial weights
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for xb, yb in batches(data.x_train, data.y_train, cfg.batch_size, shuffle=True, generator=gen):
            rt.step(xb, yb)
        print(epoch + 1, evaluate(rt, data.x_test, data.y_test), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
