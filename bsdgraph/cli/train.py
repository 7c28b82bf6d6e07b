"""``bsdgraph train / eval / plot / recall``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bsdgraph.tools import outputs
from bsdgraph.errors import UsageError
from bsdgraph.cli.common import (
    apply_overrides, check_picture, count, data_args, data_record, fraction_or_zero, load_data, number, recorded_data,
    run_checkpoint, seed,
)
from bsdgraph.compiler.model_file import load_model
from bsdgraph.train.config import BACKENDS


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
    """``bsdgraph train``: the flags, the model file and the data become one ``bsdgraph.api.train_run`` (what
    ``bsdgraph.fit`` runs too); this command adds the run directory's record of its flags and data, and prints."""
    from bsdgraph.api import train_run
    from bsdgraph.train import rundir
    from bsdgraph.train.config import TrainConfig
    from bsdgraph.train.trainer import tqdm_progress

    model = apply_overrides(load_model(args.model), args)
    data = load_data(args, model)
    out = Path(args.out or Path("runs") / model.path.stem)
    given = _train_flags(args)  # before the run's own are filled in: what this command changes on purpose
    if args.resume:
        _remembered_flags(args, rundir.manifest(out))
    cfg = TrainConfig.from_model(model.train, **_train_options(args), epochs=args.epochs,
                                 batch_size=args.batch_size, lr=args.lr, seed=args.seed, init=args.init,
                                 schedule=args.schedule, augment=True if args.augment else None,
                                 val_split=args.val_split, patience=args.patience)
    as_json = args.json or not sys.stdout.isatty()
    train_run(model, data, cfg, out, rule=args.rule, backend=args.backend, resume=args.resume, force=args.force,
              changing=frozenset(args.changing), compile=args.compile, layer_parallel=args.layer_parallel,
              record={"argv": sys.argv[1:], "train_flags": given, **data_record(args, model)},
              log=lambda rec: _report(rec, as_json), say=lambda text: print(text, file=sys.stderr),
              # the bar goes to stderr whenever that is a terminal: `train | tee log` keeps it
              progress=tqdm_progress())
    return 0


TRAIN_FLAGS = ("lr", "batch_size", "seed", "init", "schedule", "augment", "val_split", "patience", "train_options")


def _train_options(args) -> dict:
    """``--train KEY=VALUE`` options, typed by TrainConfig's fields (a bad one is a usage error, exit 2); a flag
    of its own (--lr, --val-split) wins over the same key here."""
    import dataclasses

    from bsdgraph.compiler import options
    from bsdgraph.train.config import TrainConfig

    schema = {f.name: options.Option(type(f.default)) for f in dataclasses.fields(TrainConfig)}
    values, problems = options.parse("--train", args.train_options, schema)
    if problems:
        raise UsageError(*problems)
    return {k: v for k, v in values.items() if getattr(args, k, None) is None}


def _train_flags(args) -> dict:
    """The training options given on the command line (the run directory records them); what they change is
    named by TrainConfig key (a --train option by its own key)."""
    given = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) not in (None, False)}
    args.changing = sorted([k for k in given if k != "train_options"] + list(_train_options(args)))
    return given


def _remembered_flags(args, manifest: dict) -> None:
    """On --resume, the options the run was started with on its command line, where this one does not give them:
    the run directory remembers them (--lr 0.01 at the start need not be repeated)."""
    for k, v in (manifest.get("train_flags") or {}).items():
        if k in TRAIN_FLAGS and getattr(args, k) in (None, False):
            setattr(args, k, v)


def _report(rec: dict, as_json: bool) -> None:
    _emit_record(rec, as_json)
    for w in rec["warnings"]:
        print(f"warning: {w}", file=sys.stderr)


