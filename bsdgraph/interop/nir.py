"""NIR interoperability, the shared part: the neuron mappings, file I/O, weights files, and simulating F.

Export lives in ``nir_export.py`` (``EXPORT_RULES[Op]``), import in ``nir_import.py`` (``IMPORT_RULES[NIR type]``);
both use the mappings below. The ``nir`` package is an optional dependency: it is imported on first use, and its
absence is a one-line ``NIRError``, so that ``import bsdgraph`` never needs it.

The neuron mappings (docs/nir.md has the derivations). NIR's neurons are ODEs in seconds; bsdgraph's are their
Forward Euler steps of length dt, with every time constant counted in steps (τ = tau / dt) and a synaptic current
updated before the membrane that reads it. For the LIF,

    tau dv/dt = (v_leak - v) + r I,        z = (v > v_threshold),   v <- v_reset when z

is stepped as bsdgraph's

    h[t] = v[t-1] + (I[t] - (v[t-1] - v_reset)) / τ,   s[t] = (h[t] >= v_th),   v[t] = v_reset if s[t] else h[t]

Equal when  τ = tau / dt,  v_th = v_threshold,  v_reset = v_reset,  v_leak = v_reset,  r = 1.  Import also takes
r != 1 and v_leak != v_reset exactly, by folding them into the synapse that feeds the neuron (Euler's step is
v + (r I + v_leak - v_reset - (v - v_reset)) / τ, so the neuron sees the current I' = r I + (v_leak - v_reset)):
W' = r W, b' = r b + (v_leak - v_reset). The other neurons follow the same rule, each with its factor on the input
current (``NeuronFromNIR.scale``): IF dt·r, LI r, CubaLI and CubaLIF r·w_in. Soft reset (v - v_th s), the adaptive
LIF and user-declared neurons have no NIR counterpart: export refuses them.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bsdgraph.compiler.model_file import ModelError
from bsdgraph.ir.graph import Op
from bsdgraph.registry import registrar

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


class MappingError(Exception):
    """A NIR node bsdgraph cannot represent exactly; import turns it into a ``Diagnostic`` on the node."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message, self.hint = message, hint


# ---------------------------------------------------------------------------------------------------- neuron mappings


def lif_to_nir(attrs, shape: tuple[int, ...], dt: float) -> dict[str, np.ndarray]:
    """NIR LIF parameters of a bsdgraph LIF (hard reset only; tau, v_th, v_reset), one value per neuron.

    Per-neuron arrays, never scalars: NIR's type check reads a LIF's shape off its parameters, and scalar
    parameters fail it (NIR issue #176, measured with nir 1.0.8)."""
    full = _full(shape)
    return dict(tau=full(attrs["tau"] * dt), r=full(1.0), v_leak=full(attrs["v_reset"]),
                v_threshold=full(attrs["v_th"]), v_reset=full(attrs["v_reset"]))


def _full(shape: tuple[int, ...]):
    # float64: a float32 v_th of 0.3 would read back as 0.30000001192092896 and the round trip would not be exact
    return lambda v: np.full(shape, v, dtype=np.float64)


ToNIR = Callable[[dict[str, float], tuple[int, ...], float], tuple[str, dict[str, np.ndarray]]]
NEURONS_TO_NIR: dict[str, ToNIR] = {}   # declaration name -> (parameter values, shape, dt) -> (NIR type, its fields)
_to_nir = registrar(NEURONS_TO_NIR)


@_to_nir("lif")
def _lif_out(p, shape, dt):
    return "LIF", lif_to_nir(p, shape, dt)


@_to_nir("if")
def _if_out(p, shape, dt):
    # Euler steps dv/dt = r I as v + dt r I: r = 1/dt makes it bsdgraph's v + x (import snaps dt·r back to 1)
    full = _full(shape)
    return "IF", dict(r=full(1.0 / dt), v_threshold=full(p["v_th"]), v_reset=full(p["v_reset"]))


@_to_nir("li")
def _li_out(p, shape, dt):
    full = _full(shape)
    return "LI", dict(tau=full(p["tau"] * dt), r=full(1.0), v_leak=full(p["v_leak"]))


@_to_nir("cuba_li")
def _cuba_li_out(p, shape, dt):
    full = _full(shape)
    return "CubaLI", dict(tau_syn=full(p["tau_syn"] * dt), tau_mem=full(p["tau"] * dt), r=full(1.0),
                          v_leak=full(p["v_leak"]), w_in=full(1.0))


