"""The memory estimate (bsdgraph/train/memory.py) against what the runtimes allocate, and the refusal of models that do
not fit."""

import math
import resource

import pytest
import torch

from bsdgraph import BSDConfig, GraphBuilder, derive_feedback

from bsdgraph.train import memory
from bsdgraph.compiler.lower import lower
from bsdgraph.compiler.plan import Kind
from bsdgraph.compiler.program import compile_graph, compile_model
from bsdgraph.runtime.executor import MemoryProbe
from bsdgraph.ir.params import init_params, init_state
from bsdgraph.runtime.bptt import BPTTRuntime
from bsdgraph.runtime.cpu import cpu_runtime

GiB = 2**30
FMNIST_BSD = BSDConfig(lam=0.6, negatives="all", distill_on="current", recall=True, recall_loss="mse")


def mlp(widths=(64, 32), T=3, side=12):
    g = GraphBuilder("mlp", T=T)
    h = g.flatten(g.input((1, side, side)))
    for w in widths:
        h = g.lif(g.linear(h, w))
    g.output(g.linear(h, 10), task="classification")
    return g.build()


def cnn():
    g = GraphBuilder("cnn", T=3)
    h = g.maxpool2d(g.lif(g.batchnorm(g.conv2d(g.input((1, 12, 12)), 4, kernel=3, padding=1))), 2)
    h = g.lif(g.linear(g.flatten(h), 32))
    g.output(g.linear(h, 10), task="classification")
    return g.build()


def batch(B, side=12):
    return torch.rand(B, 1, side, side, generator=torch.Generator().manual_seed(0)), torch.arange(B) % 10


def nbytes(tensors) -> int:
    return sum(t.nbytes for t in tensors)


def vm_rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


@pytest.mark.parametrize("build", [mlp, cnn])
def test_parameter_and_state_bytes_equal_the_initialised_tensors(build):
    bsd = derive_feedback(build())
    est = memory.estimate(compile_graph(bsd), 8)
    assert est.parameters == nbytes(init_params(bsd).values())
    assert est.state == nbytes(init_state(bsd).values())
    assert (est.state > 0) == (build is cnn)  # the CNN's batchnorms (F's and B's) have running statistics


def test_optimizer_state_and_gradients_scale_with_the_parameters_and_vanish_in_evaluation():
    bsd = derive_feedback(mlp())
    train, evaluation = memory.estimate(compile_graph(bsd), 8), memory.estimate(compile_graph(bsd), 8, optimizer=False)
    assert train.optimizer == 2 * train.parameters and train.gradients == train.parameters > 0
    assert evaluation.optimizer == evaluation.gradients == 0 and evaluation.parameters == train.parameters
    assert train.total == train.parameters * 4 + train.state + train.activations


def test_training_activations_are_the_plans_peak_and_affine_in_the_batch():
    bsd = derive_feedback(mlp())
    acts = {B: memory.estimate(compile_graph(bsd), B).activations for B in (32, 64, 128, 192)}
    assert all(acts[B] == lower(bsd).peak_live(B) for B in acts)
    # each launch's live bytes are a + b B (B's rows are the at most 10 classes present, not B samples); the peak
    # is their maximum, affine in B once one launch dominates (here from B = 64 on)
    assert acts[192] - acts[128] == acts[128] - acts[64] > 0
    # the executor's own count of its live buffers (same frees, actual storages) is close below the plan's
    rt = cpu_runtime(bsd, seed=0)
    probe = MemoryProbe(rt.plan)
    rt.observe(probe)
    rt.step(*batch(32))
    assert 0.95 * acts[32] <= probe.peak <= acts[32]


