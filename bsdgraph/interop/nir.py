"""NIR interoperability, the shared part: the LIF mapping, file I/O, weights files, and simulating F.

Export lives in ``nir_export.py`` (``EXPORT_RULES[Op]``), import in ``nir_import.py`` (``IMPORT_RULES[NIR type]``);
both use the mapping below. The ``nir`` package is an optional dependency: it is imported on first use, and its
absence is a one-line ``NIRError``, so that ``import bsdgraph`` never needs it.

The LIF mapping (docs/nir.md has the derivation). NIR's LIF is the ODE

    tau dv/dt = (v_leak - v) + r I,        z = (v > v_threshold),   v <- v_reset when z

bsdgraph's neuron is its Forward Euler step with step length dt (τ counted in steps):

    h[t] = v[t-1] + (I[t] - (v[t-1] - v_reset)) / τ,   s[t] = (h[t] >= v_th),   v[t] = v_reset if s[t] else h[t]

Equal when  τ = tau / dt,  v_th = v_threshold,  v_reset = v_reset,  v_leak = v_reset,  r = 1.  Import also takes
r != 1 and v_leak != v_reset exactly, by folding them into the synapse that feeds the neuron (Euler's step is
v + (r I + v_leak - v_reset - (v - v_reset)) / τ, so the neuron sees the current I' = r I + (v_leak - v_reset)):
W' = r W, b' = r b + (v_leak - v_reset). Soft reset (v - v_th s) has no NIR LIF counterpart: export refuses it.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bsdgraph.compiler.model_file import ModelError

SCHEME = "forward-euler"      # graph metadata: how a step of length dt integrates NIR's ODE
META = "bsdgraph"             # node metadata namespace for what NIR cannot say (BN statistics, encodings, ...)
WEIGHTS_FORMAT = "bsdgraph.weights"


class NIRError(ModelError):
    """A NIR file (or weights file) that cannot be read or written; the message names the file and the fix.

    It is a ``ModelError`` because a NIR file is a model in another format: the CLI already turns every
    ``ModelError`` into one line and exit code 1."""


def nir_module():
    """The ``nir`` package, imported on first use (it is an optional dependency)."""
    try:
        import nir
    except ImportError:
        raise NIRError("NIR support needs the `nir` package: pip install nir (or pip install -e '.[test]')") from None
    return nir


# ---------------------------------------------------------------------------------------------------- LIF mapping


def lif_to_nir(attrs, shape: tuple[int, ...], dt: float) -> dict[str, np.ndarray]:
    """NIR LIF parameters of a bsdgraph LIF node (hard reset only), one value per neuron.

    Per-neuron arrays, never scalars: NIR's type check reads a LIF's shape off its parameters, and scalar
    parameters fail it (NIR issue #176, measured with nir 1.0.8)."""
    # float64: a float32 v_th of 0.3 would read back as 0.30000001192092896 and the round trip would not be exact
    full = lambda v: np.full(shape, v, dtype=np.float64)  # noqa: E731
    return dict(tau=full(attrs["tau"] * dt), r=full(1.0), v_leak=full(attrs["v_reset"]),
                v_threshold=full(attrs["v_th"]), v_reset=full(attrs["v_reset"]))


@dataclass(frozen=True)
class LIFFromNIR:
    """A NIR LIF read into bsdgraph terms: the node's attributes and the fold into the synapse feeding it."""

    attrs: dict[str, Any]
    scale: np.ndarray | None   # r per neuron (None when r == 1 everywhere: nothing to fold)
    shift: np.ndarray | None   # v_leak - v_reset per neuron (None when 0 everywhere)


class MappingError(Exception):
    """A NIR node bsdgraph cannot represent exactly; import turns it into a ``Diagnostic`` on the node."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message, self.hint = message, hint


def per_neuron(node, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """A NIR neuron parameter broadcast to the layer's shape (scalars and size-1 arrays are accepted)."""
    v = np.asarray(getattr(node, key), dtype=np.float64)
    if v.size == 1:
        return np.full(shape, float(v.reshape(-1)[0]))
    if tuple(v.shape) != tuple(shape):
        raise MappingError(f"parameter {key} has shape {list(v.shape)} but the layer it follows is {list(shape)}",
                           "give one value per neuron of the incoming layer (or a scalar)")
    if not np.all(np.isfinite(v)):
        raise MappingError(f"parameter {key} holds non-finite values", "")
    return v


def uniform(v: np.ndarray, key: str) -> float:
    """The one value of a per-neuron parameter that bsdgraph keeps per layer."""
    lo, hi = float(v.min()), float(v.max())
    if lo != hi:
        raise MappingError(f"{key} varies across neurons ({lo:g} .. {hi:g}); bsdgraph has one {key} per layer",
                           f"use the same {key} for every neuron of the layer")
    return lo


def steps(tau_s: float, dt: float) -> float:
    """tau / dt in steps: the shortest decimal whose export (τ·dt) gives back exactly this file's tau, so that a
    round trip through NIR returns τ = 2.0, not 1.9999999999999998 (2.0 * 1e-3 / 1e-3 is exact, other pairs
    are not); tau / dt itself when no shorter decimal does."""
    exact = tau_s / dt
    for digits in range(1, 18):
        short = float(f"{exact:.{digits}g}")
        if short * dt == tau_s:
            return short
    return exact


def lif_from_nir(node, shape: tuple[int, ...], dt: float) -> LIFFromNIR:
    """Map NIR LIF parameters onto a bsdgraph LIF at step dt (see the module docstring for the equations)."""
    p = {k: per_neuron(node, k, shape) for k in ("tau", "r", "v_leak", "v_threshold", "v_reset")}
    tau_s = uniform(p["tau"], "tau")
    if tau_s <= 0:
        raise MappingError(f"tau must be > 0, got {tau_s:g}", "")
    tau = steps(tau_s, dt)
    v_th, v_reset = uniform(p["v_threshold"], "v_threshold"), uniform(p["v_reset"], "v_reset")
    if v_th <= v_reset:
        raise MappingError(f"v_threshold {v_th:g} must be above v_reset {v_reset:g}", "")
    shift = p["v_leak"] - v_reset
    return LIFFromNIR(dict(tau=tau, v_th=v_th, v_reset=v_reset, reset="hard"),
                      None if np.all(p["r"] == 1) else p["r"], None if np.all(shift == 0) else shift)


def plain(v: Any) -> Any:
    """NIR metadata comes back from HDF5 as numpy scalars and bytes; bsdgraph attributes are plain Python."""
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, bytes):
        return v.decode()
    return v.item() if isinstance(v, np.generic) else v


