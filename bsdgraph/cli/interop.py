"""The interoperability commands of ``bsdgraph``: export-nir, import-nir, run, draw.

``register(sub)`` adds them to the main parser's subparsers. Handlers return an exit code and raise the project's
error types for the CLI to report in one line with exit code 1: ``GraphError`` (diagnostics), ``ModelError``
(``NIRError`` is one), ``CheckpointError``, ``DataError`` and ``OSError``. Positional files use the dest ``model``
so that the CLI prefixes diagnostics with the file's name.

Weights of a model file: ``--checkpoint FILE`` (from ``bsdgraph train``, or the weights file of an imported
model), else the file's own ``WEIGHTS = "name.weights.pt"`` (written by ``import-nir -o``; a path relative to the
model file), else ``init_params(graph, seed=0)`` with a note on stderr.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bsdgraph.tools import outputs
from bsdgraph.cli.common import apply_overrides, count, number, trained_graph
from bsdgraph.cli.train import model_edits
from bsdgraph.train.prepare import refuse_stats
from bsdgraph.compiler.model_file import load_model
from bsdgraph.train.data import DataError
from bsdgraph.compiler.feedback import forward_of
from bsdgraph.ir.graph import Graph, Op
from bsdgraph.ir.printer import format_graph


@dataclass(frozen=True)
class Loaded:
    """A network ready to run: its graph, weights, readout LIF and BSD options, from a model file or NIR file."""

    graph: Graph
    params: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    readout: dict[str, Any] | None
    bsd: Any
    notes: tuple[str, ...] = ()


def load_network(path: str, dt: float | None = None, steps: int | None = None, checkpoint: str | None = None,
                 backward: bool = False) -> Loaded:
    """``path`` is a model file (``.py``) or a NIR file (``.nir``, imported with ``dt`` and ``steps``)."""
    from bsdgraph.compiler.feedback import BSDConfig

    if Path(path).suffix == ".nir":
        from bsdgraph.interop.nir_import import import_nir

        imp = import_nir(path, dt=dt, T=steps)
        return Loaded(imp.graph, imp.params, imp.state, imp.readout, BSDConfig(), imp.notes)
    from bsdgraph.train.checkpoint import load_checkpoint, require
    from bsdgraph.compiler.feedback import derive_feedback
    from bsdgraph.compiler.model_file import load_model
    from bsdgraph.interop.nir import read_declarations
    from bsdgraph.ir.params import init_params, init_state
    from bsdgraph.compiler.program import interpreted
    from bsdgraph.train.trainer import check_memory

    model = load_model(path)
    decl = read_declarations(path)
    source = checkpoint or decl.weights
    if source:
        doc = require(load_checkpoint(source), source, ("params", "state"))
        refuse_stats(doc.get("input_stats"), source)
        params, state = doc["params"], doc["state"]
        check_weights(model.graph, params, state, source)
        return Loaded(model.graph, params, state, decl.readout, model.bsd)
    graph = derive_feedback(model.graph, model.bsd) if backward else model.graph  # F's weights come first: same
    check_memory(interpreted(graph), "cpu", 1, 1, training=False)  # the weights, before they are drawn
    note = f"{path}: no --checkpoint and no WEIGHTS in the model file: using init_params(seed=0)"
    return Loaded(model.graph, init_params(graph, 0), init_state(graph), decl.readout, model.bsd, (note,))


def check_weights(graph: Graph, params: dict, state: dict, source) -> None:
    """Every weight and batchnorm statistic of F present with the shape its node needs, else one error line
    (a checkpoint of another model would otherwise fail deep inside a torch op)."""
    from bsdgraph.train.checkpoint import CheckpointError
    from bsdgraph.ir.params import param_shapes

    problems = []
    for n in graph.nodes:
        for key, shape in param_shapes(n).items():
            t = params.get(f"{n.name}.{key}")
            if t is None or tuple(t.shape) != tuple(shape):
                got = "missing" if t is None else f"shape {list(t.shape)}"
                problems.append(f"{n.name}.{key} ({got}, the model needs {list(shape)})")
        if n.op == Op.BATCHNORM:
            problems += [f"{n.name}.{k} (missing)" for k in ("running_mean", "running_var")
                         if f"{n.name}.{k}" not in state]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise CheckpointError(f"{source}: weights do not fit the model: {'; '.join(problems[:3])}{more}")


def _notes(loaded: Loaded) -> None:
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- export-nir


def _run_weights(args, bsd: Graph) -> Loaded:
    """F of a run directory's checkpoint with its weights (``--checkpoint`` may name another of the run's)."""
    from bsdgraph.compiler.feedback import BSDConfig
    from bsdgraph.train.checkpoint import load_checkpoint, require

    path = Path(args.checkpoint) if args.checkpoint else Path(args.model) / "checkpoint.pt"
    doc = require(load_checkpoint(path), path, ("params", "state"))
    refuse_stats(doc.get("input_stats"), path)
    check_weights(bsd, doc["params"], doc["state"], str(path))
    return Loaded(forward_of(bsd), doc["params"], doc["state"], None, BSDConfig())


def cmd_export_nir(args) -> int:
    from bsdgraph.compiler.feedback import derive_feedback
    from bsdgraph.interop.nir import write_nir
    from bsdgraph.interop.nir_export import export_backward, export_nir

    trained = trained_graph(args.model) if Path(args.model).is_dir() else None
    if trained is not None:   # a run directory: the BSD graph and weights its checkpoint holds
        net = _run_weights(args, trained)
        bsd = trained
    else:
        net = load_network(args.model, checkpoint=args.checkpoint, backward=args.with_backward)
        _notes(net)
        bsd = None
    forward = export_nir(net.graph, net.params, net.state, dt=args.dt, readout=net.readout)
    backward = None
    if args.with_backward:  # built before anything is written: a refusal leaves no half-written pair
        bsd = bsd if bsd is not None else derive_feedback(net.graph, net.bsd)
        backward = export_backward(bsd, net.params, net.state, dt=args.dt)
    if backward is not None:
        outputs.claim(backward_path(args.output), args.force)  # before F is written: no half-written pair
    with outputs.replacing(args.output, args.force) as tmp:
        write_nir(tmp, forward)
    print(f"wrote {args.output}: F, {len(forward.nodes)} NIR nodes, dt = {forward.metadata['dt']:g} s",
          file=sys.stderr)
    if backward is not None:
        path = backward_path(args.output)
        backward.metadata["forward"] = Path(args.output).name
        with outputs.replacing(path, args.force) as tmp:
            write_nir(tmp, backward)
        print(f"wrote {path}: B, {len(backward.nodes)} NIR nodes, pairing in its metadata", file=sys.stderr)
    return 0


def backward_path(output: str | Path) -> Path:
    """Where ``--with-backward`` writes B: ``model.nir`` -> ``model.backward.nir``."""
    out = Path(output)
    return out.with_name(f"{out.stem}.backward{out.suffix or '.nir'}")


# ---------------------------------------------------------------------------------------------------- import-nir


def cmd_import_nir(args) -> int:
    from bsdgraph.interop.nir import save_weights
    from bsdgraph.interop.nir_import import import_nir

    imp = import_nir(args.model, dt=args.dt, T=args.steps)
    for note in imp.notes:
        print(f"note: {note}", file=sys.stderr)
    if not args.output:
        print(format_graph(imp.graph))
        return 0
    model_path = Path(args.output)
    weights = model_path.with_name(f"{model_path.stem}.weights.pt")
    source = model_source(imp, weights.name, str(args.model))  # built and checked before anything is written
    outputs.claim(model_path, args.force)
    outputs.claim(weights, args.force)
    save_weights(weights, imp.params, imp.state, source=str(args.model))
    outputs.record(weights)
    outputs.write_text(model_path, source, force=True)  # claimed above
    print(f"wrote {model_path} and {weights}", file=sys.stderr)
    return 0


def model_source(imp, weights_name: str, source: str) -> str:
    """A model file whose ``build()`` rebuilds the imported graph node for node (``load_model`` gives it back
    equal), with ``WEIGHTS`` naming the weights file next to it and ``READOUT`` the NIR graph's top LIF.

    Built as an AST: the NIR file's name, notes, node names and attributes are literals in the tree, never text
    pasted into source (a crafted name once ran code through the docstring; docs/reliability.md)."""
    from bsdgraph.interop import pysource as py

    g = imp.graph
    doc = "\n".join([f"{g.name}: imported from {Path(source).name} by `bsdgraph import-nir` (dt = {g.dt!r} s per "
                      f"step, T = {g.T}).", *([""] + [f"Note: {n}" for n in imp.notes] if imp.notes else []), "",
                      "WEIGHTS names the weights file next to this file (read by `bsdgraph run` and `export-nir`);",
                      "READOUT is the LIF that `bsdgraph run` applies to the output current (None: none).", ""])
    build = [ast.Assign([ast.Name("g", ast.Store())], py.call(py.name("GraphBuilder"), [py.literal(g.name)],
                                                             T=py.literal(g.T), dt=py.literal(g.dt)))]
    delayed = [e for e in g.edges if e.delay]
    for n in g.nodes:
        # a node read through a delay (a recurrent layer's rec synapse reads the neurons defined after it) is added
        # with its shape and no operands; its delayed edges are connected once every node exists
        late = any(e.delay for e in g.in_edges(n.name))
        kwargs = {"name": py.literal(n.name),
                  **({"shape": py.literal(tuple(n.shape))} if n.op == Op.INPUT or late else {}),
                  **{k: py.literal(_plain(v)) for k, v in n.attrs.items()}}
        srcs = [e.src for e in g.in_edges(n.name) if not e.delay]
        build.append(ast.Expr(py.call(py.attr("g", "add"), [py.attr("Op", n.op.name), py.literal(srcs)], **kwargs)))
    for e in delayed:
        build.append(ast.Expr(py.call(py.attr("g", "connect"), [py.literal(e.src), py.literal(e.dst),
                                                                py.literal(e.port)], delay=py.literal(e.delay))))
    build.append(ast.Return(py.call(py.attr("g", "build"), [])))
    tree = ast.Module([
        ast.Expr(ast.Constant(doc)),
        ast.ImportFrom("bsdgraph", [ast.alias("GraphBuilder"), ast.alias("Op")], 0),
        ast.Assign([ast.Name("WEIGHTS", ast.Store())], py.literal(weights_name)),
        ast.Assign([ast.Name("READOUT", ast.Store())], py.literal(_plain(imp.readout))),
        py.function("build", build),
    ], [])
    shape = py.Shape(frozenset({"bsdgraph"}), frozenset({"GraphBuilder", "g.add", "g.connect", "g.build"}),
                     frozenset({"Op"}))
    return py.checked_source(tree, shape)


def _plain(value):
    """Mappings (a neuron's parameters) as dicts, recursively: what ``pysource.literal`` writes."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return value


# ---------------------------------------------------------------------------------------------------- run


def read_input(path: str | Path, graph: Graph) -> torch.Tensor:
    """``x`` from an npz: ``[B, *input]`` (encoded over T steps like training data) or ``[T, B, *input]``."""
    path = Path(path)
    shape = graph.by_op(Op.INPUT)[0].shape
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise DataError(f"{path}: has no array 'x' (it holds {archive.files}); save the stimulus with "
                                "np.savez(path, x=...)")
            x = np.asarray(archive["x"])
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable .npz archive ({type(err).__name__}: {err})") from None
    dims = tuple(x.shape)
    if x.dtype.kind not in "biuf" or dims[-len(shape):] != tuple(shape) or len(dims) not in (len(shape) + 1,
                                                                                         len(shape) + 2):
        raise DataError(f"{path}: x has shape {list(dims)} ({x.dtype}), expected numbers of shape "
                        f"[B, {', '.join(map(str, shape))}] or [T, B, {', '.join(map(str, shape))}]")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{path}: x holds NaN or infinite values")
    return torch.from_numpy(x.astype(np.float32))


def cmd_run(args) -> int:
    from bsdgraph.interop.nir import simulate
    from bsdgraph.runtime.common import readout
    from bsdgraph.compiler.program import interpreted
    from bsdgraph.train.trainer import check_memory

    if args.output:
        outputs.claim(args.output, args.force)  # before the work, not after it
    net = load_network(args.model, dt=args.dt, steps=args.steps, checkpoint=args.checkpoint)
    _notes(net)
    x = read_input(args.input, net.graph)
    # the reference interpreter keeps every node's value of every step; x is [B, ...] or [T, B, ...]
    samples = x.shape[-len(net.graph.by_op(Op.INPUT)[0].shape) - 1]
    check_memory(interpreted(net.graph), "cpu", samples, samples, training=False)
    sim = simulate(net.graph, net.params, net.state, x, net.readout)
    out = net.graph.by_op(Op.OUTPUT)[0]
    scores = readout(out, sim.current)
    arrays = {"current": sim.current.numpy(), "scores": scores.numpy(),
              **{f"spikes.{k}": v.numpy() for k, v in sim.spikes.items()}}
    if out.attrs["task"] == "classification":
        arrays["prediction"] = scores.argmax(-1).numpy()
    rates = ", ".join(f"{k} {100 * float(v.float().mean()):.1f} %" for k, v in sim.spikes.items())
    print(f"{args.model}: T = {sim.current.shape[0]}, B = {sim.current.shape[1]}; firing rates: {rates or 'no LIF'}")
    if "prediction" in arrays:
        print(f"prediction: {arrays['prediction'].tolist()}")
    if args.output:
        with outputs.replacing(args.output, args.force) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # a file object: np.savez would add ".npz" to a name without it
        print(f"wrote {args.output}: {', '.join(arrays)}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------- draw


def cmd_draw(args) -> int:
    from bsdgraph.cli.common import check_picture
    from bsdgraph.tools.draw import draw, to_dot
    from bsdgraph.compiler.feedback import derive_feedback

    if Path(args.output).suffix != ".dot":
        check_picture(args.output, "-o")
    outputs.claim(args.output, args.force)
    bsd = trained_graph(args.model)   # a run directory: the graph it trained
    if bsd is None and Path(args.model).suffix == ".py":
        model = apply_overrides(load_model(args.model), args)
        bsd = derive_feedback(model.graph, model.bsd)
    elif bsd is None:
        net = load_network(args.model, dt=args.dt, steps=args.steps)
        bsd = derive_feedback(net.graph, net.bsd)
    if Path(args.output).suffix == ".dot":
        outputs.write_text(args.output, to_dot(bsd), args.force)
    else:
        with outputs.replacing(args.output, args.force) as tmp:
            draw(bsd, tmp)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------- parser


def _nir_args(p) -> None:
    p.add_argument("--dt", type=number(0), metavar="SECONDS", help="length of one step in seconds (tau in steps = "
                   "tau / dt); a NIR file written by bsdgraph records it, others need it (snnTorch: 1e-4)")
    p.add_argument("--steps", type=count(1), metavar="T", help="time steps per sample for a NIR file (default: the "
                   "file's record, else 4)")


def _force_arg(p) -> None:
    p.add_argument("--force", action="store_true", help="replace existing output files even if bsdgraph did not "
                   "write them (or they changed since)")


def register(sub) -> None:
    """Add export-nir, import-nir, run and draw to the main parser's subparsers."""
    e = sub.add_parser("export-nir", help="write a model's forward network F (and B) as a NIR graph",
                       description="Write F with its trained weights as NIR (docs/nir.md has the LIF mapping).")
    e.add_argument("model", metavar="MODEL.py|RUN_DIR", help="a model file, or a run directory (the graph and "
                   "weights its checkpoint trained)")
    e.add_argument("--checkpoint", metavar="FILE", help="weights from `bsdgraph train` (default: the run "
                   "directory's checkpoint; for a model file its WEIGHTS, else init_params(seed=0))")
    e.add_argument("--dt", type=number(0), metavar="SECONDS", help="seconds per step written into NIR's time "
                   "constants, tau = τ·dt (default: the graph's dt)")
    e.add_argument("--with-backward", action="store_true", help="also write BSD's backward network B to "
                   "NAME.backward.nir, with the layer pairing in its metadata")
    e.add_argument("-o", "--output", required=True, metavar="FILE.nir")
    _force_arg(e)
    e.set_defaults(fn=cmd_export_nir)

    i = sub.add_parser("import-nir", help="read a NIR graph into a bsdgraph model",
                       description="Import a NIR graph as a validated forward network; print it, or write a model "
                                   "file (and its weights file next to it) with -o.")
    i.add_argument("model", metavar="FILE.nir")
    _nir_args(i)
    i.add_argument("-o", "--output", metavar="MODEL.py", help="write a model file and MODEL.weights.pt")
    _force_arg(i)
    i.set_defaults(fn=cmd_import_nir)

    r = sub.add_parser("run", help="simulate a model's forward network on inputs from an npz",
                       description="Run F (reference runtime) on x from an npz ([B, ...] repeated over T steps, or "
                                   "[T, B, ...] one stimulus per step); report and save spikes and top currents.")
    r.add_argument("model", metavar="MODEL_OR_NIR")
    r.add_argument("--input", required=True, metavar="FILE.npz", help="an npz holding x")
    r.add_argument("--checkpoint", metavar="FILE", help="weights (default: the model's WEIGHTS, else init)")
    _nir_args(r)
    r.add_argument("-o", "--output", metavar="OUT.npz", help="save current, scores, prediction, spikes.<layer>")
    _force_arg(r)
    r.set_defaults(fn=cmd_run)

    d = sub.add_parser("draw", help="draw F and its derived backward network B",
                       description="Picture of F and B side by side with pairings, losses and shapes (PNG, SVG, "
                                   "PDF by suffix), or Graphviz DOT text for FILE.dot.")
    d.add_argument("model", metavar="MODEL_OR_NIR", help="a model file (.py, with --lif / --bsd edits), a NIR file, "
                   "or a run directory (the graph its checkpoint trained)")
    _nir_args(d)
    model_edits(d)
    d.add_argument("-o", "--output", required=True, metavar="FILE.png")
    _force_arg(d)
    d.set_defaults(fn=cmd_draw)