@_to_nir("cuba_lif")
def _cuba_lif_out(p, shape, dt):
    # only r·w_in reaches the membrane, so r = τ, w_in = 1/τ is the same neuron as r = w_in = 1; snnTorch's import
    # accepts a CubaLIF only with r = tau_mem/dt (its dt, 1e-4) and rescales its threshold for the rest
    full = _full(shape)
    return "CubaLIF", dict(tau_syn=full(p["tau_syn"] * dt), tau_mem=full(p["tau"] * dt), r=full(p["tau"]),
                           w_in=full(1.0 / p["tau"]), v_leak=full(p["v_leak"]), v_threshold=full(p["v_th"]),
                           v_reset=full(p["v_reset"]))


_NOT_IN_NIR = {
    "lif_soft": ("reset='soft' (v = h - v_th·s) cannot be expressed by NIR's LIF, which sets v to v_reset after "
                 "a spike", "export a model with reset='hard' (train with --lif reset=hard)"),
    "alif": ("NIR 1.0 has no adaptive-threshold neuron (alif raises its threshold after each spike)",
             "use lif (or another of if, li, lif, cuba_lif, cuba_li) to export"),
}


def neuron_to_nir(neuron, values: dict[str, float], shape: tuple[int, ...], dt: float) -> tuple[str, dict]:
    """(NIR type, its parameters) for bsdgraph neurons of declaration ``neuron`` with parameter ``values``."""
    if neuron.name in _NOT_IN_NIR:
        raise MappingError(*_NOT_IN_NIR[neuron.name])
    if neuron.name not in NEURONS_TO_NIR:
        raise MappingError(f"uses the neuron {neuron.name!r} declared by its model file; NIR has a fixed set of "
                           "neuron types, and a declaration's equations have no NIR node",
                           f"export a model built from NIR's neurons: {', '.join(sorted(NEURONS_TO_NIR))}")
    return NEURONS_TO_NIR[neuron.name](values, shape, dt)


@dataclass(frozen=True)
class NeuronFromNIR:
    """A NIR neuron read into bsdgraph terms: the node (``op`` and its attributes, surrogate and alpha aside) and
    the fold into the synapse feeding it: the neuron's input current is ``scale * I + shift`` per neuron."""

    op: Op
    attrs: dict[str, Any]
    scale: np.ndarray | None = None   # None when 1 everywhere: nothing to fold
    shift: np.ndarray | None = None   # None when 0 everywhere

    @property
    def model(self) -> str:
        """The declaration's name: ``lif`` for the lif op (hard reset), the node's model otherwise."""
        return self.attrs["model"] if self.op == Op.NEURON else "lif"

    @property
    def params(self) -> dict[str, float]:
        """The declaration's parameter values."""
        if self.op == Op.NEURON:
            return dict(self.attrs["params"])
        return {k: self.attrs[k] for k in ("tau", "v_th", "v_reset")}