def node_metadata(node) -> dict[str, Any]:
    """What bsdgraph's export wrote into a NIR node's ``metadata["bsdgraph"]`` (empty for other writers)."""
    return plain(dict((getattr(node, "metadata", None) or {}).get(META, {})))


# ---------------------------------------------------------------------------------------------------- files


def read_nir(path: str | Path):
    """Read a NIR file; every failure of the reader (it raises AssertionError, KeyError, OSError, ... depending on
    what is wrong) becomes one ``NIRError`` line. NIR's own type check is off: scalar neuron parameters fail it
    (anchors.md), and import re-infers every shape itself."""
    path = Path(path)
    nir = nir_module()
    if not path.is_file():
        raise NIRError(f"{path}: NIR file not found")
    try:
        graph = nir.read(path, type_check=False)
    except Exception as err:  # third-party reader: any exception means "not a NIR graph we can read"
        raise NIRError(f"{path}: cannot be read as a NIR graph ({type(err).__name__}: {_first_line(err)}); "
                       "is it an HDF5 file written by nir.write?") from None
    if not isinstance(graph, nir.NIRGraph):
        raise NIRError(f"{path}: holds a single {type(graph).__name__} node, not a NIR graph")
    return graph


def write_nir(path: str | Path, graph) -> None:
    try:
        nir_module().write(path, graph)
    except OSError:
        raise
    except Exception as err:
        raise NIRError(f"{path}: could not write the NIR graph ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def save_weights(path: str | Path, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                 source: str = "") -> None:
    """Weights of an imported model, written atomically in the checkpoint container (``--checkpoint`` reads it)."""
    from bsdgraph.train.checkpoint import save_checkpoint

    save_checkpoint(path, {"kind": WEIGHTS_FORMAT, "params": params, "state": state, "source": source})


@dataclass(frozen=True)
class Declarations:
    """Module-level literals of a model file that bsdgraph's interop commands read: ``WEIGHTS`` (a path relative to
    the file) and ``READOUT`` (the LIF that a NIR graph had after its output synapse)."""

    weights: Path | None = None
    readout: dict[str, Any] | None = None


def read_declarations(model_path: str | Path) -> Declarations:
    """Read ``WEIGHTS = "..."`` and ``READOUT = {...}`` from a model file's top level without running it again.

    They must be literals: the file is parsed, not executed, so a computed value is an error naming the line."""
    path = Path(model_path)
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError, ValueError):
        return Declarations()  # load_model reports an unreadable file with its own message
    found: dict[str, Any] = {}
    for stmt in tree.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else []
        for t in targets:
            if isinstance(t, ast.Name) and t.id in ("WEIGHTS", "READOUT"):
                try:
                    found[t.id] = ast.literal_eval(stmt.value)
                except ValueError:
                    raise ModelError(f"{path}:{stmt.lineno}: {t.id} must be a literal (a string path for WEIGHTS, a "
                                     "dict for READOUT): bsdgraph reads it without running the file") from None
    weights = found.get("WEIGHTS")
    if weights is not None and not isinstance(weights, str):
        raise ModelError(f"{path}: WEIGHTS must be a string (a path relative to the model file), got {weights!r}")
    readout = found.get("READOUT")
    if readout is not None and not (isinstance(readout, dict) and {"name", "tau", "v_th"} <= set(readout)):
        raise ModelError(f"{path}: READOUT must be a dict with name, tau, v_th (and v_reset, reset), got {readout!r}")
    return Declarations(path.parent / weights if weights else None, readout)


