"""Helpers shared by the ``bsdgraph`` subcommands."""

from __future__ import annotations

import argparse
import math

from bsdgraph.compiler import options
from bsdgraph.errors import UsageError


def count(minimum: int = 1, maximum: int | None = None):
    """An argparse type: a whole number in [minimum, maximum] (a bad value is a usage error, exit 2, before any
    work)."""
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {raw!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def number(low: float, high: float = float("inf")):
    """An argparse type: a finite number with ``low < value < high`` (nan and inf are refused)."""
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
        if not (math.isfinite(value) and low < value < high):
            bounds = f"> {low:g}" if high == float("inf") else f"between {low:g} and {high:g} (exclusive)"
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, got {raw!r}")
        return value

    return parse


def fraction_or_zero(raw: str) -> float:
    """An argparse type: 0 (none) or a finite number strictly between 0 and 1 (a held-out fraction)."""
    try:
        if float(raw) == 0:
            return 0.0
    except ValueError:
        pass  # number() below names the problem
    return number(0, 1)(raw)


def seed(raw: str) -> int:
    """An argparse type: a 64-bit signed integer (what torch.Generator.manual_seed takes)."""
    value = count(-2 ** 63)(raw)
    if value >= 2 ** 63:
        raise argparse.ArgumentTypeError(f"must fit in 64 bits, got {value}")
    return value


def check_picture(path, flag: str) -> None:
    """Refuse, before any work, an output name whose suffix matplotlib cannot write (it raises ValueError late)."""
    from pathlib import Path

    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(path).suffix.lower().lstrip(".")
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise UsageError(f"{flag} {path}: cannot write a .{suffix} picture; use one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")


def data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--data-dir", metavar="DIR", help="folder with Fashion-MNIST/MNIST IDX files (default: "
                   "/usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)")
    g.add_argument("--npz", metavar="FILE", help="an .npz with arrays x_train, y_train, x_test, y_test")
    g.add_argument("--text", metavar="FILE", help="a UTF-8 text for a character model (e.g. models/char_rnn.py): "
                   f"next-character windows; the last 10 %% is held out; at most the first {TEXT_CHARS:,} "
                   "characters are used")
    p.add_argument("--limit-test", type=count(1), metavar="N", help="evaluate on the first N test samples only")


def apply_overrides(model, args):
    """--lif / --encoding / --bsd / --batchnorm / --class-code edits of the model (pure graph passes,
    re-validated). Every problem of every flag is one usage line naming the flag (the model file validated before
    the edit, so the flags are to blame)."""
    import dataclasses

    from bsdgraph.compiler.feedback import check_config
    from bsdgraph.ir.graph import Op
    from bsdgraph.compiler.passes import set_attrs
    from bsdgraph.ir.diagnostics import GraphError

    lif, problems = options.parse("--lif", args.lif, lif_options())
    bsd, bsd_problems = options.parse("--bsd", args.bsd, bsd_options())
    problems += bsd_problems
    graph = model.graph
    try:
        graph = set_attrs(graph, Op.LIF, **lif) if lif else graph
    except GraphError as err:
        problems += [f"--lif: {d}" for d in err.diagnostics]
    cfg = dataclasses.replace(model.bsd, **bsd)
    try:
        check_config(cfg)
    except GraphError as err:
        problems += [f"--bsd: {d.message}" for d in err.diagnostics]
    if problems:
        raise UsageError(*problems)
    if args.encoding:
        graph = set_attrs(graph, Op.INPUT, encoding=args.encoding)
    if getattr(args, "batchnorm", False):
        from bsdgraph.compiler.passes import insert_batchnorm

        graph = insert_batchnorm(graph)
    if getattr(args, "class_code", None):
        from bsdgraph.compiler.passes import use_class_code

        try:
            graph = use_class_code(graph, *args.class_code)
        except GraphError as err:
            raise UsageError(*[f"--class-code: {d}" for d in err.diagnostics]) from None
    _note_unused_lams(graph, cfg, bsd)
    return dataclasses.replace(model, graph=graph, bsd=cfg)


def lif_options() -> dict[str, options.Option]:
    from bsdgraph.ir.graph import ATTRS, Op

    return {a.name: options.Option(float if float in a.types else a.types[0], a.choices) for a in ATTRS[Op.LIF]}


def bsd_options() -> dict[str, options.Option]:
    import dataclasses

    from bsdgraph.compiler.feedback import BSD_CHOICES, BSDConfig

    return {f.name: options.Option(type(f.default), BSD_CHOICES.get(f.name)) for f in dataclasses.fields(BSDConfig)}


def _note_unused_lams(graph, cfg, bsd: dict) -> None:
    """A ReCo layer with the frequency split weighs its negatives by lam_low / lam_high, one without it by lam:
    say so when a --bsd lam* setting reaches no layer, rather than let an ablation silently change nothing."""
    import sys

    from bsdgraph.compiler.feedback import frequency_split
    from bsdgraph.ir.diagnostics import GraphError

    try:
        split = list(frequency_split(graph, cfg).values())  # from F alone: B is derived once, by compile_model
    except GraphError:  # an invalid graph is reported with its diagnostics where it is used
        return
    unused = {"lam": all(split), "lam_low": not any(split), "lam_high": not any(split)}
    for key in (k for k in unused if k in bsd and unused[k] and split):
        uses = "lam_low / lam_high (the frequency split)" if key == "lam" else "lam (no frequency split)"
        print(f"note: --bsd {key}={bsd[key]} changes nothing here: every ReCo layer of this model uses {uses}",
              file=sys.stderr)


TEXT_CHARS = 2_000_000   # one-hot windows of a character model take T * 97 * 4 bytes per T characters (~1.6 GB here)


def data_origin(args, model) -> str:
    """Where ``load_data`` takes the data from: "npz", "text", "model" (the model file's own ``data()``) or
    "idx"."""
    if getattr(args, "npz", None):
        return "npz"
    if getattr(args, "text", None):
        return "text"
    return "model" if model.data is not None else "idx"


def run_checkpoint(run, checkpoint=None) -> tuple:
    """(checkpoint, the graph it trained) of a run directory: its ``checkpoint.pt`` or ``checkpoint``, verified;
    the graph is read back from the checkpoint, so no model file runs."""
    from pathlib import Path

    from bsdgraph.ir.printer import from_json
    from bsdgraph.train.checkpoint import load_checkpoint, require

    ck = Path(checkpoint) if checkpoint else Path(run) / "checkpoint.pt"
    if not ck.is_file():
        raise UsageError(f"{run} is a directory without a checkpoint.pt: pass a model file or a run directory")
    doc = require(load_checkpoint(ck), ck, ("graph", "rule"))
    return doc, from_json(doc["graph"])


def trained_graph(path):
    """The BSD graph a run directory's checkpoint trained (whatever --lif / --bsd made it), or None when ``path``
    is not a run directory (``run_checkpoint``). Returns a ``Graph``."""
    from pathlib import Path

    if not Path(path).is_dir():
        return None
    doc, graph = run_checkpoint(path)
    if doc["rule"] != "bsd":
        raise UsageError(f"{path} trained with --rule {doc['rule']}: it has no backward network to show; pass its "
                         "model file instead")
    return graph


def data_record(args, model) -> dict:
    """What a run directory records of its data: the origin, and for a file (``--npz``, ``--text``) or an IDX
    folder its absolute path, and for a file its SHA-256, so that later commands find the same data and can tell
    when it changed."""
    import hashlib
    from pathlib import Path

    origin = data_origin(args, model)
    path = {"npz": getattr(args, "npz", None), "text": getattr(args, "text", None),
            "idx": getattr(args, "data_dir", None)}.get(origin)
    record = {"data": origin}
    if path:
        record["data_path"] = str(Path(path).resolve())
        if Path(path).is_file():
            record["data_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return record


def recorded_data(args, run_manifest: dict) -> None:
    """Point ``args`` at the data a run trained on when the command names none (``plot RUN_DIR``), after checking
    that the file is still the one the run read; a note says which data is used."""
    import hashlib
    import sys
    from pathlib import Path

    if getattr(args, "npz", None) or getattr(args, "text", None) or getattr(args, "data_dir", None):
        return
    origin, path = run_manifest.get("data"), run_manifest.get("data_path")
    if origin not in ("npz", "text", "idx") or not path:
        return
    if not Path(path).exists():
        raise UsageError(f"the run trained on {path}, which is no longer there; pass the data again "
                         f"(--{'data-dir' if origin == 'idx' else origin} ...)")
    digest = run_manifest.get("data_sha256")
    if digest and hashlib.sha256(Path(path).read_bytes()).hexdigest() != digest:
        raise UsageError(f"{path} changed since the run trained on it (SHA-256 differs); pass it explicitly "
                         f"(--{origin} {path}) to use it as it is now")
    setattr(args, {"idx": "data_dir"}.get(origin, origin), path)
    print(f"note: using the run's data, {path}", file=sys.stderr)


def _text_data(args, model):
    import sys

    from bsdgraph.tools.sample import check_char_model
    from bsdgraph.train.text import read_text, text_dataset

    why = check_char_model(model.graph)
    if why:
        raise UsageError(f"--text needs a character model; {model.path}: {why}")
    text = read_text(args.text)
    if len(text) > TEXT_CHARS:
        print(f"note: {args.text}: using the first {TEXT_CHARS:,} of {len(text):,} characters", file=sys.stderr)
    return text_dataset(text, model.graph.T, max_chars=TEXT_CHARS, source=args.text)


def load_data(args, model):
    from bsdgraph.train.data import autoencode, check_against_model, expects, load_idx_dataset, load_npz, subset

    origin = data_origin(args, model)
    if origin == "npz":
        ds = load_npz(args.npz)
    elif origin == "text":
        ds = _text_data(args, model)
    elif origin == "model":
        ds = _model_data(model)
    else:
        ds = load_idx_dataset(args.data_dir)
    if model.target == "input":  # an autoencoder: y is the stimulus itself
        ds = autoencode(ds)
    want = expects(model.graph)
    ds = check_against_model(ds, want.shape, want.n_classes, want.task, want.per_sample)
    return subset(ds, getattr(args, "limit_train", None), args.limit_test)


def _model_data(model):
    from bsdgraph.train.data import Dataset
    from bsdgraph.compiler.model_file import ModelError

    try:
        ds = model.data()
    except Exception as err:  # the user's code: name the file, never a traceback
        raise ModelError(f"{model.path}: data() raised {type(err).__name__}: {err}") from None
    if not isinstance(ds, Dataset):
        raise ModelError(f"{model.path}: data() returned {type(ds).__name__}, expected a bsdgraph.train.data.Dataset")
    return ds