def cmd_eval(args) -> int:
    from bsdgraph.train.trainer import evaluate, load_for_eval, tqdm_progress

    if Path(args.model).is_dir():
        model, program = _run_model(args)
        rt, ck = load_for_eval(program, Path(args.checkpoint), args.backend)
    else:
        if not args.checkpoint:
            raise UsageError("eval MODEL.py needs --checkpoint FILE (or give the run directory instead of the model)")
        model = apply_overrides(load_model(args.model), args)
        rt, ck = load_for_eval(model, Path(args.checkpoint), args.backend)
    data = load_data(args, model)
    result = {"checkpoint": args.checkpoint, "epoch": ck["epoch"], "rule": ck.get("rule"),
              **{f"test_{k}": v for k, v in evaluate(rt, data.x_test, data.y_test,
                                                      progress=tqdm_progress(what="evaluating")).items()}}
    if args.frechet_classifier:
        from bsdgraph.tools.frechet import reconstruction_frechet

        if model.target != "input":
            raise UsageError(f"--frechet-classifier compares reconstructions with their originals; {model.path} is "
                             "not an autoencoder (its model file has no TARGET = 'input')")
        if data.n_test < 2:  # a covariance of one sample does not exist
            raise UsageError(f"--frechet-classifier fits a Gaussian to the test samples and needs at least 2, got "
                             f"{data.n_test} (--limit-test)")
        result["test_frechet"] = reconstruction_frechet(rt, data.x_test, args.frechet_classifier)
    if args.json:
        print(json.dumps(result))
    else:
        metric = (f"test accuracy {100 * result['test_accuracy']:.2f} %" if "test_accuracy" in result
                  else f"test MSE {result['test_mse']:.5f}")
        if "test_frechet" in result:
            metric += (f", Fréchet distance {result['test_frechet']:.3f} in the feature space of the classifier "
                       f"{args.frechet_classifier}")
        print(f"{args.checkpoint} (epoch {ck['epoch']}, {result['rule']}): {metric} on {data.n_test} samples")
    return 0


def cmd_plot(args) -> int:
    from bsdgraph.tools import plot
    from bsdgraph.train import rundir

    run = Path(args.run_dir)
    records = plot.read_metrics(run)
    if not records:
        raise plot.PlotError(f"{run / 'metrics.jsonl'} holds no epoch yet")
    about = rundir.describe(run)
    if about:
        print(about, file=sys.stderr)
    written = [plot.plot_curves(records, run), plot.plot_rates(records, run)]
    ck = run / "checkpoint.pt"
    if ck.is_file():
        written += _plot_samples(args, run, ck, records)
    for path in written:
        print(f"wrote {path}")
    return 0


DATA_ORIGINS = ("npz", "text", "idx")   # what `bsdgraph train` records of data it can read again (cli/common.py)


def _plot_samples(args, run: Path, ck: Path, records: list[dict]) -> list[Path]:
    """raster.png (BSD runs) and reconstructions.png (autoencoders) of test samples, from the checkpoint's own
    graph and weights. The model file runs only when the user names it (--model): a checkpoint is data, and the
    path it records is not the user's choice of code to run."""
    from bsdgraph.tools import plot
    from bsdgraph.train import rundir
    from bsdgraph.train.checkpoint import load_checkpoint, require
    from bsdgraph.train.prepare import standardize
    from bsdgraph.ir.printer import from_json

    doc = require(load_checkpoint(ck), ck)
    graph = from_json(doc["graph"])  # the graph trained, whatever --bsd / --lif options made it
    recorded_data(args, rundir.manifest(run))  # the --npz / --text / --data-dir the run trained on
    model = load_model(args.model) if args.model else _model_of_checkpoint(doc, graph)
    origin = rundir.manifest(run).get("data")
    named = args.npz or args.data_dir or getattr(args, "text", None)
    if not args.model and origin == "model" and not named:
        print(f"note: no raster: the run trained on its model file's own data(), and bsdgraph does not run a model "
              f"file you did not name; pass --model (e.g. --model {run / 'model_source.py'})", file=sys.stderr)
        return []
    if origin not in (None, "model", *DATA_ORIGINS) and not named:  # bsdgraph.fit on data held in Python
        print(f"note: no raster: the run trained on data held in Python ({origin}), which the run directory does "
              "not keep; pass the test data as --npz FILE to draw one", file=sys.stderr)
        return []
    data = load_data(args, model)
    i = args.sample
    if not 0 <= i < data.n_test:
        raise UsageError(f"--sample {i} is out of range: the test split has {data.n_test} samples")
    written = []
    # a standardised run sees its input standardised (the pictures show the originals)
    seen = (lambda x: standardize(x, doc["input_stats"])) if doc.get("input_stats") else (lambda x: x)
    if model.target == "input":  # an autoencoder: originals beside what F reconstructs
        x = data.x_test[i:i + 10]
        written.append(plot.plot_reconstructions(x, plot.reconstruct(graph, doc["params"], doc["state"], seen(x)),
                                                 run))
    if records[-1].get("rule") == "bsd":
        written.append(plot.plot_raster(graph, doc["params"], doc["state"], seen(data.x_test[i:i + 1]),
                                        data.y_test[i:i + 1], run, data.class_names))
    return written