# ---------------------------------------------------------------------------------------------------- simulation


@dataclass
class Simulation:
    """What running F produced: node name -> value, the top current, and the readout spikes (if any)."""

    env: dict[str, torch.Tensor]
    current: torch.Tensor
    spikes: dict[str, torch.Tensor] = field(default_factory=dict)   # every LIF of F, plus the readout LIF


def simulate(graph, params, state, x: torch.Tensor, readout: dict[str, Any] | None = None,
             seed: int = 0) -> Simulation:
    """Run F on ``x`` with the reference implementations (``runtime.reference.IMPLS``: the spec).

    ``x`` is ``[B, *input]`` (encoded over the graph's T steps by the input node, as in training) or
    ``[T, B, *input]`` (one stimulus per step, used as is: how a NIR peer is driven; T is then x's first axis)."""
    from bsdgraph.ir.graph import Op, Stream
    from bsdgraph.ir.neuron import lif_scan
    from bsdgraph.runtime.reference import IMPLS, Ctx

    inp = graph.by_op(Op.INPUT)[0]
    per_step = x.dim() == len(inp.shape) + 2
    T = x.shape[0] if per_step else graph.T
    ctx = Ctx(params, state, T, x, None, False, seed)
    env: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for n in graph.topo_order():
            if n.stream != Stream.F:
                continue
            if n.op == Op.INPUT and per_step:
                env[n.name] = x.to(torch.float32)
            else:
                env[n.name] = IMPLS[n.op](n, [env[e.src] for e in graph.in_edges(n.name)], ctx)
        out = graph.by_op(Op.OUTPUT)[0]
        spikes = {n.name: env[n.name].to(torch.uint8) for n in graph.by_op(Op.LIF) if n.stream == Stream.F}
        if readout:
            s, _ = lif_scan(env[out.name], readout["tau"], readout["v_th"], readout.get("v_reset", 0.0),
                            readout.get("reset", "hard") == "soft")
            spikes[readout["name"]] = s.to(torch.uint8)
    return Simulation(env, env[out.name], spikes)


def check_dt(dt: float | None, where: str) -> float:
    if dt is None or isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
        raise NIRError(f"{where}: dt must be a positive number of seconds per step, got {dt!r}")
    return float(dt)
