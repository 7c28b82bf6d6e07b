"""``bsdgraph bench``: time training steps and inference, count the FLOPs the plan executes, measure this machine's
GEMM roofline in the same run, report peak memory; with ``--compare``, the same step in the in-repo baselines
(naive eager BSD, BPTT of F, snnTorch BPTT when installed), timed interleaved in one process.

FLOPs count dense work only (GEMMs and convolutions: 2 per multiply-add), read off the plan's launches and
buffer shapes; elementwise work (LIF scans, norms, AdamW) is not counted, so the roofline fraction is a lower
bound on how busy the machine is.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from bsdgraph.ir.graph import Graph, Op
from bsdgraph.compiler.cost import launch_flops, plan_flops
from bsdgraph.compiler.plan import Plan


# ---------------------------------------------------------------------------------------------------- measuring


ROOFLINE = "roofline GEMM"


def roofline_probe(n: int | None = None) -> tuple[Callable[[], object], float]:
    """A large fp32 GEMM (same threads and device as the benchmark) and its FLOPs: timed as one more candidate
    of ``time_interleaved``, so the roofline is measured in the same rounds as the steps it divides. Measured
    once before the steps instead, it moved from 114 to 240 GFLOP/s between runs on this shared VM, and the
    fraction with it."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = n or (8192 if device == "cuda" else 2048)  # 2048^3 takes ~0.3 ms on an H200: too short to saturate it
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return (lambda: a @ b), 2.0 * n ** 3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def _trim() -> None:
    """Return freed heap to the OS so that the next measurement's RSS baseline is honest."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident memory above the starting level while the block runs (sampled every millisecond)."""

    def __enter__(self):
        _trim()
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.delta = self.peak - self.base


@dataclass
class Result:
    name: str
    ms_step: float
    ms_infer: float | None
    samples_per_s: float
    peak_mib: float
    gflop_step: float | None
    gflops: float | None = None
    roofline_fraction: float | None = None


def _sync() -> None:
    """Wait for queued GPU work, so a wall-clock interval covers the kernels it launched (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], steps: int, warmup: int) -> dict[str, list[float]]:
    """Round-robin timing: each repeat runs every candidate once, so machine noise hits all of them alike.
    Synchronised on a GPU (the published ONB harness is not: its figures undercount)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            _sync()
            t = time.perf_counter()
            fn()
            _sync()
            times[k].append(time.perf_counter() - t)
    return times


def peak_memory(fn: Callable[[], object], steps: int = 3) -> float:
    """Peak memory of ``steps`` calls in MiB: torch.cuda.max_memory_allocated on a GPU, else resident memory
    above the starting level."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            fn()
        _sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with PeakRSS() as m:
        for _ in range(steps):
            fn()
    return m.delta / 2**20


def summarise(name: str, step_times, infer_times, batch: int, peak_mib: float, flop: float | None,
              roofline: float) -> Result:
    ms = 1e3 * statistics.median(step_times)
    r = Result(name, round(ms, 2), round(1e3 * statistics.median(infer_times), 2) if infer_times else None,
               round(batch / (ms / 1e3), 1), round(peak_mib, 1), round(flop / 1e9, 3) if flop else None)
    if flop:
        r.gflops = round(flop / (ms / 1e3) / 1e9, 1)
        r.roofline_fraction = round(r.gflops / roofline, 3)
    return r


def as_dicts(results: list[Result]) -> list[dict]:
    return [asdict(r) for r in results]


# ---------------------------------------------------------------------------------------------------- the command


def _batch(g: Graph, B: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random stimuli and labels (or targets) of the shapes the model trains on: a sequence stimulus or target
    carries its T steps per sample."""
    gen = torch.Generator().manual_seed(seed)
    inp, out = g.by_op(Op.INPUT)[0], g.by_op(Op.OUTPUT)[0]
    steps = lambda n, key: (g.T,) if n.attrs[key] == "sequence" else ()  # noqa: E731
    x = torch.rand(B, *steps(inp, "encoding"), *inp.shape, generator=gen)
    if out.attrs["task"] == "classification":
        return x, torch.randint(0, out.attrs["n_classes"], (B,), generator=gen)
    return x, torch.rand(B, *steps(out, "target"), *out.shape, generator=gen)


def bptt_flops(plan_plain: Plan, g: Graph, B: int) -> int:
    """BPTT of F: forward, weight gradients, and input gradients of every synapse but the first (T*B rows)."""
    fwd = [la for la in plan_plain.launches if la.phase == "forward-F"]
    per = [launch_flops(plan_plain, g, la, B, time_invariant=False) for la in fwd]
    return 3 * sum(per) - (per[0] if per else 0)


