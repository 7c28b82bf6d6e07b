"""1 process vs 2 processes on this machine: data-parallel and layer-parallel BSD steps, and the bytes they send.

    .venv/bin/python bench/distributed.py [--model models/fmnist_mlp.py] [--batch 128] [--steps 20] [--rounds 3]

Every configuration runs in freshly spawned processes with one torch thread each (two processes of two threads
on two cores spin-wait, CONTRIBUTING.md), on loopback gloo. The configurations are interleaved round after round
so that a busy machine slows them alike; the medians over rounds are reported, with the per-round ratios.

- ``1 proc``: ``cpu_runtime.step`` on the full batch (1 thread); ``1 proc x2 thr``: the same with 2 threads;
  ``1 proc, B/2``: one thread on half the batch (what each data-parallel rank computes, without communication).
- ``DP 2``: 2 ranks, each its half of every batch, gradients all-reduced (``bsdgraph.parallel.distributed``).
- ``LP 2``: 2 pipeline stages streaming ``steps`` micro-batches of ``batch`` (``bsdgraph.parallel.layer_parallel``); the
  time includes the pipeline's fill and drain.
Bytes are what one rank hands to the network per step: the ring estimate 2 (N-1)/N S for an all-reduce of S
bytes, (N-1) x the local part for an all-gather, exact sizes for pipeline messages (spikes bit-packed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _graph(model_path: str):
    from bsdgraph.compiler.feedback import derive_feedback
    from bsdgraph.compiler.model_file import load_model

    model = load_model(model_path)
    return derive_feedback(model.graph, model.bsd)


def _data(graph, batch: int, n: int):
    from bsdgraph.ir.graph import Op

    x_shape = graph.by_op(Op.INPUT)[0].shape
    classes = graph.by_op(Op.TARGET)[0].attrs["n_classes"]
    gen = torch.Generator().manual_seed(0)
    return [(torch.rand((batch, *x_shape), generator=gen), torch.randint(0, classes, (batch,), generator=gen))
            for _ in range(n)]


def _timed_steps(rt, data, warmup: int) -> float:
    for x, y in data[:warmup]:
        rt.step(x, y)
    start = time.perf_counter()
    for x, y in data[warmup:]:
        rt.step(x, y)
    return time.perf_counter() - start


def _worker(rank: int, world: int, port: int, mode: str, args: dict, out: str) -> None:
    torch.set_num_threads(args.get("threads", 1))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    from bsdgraph.runtime.cpu import cpu_backend, cpu_runtime

    graph, warmup, steps = _graph(args["model"]), 3, args["steps"]
    data = _data(graph, args["batch"], warmup + steps)
    result: dict = {}
    if mode == "single":
        result["seconds"] = _timed_steps(cpu_runtime(graph, seed=0), data, warmup)
    elif mode == "dp":
        from bsdgraph.parallel.distributed import Comm, DataParallelExecutor

        comm = Comm.from_env()
        rt = DataParallelExecutor(graph, cpu_backend(), comm=comm, seed=0)
        for x, y in data[:warmup]:
            rt.step(x, y)
        comm.traffic.clear()
        comm.barrier("start")
        comm.blocked_s, start = 0.0, time.perf_counter()
        for x, y in data[warmup:]:
            rt.step(x, y)
        result["seconds"] = time.perf_counter() - start
        result["bytes_per_step"] = {k: v / steps for k, v in comm.traffic.items()}
        result["ms_blocked_in_collectives_per_step"] = round(1000 * comm.blocked_s / steps, 1)
    else:
        result = _pipeline(graph, data, warmup, steps)
    Path(out, f"{mode}_{rank}.json").write_text(json.dumps(result))


def _pipeline(graph, data, warmup: int, steps: int) -> dict:
    from bsdgraph.parallel.distributed import Comm
    from bsdgraph.parallel.layer_parallel import DistLinks, PipelineStage, run_stage
    from bsdgraph.runtime.cpu import cpu_backend

    comm = Comm.from_env()
    stage = PipelineStage(graph, cpu_backend(), stage=comm.rank, n_stages=comm.world, seed=0)
    run_stage(stage, DistLinks(comm), data[:warmup])
    links = DistLinks(comm)
    comm.barrier("start")
    comm.blocked_s, start = 0.0, time.perf_counter()
    run_stage(stage, links, data[warmup:])
    return {"seconds": time.perf_counter() - start, "bytes_per_step": {k: v / steps for k, v in links.traffic.items()},
            "ms_blocked_in_messages_per_step": round(1000 * comm.blocked_s / steps, 1),
            "layers": sorted({la.nodes[0] for la in stage.part.launches if la.phase == "forward-F"}),
            "receives": {"F": [str(r) for r in stage.part.recv_f], "B": [str(r) for r in stage.part.recv_b]}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str, world: int, args: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, _free_port(), mode, args, out), nprocs=world,
                           start_method="spawn")
        return [json.loads(Path(out, f"{mode}_{r}.json").read_text()) for r in range(world)]


def lag_accuracy(model_path: str, epochs: int, stage_counts: list[int]) -> None:
    """What B's lag costs in accuracy: the pipeline schedule emulated in one process (its weights equal the
    multi-process run's, tests/test_distributed.py) with 1, 2, 3 ... stages, on Fashion-MNIST."""
    from bsdgraph.train.data import batches, load_idx_dataset
    from bsdgraph.parallel.layer_parallel import PipelineStage, emulate
    from bsdgraph.compiler.model_file import load_model
    from bsdgraph.runtime.cpu import cpu_backend, cpu_runtime
    from bsdgraph.train.config import TrainConfig
    from bsdgraph.train.trainer import evaluate

    torch.set_num_threads(1)  # one per stage thread (two threads each on 2 cores spin-wait)
    model, ds = load_model(model_path), load_idx_dataset(None)
    graph, cfg = _graph(model_path), TrainConfig.from_model(load_model(model_path).train)
    for k in stage_counts:
        stages = [PipelineStage(graph, cpu_backend(), stage=r, n_stages=k, seed=cfg.seed, opt=cfg.optim())
                  for r in range(k)]
        gen, start = torch.Generator().manual_seed(cfg.seed), time.perf_counter()
        for _ in range(epochs):
            emulate(stages, list(batches(ds.x_train, ds.y_train, cfg.batch_size, shuffle=True, generator=gen)))
        params = {name: p for s in stages for name, p in s.params.items()}
        acc = evaluate(cpu_runtime(graph, params=params), ds.x_test, ds.y_test)["accuracy"]
        print(f"{model.path.name}: {k} stage(s), {epochs} epoch(s): test accuracy {100 * acc:.2f} % "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/fmnist_mlp.py")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", help="comma-separated subset of: single,single2,half,dp,lp (default: all)")
    p.add_argument("--lag-accuracy", type=int, metavar="EPOCHS", help="instead: train Fashion-MNIST EPOCHS epochs "
                   "with the pipeline schedule emulated for 1, 2 and 3 stages and report the test accuracy")
    a = p.parse_args()
    if a.lag_accuracy:
        lag_accuracy(a.model, a.lag_accuracy, [1, 2, 3])
        return
    base = {"model": a.model, "batch": a.batch, "steps": a.steps}
    configs = {"1 proc": ("single", 1, base), "1 proc x2 thr": ("single", 1, {**base, "threads": 2}),
               "1 proc, B/2": ("single", 1, {**base, "batch": a.batch // 2}),
               "DP 2": ("dp", 2, base), "LP 2": ("lp", 2, base)}
    keys = dict(zip(["single", "single2", "half", "dp", "lp"], configs))
    if a.only:
        configs = {keys[k]: configs[keys[k]] for k in a.only.split(",")}
    seconds: dict[str, list[float]] = {k: [] for k in configs}
    last: dict[str, list[dict]] = {}
    for r in range(a.rounds):
        for name, (mode, world, args) in configs.items():
            last[name] = run(mode, world, args)
            seconds[name].append(max(res["seconds"] for res in last[name]))
        print(f"round {r + 1}: " + ", ".join(f"{k} {1000 * v[-1] / a.steps:.1f} ms/step" for k, v in seconds.items()),
              flush=True)
    print(f"\n{a.model}, batch {a.batch}, {a.steps} timed steps, {a.rounds} rounds (medians):")
    ref = statistics.median(seconds.get("1 proc", [math.nan]))
    for name, values in seconds.items():
        med = statistics.median(values)
        ratios = " ".join(f"{seconds.get('1 proc', values)[i] / v:.2f}" for i, v in enumerate(values))
        batch = configs[name][2]["batch"]
        print(f"  {name:14s} {1000 * med / a.steps:7.1f} ms/step  {batch * a.steps / med:7.0f} samples/s  "
              f"speed-up vs 1 proc {ref / med:.2f} (per round: {ratios})")
    for name in [k for k in ("DP 2", "LP 2") if k in last]:
        for rank, res in enumerate(last[name]):
            extra = {k: v for k, v in res.items() if k not in ("seconds", "bytes_per_step")}
            print(f"  {name} rank {rank}: bytes sent per step {json.dumps(res['bytes_per_step'])} {json.dumps(extra)}")


if __name__ == "__main__":
    main()
