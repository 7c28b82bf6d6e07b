"""``bsdgraph bench`` (timing, --compare, --sweep, --energy)."""

from __future__ import annotations

import json
from pathlib import Path

from bsdgraph.tools import outputs
from bsdgraph.errors import UsageError
from bsdgraph.cli.common import check_picture, count, data_args, load_data
from bsdgraph.compiler.model_file import load_model
from bsdgraph.train.config import BACKENDS


def cmd_bench(args) -> int:
    import torch

    from bsdgraph.tools.bench import format_report, run_bench

    if args.sweep:
        check_picture(args.plot or "sweep.png", "--plot")
        if args.plot:
            outputs.claim(args.plot, args.force, "--plot")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    from bsdgraph.train.trainer import default_backend

    if args.energy:
        return _energy(args, model)
    if args.sweep:
        return _sweep(args, model)
    rep = run_bench(model, args.backend or default_backend(), args.batch_size, args.steps, args.warmup,
                    args.compare, args.compile)
    print(json.dumps(rep) if args.json else format_report(rep))
    return 0


def _sweep(args, model) -> int:
    from bsdgraph.tools.bench import plot_sweep, run_sweep
    from bsdgraph.train.trainer import default_backend

    param, _, raw = args.sweep.partition("=")
    try:
        values = [int(v) for v in raw.split(",") if v]
    except ValueError:
        values = []
    if param not in ("T", "width", "batch") or not values or min(values) < 1:
        raise UsageError(f"--sweep expects T=..., width=... or batch=... with positive integers, got {args.sweep!r}")
    rep = run_sweep(model, args.backend or default_backend(), param, values, args.batch_size, args.steps,
                    args.warmup)
    out = Path(args.plot or f"sweep_{model.path.stem}_{param}.png")
    with outputs.replacing(out, args.force, "--plot") as tmp:
        plot_sweep(rep, tmp)
    if args.json:
        print(json.dumps(rep))
    else:
        for row in rep["rows"]:
            print(f"{param}={row[param]:<6} bsdgraph {row['bsdgraph']:8.2f} ms   bptt {row['bptt']:8.2f} ms   "
                  f"bptt/bsdgraph {row['bptt'] / row['bsdgraph']:.2f}")
        print(f"wrote {out}")
    return 0


def _energy(args, model) -> int:
    """Inference energy from firing rates measured on test data (trained weights with --checkpoint)."""
    from dataclasses import asdict

    from bsdgraph.tools.energy import estimate, format_energy, measured_rates
    from bsdgraph.ir.graph import Op
    from bsdgraph.runtime.reference import ReferenceRuntime

    if args.checkpoint:
        from bsdgraph.train.checkpoint import load_checkpoint, require

        from bsdgraph.cli.interop import check_weights

        ck = require(load_checkpoint(args.checkpoint), args.checkpoint, ("params", "state"))
        check_weights(model.graph, ck["params"], ck["state"], args.checkpoint)  # F's weights, of this model
        rt = ReferenceRuntime(model.graph, {k: v for k, v in ck["params"].items() if k.split(".")[0] in
                                            model.graph}, state=ck["state"])
        source = f"measured on test data with the weights of {args.checkpoint}"
    else:
        rt = ReferenceRuntime(model.graph)
        source = "measured on test data with untrained (initial) weights"
    data = load_data(args, model)
    x = data.x_test[: args.energy_samples]
    poisson = model.graph.by_op(Op.INPUT)[0].attrs["encoding"] == "poisson"
    layers = estimate(model.graph, measured_rates(rt, x), input_rate=float(x.mean()) if poisson else None)
    print(json.dumps([asdict(e) for e in layers]) if args.json else format_energy(layers, source))
    return 0


def register(sub) -> None:
    b = sub.add_parser("bench", help="time training steps and inference; FLOPs, roofline, memory; --compare",
                       description="Time BSD training steps (median after warm-up) and inference on random "
                                   "inputs, count the plan's dense FLOPs, measure the GEMM roofline in the same "
                                   "run, and report peak memory. --compare times the in-repo baselines "
                                   "interleaved in the same process.")
    b.add_argument("model", metavar="MODEL.py")
    b.add_argument("--backend", choices=BACKENDS, help="runtime (default: triton with a CUDA GPU, else cpu)")
    b.add_argument("--compile", choices=["off", "auto", "inductor", "aot_eager"], default="off",
                   help="also time the step compiled by torch.compile (cpu backend), after compiling it once; "
                        "reports the compile seconds")
    b.add_argument("--batch-size", type=count(1), default=128, help="samples per step (default 128)")
    b.add_argument("--steps", type=count(1), default=20, help="timed steps per candidate (default 20)")
    b.add_argument("--warmup", type=count(0), default=3, help="untimed steps first (default 3)")
    b.add_argument("--threads", type=count(1, 1024), help="torch CPU threads (default: torch's choice)")
    b.add_argument("--compare", action="store_true", help="also time naive eager BSD, BPTT and snnTorch")
    b.add_argument("--json", action="store_true")
    b.add_argument("--energy", action="store_true", help="instead of timing: inference energy (synaptic "
                   "operations from measured firing rates; E_AC 0.9 pJ, E_MAC 4.6 pJ) vs the same net as an ANN")
    b.add_argument("--checkpoint", metavar="FILE", help="with --energy: trained weights to measure rates with")
    b.add_argument("--energy-samples", type=count(1), default=1000, metavar="N", help="test samples for --energy")
    b.add_argument("--sweep", metavar="PARAM=V1,V2,...", help="time per step vs T, width (MLP hidden width) or "
                   "batch, with BPTT beside; writes a PNG (see --plot)")
    b.add_argument("--plot", metavar="FILE.png", help="where --sweep writes its plot")
    b.add_argument("--force", action="store_true", help="replace the plot even if bsdgraph did not write it")
    data_args(b)
    b.set_defaults(fn=cmd_bench)
