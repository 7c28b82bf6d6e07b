"""Training on several processes (``torchrun ... -m bsdgraph train``): the Trainer made data-parallel
(``distributed.py``) or layer-parallel (``layer_parallel.py``).

Both write what a one-process run writes, once: rank 0 writes ``checkpoint.pt`` (atomically, as always) and
``metrics.jsonl``; the others write nothing. A checkpoint holds the full weights, the optimiser state in the
one-process layout, the shuffling generator and the step counter, so a run resumes with any number of processes
and in either mode. On resume rank 0 reads the checkpoint and broadcasts it: other nodes need no shared disk.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bsdgraph import env
from bsdgraph.train.checkpoint import load_checkpoint, require
from bsdgraph.train.data import augment, batches
from bsdgraph.parallel.distributed import Comm, DataParallelExecutor, launched
from bsdgraph.parallel.layer_parallel import DistLinks, PipelineStage, predict_stage, run_stage
from bsdgraph.ir.params import param_shapes
from bsdgraph.train.trainer import Trainer, _check_finite, check_memory, health_warnings, plan_backend
from bsdgraph.train.config import TrainingError


class _RankZeroWrites:
    """Checkpoint and metrics are written by rank 0 only."""

    comm: Comm

    def _write_metrics(self, records, mode: str) -> None:
        if self.comm.rank == 0:
            super()._write_metrics(records, mode)

    def resume(self, changing: frozenset[str] = frozenset()) -> None:
        ck = require(load_checkpoint(self.checkpoint_path), self.checkpoint_path) if self.comm.rank == 0 else None
        ck = self.comm.broadcast_object(ck, "the checkpoint")
        self._check_options(ck.get("train", {}), changing)   # every rank: each stops with the same message
        self._restore(ck)

    def _payload(self) -> dict[str, Any]:
        return {**super()._payload(), "parallel": {"mode": self.mode, "processes": self.comm.world}}


class DataParallelTrainer(_RankZeroWrites, Trainer):
    mode = "data"

    def __init__(self, *args, comm: Comm, **kwargs):
        self.comm = comm
        super().__init__(*args, **kwargs)

    def _runtime(self, params=None, state=None):
        # every rank holds all weights and its shard of each batch
        check_memory(self.program, str(self.comm.device), -(-self.cfg.batch_size // self.comm.world),
                     self.cfg.eval_batch_size)
        return DataParallelExecutor(self.program, plan_backend(self.backend, self.comm.device), comm=self.comm,
                                    params=params, opt=self.cfg.optim(), seed=self.cfg.seed, state=state)

    def _save(self) -> None:
        if self.comm.rank == 0:
            super()._save()


class PipelineTrainer(_RankZeroWrites, Trainer):
    """One pipeline stage per rank; an epoch streams all its batches through the pipeline."""

    mode = "layer"

    def __init__(self, *args, comm: Comm, **kwargs):
        self.comm, self.links, self.gathered = comm, DistLinks(comm), None
        super().__init__(*args, **kwargs)

    def _runtime(self, params=None, state=None):
        return PipelineStage(self.program, plan_backend(self.backend, self.comm.device), stage=self.comm.rank,
                             n_stages=self.comm.world, params=params, opt=self.cfg.optim(), seed=self.cfg.seed,
                             state=state)

    # -- checkpoints: every stage's weights and optimiser state, in the one-process layout
    def _save(self) -> None:
        mine = {"params": {k: v.detach().cpu() for k, v in self.rt.params.items()},
                "state": {k: v.cpu() for k, v in self.rt.state.items()},
                "optimizer": _named_optimizer_state(self.rt)}
        parts = self.comm.all_gather_object(mine, "the stages' weights for the checkpoint")
        self.gathered = {key: {k: v for p in parts for k, v in p[key].items()} for key in mine}
        if self.comm.rank == 0:
            super()._save()

    def _payload(self) -> dict[str, Any]:
        payload = super()._payload()
        names = [f"{n.name}.{k}" for n in self.graph.nodes for k in param_shapes(n)]
        group = {k: v for k, v in self.rt.optimizer.state_dict()["param_groups"][0].items() if k != "params"}
        named = self.gathered["optimizer"]
        optimizer = {"state": {i: named[n] for i, n in enumerate(names) if n in named},
                     "param_groups": [{**group, "params": list(range(len(names)))}]}
        # the one-process order (init_params'): a runtime built from these lists its optimiser's tensors in it
        params = {n: self.gathered["params"][n] for n in names}
        return {**payload, "params": params, "state": self.gathered["state"], "optimizer": optimizer}

    def _restore(self, ck: dict[str, Any]) -> None:
        full = ck["optimizer"]
        names = [f"{n.name}.{k}" for n in self.graph.nodes for k in param_shapes(n)]
        index = {n: i for i, n in enumerate(names)}
        own = list(self.rt.params)  # this stage's parameters, in the order of its optimiser
        local = {"state": {i: full["state"][index[n]] for i, n in enumerate(own) if index[n] in full["state"]},
                 "param_groups": [{**full["param_groups"][0], "params": list(range(len(own)))}]}
        super()._restore({**ck, "optimizer": local})

    # -- an epoch
    def _epoch(self) -> dict:
        lr = self.cfg.lr_at(self.epoch)
        self.rt.set_lr(lr)
        todo = []
        for xb, yb in batches(self.data.x_train, self.data.y_train, self.cfg.batch_size, shuffle=True,
                              generator=self.gen):
            todo.append((augment(xb, self.gen) if self.cfg.augment else xb, yb))  # every rank draws the same
        sums: dict[str, dict[str, float]] = {"losses": {}, "rates": {}}

        def on_step(m, result):
            _check_finite(self.rt, result.losses, f"at epoch {self.epoch + 1}, step {m + 1}")
            for key, values in (("losses", result.losses), ("rates", result.rates)):
                for k, v in values.items():
                    sums[key][k] = sums[key].get(k, 0.0) + v

        start = time.perf_counter()
        run_stage(self.rt, self.links, todo, on_step)
        seconds = time.perf_counter() - start
        accuracy = self._evaluate()
        parts = self.comm.all_gather_object((sums, accuracy, seconds), "the epoch's metrics")
        losses = {k: v / len(todo) for p in parts for k, v in p[0]["losses"].items()}
        rates = {k: v / len(todo) for p in parts for k, v in p[0]["rates"].items()}
        seconds = max(p[2] for p in parts)
        return {
            "epoch": self.epoch + 1, "lr": lr, "test_accuracy": parts[-1][1], "losses": losses, "rates": rates,
            "warnings": health_warnings(rates, self.graph, self.cfg.init == "calibrated"),
            "seconds": round(seconds, 3),
            "samples_per_s": round(self.data.n_train / seconds, 1), "rule": self.rule, "backend": self.backend,
        }

    def _evaluate(self) -> float | None:
        """Test accuracy of F through the pipeline (known on the top stage)."""
        n, bs = len(self.data.y_test), self.cfg.eval_batch_size
        xs = [self.data.x_test[i:i + bs] for i in range(0, n, bs)]
        outs = predict_stage(self.rt, self.links, xs)
        if outs is None:
            return None
        pred = torch.cat([o.argmax(1).cpu() for o in outs])
        return int((pred == self.data.y_test).sum()) / max(n, 1)


def _named_optimizer_state(rt) -> dict[str, dict]:
    state = rt.optimizer.state_dict()["state"]
    return {name: state[i] for i, name in enumerate(rt.params) if i in state}


def parallel_trainer(layer_parallel: bool, model, data, cfg, out, rule: str, backend: str, **kwargs) -> Trainer:
    """The trainer for this torchrun process: data-parallel, or one stage of the layer pipeline."""
    if rule != "bsd":
        raise TrainingError(f"--rule {rule} trains on one process only; multi-process training runs BSD")
    if backend == "reference":
        raise TrainingError("multi-process training runs the plan executor: use --backend cpu (or triton)")
    unsupported = [k for k, on in (("layer_lr", cfg.layer_lr), ("val_split", cfg.val_split),
                                   ("standardize", cfg.standardize)) if on]
    if unsupported:  # the gathered checkpoint holds one optimiser group; selection and statistics are rank 0's
        raise TrainingError(f"{', '.join(unsupported)} run(s) on one process only for now: train without "
                            "torchrun, or without these options")
    comm = Comm.from_env(want_cuda=backend == "triton" and torch.cuda.is_available())
    cls = PipelineTrainer if layer_parallel else DataParallelTrainer
    if not layer_parallel and cfg.batch_size < comm.world:
        raise TrainingError(f"--batch-size {cfg.batch_size} is smaller than the {comm.world} processes: every "
                            "rank needs at least one sample of every batch")
    last = data.n_train % cfg.batch_size
    if not layer_parallel and 0 < last < comm.world:
        raise TrainingError(f"the last batch of an epoch has {last} samples ({data.n_train} % {cfg.batch_size}), "
                            f"fewer than the {comm.world} processes: use --limit-train or another --batch-size")
    return cls(model, data, cfg, out, rule=rule, backend=backend, comm=comm, **kwargs)


def world_rank() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun, (0, 1) otherwise."""
    if not launched():
        return 0, 1
    return env.RANK.get(), env.WORLD_SIZE.get()