def test_evaluation_activations_are_the_forward_buffers_predict_holds():
    """predict frees nothing until it returns: it holds exactly F's forward buffers and the stimulus."""
    bsd = derive_feedback(mlp())
    rt = cpu_runtime(bsd, seed=0)
    storages = {}
    rt.observe(lambda la, ins, outs: storages.update((v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
                                                     for r, v in (*zip(la.reads, ins), *zip(la.writes, outs))
                                                     if isinstance(v, torch.Tensor) and r.kind != Kind.PARAM
                                                     and r.kind != Kind.RATE))
    rt.predict(batch(50)[0])
    held = sum(storages.values())
    assert memory.estimate(compile_graph(bsd), 50, optimizer=False).activations == held
    # training reports the larger of a step's peak and evaluation's at eval_batch
    assert memory.estimate(compile_graph(bsd), 8, eval_batch=50).activations == held > lower(bsd).peak_live(8)


def test_parameters_and_optimizer_state_match_what_a_step_allocates():
    """Tolerance 0.1 %: the only bytes not estimated are AdamW's per-tensor step counters (4 bytes each)."""
    bsd = derive_feedback(mlp((512, 256), T=4, side=28), FMNIST_BSD)
    rt = cpu_runtime(bsd, seed=0)
    grads = rt.gradients(*batch(32, side=28))[0]
    rt.step(*batch(32, side=28))
    est = memory.estimate(compile_graph(bsd), 32)
    params, opt = nbytes(rt.params.values()), nbytes(v for s in rt.optimizer.state.values() for v in s.values())
    assert params == est.parameters
    assert opt == pytest.approx(est.optimizer, rel=1e-3) and opt - est.optimizer == 4 * len(rt.params)
    assert nbytes(grads.values()) == est.gradients  # one gradient per parameter


def test_bptt_activations_cover_what_autograd_saves():
    """BPTT's estimate (BPTT_FACTOR x node values) is at least the bytes autograd saves for the backward."""
    f = mlp((256, 128), T=4)
    rt, (x, y) = BPTTRuntime(f, seed=0), batch(64)
    weights = {p.untyped_storage().data_ptr() for p in rt.params.values()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rt.step(x, y)
    est = memory.estimate(compile_model(f, "bptt"), 64)
    assert sum(saved.values()) <= est.activations <= 4 * sum(saved.values())


def test_a_40000_wide_mlp_is_estimated_without_allocation_and_refused(monkeypatch):
    f = mlp((40000, 40000), T=4, side=28)
    bsd = derive_feedback(f, FMNIST_BSD)
    before = vm_rss()
    est = memory.estimate(compile_graph(bsd), 128, eval_batch=1000)
    assert vm_rss() - before < 100 * 2**20
    # F: 784-40000-40000-10; B mirrors it: 10-40000-40000-784 (every synapse with a bias)
    weights = 2 * (784 * 40000 + 40000 * 40000 + 40000 * 10)
    assert est.parameters == 4 * (weights + 2 * 40000 + 10 + 2 * 40000 + 784)
    assert 40e9 < est.total < 100e9
    monkeypatch.setattr(memory, "available", lambda device="cpu": (8 * GiB, "a test figure"))
    with pytest.raises(memory.MemoryBudgetError) as err:
        memory.check_fits(est)
    msg = str(err.value)
    assert "\n" not in msg and memory.size(est.total) in msg and "8.6 GB are available (a test figure)" in msg
    assert "at batch 128" in msg and "parameters 13.1 GB" in msg
    memory.check_fits(memory.estimate(compile_graph(derive_feedback(mlp())), 128))  # a tiny model fits


def test_the_environment_knob_turns_the_refusal_off(monkeypatch):
    est = memory.estimate(compile_graph(derive_feedback(mlp())), 8)
    monkeypatch.setattr(memory, "available", lambda device="cpu": (est.total - 1, "a test figure"))
    with pytest.raises(memory.MemoryBudgetError):
        memory.check_fits(est)
    monkeypatch.setenv("BSDGRAPH_MEMORY_CHECK", "0")
    memory.check_fits(est)
    monkeypatch.setattr(memory, "available", lambda device="cpu": (None, "nothing readable"))
    monkeypatch.setenv("BSDGRAPH_MEMORY_CHECK", "1")
    memory.check_fits(est)  # nothing known: no refusal


@pytest.fixture
def proc(tmp_path, monkeypatch):
    """Fake /proc and /sys/fs/cgroup files; no rlimit unless a test sets one."""
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(memory, "PROC_CGROUP", tmp_path / "cgroup")
    monkeypatch.setattr(memory, "PROC_STATUS", tmp_path / "status")
    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path / "sys")
    monkeypatch.setattr(resource, "getrlimit", lambda r: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    (tmp_path / "meminfo").write_text("MemTotal:  4000000 kB\nMemAvailable:  1000000 kB\n")
    (tmp_path / "status").write_text("VmSize:\t 1048576 kB\nVmData:\t  524288 kB\n")
    return tmp_path


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_available_takes_the_smallest_of_meminfo_and_cgroup_limits(proc):
    assert memory.available() == (1_024_000_000, f"MemAvailable of {proc / 'meminfo'}")
    write(proc / "cgroup", "0::/a/b\n")
    write(proc / "sys/a/b/memory.max", "4000000000\n")  # room 3 GB
    write(proc / "sys/a/b/memory.current", "1000000000\n")
    write(proc / "sys/a/memory.max", "2000000000\n")  # the parent is stricter: 2 GB - (1.5 GB - 0.1 GB of cache)
    write(proc / "sys/a/memory.current", "1500000000\n")
    write(proc / "sys/a/memory.stat", "anon 1400000000\ninactive_file 100000000\n")
    write(proc / "sys/memory.max", "max\n")
    room, source = memory.available()
    assert room == 600_000_000 and str(proc / "sys/a") in source and "memory.max" in source


def test_available_reads_cgroup_v1_whose_no_limit_value_never_wins(proc):
    write(proc / "cgroup", "4:memory:/job\n0::/\n")
    write(proc / "sys/memory/job/memory.limit_in_bytes", "9223372036854771712\n")
    assert memory.available()[0] == 1_024_000_000
    write(proc / "sys/memory/job/memory.limit_in_bytes", "900000000\n")
    write(proc / "sys/memory/job/memory.usage_in_bytes", "200000000\n")
    assert memory.available()[0] == 700_000_000


def test_available_counts_an_address_space_limit_less_current_use(proc, monkeypatch):
    limits = {resource.RLIMIT_AS: (3 * GiB, resource.RLIM_INFINITY)}
    monkeypatch.setattr(resource, "getrlimit", lambda r: limits.get(r, (resource.RLIM_INFINITY,) * 2))
    (proc / "meminfo").write_text("MemAvailable: 10000000 kB\n")
    room, source = memory.available()
    assert room == 3 * GiB - GiB and "RLIMIT_AS" in source and "VmSize" in source


def test_available_reports_none_when_nothing_is_readable(proc):
    (proc / "meminfo").unlink()
    room, why = memory.available()
    assert room is None and why


def test_available_on_cuda_is_the_free_device_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (5 * GiB, 80 * GiB))
    room, source = memory.available("cuda:0")
    assert room == 5 * GiB and "cuda:0" in source


def test_describe_names_every_part():
    est = memory.Estimate(parameters=int(9.5e9), gradients=int(9.5e9), optimizer=int(19.1e9), state=0,
                          activations=int(0.2e9), batch=128)
    assert est.describe() == ("about 38.3 GB (parameters 9.5 GB, AdamW state 19.1 GB, gradients 9.5 GB, "
                              "activations 200.0 MB)")
    assert math.isclose(est.total, 38.3e9)


def test_available_on_cuda_without_a_driver_is_unknown(monkeypatch):
    def no_driver(device):
        raise RuntimeError("No CUDA GPUs are available")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_driver)
    assert memory.available("cuda")[0] is None