def _run_model(args, data: bool = True):
    """(Model, Program) of a run directory given as the model: its checkpoint's graph, its recorded data (unless
    ``data`` is False), no model file (``args.checkpoint`` defaults to the run's)."""
    from bsdgraph.compiler.program import compile_graph, compile_model
    from bsdgraph.train import rundir

    run = Path(args.model)
    if args.lif or args.bsd or args.encoding or args.batchnorm or args.class_code:
        raise UsageError("--lif / --bsd / --encoding / --batchnorm / --class-code edit a model file; a run "
                         "directory keeps what it trained")
    # a run that held out a validation split is evaluated at its best epoch on it (best.pt), unless told otherwise
    args.checkpoint = args.checkpoint or str(run / "best.pt" if (run / "best.pt").is_file() else run / "checkpoint.pt")
    doc, graph = run_checkpoint(run, args.checkpoint)
    program = compile_graph(graph) if doc["rule"] == "bsd" else compile_model(graph, doc["rule"])
    if data:
        recorded_data(args, rundir.manifest(run))
    return _model_of_checkpoint(doc, graph), program


def _model_of_checkpoint(doc: dict, graph):
    """A Model made of what the checkpoint records (no code runs): F's input and output for the data checks, and
    the target (``TARGET = "input"`` for an autoencoder; a checkpoint older than that record is an autoencoder when
    its regression output is exactly as large as its stimulus, which is what load_model requires of one)."""
    import math

    from bsdgraph.compiler.feedback import BSDConfig
    from bsdgraph.ir.graph import Op
    from bsdgraph.compiler.model_file import Model

    target = doc.get("target")
    if target not in ("labels", "input"):
        x, out = graph.by_op(Op.INPUT)[0], graph.by_op(Op.OUTPUT)[0]
        same = out.attrs["task"] == "regression" and math.prod(out.shape) == math.prod(x.shape)
        target = "input" if same else "labels"
    return Model(Path(doc["model"]), graph, BSDConfig(), target=target)


