"""Helpers shared by the ``bsdgraph`` subcommands."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """A command line that parses but asks for something impossible (exit 2)."""


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
    p.add_argument("--limit-test", type=int, metavar="N", help="evaluate on the first N test samples only")


def apply_overrides(model, args):
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
    _note_unused_lams(graph, cfg, bsd)
    return dataclasses.replace(model, graph=graph, bsd=cfg)


def _note_unused_lams(graph, cfg, bsd: dict) -> None:
    """A ReCo layer with the frequency split weighs its negatives by lam_low / lam_high, one without it by lam:
    say so when a --bsd lam* setting reaches no layer, rather than let an ablation silently change nothing."""
    import sys

    from bsdgraph.feedback import derive_feedback
    from bsdgraph.ir import Op
    from bsdgraph.validate import GraphError

    try:
        split = [n.attrs["freq"] for n in derive_feedback(graph, cfg).nodes if n.op == Op.RECO]
    except GraphError:  # an invalid graph is reported with its diagnostics where it is used
        return
    unused = {"lam": all(split), "lam_low": not any(split), "lam_high": not any(split)}
    for key in (k for k in unused if k in bsd and unused[k] and split):
        uses = "lam_low / lam_high (the frequency split)" if key == "lam" else "lam (no frequency split)"
        print(f"note: --bsd {key}={bsd[key]} changes nothing here: every ReCo layer of this model uses {uses}",
              file=sys.stderr)


def load_data(args, model):
    import math

    from bsdgraph.data import autoencode, check_against_model, load_idx_dataset, load_npz, subset
    from bsdgraph.ir import Op

    if args.npz:
        ds = load_npz(args.npz)
    elif model.data is not None:
        ds = _model_data(model)
    else:
        ds = load_idx_dataset(args.data_dir)
    if model.target == "input":  # an autoencoder: y is the stimulus itself
        ds = autoencode(ds)
    out, inp = model.graph.by_op(Op.OUTPUT)[0], model.graph.by_op(Op.INPUT)[0]
    # a sequence stimulus carries its T steps per sample: [N, T, *shape]
    shape = (model.graph.T, *inp.shape) if inp.attrs["encoding"] == "sequence" else inp.shape
    per_step = model.graph.T if out.attrs["target"] == "sequence" else 1  # one target per step
    ds = check_against_model(ds, shape, out.attrs["n_classes"] or None, out.attrs["task"],
                             per_step * math.prod(out.shape))
    return subset(ds, getattr(args, "limit_train", None), args.limit_test)


def _model_data(model):
    from bsdgraph.data import Dataset
    from bsdgraph.model_file import ModelError

    try:
        ds = model.data()
    except Exception as err:  # the user's code: name the file, never a traceback
        raise ModelError(f"{model.path}: data() raised {type(err).__name__}: {err}") from None
    if not isinstance(ds, Dataset):
        raise ModelError(f"{model.path}: data() returned {type(ds).__name__}, expected a bsdgraph.data.Dataset")
    return ds