def _baseline(name: str):
    """Load ``bench/baselines/<name>.py`` of this checkout (the baselines are benchmark code, not the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "baselines" / f"{name}.py"
    if not path.is_file():
        raise ImportError(f"{path} not found (bench/ ships with the repository, not the installed package)")
    spec = importlib.util.spec_from_file_location(f"bsdgraph_baseline_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def baseline_widths(g: Graph, who: str) -> list[int]:
    """The layer widths of a direct-encoded Linear + LIF classifier, which is all the hand-written baselines
    (``bench/baselines/``) implement; ValueError naming ``who`` otherwise."""
    from bsdgraph.compiler.feedback import segment

    (inp,), (out,) = g.by_op(Op.INPUT), g.by_op(Op.OUTPUT)
    if inp.attrs["encoding"] != "direct" or out.attrs["task"] != "classification":
        raise ValueError(f"the {who} covers direct-encoded classifiers only")
    layers = segment(g)
    if any(len(layer.synapses) != 1 or g[layer.synapse].op != Op.LINEAR or layer.bn for layer in layers):
        raise ValueError(f"the {who} covers Linear + LIF stacks (MLPs) only")
    return [g[layers[0].synapse].attrs["in_features"]] + [g[layer.synapse].attrs["out_features"] for layer in layers]


def baselines(model, g: Graph, bsd: Graph, x, y, device: torch.device | str = "cpu"
              ) -> tuple[dict[str, Callable], dict[str, float], list[str]]:
    """The --compare candidates that apply to this model (on ``device``, where the engine runs), their FLOPs, and
    notes on the ones skipped."""
    from bsdgraph.compiler.lower import lower
    from bsdgraph.runtime.bptt import BPTTRuntime

    plain = lower(bsd, dedup=False)  # what the naive baseline and BPTT compute, for their FLOP counts only
    fns, flops, notes = {}, {}, []
    try:
        NaiveBSD = _baseline("naive_bsd").NaiveBSD
        naive = NaiveBSD.from_graph(g, device)
        fns["naive"] = lambda: naive.step(x, y)
        flops["naive"] = plan_flops(plain, bsd, len(y), time_invariant=False)
    except (ImportError, ValueError) as err:
        notes.append(f"naive: skipped ({err})")
    bptt = BPTTRuntime(g, device=device)
    fns["bptt"] = lambda: bptt.step(x, y)
    flops["bptt"] = bptt_flops(plain, bsd, len(y))
    try:
        snn = _baseline("snntorch_bptt").SnnTorchBPTT.from_graph(g, device)
        fns["snntorch"] = lambda: snn.step(x, y)
        flops["snntorch"] = flops["bptt"]
    except (ImportError, ValueError) as err:
        notes.append(f"snntorch: skipped ({err})")
    return fns, flops, notes


def run_bench(model, backend: str, batch: int, steps: int, warmup: int, compare: bool, compile: str = "off",
              say=None) -> dict:
    """Time the engine's step (and, with ``compare``, the baselines) in one interleaved run; ``say`` prints what
    is being measured (default: to stderr), since a comparison takes minutes."""
    import sys

    from bsdgraph.compiler.program import compile_model

    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    from bsdgraph.train.config import TrainConfig
    from bsdgraph.train.trainer import make_runtime

    program = compile_model(model)
    g, bsd = program.forward, program.graph
    engine = make_runtime(program, backend, TrainConfig.from_model(model.train), batch=batch)
    device = engine.device  # every runtime has one; the batch goes there before timing, not inside a step
    x, y = (v.to(device) for v in _batch(g, batch))
    name = f"bsdgraph-{backend}"
    fns = {name: lambda: engine.step(x, y)}
    flops = {name: plan_flops(engine.plan, bsd, batch) if hasattr(engine, "plan") else None}
    notes: list[str] = []
    compile_s = None
    if compile != "off":  # the compiled step as one more candidate, its compile (its first call) timed apart
        compiled = make_runtime(program, backend, TrainConfig.from_model(model.train), batch=batch, compile=compile)
        if compiled.compile_mode == "off":
            notes.append(f"--compile {compile}: {compiled.compile_why}")
        else:
            compiled.step(x, y)
            compile_s = round(compiled.compile_seconds, 1)
            label = f"{name} ({compiled.compile_mode})"
            fns[label] = lambda: compiled.step(x, y)
            flops[label] = flops[name]
            notes.append(f"{label}: compiled in {compile_s} s ({compiled.compile_why})")
    if compare:
        more, more_flops, skipped = baselines(model, g, bsd, x, y, device)
        notes += skipped
        fns.update(more)
        flops.update(more_flops)
    probe, probe_flop = roofline_probe()
    say(f"timing {', '.join(fns)} and the GEMM roofline: {warmup} warm-up + {steps} interleaved rounds")
    times = time_interleaved({**fns, ROOFLINE: probe}, steps, warmup)
    say("timing inference; measuring peak memory of each step")
    roofline = probe_flop / statistics.median(times.pop(ROOFLINE)) / 1e9
    infer = time_interleaved({name: lambda: engine.predict(x)}, max(3, steps // 2), 1)[name]
    results = [summarise(k, times[k], infer if k == name else None, batch, peak_memory(fns[k]), flops[k], roofline)
               for k in fns]
    ratios = {k: round(r.ms_step / results[0].ms_step, 2) for k, r in zip(fns, results) if k != name}
    by_name = {r.name: r for r in results}
    compiled_label = next((k for k in fns if k.startswith(f"{name} (")), None)
    if compiled_label is not None and compile_s is not None:
        saved = by_name[name].ms_step - by_name[compiled_label].ms_step
        # steps after which compiling has paid for itself (None: the compiled step is not faster)
        break_even = round(compile_s * 1e3 / saved) if saved > 0 else None
        notes.append(f"{compiled_label}: pays for its compile after "
                     + (f"{break_even} steps" if break_even is not None else "no number of steps (not faster)"))
    return {"model": str(model.path), "batch": batch, "T": g.T, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "roofline_gflops": round(roofline, 1), "results": as_dicts(results),
            "speedup_vs": ratios, "compile_seconds": compile_s, "launches_per_step": len(program.plan.launches),
            "notes": notes}


def format_report(rep: dict) -> str:
    lines = [f"bench {rep['model']}: batch {rep['batch']}, T={rep['T']}, {rep['device']}, {rep['threads']} threads, "
             f"fp32 GEMM roofline {rep['roofline_gflops']} GFLOP/s (timed interleaved with the steps)",
             f"  {'runtime':<18} {'ms/step':>8} {'ms/infer':>9} {'samples/s':>10} {'peak MiB':>9} "
             f"{'GFLOP/step':>11} {'GFLOP/s':>8} {'roofline':>9}"]
    for r in rep["results"]:
        fmt = lambda v, f: (f % v) if v is not None else "-"  # noqa: E731
        lines.append(f"  {r['name']:<18} {r['ms_step']:>8.2f} {fmt(r['ms_infer'], '%9.2f'):>9} "
                     f"{r['samples_per_s']:>10.0f} {r['peak_mib']:>9.1f} {fmt(r['gflop_step'], '%11.3f'):>11} "
                     f"{fmt(r['gflops'], '%8.1f'):>8} {fmt(r['roofline_fraction'], '%9.2f'):>9}")
    for k, v in rep["speedup_vs"].items():
        lines.append(f"  {k} takes {v:.2f}x the time of bsdgraph per training step (interleaved, same process)")
    lines += [f"  note: {n}" for n in rep["notes"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- sweeps


def _variant(model, param: str, value: int):
    import dataclasses

    from bsdgraph.compiler.passes import set_hidden_width

    if param == "T":
        return dataclasses.replace(model, graph=model.graph.replace(T=value))
    if param == "width":
        return dataclasses.replace(model, graph=set_hidden_width(model.graph, value))
    return model


def run_sweep(model, backend: str, param: str, values: list[int], batch: int, steps: int, warmup: int) -> dict:
    """Median ms per training step of bsdgraph and of BPTT on the same forward network, per value."""
    from bsdgraph.compiler.program import compile_model
    from bsdgraph.runtime.bptt import BPTTRuntime
    from bsdgraph.train.config import TrainConfig
    from bsdgraph.train.trainer import make_runtime

    rows = []
    for v in values:
        m = _variant(model, param, v)
        B = v if param == "batch" else batch
        engine = make_runtime(compile_model(m), backend, TrainConfig.from_model(m.train), batch=B)
        device = engine.device
        bptt = BPTTRuntime(m.graph, device=device)
        x, y = (v.to(device) for v in _batch(m.graph, B))
        times = time_interleaved({"bsdgraph": lambda: engine.step(x, y), "bptt": lambda: bptt.step(x, y)},
                                 steps, warmup)
        rows.append({param: v, **{k: round(1e3 * statistics.median(t), 2) for k, t in times.items()}})
    return {"model": str(model.path), "param": param, "batch": batch, "backend": backend,
            "threads": torch.get_num_threads(), "rows": rows}


def plot_sweep(rep: dict, path) -> None:
    from bsdgraph.tools.plot import _plt

    plt = _plt()
    p = rep["param"]
    xs = [r[p] for r in rep["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (("bsdgraph", "o-"), ("bptt", "s--")):
        ax.plot(xs, [r[name] for r in rep["rows"]], style, label=f"{name}" + (f" ({rep['backend']})"
                                                                              if name == "bsdgraph" else ""))
    ax.set(xscale="log", yscale="log", xlabel=p, ylabel="ms per training step",
           title=f"{rep['model']}: time per step vs {p} ({rep['threads']} threads)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