def cmd_recall(args) -> int:
    from bsdgraph.tools import plot
    from bsdgraph.train.data import FASHION_NAMES
    from bsdgraph.ir.printer import from_json
    from bsdgraph.train.prepare import in_input_units
    from bsdgraph.train.trainer import load_for_eval

    check_picture(args.out, "--out")
    outputs.claim(args.out, args.force, "--out")
    if Path(args.model).is_dir():   # a run directory: its checkpoint and graph
        model, program = _run_model(args, data=False)
        _, doc = load_for_eval(program, Path(args.checkpoint))
    else:
        if not args.checkpoint:
            raise UsageError("recall MODEL.py needs --checkpoint FILE (or give the run directory instead)")
        model = apply_overrides(load_model(args.model), args)  # the edits the checkpoint was trained with
        _, doc = load_for_eval(model, Path(args.checkpoint))  # checks that the checkpoint belongs to this model
    if doc.get("rule") != "bsd":
        raise UsageError(f"{args.checkpoint} was trained with {doc.get('rule')}: it has no backward network")
    images = in_input_units(plot.recall_images(from_json(doc["graph"]), doc["params"], doc["state"]),
                            doc.get("input_stats"))
    names = FASHION_NAMES if len(images) == 10 and "fmnist" in model.path.stem else None
    with outputs.replacing(args.out, args.force, "--out") as tmp:
        plot.plot_recall(images, tmp, names)
    print(f"wrote {args.out}")
    return 0


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model with BSD (or BPTT) and checkpoint every epoch",
                       description="Train MODEL.py. Hyper-parameters default from the model's TRAIN dict; "
                                   "command-line values override them. Under torchrun (torchrun "
                                   "--nproc-per-node N -m bsdgraph train ...) N processes train data-parallel, "
                                   "or layer-parallel with --layer-parallel.")
    t.add_argument("model", metavar="MODEL.py")
    t.add_argument("--epochs", type=count(1), help="epochs to train in all (default: the model's TRAIN, else 3)")
    t.add_argument("--batch-size", type=count(1), help="samples per step (default: the model's TRAIN, else 128)")
    t.add_argument("--lr", type=number(0, 10), help="AdamW learning rate (default: the model's TRAIN, else 1e-3)")
    t.add_argument("--seed", type=seed, help="seed of weights, shuffling and Poisson spikes (default: TRAIN, else 0)")
    t.add_argument("--backend", choices=BACKENDS, help="runtime (default: triton with a CUDA GPU, else cpu)")
    t.add_argument("--compile", choices=["off", "auto", "inductor", "aot_eager"], default="off",
                   help="run the step as one torch.compile graph (cpu backend, one process): inductor generates "
                        "code (about a minute to compile on 2 cores, cached across runs), aot_eager only traces, "
                        "auto decides per device and says what it picked (default off)")
    t.add_argument("--rule", choices=["bsd", "bptt"], default="bsd",
                   help="bsd (local learning, default) or bptt (surrogate-gradient backprop baseline)")
    t.add_argument("--init", choices=["default", "calibrated"], help="weight initialisation; calibrated scales each "
                   "layer's weights until it fires 5-25 %% (default: the model's TRAIN, else default)")
    t.add_argument("--schedule", choices=["constant", "cosine"], help="learning-rate schedule over epochs (default: "
                   "the model's TRAIN, else constant)")
    t.add_argument("--augment", action="store_true", help="random +-2 px shifts and horizontal flips (images)")
    t.add_argument("--val-split", type=fraction_or_zero, metavar="F", help="hold out this fraction of the "
                   "training split (the same samples for every seed; the last windows of a series whose windows "
                   "overlap), evaluate it after each epoch and keep the best epoch as RUN_DIR/best.pt (0: none; "
                   "default: the model's TRAIN, else none)")
    t.add_argument("--patience", type=count(1), metavar="N", help="with --val-split: stop after N epochs without a "
                   "better validation result (default: the model's TRAIN, else train all epochs)")
    t.add_argument("--train", action="append", metavar="KEY=VALUE", dest="train_options", help="set any training "
                   "option (e.g. --train standardize=true, --train layer_lr=1,1,0.5,0.5, --train weight_decay=0); "
                   "repeatable; the keys are the TRAIN dict's (docs/api.md)")
    model_edits(t)
    data_args(t)
    t.add_argument("--limit-train", type=count(1), metavar="N", help="train on the first N samples only")
    t.add_argument("--out", metavar="RUN_DIR", help="where checkpoint.pt and metrics.jsonl go (default "
                   "runs/<model>)")
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt (with any number "
                   "of processes; --epochs may grow; another training option only when given on this command line)")
    t.add_argument("--force", action="store_true", help="start over in a RUN_DIR that holds a checkpoint (it is "
                   "deleted) or files bsdgraph did not write (they are replaced)")
    t.add_argument("--json", action="store_true", help="one JSON line per epoch (default when stdout is not a "
                   "terminal)")
    t.add_argument("--layer-parallel", action="store_true", help="under torchrun: one pipeline stage of "
                   "consecutive layers per process; F's spikes go up, B's class-coded spikes down, no gradient "
                   "is sent (default under torchrun: data-parallel, each process a shard of every batch)")
    t.set_defaults(fn=cmd_train)


def model_edits(p) -> None:
    """Edits of the model file without changing it; eval takes them too, to match a checkpoint trained with them."""
    p.add_argument("--lif", action="append", metavar="KEY=VALUE", help="set a parameter of every lif layer (e.g. "
                   "--lif v_th=0.6); repeatable. Neurons of other declared types (g.neuron) keep the parameters "
                   "their model file gives")
    p.add_argument("--bsd", action="append", metavar="KEY=VALUE", help="set a BSD option (e.g. --bsd "
                   "negatives=other_class, --bsd distill_on=membrane, --bsd freq=False); repeatable")
    p.add_argument("--encoding", choices=["direct", "poisson", "sequence"], help="override the input encoding")
    p.add_argument("--batchnorm", action="store_true", help="insert a batchnorm between every synapse and the "
                   "neurons it feeds (where the model has none; B mirrors each)")
    p.add_argument("--class-code", type=class_code, metavar="K:N[:SEED]", help="a distributed class code: the top "
                   "Linear gets N outputs, each class a fixed random pattern of K of them (drawn by SEED, default "
                   "0), read out by the cosine to each pattern (instead of one neuron per class)")


def class_code(raw: str) -> tuple[int, int, int]:
    """--class-code K:N[:SEED] as (K, N, SEED); the graph's checks say whether they fit the classifier."""
    parts = raw.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (2, 3) or values[0] < 1 or values[1] < 2:
        raise argparse.ArgumentTypeError(f"expected K:N or K:N:SEED (K >= 1 active of N >= 2 neurons), got {raw!r}")
    return values[0], values[1], values[2] if len(values) == 3 else 0


