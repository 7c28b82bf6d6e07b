"""The ``bsdgraph`` command line. Exit codes: 0 ok, 1 invalid model or input, 2 usage error."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from bsdgraph.cli import bench as cli_bench

from bsdgraph.cli import interop as cli_interop

from bsdgraph.cli import train as cli_train

from bsdgraph.tools import outputs
from bsdgraph.version import __version__
from bsdgraph.errors import UsageError, UserError
from bsdgraph.compiler.feedback import pairing
from bsdgraph.compiler.program import compile_graph, compile_model
from bsdgraph.cli.common import apply_overrides, trained_graph
from bsdgraph.compiler.model_file import load_model
from bsdgraph.compiler.neuron_gen import triton_source, twin_source
from bsdgraph.ir.printer import format_graph, to_dict


def _pairing_table(bsd) -> str:
    lines = ["  pairing (layer: loss = F side ~ B side; updates):"]
    for p in pairing(bsd):
        b = p.b_side or "labels"
        lines.append(f"    {p.layer}: {p.loss} = {p.f_side} ~ {b}; updates F {list(p.f_params)} B {list(p.b_params)}")
    return "\n".join(lines)


def _neurons(bsd) -> dict:
    """Each neuron declaration the BSD graph uses -> the nodes using it."""
    from bsdgraph.ir.graph import GroupOp
    from bsdgraph.ir.neurons import neuron_of

    out: dict = {}
    for n in bsd.by_op(*GroupOp.NEURON):
        out.setdefault(neuron_of(n)[0], []).append(n.name)
    return out


def _kernels_text(bsd) -> str:
    parts = []
    for decl, nodes in _neurons(bsd).items():
        parts.append(f"== neuron {decl.name!r} (nodes {', '.join(nodes)}): generated torch twin\n{twin_source(decl)}"
                     f"\n== neuron {decl.name!r}: generated Triton kernels (forward over T; backward)\n"
                     f"{triton_source(decl)}")
    return "\n".join(parts)


def cmd_compile(args) -> int:
    trained = trained_graph(args.model)   # a run directory: the graph it trained, exactly
    if trained is not None and (args.lif or args.bsd or args.encoding or args.batchnorm or args.class_code):
        raise UsageError("--lif / --bsd / --encoding / --batchnorm / --class-code edit a model file; a run "
                         "directory shows the graph it trained")
    program = (compile_graph(trained) if trained is not None
               else compile_model(apply_overrides(load_model(args.model), args)))
    bsd, plan = program.graph, program.plan
    stages = ["ir", "backward", "plan", "step", "kernels"] if args.emit == "all" else [args.emit]
    if args.emit == "dot":  # Graphviz text; --json does not apply
        from bsdgraph.tools.draw import to_dot

        _write(to_dot(bsd), args.output, args.force)
        return 0
    if args.json:
        doc = {"model": str(program.model.path) if program.model else str(args.model)}
        doc.update({"ir": to_dict(program.forward)} if "ir" in stages else {})
        doc.update({"backward": to_dict(bsd), "pairing": [p.__dict__ for p in pairing(bsd)]}
                   if "backward" in stages else {})
        doc.update({"plan": plan.to_dict()} if "plan" in stages else {})
        doc.update({"step": {name: code.source for name, code in program.code.items()}} if "step" in stages else {})
        doc.update({"kernels": {d.name: {"nodes": nodes, "twin": twin_source(d), "triton": triton_source(d)}
                                for d, nodes in _neurons(bsd).items()}} if "kernels" in stages else {})
        text = json.dumps(doc, indent=1)
    else:
        parts = {
            "ir": lambda: "== forward network F (validated)\n" + format_graph(program.forward),
            "backward": lambda: "== BSD graph: F + derived backward network B + local losses\n"
                                + format_graph(bsd) + "\n" + _pairing_table(bsd),
            "plan": lambda: "== plan\n" + str(plan) + "\n\n" + _energy_bound(program.forward),
            "step": lambda: "== generated step (one statement per launch; K[i], C[i]: launch i's kernel and "
                            "context)\n" + program.code["step"].source,
            "kernels": lambda: _kernels_text(bsd),
        }
        text = "\n\n".join(parts[s]() for s in stages)
    _write(text, args.output, args.force)
    return 0


def _energy_bound(graph) -> str:
    from bsdgraph.tools.energy import estimate, format_energy
    from bsdgraph.ir.graph import GroupOp
    from bsdgraph.ir.neurons import is_spiking

    rates = {n.name: 1.0 for n in graph.by_op(*GroupOp.NEURON) if is_spiking(n)}
    return format_energy(estimate(graph, rates, input_rate=1.0), "assumed 100 % (an upper bound; "
                         "`bsdgraph bench --energy` measures them)")


def _write(text: str, output: str | None, force: bool = False) -> None:
    if output:
        outputs.write_text(output, text + "\n", force)
        print(f"wrote {output}", file=sys.stderr)
    else:
        print(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bsdgraph", description="Compile and run spiking networks trained with "
                                "Bidirectional Spike-based Distillation (BSD).")
    p.add_argument("--version", action="version", version=f"bsdgraph {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("compile", help="validate a model, derive its backward network, lower it to a plan",
                       description="Load MODEL.py, call build(), validate, derive the BSD backward network and "
                                   "local losses, lower to a kernel plan, generate its step function, and print "
                                   "the requested stages.")
    c.add_argument("model", metavar="MODEL.py|RUN_DIR", help="a model file, or a run directory (the graph its "
                   "checkpoint trained, with every --lif / --bsd edit it was trained with)")
    cli_train.model_edits(c)
    c.add_argument("--emit", choices=["ir", "backward", "plan", "step", "kernels", "dot", "all"], default="all",
                   help="stage to show: ir (F), backward (F + derived B + losses + pairing), plan, step (the "
                        "generated step function), kernels (each neuron's generated twin and Triton kernels), "
                        "all (default), or dot (the BSD graph for Graphviz)")
    c.add_argument("--json", action="store_true", help="machine-readable JSON instead of text")
    c.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    c.add_argument("--force", action="store_true", help="replace FILE even if bsdgraph did not write it")
    c.set_defaults(fn=cmd_compile)
    cli_train.register(sub)
    cli_bench.register(sub)
    cli_interop.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on usage errors and 0 on --help
        return int(exit_.code or 0)
    prefix = getattr(args, "model", None)
    try:
        _check_values(args)
        return args.fn(args)
    except UserError as err:  # every error a user can cause (bsdgraph/errors.py): its lines, its exit code
        for line in err.lines(prefix):
            print(_one_line(line), file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # the reader of stdout went away (`bsdgraph compile M.py | head`): nothing to say
        return _reader_gone()
    except OSError as err:  # e.g. -o into a missing directory
        print(_one_line(f"error: {err.strerror or err}: {err.filename or ''}".rstrip(": ")), file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else "MemoryError"
        print(f"error: out of memory ({reason}); the model, T or the batch is too large for this machine. Fix: "
              "make it smaller (--batch-size, layer widths, T)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(text: str) -> str:
    """``text`` with its control characters escaped: a message is one line, whatever a file name or a NIR node name
    it quotes holds (a line break in one split a usage message in two, found by fuzzing)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _check_values(args) -> None:
    """argparse (Python 3.11) stores ``[]`` for ``--flag=--`` without calling the flag's type, or appends it to a
    repeatable flag's list (found by fuzzing: tracebacks, or the flag silently ignored); no option of bsdgraph
    takes a list as its value, so ``[]`` is always that."""
    empty = [k for k, v in vars(args).items()
             if isinstance(v, list) and (not v or any(isinstance(x, list) for x in v))]
    if empty:
        raise UsageError(*(f"argument --{k.replace('_', '-')}: expected a value, got '--'" for k in empty))


def _out_of_memory(err: BaseException) -> bool:
    """numpy raises MemoryError; torch's CPU allocator a RuntimeError (torch.OutOfMemoryError on a GPU)."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)


SIGPIPE_EXIT = 128 + 13  # what a shell reports for a writer killed by SIGPIPE, as `cat` or `git log` are


def _reader_gone() -> int:
    """Point stdout at /dev/null, so that the interpreter's last flush does not fail again, and end quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (in-process callers): nothing will be flushed to it
        pass
    return SIGPIPE_EXIT


def entry() -> None:
    try:
        code = main()
        sys.stdout.flush()  # the last buffered output can meet the closed pipe only here
    except BrokenPipeError:
        code = _reader_gone()
    sys.exit(code)
