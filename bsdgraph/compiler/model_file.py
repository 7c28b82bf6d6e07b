"""Loading a user's model file: ``def build() -> Graph`` plus optional ``TRAIN`` and ``BSD`` dicts and an optional
``def data() -> Dataset`` for models that bring their own data (a generated time series; ``--npz`` overrides it).

``TARGET = "input"`` makes the model an autoencoder: the regression target of every sample is its own stimulus
(``data.autoencode``), so any image data set trains it and its labels are never read; the default is "labels".

Every way a model file can be wrong ends in ``ModelError`` (or ``GraphError`` for an invalid graph) with a message
that names the file and, for exceptions raised inside it, the line; never a traceback.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from bsdgraph.compiler.feedback import BSDConfig
from bsdgraph.errors import UserError
from bsdgraph.ir.graph import Graph
from bsdgraph.ir.diagnostics import GraphError
from bsdgraph.ir.validate import validate


class ModelError(UserError):
    """A model file that cannot be loaded or built (not an invalid graph: that is ``GraphError``)."""


@dataclass(frozen=True)
class Model:
    path: Path
    graph: Graph
    bsd: BSDConfig
    train: dict[str, Any] = field(default_factory=dict)
    doc: str = ""
    data: Callable[[], Any] | None = None  # the model file's own data set (``def data()``), used without --npz
    target: str = "labels"  # labels | input (an autoencoder: y is the stimulus itself)


def _where(err: BaseException, path: Path) -> str:
    """The innermost line of ``path`` in the exception's traceback, as 'file:line'."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    lineno = getattr(err, "lineno", None) if isinstance(err, SyntaxError) else None
    if frames:
        lineno = frames[-1].lineno
    return f"{path}:{lineno}" if lineno else str(path)


def _import(path: Path) -> ModuleType:
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    name = f"bsdgraph_model_{path.stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"{path}: cannot be loaded as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling inside the model file need the module registered
    try:
        spec.loader.exec_module(module)
    except BaseException as err:  # anything the user's top-level code raises, sys.exit() included
        sys.modules.pop(name, None)
        if isinstance(err, KeyboardInterrupt):  # Ctrl-C while importing: the user's, not the file's
            raise
        raise ModelError(f"{_where(err, path)}: the model file failed to import: {_describe(err)}") from None
    return module


def _describe(err: BaseException) -> str:
    if isinstance(err, SystemExit):  # exit(3) in a model file would otherwise end bsdgraph with exit code 3
        return f"it called sys.exit({err.code!r}); a model file must not exit"
    return f"{type(err).__name__}: {err}"


def load_model(path: str | Path) -> Model:
    """Import ``path``, call its ``build()``, check the result; BSD options come from its ``BSD`` dict."""
    path = Path(path)
    module = _import(path)
    build = getattr(module, "build", None)
    if not callable(build):
        raise ModelError(f"{path}: has no build() function (a model file defines `def build() -> Graph`, "
                         "see models/fmnist_mlp.py)")
    try:
        graph = build()
    except (GraphError, KeyboardInterrupt):
        raise
    except BaseException as err:  # sys.exit() included
        raise ModelError(f"{_where(err, path)}: build() raised {_describe(err)}") from None
    if not isinstance(graph, Graph):
        raise ModelError(f"{path}: build() returned {type(graph).__name__}, expected a bsdgraph Graph "
                         "(end build() with `return g.build()`)")
    validate(graph)  # build(validate=False) or a hand-made Graph must not reach the compiler unchecked
    for key in ("BSD", "TRAIN"):
        value = getattr(module, key, {})
        if not isinstance(value, dict):
            raise ModelError(f"{path}: {key} must be a dict, got {type(value).__name__}")
        if not all(isinstance(k, str) for k in value):  # option names; mixed key types would not even sort
            raise ModelError(f"{path}: {key} keys must be option names (strings), got "
                             f"{[k for k in value if not isinstance(k, str)]!r}")
    doc = module.__doc__ if isinstance(module.__doc__, str) else ""
    data = getattr(module, "data", None)
    if data is not None and not callable(data):
        raise ModelError(f"{path}: data must be a function returning a bsdgraph.train.data.Dataset, got "
                         f"{type(data).__name__}")
    return Model(path, graph, BSDConfig.from_dict(getattr(module, "BSD", None)), dict(getattr(module, "TRAIN", {})),
                 doc.strip(), data, target=_target(module, graph, path))


TARGETS = ("labels", "input")


def _target(module: ModuleType, graph: Graph, path: Path) -> str:
    """The model's ``TARGET``; "input" needs a regression output with as many values as the stimulus."""
    import math

    from bsdgraph.ir.graph import Op

    target = getattr(module, "TARGET", "labels")
    if not isinstance(target, str) or target not in TARGETS:
        raise ModelError(f"{path}: TARGET must be one of {TARGETS}, got {target!r}")
    if target == "input":
        x, out = graph.by_op(Op.INPUT)[0], graph.by_op(Op.OUTPUT)[0]
        size = math.prod(x.shape)
        if out.attrs["task"] != "regression" or math.prod(out.shape) != size:
            raise ModelError(f"{path}: TARGET = 'input' reconstructs the stimulus ({size} values), but the output "
                             f"{out.name!r} is a {out.attrs['task']} output of {math.prod(out.shape)} values. Fix: "
                             f"end build() with g.output(g.linear(h, {size}), task='regression')")
    return target
