"""Training on several processes, on loopback: data-parallel equals one process on the full batch (an MLP, a conv
net with batchnorm, Poisson input, other-class negatives) and resumes on another process count; layer-parallel equals its one-process
emulation, which equals an independent reference of the documented schedule; a rank that dies makes the other
exit with a clear error.

Tolerance of the data-parallel comparisons: ATOL = 1e-6 on weights and batchnorm statistics. Two ranks sum each
weight gradient as two partial GEMMs plus an all-reduce, one process as one GEMM: the float32 sums differ in their
last bits (measured: at most 1.5e-8 after 3 steps, weights ~0.1, updates ~3e-3). AdamW's first steps are about
lr * sign(g), so a gradient element at the noise level could move a weight by up to 2 lr; no such element occurred
in these models (the conv has no bias: a bias before batchnorm has a true gradient of exactly 0, which AdamW turns
into full-size steps of pure rounding noise in *any* two runs). Replicas must be bitwise identical across ranks.
Layer-parallel comparisons are exact: same kernels, same shapes, one thread everywhere.
"""

import functools
import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from bsdgraph.cli.main import main
from bsdgraph.train.data import batches, make_synthetic
from bsdgraph.compiler.feedback import derive_feedback
from bsdgraph.ir.graph import GroupOp, Op, Stream
from bsdgraph.compiler.lower import can_dedup
from bsdgraph.compiler.model_file import load_model
from bsdgraph.runtime.common import OptimConfig
from bsdgraph.runtime.cpu import cpu_backend, cpu_runtime
from bsdgraph.train.config import TrainConfig
from bsdgraph.train.trainer import Trainer

ATOL = 1e-6
TIMEOUT = 30  # seconds: BSDGRAPH_DIST_TIMEOUT of the children and the bound on every wait here
SHAPE, CLASSES = (1, 8, 8), 4

MODELS = {
    "mlp": """
from bsdgraph import GraphBuilder
TRAIN = dict(batch_size=16, lr=1e-3)
BSD = dict(negatives="{neg}", reco_rows="{rows}")
def build():
    g = GraphBuilder("mlp", T=4)
    h = g.flatten(g.input((1, 8, 8), encoding="{enc}"))
    for width in (48, 40, 32):
        h = g.lif(g.linear(h, width))
    g.output(g.linear(h, 4))
    return g.build()
""",
    "cnn": """
from bsdgraph import GraphBuilder
TRAIN = dict(batch_size=16, lr=1e-3)
def build():
    g = GraphBuilder("cnn", T=4)
    h = g.input((1, 8, 8))
    h = g.maxpool2d(g.lif(g.batchnorm(g.conv2d(h, 4, kernel=3, padding=1, bias=False))), 2)
    h = g.lif(g.linear(g.flatten(h), 24))
    g.output(g.linear(h, 4))
    return g.build()
""",
}


def write_models(folder: Path) -> dict[str, Path]:
    paths = {}
    for name, enc, neg, rows in VARIANTS:
        paths[name] = folder / f"{name}.py"
        text = MODELS[name.split("_")[0]]
        paths[name].write_text(text.replace("{enc}", enc).replace("{neg}", neg).replace("{rows}", rows))
    return paths


# (file, input encoding, ReCo negatives, ReCo rows): Poisson draws the full batch's random numbers; 'other_class'
# negatives need the full batch's labels; 'each_step' rows contrast the full batch's samples at every step
VARIANTS = [("mlp", "direct", "all", "sample"), ("cnn", "direct", "all", "sample"),
            ("mlp_poisson", "poisson", "all", "sample"), ("mlp_other", "direct", "other_class", "sample"),
            ("mlp_each", "direct", "other_class", "each_step")]


def dataset(n_train: int = 43):
    return make_synthetic(n_train, 24, SHAPE, CLASSES, seed=1)  # batches of 16, 16 and 11: shards 8/8, 8/8, 6/5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(port: int, rank: int, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      BSDGRAPH_DIST_TIMEOUT=str(TIMEOUT))
    torch.set_num_threads(1)