def _plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="write PNG plots of a training run",
                       description="Write curves.png (test metric, per-layer losses), rates.png (firing rates), "
                                   "raster.png (spikes of one test sample through F and B; BSD runs) and, for an "
                                   "autoencoder (TARGET = 'input'), reconstructions.png (10 test images from "
                                   "--sample on, originals above F's reconstructions) into RUN_DIR.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--model", metavar="MODEL.py", help="model file to load the test data with (needed only for a "
                   "model that brings its own data(); by default the checkpoint's graph is used and no model file "
                   "runs)")
    p.add_argument("--sample", type=count(0), default=0, help="test sample for the raster, first one of the "
                   "reconstructions (default 0)")
    data_args(p)
    p.set_defaults(fn=cmd_plot)


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a checkpoint on the test split",
                       description="Evaluate the forward network F of a checkpoint on the test split.")
    e.add_argument("model", metavar="MODEL.py|RUN_DIR", help="a model file (with --checkpoint), or a run directory: "
                   "its checkpoint, its graph and the data it trained on")
    e.add_argument("--checkpoint", metavar="FILE", help="the checkpoint to evaluate (default with a run directory: "
                   "RUN_DIR/best.pt, the best epoch on the validation split, if the run held one out, else "
                   "RUN_DIR/checkpoint.pt)")
    e.add_argument("--backend", choices=BACKENDS)
    model_edits(e)
    e.add_argument("--frechet-classifier", metavar="CLASSIFIER_CKPT", help="autoencoders: also report the Fréchet "
                   "distance between the test images and their reconstructions in the feature space of this trained "
                   "classifier (a bsdgraph train checkpoint, e.g. of models/fmnist_mlp.py; not Inception FID)")
    data_args(e)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)


def cmd_sample(args) -> int:
    from bsdgraph.tools.sample import check_char_model, generate
    from bsdgraph.train.trainer import load_for_eval

    model = apply_overrides(load_model(args.model), args)
    why = check_char_model(model.graph)
    if why:
        raise UsageError(f"{model.path}: {why}")
    rt, ck = load_for_eval(model, Path(args.checkpoint), args.backend)
    text = generate(rt, model.graph.T, args.prime, args.length, args.temperature, args.seed)
    print(args.prime + text)
    return 0


def _temperature(raw: str) -> float:
    value = number(-math.inf)(raw)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {raw}")
    return value


def _sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="print text generated by a trained character model",
                       description="Generate text with the forward network F of a trained character model "
                                   "(models/char_rnn.py): each next character is drawn from F's scores at the last "
                                   "step of the window of the T characters before it.")
    s.add_argument("model", metavar="MODEL.py")
    s.add_argument("--checkpoint", required=True, metavar="FILE")
    s.add_argument("--prime", default="", help="text to continue (default: none)")
    s.add_argument("--length", type=count(1), default=300, metavar="N", help="characters to generate (default 300)")
    s.add_argument("--temperature", type=_temperature, default=0.8,
                   help="softmax temperature; 0 takes the best character every time (default 0.8)")
    s.add_argument("--seed", type=seed, default=0, help="seed of the draws (default 0)")
    s.add_argument("--backend", choices=BACKENDS)
    model_edits(s)
    s.set_defaults(fn=cmd_sample)


def register(sub) -> None:
    _train_parser(sub)
    _eval_parser(sub)
    _sample_parser(sub)
    _plot_parser(sub)
    r = sub.add_parser("recall", help="render what the backward network B recalls for every class",
                       description="Run B of a trained BSD checkpoint on every class code and save its bottom "
                                   "reconstruction (the stimulus it generates) as an image grid.")
    r.add_argument("model", metavar="MODEL.py|RUN_DIR", help="a model file (with --checkpoint) or a run directory")
    r.add_argument("--checkpoint", metavar="FILE", help="default with a run directory: RUN_DIR/best.pt if the run "
                   "kept one, else RUN_DIR/checkpoint.pt")
    r.add_argument("--out", default="recall.png", metavar="FILE.png")
    r.add_argument("--force", action="store_true", help="replace FILE.png even if bsdgraph did not write it")
    model_edits(r)
    r.set_defaults(fn=cmd_recall)
