"""The ``bsdgraph`` command line. Exit codes: 0 ok, 1 invalid model or input, 2 usage error."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bsdgraph.checkpoint import CheckpointError
from bsdgraph.data import DataError
from bsdgraph.feedback import derive_feedback, pairing
from bsdgraph.lower import lower
from bsdgraph.model_file import ModelError, load_model
from bsdgraph.plot import PlotError
from bsdgraph.printer import format_graph, to_dict
from bsdgraph.train import BACKENDS, TrainingError
from bsdgraph.validate import GraphError


class UsageError(Exception):
    """A command line that parses but asks for something impossible (exit 2)."""


def _pairing_table(bsd) -> str:
    lines = ["  pairing (layer: loss = F side ~ B side; updates):"]
    for p in pairing(bsd):
        b = p.b_side or "labels"
        lines.append(f"    {p.layer}: {p.loss} = {p.f_side} ~ {b}; updates F {list(p.f_params)} B {list(p.b_params)}")
    return "\n".join(lines)


def cmd_compile(args) -> int:
    model = load_model(args.model)
    bsd = derive_feedback(model.graph, model.bsd)
    plan = lower(bsd)
    stages = ["ir", "backward", "plan"] if args.emit == "all" else [args.emit]
    if args.json:
        doc = {"model": str(model.path)}
        doc.update({"ir": to_dict(model.graph)} if "ir" in stages else {})
        doc.update({"backward": to_dict(bsd), "pairing": [p.__dict__ for p in pairing(bsd)]}
                   if "backward" in stages else {})
        doc.update({"plan": plan.to_dict()} if "plan" in stages else {})
        text = json.dumps(doc, indent=1)
    else:
        parts = {
            "ir": lambda: "== forward network F (validated)\n" + format_graph(model.graph),
            "backward": lambda: "== BSD graph: F + derived backward network B + local losses\n"
                                + format_graph(bsd) + "\n" + _pairing_table(bsd),
            "plan": lambda: "== plan\n" + str(plan) + "\n\n" + _energy_bound(model.graph),
        }
        text = "\n\n".join(parts[s]() for s in stages)
    _write(text, args.output)
    return 0


def _apply_overrides(model, args):
    """--lif / --encoding / --bsd edits of the model (pure graph passes, re-validated)."""
    import dataclasses

    from bsdgraph.feedback import BSDConfig
    from bsdgraph.ir import Op
    from bsdgraph.passes import parse_assignments, set_attrs

    try:
        lif, bsd = parse_assignments(args.lif), parse_assignments(args.bsd)
    except ValueError as err:
        raise UsageError(str(err)) from None
    graph = model.graph
    if lif:
        graph = set_attrs(graph, Op.LIF, **lif)
    if args.encoding:
        graph = set_attrs(graph, Op.INPUT, encoding=args.encoding)
    cfg = BSDConfig.from_dict({**dataclasses.asdict(model.bsd), **bsd})
    return dataclasses.replace(model, graph=graph, bsd=cfg)


def _load_data(args, model):
    from bsdgraph.data import check_against_model, load_idx_dataset, load_npz, subset
    from bsdgraph.ir import Op

    ds = load_npz(args.npz) if args.npz else load_idx_dataset(args.data_dir)
    out = model.graph.by_op(Op.OUTPUT)[0]
    ds = check_against_model(ds, model.graph.by_op(Op.INPUT)[0].shape, out.attrs["n_classes"] or None,
                             out.attrs["task"])
    return subset(ds, getattr(args, "limit_train", None), args.limit_test)


def _emit_record(rec: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rec), flush=True)
        return
    metric = (f"test accuracy {100 * rec['test_accuracy']:.2f} %" if "test_accuracy" in rec
              else f"test MSE {rec['test_mse']:.5f}")
    losses = " ".join(f"{k} {v:.3f}" for k, v in rec["losses"].items())
    print(f"epoch {rec['epoch']}: {metric} | losses {losses} | {rec['seconds']:.1f} s "
          f"({rec['samples_per_s']:.0f} samples/s)", flush=True)
    rates = " ".join(f"{k} {100 * v:.1f}%" for k, v in rec["rates"].items())
    print(f"  firing rates: {rates}", flush=True)


def cmd_train(args) -> int:
    from bsdgraph.train import Trainer, TrainConfig, tqdm_progress

    model = _apply_overrides(load_model(args.model), args)
    data = _load_data(args, model)
    cfg = TrainConfig.from_model(model.train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                 seed=args.seed, init=args.init, schedule=args.schedule,
                                 augment=True if args.augment else None)
    out = Path(args.out or Path("runs") / model.path.stem)
    if (out / "checkpoint.pt").exists() and not args.resume:
        raise UsageError(f"{out} already holds a checkpoint: pass --resume to continue it, or another --out")
    as_json = args.json or not sys.stdout.isatty()
    trainer = Trainer(model, data, cfg, out, rule=args.rule, backend=args.backend,
                      log=lambda rec: _report(rec, as_json), progress=None if as_json else tqdm_progress())
    if args.resume:
        trainer.resume()
    else:
        for syn, (factor, rate) in trainer.initialise().items():
            print(f"calibrated {syn}: weights x{factor:.3g}, firing {100 * rate:.1f} %", file=sys.stderr)
    print(f"training {model.path} ({args.rule}, {trainer.backend} backend) on {data.name}: {data.n_train} train / "
          f"{data.n_test} test samples, epochs {trainer.epoch + 1}..{cfg.epochs}", file=sys.stderr)
    history = trainer.run()
    final = history[-1] if history else {}
    summary = (f"test accuracy {100 * final['test_accuracy']:.2f} %" if "test_accuracy" in final
               else f"test MSE {final.get('test_mse', float('nan')):.5f}")
    print(f"done: {summary}; checkpoint {trainer.checkpoint_path}; metrics {out / 'metrics.jsonl'}; "
          f"plots: bsdgraph plot {out}", file=sys.stderr)
    return 0


def _report(rec: dict, as_json: bool) -> None:
    _emit_record(rec, as_json)
    for w in rec["warnings"]:
        print(f"warning: {w}", file=sys.stderr)


def cmd_eval(args) -> int:
    from bsdgraph.train import evaluate, load_for_eval

    model = load_model(args.model)
    rt, ck = load_for_eval(model, Path(args.checkpoint), args.backend)
    data = _load_data(args, model)
    result = {"checkpoint": args.checkpoint, "epoch": ck["epoch"], "rule": ck.get("rule"),
              **{f"test_{k}": v for k, v in evaluate(rt, data.x_test, data.y_test).items()}}
    if args.json:
        print(json.dumps(result))
    else:
        metric = (f"test accuracy {100 * result['test_accuracy']:.2f} %" if "test_accuracy" in result
                  else f"test MSE {result['test_mse']:.5f}")
        print(f"{args.checkpoint} (epoch {ck['epoch']}, {result['rule']}): {metric} on {data.n_test} samples")
    return 0


def cmd_plot(args) -> int:
    from bsdgraph import plot

    run = Path(args.run_dir)
    records = plot.read_metrics(run)
    if not records:
        raise plot.PlotError(f"{run / 'metrics.jsonl'} holds no epoch yet")
    written = [plot.plot_curves(records, run), plot.plot_rates(records, run)]
    ck = run / "checkpoint.pt"
    if ck.is_file() and records[-1].get("rule") == "bsd":
        from bsdgraph.checkpoint import load_checkpoint
        from bsdgraph.printer import from_json

        doc = load_checkpoint(ck)
        model = load_model(args.model or doc["model"])
        data = _load_data(args, model)
        i = args.sample
        if not 0 <= i < data.n_test:
            raise UsageError(f"--sample {i} is out of range: the test split has {data.n_test} samples")
        written.append(plot.plot_raster(from_json(doc["graph"]), doc["params"], doc["state"],
                                        data.x_test[i:i + 1], data.y_test[i:i + 1], run))
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from bsdgraph.bench import format_report, run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.batch_size < 1:
        raise UsageError("--steps and --batch-size must be >= 1")
    model = load_model(args.model)
    from bsdgraph.train import default_backend

    if args.energy:
        return _energy(args, model)
    if args.sweep:
        return _sweep(args, model)
    rep = run_bench(model, args.backend or default_backend(), args.batch_size, args.steps, args.warmup,
                    args.compare)
    print(json.dumps(rep) if args.json else format_report(rep))
    return 0


def _sweep(args, model) -> int:
    from bsdgraph.bench import plot_sweep, run_sweep
    from bsdgraph.train import default_backend

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
    plot_sweep(rep, out)
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

    from bsdgraph.energy import estimate, format_energy, measured_rates
    from bsdgraph.ir import Op
    from bsdgraph.runtime.reference import ReferenceRuntime

    if args.checkpoint:
        from bsdgraph.checkpoint import load_checkpoint

        ck = load_checkpoint(args.checkpoint)
        rt = ReferenceRuntime(model.graph, {k: v for k, v in ck["params"].items() if k.split(".")[0] in
                                            model.graph}, state=ck["state"])
        source = f"measured on test data with the weights of {args.checkpoint}"
    else:
        rt = ReferenceRuntime(model.graph)
        source = "measured on test data with untrained (initial) weights"
    data = _load_data(args, model)
    x = data.x_test[: args.energy_samples]
    poisson = model.graph.by_op(Op.INPUT)[0].attrs["encoding"] == "poisson"
    layers = estimate(model.graph, measured_rates(rt, x), input_rate=float(x.mean()) if poisson else None)
    print(json.dumps([asdict(e) for e in layers]) if args.json else format_energy(layers, source))
    return 0


def _energy_bound(graph) -> str:
    from bsdgraph.energy import estimate, format_energy
    from bsdgraph.ir import Op

    rates = {n.name: 1.0 for n in graph.by_op(Op.LIF)}
    return format_energy(estimate(graph, rates, input_rate=1.0), "assumed 100 % (an upper bound; "
                         "`bsdgraph bench --energy` measures them)")


FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]


def cmd_recall(args) -> int:
    from bsdgraph import plot
    from bsdgraph.checkpoint import load_checkpoint
    from bsdgraph.printer import from_json
    from bsdgraph.train import load_for_eval

    model = load_model(args.model)
    load_for_eval(model, Path(args.checkpoint))  # checks that the checkpoint belongs to this model
    doc = load_checkpoint(args.checkpoint)
    if doc.get("rule") != "bsd":
        raise UsageError(f"{args.checkpoint} was trained with {doc.get('rule')}: it has no backward network")
    images = plot.recall_images(from_json(doc["graph"]), doc["params"], doc["state"])
    names = FASHION_NAMES if len(images) == 10 and "fmnist" in model.path.stem else None
    print(f"wrote {plot.plot_recall(images, Path(args.out), names)}")
    return 0


def _write(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text + "\n")
        print(f"wrote {output}", file=sys.stderr)
    else:
        print(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bsdgraph", description="Compile and run spiking networks trained with "
                                "Bidirectional Spike-based Distillation (BSD).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("compile", help="validate a model, derive its backward network, lower it to a plan",
                       description="Load MODEL.py, call build(), validate, derive the BSD backward network and "
                                   "local losses, lower to a kernel plan, and print the requested stages.")
    c.add_argument("model", metavar="MODEL.py")
    c.add_argument("--emit", choices=["ir", "backward", "plan", "all"], default="all",
                   help="stage to show: ir (F), backward (F + derived B + losses + pairing), plan, all (default)")
    c.add_argument("--json", action="store_true", help="machine-readable JSON instead of text")
    c.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    c.set_defaults(fn=cmd_compile)
    _train_parser(sub)
    _eval_parser(sub)
    _plot_parser(sub)
    _bench_parser(sub)
    r = sub.add_parser("recall", help="render what the backward network B recalls for every class",
                       description="Run B of a trained BSD checkpoint on every class code and save its bottom "
                                   "reconstruction (the stimulus it generates) as an image grid.")
    r.add_argument("model", metavar="MODEL.py")
    r.add_argument("--checkpoint", required=True, metavar="FILE")
    r.add_argument("--out", default="recall.png", metavar="FILE.png")
    r.set_defaults(fn=cmd_recall)
    return p


def _bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="time training steps and inference; FLOPs, roofline, memory; --compare",
                       description="Time BSD training steps (median after warm-up) and inference on random "
                                   "inputs, count the plan's dense FLOPs, measure the GEMM roofline in the same "
                                   "run, and report peak memory. --compare times the in-repo baselines "
                                   "interleaved in the same process.")
    b.add_argument("model", metavar="MODEL.py")
    b.add_argument("--backend", choices=BACKENDS, help="runtime (default: triton with a CUDA GPU, else cpu)")
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--steps", type=int, default=20, help="timed steps per candidate (default 20)")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--compare", action="store_true", help="also time naive eager BSD, BPTT and snnTorch")
    b.add_argument("--json", action="store_true")
    b.add_argument("--energy", action="store_true", help="instead of timing: inference energy (synaptic "
                   "operations from measured firing rates; E_AC 0.9 pJ, E_MAC 4.6 pJ) vs the same net as an ANN")
    b.add_argument("--checkpoint", metavar="FILE", help="with --energy: trained weights to measure rates with")
    b.add_argument("--energy-samples", type=int, default=1000, metavar="N", help="test samples for --energy")
    b.add_argument("--sweep", metavar="PARAM=V1,V2,...", help="time per step vs T, width (MLP hidden width) or "
                   "batch, with BPTT beside; writes a PNG (see --plot)")
    b.add_argument("--plot", metavar="FILE.png", help="where --sweep writes its plot")
    _data_args(b)
    b.set_defaults(fn=cmd_bench)


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--data-dir", metavar="DIR", help="folder with Fashion-MNIST/MNIST IDX files (default: "
                   "/usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)")
    g.add_argument("--npz", metavar="FILE", help="an .npz with arrays x_train, y_train, x_test, y_test")
    p.add_argument("--limit-test", type=int, metavar="N", help="evaluate on the first N test samples only")


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model with BSD (or BPTT) and checkpoint every epoch",
                       description="Train MODEL.py. Hyper-parameters default from the model's TRAIN dict; "
                                   "command-line values override them.")
    t.add_argument("model", metavar="MODEL.py")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--backend", choices=BACKENDS, help="runtime (default: triton with a CUDA GPU, else cpu)")
    t.add_argument("--rule", choices=["bsd", "bptt"], default="bsd",
                   help="bsd (local learning, default) or bptt (surrogate-gradient backprop baseline)")
    t.add_argument("--init", choices=["default", "calibrated"], help="weight initialisation")
    t.add_argument("--schedule", choices=["constant", "cosine"], help="learning-rate schedule over epochs")
    t.add_argument("--augment", action="store_true", help="random +-2 px shifts and horizontal flips (images)")
    t.add_argument("--lif", action="append", metavar="KEY=VALUE", help="set a LIF parameter on every neuron "
                   "(e.g. --lif v_th=0.6); repeatable")
    t.add_argument("--bsd", action="append", metavar="KEY=VALUE", help="set a BSD option (e.g. --bsd "
                   "negatives=other_class, --bsd distill_on=membrane); repeatable")
    t.add_argument("--encoding", choices=["direct", "poisson"], help="override the input encoding")
    _data_args(t)
    t.add_argument("--limit-train", type=int, metavar="N", help="train on the first N samples only")
    t.add_argument("--out", metavar="RUN_DIR", help="where checkpoint.pt and metrics.jsonl go (default "
                   "runs/<model>)")
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    t.add_argument("--json", action="store_true", help="one JSON line per epoch (default when stdout is not a "
                   "terminal)")
    t.set_defaults(fn=cmd_train)


def _plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="write PNG plots of a training run",
                       description="Write curves.png (test metric, per-layer losses), rates.png (firing rates) "
                                   "and raster.png (spikes of one test sample through F and B) into RUN_DIR.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--model", metavar="MODEL.py", help="model file (default: the one recorded in the checkpoint)")
    p.add_argument("--sample", type=int, default=0, help="test sample for the raster (default 0)")
    _data_args(p)
    p.set_defaults(fn=cmd_plot)


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a checkpoint on the test split",
                       description="Evaluate the forward network F of a checkpoint on the test split.")
    e.add_argument("model", metavar="MODEL.py")
    e.add_argument("--checkpoint", required=True, metavar="FILE")
    e.add_argument("--backend", choices=BACKENDS)
    _data_args(e)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on usage errors and 0 on --help
        return int(exit_.code or 0)
    prefix = getattr(args, "model", None)
    try:
        return args.fn(args)
    except GraphError as err:
        for d in err.diagnostics:
            print(f"{prefix}: {d}", file=sys.stderr)
        print(f"{prefix}: invalid model ({len(err.diagnostics)} problem(s))", file=sys.stderr)
        return 1
    except (ModelError, DataError, CheckpointError, TrainingError, PlotError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except UsageError as err:
        print(f"bsdgraph: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. -o into a missing directory
        print(f"error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