def per_neuron(node, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """A NIR neuron parameter broadcast to the layer's shape (scalars and size-1 arrays are accepted)."""
    v = np.asarray(getattr(node, key), dtype=np.float64)
    if v.size == 1:
        v = np.full(shape, float(v.reshape(-1)[0]))
    elif tuple(v.shape) != tuple(shape):
        raise MappingError(f"parameter {key} has shape {list(v.shape)} but the layer it follows is {list(shape)}",
                           "give one value per neuron of the incoming layer (or a scalar)")
    if not np.all(np.isfinite(v)):
        raise MappingError(f"parameter {key} holds non-finite values", "give every neuron a finite value")
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


def _tau(p: dict[str, np.ndarray], key: str, dt: float) -> float:
    tau_s = uniform(p[key], key)
    if tau_s <= 0:
        raise MappingError(f"{key} must be > 0, got {tau_s:g}", "a time constant is a positive number of seconds")
    return steps(tau_s, dt)


def _threshold(p: dict[str, np.ndarray]) -> tuple[float, float]:
    v_th, v_reset = uniform(p["v_threshold"], "v_threshold"), uniform(p["v_reset"], "v_reset")
    if v_th <= v_reset:
        raise MappingError(f"v_threshold {v_th:g} must be above v_reset {v_reset:g}",
                           "a threshold at or below the reset potential fires every step: raise v_threshold")
    return v_th, v_reset


def _factor(v: np.ndarray) -> np.ndarray | None:
    """A per-neuron factor on the input current, None when it is 1 everywhere. Within 4 float64 ulps of 1 counts as
    1: the products an export writes (dt·(1/dt) for IF, τ·(1/τ) for CubaLIF) are 1 only up to rounding, and a
    factor that close changes no float32 weight anyway."""
    v = np.where(np.abs(v - 1.0) <= 4 * np.finfo(np.float64).eps, 1.0, v)
    return None if np.all(v == 1) else v


def _declared(model: str, **params: float) -> dict[str, Any]:
    return {"model": model, "params": params}


FromNIR = Callable[[Any, tuple[int, ...], float], NeuronFromNIR]
NEURONS_FROM_NIR: dict[str, FromNIR] = {}   # NIR type -> its mapping at step dt
_from_nir = registrar(NEURONS_FROM_NIR)


def _read(node, shape: tuple[int, ...], *keys: str) -> dict[str, np.ndarray]:
    return {k: per_neuron(node, k, shape) for k in keys}


@_from_nir("LIF")
def lif_from_nir(node, shape: tuple[int, ...], dt: float) -> NeuronFromNIR:
    """NIR LIF -> the lif op (hard reset): τ = tau/dt; r and v_leak - v_reset fold into the synapse."""
    p = _read(node, shape, "tau", "r", "v_leak", "v_threshold", "v_reset")
    tau = _tau(p, "tau", dt)
    v_th, v_reset = _threshold(p)
    shift = p["v_leak"] - v_reset
    return NeuronFromNIR(Op.LIF, dict(tau=tau, v_th=v_th, v_reset=v_reset, reset="hard"), _factor(p["r"]),
                         None if np.all(shift == 0) else shift)


@_from_nir("IF")
def _if_in(node, shape, dt) -> NeuronFromNIR:
    """NIR IF, dv/dt = r I -> ``if`` (v + x): Euler's step is v + dt r I, so dt·r folds into the synapse."""
    p = _read(node, shape, "r", "v_threshold", "v_reset")
    v_th, v_reset = _threshold(p)
    return NeuronFromNIR(Op.NEURON, _declared("if", v_th=v_th, v_reset=v_reset), _factor(dt * p["r"]))


@_from_nir("LI")
def _li_in(node, shape, dt) -> NeuronFromNIR:
    """NIR LI -> ``li`` (v + (x - (v - v_leak))/τ): τ = tau/dt, v_leak as is, r folds into the synapse."""
    p = _read(node, shape, "tau", "r", "v_leak")
    return NeuronFromNIR(Op.NEURON, _declared("li", tau=_tau(p, "tau", dt), v_leak=uniform(p["v_leak"], "v_leak")),
                         _factor(p["r"]))


def _cuba(node, shape, dt, spiking: bool) -> NeuronFromNIR:
    """NIR CubaLI(F) -> ``cuba_li(f)``: i + (x - i)/τs, then v + (i - (v - v_leak))/τ reading the new i. The
    membrane sees r I, and I integrates w_in S, so r·w_in folds into the synapse (bsdgraph's i is r·I)."""
    keys = ("tau_syn", "tau_mem", "r", "v_leak", "w_in") + (("v_threshold", "v_reset") if spiking else ())
    p = _read(node, shape, *keys)
    params = dict(tau_syn=_tau(p, "tau_syn", dt), tau=_tau(p, "tau_mem", dt), v_leak=uniform(p["v_leak"], "v_leak"))
    if spiking:
        params["v_th"], params["v_reset"] = _threshold(p)
    return NeuronFromNIR(Op.NEURON, _declared("cuba_lif" if spiking else "cuba_li", **params),
                         _factor(p["r"] * p["w_in"]))


@_from_nir("CubaLIF")
def _cuba_lif_in(node, shape, dt) -> NeuronFromNIR:
    return _cuba(node, shape, dt, spiking=True)


@_from_nir("CubaLI")
def _cuba_li_in(node, shape, dt) -> NeuronFromNIR:
    return _cuba(node, shape, dt, spiking=False)


@_from_nir("Threshold")
def _threshold_in(node, shape, dt) -> NeuronFromNIR:
    """NIR Threshold, z = (x > θ), a neuron without memory -> a lif op with τ = 1 step and v_reset = 0: its
    h = v + (x - v) is x (up to the rounding of that sum), so s = (x >= θ). Needs θ > 0 (above the reset)."""
    theta = uniform(per_neuron(node, "threshold", shape), "threshold")
    if theta <= 0:
        raise MappingError(f"threshold {theta:g} is not above 0; import maps a Threshold to a LIF of one-step "
                           "memory, whose threshold must lie above its reset potential 0",
                           "use a positive threshold (or fold an offset into the synapse's bias)")
    return NeuronFromNIR(Op.LIF, dict(tau=1.0, v_th=theta, v_reset=0.0, reset="hard"))


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
    (NIR issue #176, docs/nir.md), and import re-infers every shape itself."""
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
    the file) and ``READOUT`` (the neuron that a NIR graph had after its output synapse, see ``readout_neuron``)."""

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
    if readout is not None and not (isinstance(readout, dict) and any(keys <= set(readout) for keys in _READOUT_KEYS)):
        raise ModelError(f"{path}: READOUT must be a dict with name, tau, v_th (and v_reset, reset) for a LIF, or "
                         f"with name, model, params for another neuron, got {readout!r}")
    return Declarations(path.parent / weights if weights else None, readout)


# A readout is a LIF, {name, tau, v_th, v_reset, reset} (the form files written before other neurons kept), or any
# declared neuron, {name, model, params}.
_READOUT_KEYS = ({"name", "tau", "v_th"}, {"name", "model", "params"})


def readout_neuron(readout: dict[str, Any]):
    """(declaration, parameter values) of a readout dict."""
    from bsdgraph.ir.neurons import NEURONS, lookup

    if "model" in readout:
        neuron = lookup(readout["model"])
        return neuron, neuron.param_values(readout["params"])
    soft = readout.get("reset", "hard") == "soft"
    return NEURONS["lif_soft" if soft else "lif"], {"tau": readout["tau"], "v_th": readout["v_th"],
                                                   "v_reset": readout.get("v_reset", 0.0)}


def readout_of(name: str, m: NeuronFromNIR) -> dict[str, Any]:
    """The readout dict of imported neurons: the LIF form for the lif op, the declared form for the rest."""
    if m.op == Op.LIF:
        return {"name": name, **m.attrs}
    return {"name": name, "model": m.attrs["model"], "params": dict(m.attrs["params"])}


# ---------------------------------------------------------------------------------------------------- simulation


@dataclass
class Simulation:
    """What running F produced: node name -> value, the top current, the spikes of every spiking neuron layer and of
    a spiking readout, and the readout's own value (its spikes, or the membrane of a leaky integrator)."""

    env: dict[str, torch.Tensor]
    current: torch.Tensor
    spikes: dict[str, torch.Tensor] = field(default_factory=dict)
    readout: torch.Tensor | None = None
    membranes: dict[str, torch.Tensor] = field(default_factory=dict)   # pre-reset h of every neuron, readout too


def simulate(graph, params, state, x: torch.Tensor, readout: dict[str, Any] | None = None,
             seed: int = 0) -> Simulation:
    """Run F on ``x`` with the reference runtime (``runtime.reference.run_graph``: the spec), recurrent loops
    included (a loop runs step by step, its delayed edges reading the previous step).

    ``x`` is ``[B, *input]`` (encoded over the graph's T steps by the input node, as in training) or
    ``[T, B, *input]`` (one stimulus per step, used as is: how a NIR peer is driven; T is then x's first axis)."""
    from bsdgraph.ir.graph import GroupOp, Stream
    from bsdgraph.ir.neuron import lif_scan
    from bsdgraph.ir.neurons import is_spiking
    from bsdgraph.runtime.neurons import twin_scan
    from bsdgraph.runtime.reference import Ctx, run_graph

    inp = graph.by_op(Op.INPUT)[0]
    T = graph.T
    if x.dim() == len(inp.shape) + 2:
        # one stimulus per step: the input node reads it as a sequence ([B, T, ...]) of x's own length
        seq = inp.replace(attrs={**inp.attrs, "encoding": "sequence"})
        graph = graph.replace(nodes=[seq if n is inp else n for n in graph.nodes])
        T, x = x.shape[0], x.transpose(0, 1)
    ctx = Ctx(params, state, T, x, None, False, seed)
    with torch.no_grad():
        env = run_graph(graph, ctx, frozenset({Stream.F}))
        out = graph.by_op(Op.OUTPUT)[0]
        spikes = {n.name: env[n.name].to(torch.uint8) for n in graph.nodes
                  if n.stream == Stream.F and n.op in GroupOp.NEURON and is_spiking(n)}
        value, membranes = None, dict(ctx.membrane)
        if readout:
            neuron, values = readout_neuron(readout)
            if "model" in readout:
                value, h = twin_scan(neuron, values, env[out.name], grad=False)
            else:  # the LIF form: the lif op's own recurrence, as before declarations existed
                value, h = lif_scan(env[out.name], values["tau"], values["v_th"], values["v_reset"],
                                    neuron.name == "lif_soft")
            membranes[readout["name"]] = h
            if neuron.spiking:
                spikes[readout["name"]] = value.to(torch.uint8)
    return Simulation(env, env[out.name], spikes, value, membranes)


def check_dt(dt: float | None, where: str) -> float:
    if dt is None or isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
        raise NIRError(f"{where}: dt must be a positive number of seconds per step, got {dt!r}")
    return float(dt)