class one_thread:
    """Run a one-process comparison with the children's thread count (GEMM blocking may depend on it)."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


# ---------------------------------------------------------------------------------------------------- data-parallel


def _dp_worker(rank: int, world: int, port: int, folder: str) -> None:
    """Rank ``rank``: one epoch of each model data-parallel, a direct run counting bytes, then rank 1 dies and
    rank 0 must fail with a DistributedError (written to fault.txt) instead of hanging."""
    child_env(port, rank, world)
    from bsdgraph.parallel.distributed import Comm, DataParallelExecutor, DistributedError
    from bsdgraph.parallel.train_parallel import DataParallelTrainer

    out = Path(folder)
    try:
        comm = Comm.from_env()
        for name, *_ in VARIANTS:
            model = load_model(out / f"{name}.py")
            trainer = DataParallelTrainer(model, dataset(), TrainConfig.from_model(model.train, epochs=1),
                                          out / name, comm=comm)
            trainer.run()
            torch.save(trainer.rt.params, out / f"{name}_params_{rank}.pt")
        rt = DataParallelExecutor(bsd_graph(out / "mlp.py"), cpu_backend(), comm=comm, seed=0)
        comm.traffic.clear()
        for x, y in dp_batches():
            rt.step(x, y)
        (out / f"traffic_{rank}.json").write_text(json.dumps(dict(comm.traffic)))
        comm.barrier("end of the equivalence part")
        if rank == 1:
            os._exit(3)  # dies without a word, as a killed process does
        x, y = dp_batches()[0]
        rt.step(x, y)
        (out / "fault.txt").write_text("no error: the step succeeded without rank 1")
    except DistributedError as err:
        (out / "fault.txt").write_text(str(err))
        sys.exit(1)
    except Exception:  # noqa: BLE001 - anything else: the parent reads it
        (out / f"error_{rank}.txt").write_text(traceback.format_exc())
        sys.exit(2)


def bsd_graph(path: Path):
    model = load_model(path)
    return derive_feedback(model.graph, model.bsd)


def dp_batches():
    ds = dataset()
    return [(ds.x_train[i:i + 16], ds.y_train[i:i + 16]) for i in range(0, 43, 16)]


def spawn(fn, world: int, *args) -> list[int]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=fn, args=(rank, world, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(3 * TIMEOUT)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            pytest.fail(f"rank {procs.index(p)} still running after {3 * TIMEOUT} s")
    return [p.exitcode for p in procs]


def test_data_parallel_on_two_processes(tmp_path):
    """One spawn of two ranks (process start-up dominates on 2 cores), then every data-parallel check."""
    folder = tmp_path / "dp"
    folder.mkdir()
    write_models(folder)
    codes = spawn(_dp_worker, 2, free_port(), str(folder))
    errors = [f.read_text() for f in folder.glob("error_*.txt")]
    assert not errors, errors[0]
    for name, *_ in VARIANTS:
        check_equals_one_process_on_the_full_batch(folder, name)
    check_resumes_on_one_process(folder, tmp_path)
    check_sends_only_gradients_for_a_class_coded_b(folder)
    message = (folder / "fault.txt").read_text()
    assert codes == [1, 3], (codes, message)  # rank 1 died (3); rank 0 stopped with an error (1), did not hang
    assert message.startswith("rank 0/2: all-reduce of") and "peer rank has probably exited" in message, message


def check_equals_one_process_on_the_full_batch(folder: Path, name: str) -> None:
    model = load_model(folder / f"{name}.py")
    cfg = TrainConfig.from_model(model.train, epochs=1)
    with one_thread():
        single = Trainer(model, dataset(), cfg, folder / f"{name}_single")
        single.run()
    ck = torch.load(folder / name / "checkpoint.pt", weights_only=True)
    replicas = [torch.load(folder / f"{name}_params_{r}.pt", weights_only=True) for r in range(2)]
    init = cpu_runtime(single.graph, seed=0).params
    for key, p in single.rt.params.items():
        assert torch.equal(replicas[0][key], replicas[1][key]), f"{name} {key}: the ranks' replicas drifted apart"
        diff = (ck["params"][key] - p).abs().max()
        assert diff <= ATOL, f"{name} {key}: two processes differ from one by {diff}"
        assert (p - init[key]).abs().max() > 100 * ATOL, f"{name} {key} did not train: the comparison is empty"
    for key, v in single.rt.state.items():
        assert torch.allclose(ck["state"][key], v, rtol=0, atol=ATOL), f"{name} {key}"
    assert ck["parallel"] == {"mode": "data", "processes": 2}
    records = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["test_accuracy"] == pytest.approx(single.history[0]["test_accuracy"])


def check_resumes_on_one_process(folder: Path, tmp_path: Path) -> None:
    """Epoch 1 on two processes + epoch 2 on one == two epochs on one (the conv net: batchnorm statistics too)."""
    model = load_model(folder / "cnn.py")
    cfg = TrainConfig.from_model(model.train, epochs=2)
    run = tmp_path / "resumed"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((folder / "cnn" / "checkpoint.pt").read_bytes())
    with one_thread():
        resumed = Trainer(model, dataset(), cfg, run)
        resumed.resume()
        resumed.run()
        straight = Trainer(model, dataset(), cfg, tmp_path / "straight")
        straight.run()
    for key, p in straight.rt.params.items():
        assert torch.allclose(resumed.rt.params[key], p, rtol=0, atol=ATOL), key
    for key, v in straight.rt.state.items():
        assert torch.allclose(resumed.rt.state[key], v, rtol=0, atol=ATOL), key


def check_sends_only_gradients_for_a_class_coded_b(folder: Path) -> None:
    """MLP (B deduplicated per class): per step one all-reduce of every gradient (4 bytes each, x 2(N-1)/N = 1)
    and of the step's metrics (float64); no activation is gathered."""
    graph = bsd_graph(folder / "mlp.py")
    n_params = sum(p.numel() for p in cpu_runtime(graph, seed=0).params.values())
    n_metrics = len(graph.by_op(*GroupOp.LOSS)) + len(graph.by_op(Op.LIF))
    for rank in range(2):
        traffic = json.loads((folder / f"traffic_{rank}.json").read_text())
        assert traffic == {"all_reduce": 3 * (4 * n_params + 8 * n_metrics)}, traffic


# ---------------------------------------------------------------------------------------------------- layer-parallel


def staleness_reference(graph, micro_batches, n_stages: int) -> dict[str, torch.Tensor]:
    """The documented schedule written directly, without the pipeline code: micro-batch after micro-batch, the
    gradients of stage r's parameters taken with the B weights of stage r+j from before micro-batch
    max(m - 2j, 0) and every other weight current; then per-node clipping and AdamW as usual."""
    from bsdgraph.parallel.layer_parallel import PipelineStage, node_layers, split
    from bsdgraph.runtime.common import make_optimizer
    from bsdgraph.runtime.local_adamw import adamw_step

    probe = PipelineStage(graph, cpu_backend(), stage=0, n_stages=1, seed=0)  # B for every class, all weights
    stage_of, layer = split(probe.plan, graph, n_stages), node_layers(graph)
    owner = {k: stage_of[layer[k.rsplit(".", 1)[0]]] for k in probe.params}
    is_b = {k: graph[k.rsplit(".", 1)[0]].stream.value == "B" for k in probe.params}
    current = {k: v.clone() for k, v in probe.params.items()}
    optimizer = make_optimizer(current, OptimConfig())
    history = [{k: v.clone() for k, v in current.items()}]  # history[n]: the weights before micro-batch n
    for m, (x, y) in enumerate(micro_batches):
        grads = {}
        for r in range(n_stages):
            for k, p in probe.params.items():
                lag = 2 * (owner[k] - r)
                p.copy_(history[max(m - lag, 0)][k] if is_b[k] and lag > 0 else current[k])
            grads.update({k: g for k, g in probe.gradients(x, y)[0].items() if owner[k] == r})
        adamw_step(optimizer, current, grads, OptimConfig().clip)
        history.append({k: v.clone() for k, v in current.items()})
    return current


def lp_micro_batches(n: int = 96, batch: int = 16, seed: int = 0):
    ds = make_synthetic(n, 24, SHAPE, CLASSES, seed=1)
    return list(batches(ds.x_train, ds.y_train, batch, shuffle=True, generator=torch.Generator().manual_seed(seed)))


def test_layer_parallel_schedule_equals_its_reference_and_counts_spike_bytes(tmp_path):
    from bsdgraph.parallel.layer_parallel import PipelineStage, emulate

    graph = bsd_graph(write_models(tmp_path)["mlp"])
    micro = lp_micro_batches()
    stage_cls = functools.partial(PipelineStage, backend=cpu_backend())
    results = {}
    with one_thread():
        for k in (1, 2, 3):
            stages = [stage_cls(graph, stage=r, n_stages=k, seed=0) for r in range(k)]
            links = emulate(stages, micro)
            results[k] = {name: p for s in stages for name, p in s.params.items()}
            reference = staleness_reference(graph, micro, k)
            for name, p in reference.items():
                assert torch.equal(results[k][name], p), f"{k} stages: {name} differs from the reference"
        plain = cpu_runtime(graph, seed=0)
        for x, y in micro:
            plain.step(x, y)
    assert all(torch.equal(results[1][k], p) for k, p in plain.params.items()), "1 stage == the plain step"
    assert any(not torch.equal(results[2][k], p) for k, p in plain.params.items()), "B's lag had no effect"
    # 3 stages of layers {0,1} {2} {3,4} (widths 48, 40, 32): F sends s_1 and s_2 ([T, 16, D] bits per
    # micro-batch), B sends s'_2 and s'_3 for every class ([T, 4, D] bits; the fill + micro-batches 0..M-3)
    T, M = 4, len(micro)
    assert [dict(link.traffic) for link in links] == [
        {"F spikes": M * T * 16 * 48 // 8},
        {"F spikes": M * T * 16 * 40 // 8, "B spikes": (M - 1) * T * CLASSES * 40 // 8},
        {"B spikes": (M - 1) * T * CLASSES * 32 // 8}]


def test_layer_parallel_refuses_batchnorm_in_the_backward_network(tmp_path):
    """B with batchnorm runs per class on one process (count-weighted statistics), but its rows then depend on the
    batch's class counts, so one table per class cannot serve every micro-batch: refused with the way out."""
    from bsdgraph.parallel.layer_parallel import LayerParallelError, PipelineStage

    graph = bsd_graph(write_models(tmp_path)["cnn"])
    assert can_dedup(graph) and any(n.op == Op.BATCHNORM and n.stream == Stream.B for n in graph.nodes)
    with pytest.raises(LayerParallelError, match="train it data-parallel instead"):
        PipelineStage(graph, cpu_backend(), stage=0, n_stages=2, seed=0)


def test_layer_parallel_on_two_processes_equals_the_emulation(tmp_path):
    """torchrun, 2 processes, `bsdgraph train --layer-parallel`: the checkpoint rank 0 writes holds the weights
    the one-process emulation of the same schedule computes; one process then resumes it."""
    from bsdgraph.parallel.layer_parallel import PipelineStage, emulate

    model_path = write_models(tmp_path)["mlp"]
    ds = make_synthetic(96, 24, SHAPE, CLASSES, seed=1)
    npz = tmp_path / "syn.npz"
    np.savez(npz, x_train=ds.x_train.numpy(), y_train=ds.y_train.numpy(), x_test=ds.x_test.numpy(),
             y_test=ds.y_test.numpy())
    out = tmp_path / "run"
    env = {**os.environ, "BSDGRAPH_DIST_TIMEOUT": str(TIMEOUT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "bsdgraph", "train",
           str(model_path), "--npz", str(npz), "--out", str(out), "--epochs", "1", "--lr", "0.01", "--layer-parallel",
           "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=4 * TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 1 and 0 <= records[0]["test_accuracy"] <= 1, proc.stdout  # printed once: rank 0
    assert set(records[0]["losses"]) == {"mse0", "reco1", "reco2", "reco3", "ce4"}
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["parallel"] == {"mode": "layer", "processes": 2} and ck["steps"] == 6
    graph = bsd_graph(model_path)
    with one_thread():
        stages = [PipelineStage(graph, cpu_backend(), stage=r, n_stages=2, seed=0, opt=OptimConfig(lr=1e-2))
                  for r in range(2)]
        emulate(stages, lp_micro_batches())
    expected = {name: p for s in stages for name, p in s.params.items()}
    init = cpu_runtime(graph, seed=0).params
    assert list(ck["params"]) == list(init)  # the one-process order: its optimiser state is indexed by it
    for name, p in expected.items():
        assert torch.equal(ck["params"][name], p), name
        assert not torch.equal(p, init[name]), f"{name} did not train: the comparison would be empty"
    assert all(r > 0.001 for r in records[0]["rates"].values()), records[0]["rates"]
    code = main(["train", str(model_path), "--npz", str(npz), "--out", str(out), "--epochs", "2", "--resume",
                 "--json"])
    assert code == 0 and len((out / "metrics.jsonl").read_text().splitlines()) == 2
