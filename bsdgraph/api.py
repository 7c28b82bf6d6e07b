"""The Python API, for notebooks and scripts: build or load a network, train it, predict, evaluate.

    import bsdgraph
    g = bsdgraph.GraphBuilder("mlp", T=4)
    h = g.lif(g.linear(g.flatten(g.input((1, 28, 28))), 256))
    g.output(g.linear(h, 10))
    net = bsdgraph.net(g, bsd={"lam": 0.6})          # or a model file: bsdgraph.net("models/fmnist_mlp.py")
    run = bsdgraph.fit(net, (x_train, y_train), test=(x_test, y_test), epochs=2, out="runs/mlp")
    scores = net.predict(x_test)                      # [N, classes]: mean over time of the top current
    net.evaluate((x_test, y_test))                    # {"accuracy": ...} (or {"mse": ...})
    again = bsdgraph.load("runs/mlp")                 # the trained network, from its run directory alone

Data are numpy arrays or torch tensors: ``(x, y)`` pairs, a ``bsdgraph.train.data.Dataset``, or a dict with
``x_train, y_train, x_test, y_test``. Bad input raises the same one-line ``UserError``s the command line prints
(``bsdgraph.errors``), naming the node or the array at fault. ``load`` rebuilds the network from the graph its
checkpoint records, so it runs no model file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bsdgraph.compiler.feedback import BSDConfig, check_config
from bsdgraph.compiler.model_file import Model, load_model
from bsdgraph.compiler.program import Program, compile_graph, compile_model
from bsdgraph.errors import UsageError, UserError
from bsdgraph.ir.builder import GraphBuilder
from bsdgraph.ir.graph import Graph, Op
from bsdgraph.ir.printer import to_json
from bsdgraph.train.config import TrainConfig
from bsdgraph.train.data import Dataset, check_against_model, expects
from bsdgraph.train.prepare import in_input_units, refuse_stats, with_stats


@dataclasses.dataclass
class Net:
    """A compiled network and, once trained or loaded, its weights (``runtime``)."""

    program: Program
    train: dict[str, Any]               # TRAIN options (the model file's, then the overrides)
    runtime: Any = None                 # set by fit / load; predict before it uses fresh weights (seed 0)
    history: list[dict] = dataclasses.field(default_factory=list)

    @property
    def graph(self) -> Graph:
        """The forward network F."""
        return self.program.forward

    def predict(self, x) -> torch.Tensor:
        """Class scores [N, C] (per step: [N, T, C]) or regression values of F, for samples ``x``."""
        x = _samples(self.graph, x, "x")
        rt = self._runtime()
        with torch.no_grad():
            return torch.cat([rt.predict(x[i:i + 1000]).cpu() for i in range(0, len(x), 1000)]) if len(x) else x

    def evaluate(self, data) -> dict[str, Any]:
        """Accuracy (per step too, for per-step classes) or MSE of F on ``data`` (an (x, y) pair or a Dataset)."""
        from bsdgraph.train.trainer import evaluate

        x, y = _pair(data, "data")
        # the pair is the test split of an otherwise empty set: a bad label is reported as y_test's
        ds = _fit_to(self, Dataset(x[:0], y[:0], x, y, "data", "data", expects(self.graph).n_classes))
        return evaluate(self._runtime(), ds.x_test, ds.y_test)

    def recall(self) -> torch.Tensor:
        """What the backward network B generates for every class (its bottom reconstruction, mean over time):
        [classes, *input shape]; needs a BSD network derived with recall (the default) and an image input."""
        from bsdgraph.tools.plot import recall_images

        rt = self._runtime()
        if self.program.rule != "bsd":
            raise UserError("recall runs the backward network B, which a BPTT network does not have")
        return in_input_units(recall_images(self.program.graph, rt.params, rt.state),
                              getattr(rt, "input_stats", None))

    def export_nir(self, path: str | Path) -> Path:
        """Write F with its weights as a NIR file (docs/nir.md says what maps); returns the path."""
        from bsdgraph.interop.nir import write_nir
        from bsdgraph.interop.nir_export import export_nir

        rt = self._runtime()
        refuse_stats(getattr(rt, "input_stats", None), "this network")
        write_nir(path, export_nir(self.program.graph, rt.params, rt.state))
        return Path(path)

    def _runtime(self):
        if self.runtime is None:
            from bsdgraph.train.trainer import default_backend, make_runtime

            self.runtime = make_runtime(self.program, default_backend(), TrainConfig.from_model(self.train),
                                        training=False)
        return self.runtime


def net(model, *, rule: str = "bsd", bsd: Mapping[str, Any] | None = None,
        train: Mapping[str, Any] | None = None) -> Net:
    """A network from a ``GraphBuilder``, a forward ``Graph``, a ``Model`` or a model file's path.

    ``bsd`` overrides BSD options (``lam``, ``negatives``, ``distill_on``, ...; see docs/bsd.md), ``train`` the
    training options (``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``init``, ...); ``rule`` is ``bsd`` or
    ``bptt``."""
    if isinstance(model, GraphBuilder):
        model = model.build()
    if isinstance(model, (str, Path)):
        model = load_model(Path(model))
    elif isinstance(model, Graph):
        model = Model(Path(f"<{model.name}>"), model, BSDConfig())
    elif not isinstance(model, Model):
        raise UsageError(f"bsdgraph.net takes a GraphBuilder, a Graph, a Model or a model file's path, got "
                         f"{type(model).__name__}")
    cfg = dataclasses.replace(model.bsd, **_known(bsd or {}, BSDConfig, "bsd"))
    check_config(cfg)
    merged = {**model.train, **(train or {})}
    TrainConfig.from_model(merged)   # every problem of the options now, not at fit
    model = dataclasses.replace(model, bsd=cfg, train=merged)
    return Net(compile_model(model, rule), merged)


def fit(net: Net, data, *, test=None, epochs: int | None = None, out: str | Path | None = None,
        overwrite: bool = False, progress: bool = True, backend: str | None = None, **train: Any) -> list[dict]:
    """Train ``net`` on ``data``; returns the per-epoch records (also in ``net.history`` and
    ``out/metrics.jsonl``) and leaves ``net`` holding the trained weights.

    ``data``: an (x, y) pair (then ``test`` is an (x, y) pair, or the last 10 % of ``data`` is held out), a Dataset
    or a dict of the four arrays; or streamed: a torch ``DataLoader`` (its batch size and order), or a torch
    ``Dataset`` (batched here, shuffled by the seed), read afresh each epoch and never held whole; ``test`` is then
    needed (a loader, a torch Dataset or an (x, y) pair). ``out`` (default ``runs/<name>``) receives the checkpoint after every epoch; a
    directory that already holds one is refused unless ``overwrite`` (as the command line's --force), and one that
    another run is writing always is. ``train`` overrides training options for this fit (lr=..., batch_size=...)."""
    from bsdgraph.train.trainer import tqdm_progress

    options = {**net.train, **train, **({"epochs": epochs} if epochs is not None else {})}
    cfg = TrainConfig.from_model(options)
    ds = _stream(net, data, test, cfg) if _streamed(data) else _fit_to(net, _dataset(net, data, test))
    out = Path(out) if out is not None else Path("runs") / net.graph.name
    if (out / "checkpoint.pt").exists() and not overwrite:
        raise UserError(f"{out} already holds a checkpoint: pass overwrite=True to start over (it is deleted), or "
                        "another out=")
    program = net.program
    if program.model is None:   # loaded from a run directory: a model named after its graph
        program = dataclasses.replace(program, model=Model(Path(f"<{net.graph.name}>"), net.graph, program.bsd))
    model = program.model
    in_memory = not model.path.is_file()   # built in Python: the run records the graph instead of a file
    source = to_json(net.graph).encode() if in_memory else None
    trainer = train_run(program, ds, cfg, out, force=overwrite, source=source, backend=backend,
                        record={"argv": ["<python api>"], "data": ds.source},
                        progress=tqdm_progress() if progress else None)
    net.history, net.train = trainer.history, options
    if trainer.val is not None and trainer.best_path.is_file():  # the net is the epoch chosen on validation data
        net.runtime = load(trainer.best_path, backend).runtime
    else:
        net.runtime = with_stats(trainer.rt, trainer.input_stats)
    return net.history


def _quiet(*_: Any) -> None:
    return None


def train_run(model: Model | Program, data, cfg: TrainConfig, out: Path, *, rule: str = "bsd",
              backend: str | None = None, resume: bool = False, force: bool = False,
              changing: frozenset[str] = frozenset(), record: Mapping[str, Any] | None = None,
              source: bytes | None = None, compile: str = "off", layer_parallel: bool = False,
              log=None, say=None, progress=None):
    """The training run behind both ``fit`` and ``bsdgraph train``; returns the finished ``Trainer``.

    It claims ``out`` (one writer per run directory; ``record`` and ``source`` go into its ``run.json``), builds
    the trainer (one process, or under torchrun one rank of a data-parallel or, with ``layer_parallel``, pipelined
    run, where only rank 0 reports and writes), calibrates or resumes (refusing changed options but those in
    ``changing``), trains ``cfg.epochs`` epochs, and says what it does through ``say`` (a line of text) and
    ``log`` (each epoch's record)."""
    import contextlib

    from bsdgraph.parallel.distributed import launched
    from bsdgraph.parallel.train_parallel import parallel_trainer, world_rank
    from bsdgraph.train import rundir
    from bsdgraph.train.trainer import Trainer, best_epoch, default_backend

    lead = world_rank()[0] == 0
    say, log = (say or _quiet) if lead else _quiet, (log or _quiet) if lead else _quiet
    path = model.path if isinstance(model, Model) else model.model.path
    if not launched() and layer_parallel:
        raise UsageError("--layer-parallel runs one pipeline stage per process: start it with torchrun "
                         "--nproc-per-node K -m bsdgraph train ... --layer-parallel")
    if launched() and compile != "off":
        raise UsageError("--compile runs on one process only for now")
    claim = rundir.claim(out, path, resume=resume, force=force, source=source, record=dict(record or {}))
    with claim if lead else contextlib.nullcontext():
        if launched():
            trainer = parallel_trainer(layer_parallel, model, data, cfg, out, rule, backend or default_backend(),
                                       log=log)
        else:
            trainer = Trainer(model, data, cfg, out, rule=rule, backend=backend, log=log, progress=progress,
                              compile=compile, say=say)
        if resume:  # an option given on this command line is a change on purpose; an edited TRAIN dict is not
            trainer.resume(frozenset(changing))
        else:
            for syn, (factor, rate) in trainer.initialise().items():
                say(f"calibrated {syn}: weights x{factor:.3g}, firing {100 * rate:.1f} %")
        why = getattr(trainer.rt, "compile_why", None)
        if compile != "off" and why:
            say(f"compile: {trainer.rt.compile_mode} ({why}); the first step pays for it")
        comm = getattr(trainer, "comm", None)
        processes = f", {trainer.mode}-parallel on {comm.world} processes" if comm else ""
        say(f"training {path} ({trainer.rule}, {trainer.backend} backend{processes}) on {data.name}: "
            f"{trainer.data.n_train} train{_held_out(trainer)} / {data.n_test} test samples, epochs "
            f"{trainer.epoch + 1}..{cfg.epochs}")
        trainer.run()
    final = trainer.history[-1] if trainer.history else {}
    say(f"done: {_metric(final, 'test')}; checkpoint {trainer.checkpoint_path}; metrics {out / 'metrics.jsonl'}; "
        f"plots: bsdgraph plot {out}")
    best = best_epoch(trainer.history)
    if best:
        stop = (f"stopped early after {len(trainer.history)} epochs ({cfg.patience} without a better validation "
                "result); " if trainer.stopped_early() else "")
        chosen = trainer.history[best - 1]
        say(f"{stop}best on the validation split: epoch {best} ({_metric(chosen, 'val')}, "
            f"{_metric(chosen, 'test')}), kept as {trainer.best_path}")
    return trainer


def _held_out(trainer) -> str:
    """' + N validation' when the trainer held out a validation split, else nothing."""
    val = getattr(trainer, "val", None)
    return f" + {len(val[0])} validation" if val is not None else ""


def _metric(record: Mapping[str, Any], split: str) -> str:
    """A record's accuracy or MSE on ``split`` (test | val), in words."""
    if f"{split}_accuracy" in record:
        return f"{split} accuracy {100 * record[f'{split}_accuracy']:.2f} %"
    return f"{split} MSE {record.get(f'{split}_mse', float('nan')):.5f}"


def load(run_dir: str | Path, backend: str | None = None) -> Net:
    """The trained network of a run directory (its ``best.pt`` when the run held out a validation split, else its
    ``checkpoint.pt``; or the checkpoint file given), rebuilt from the graph the checkpoint records: no model file
    is imported. Declared neurons must be declared (``declare_neuron``) before."""
    from bsdgraph.ir.printer import from_json
    from bsdgraph.train.checkpoint import load_checkpoint, require
    from bsdgraph.train.trainer import default_backend, make_runtime

    path = Path(run_dir)
    if path.is_dir():  # a run that held out a validation split kept its best epoch apart
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "checkpoint.pt"
    ck = require(load_checkpoint(path), path, ("graph", "rule", "params", "state", "epoch"))
    graph = from_json(ck["graph"])
    if ck["rule"] == "bptt":
        program = compile_model(graph, "bptt")
    else:
        program = compile_graph(graph)
    cfg = TrainConfig.from_model(dict(ck.get("train", {})))
    rt = make_runtime(program, backend or default_backend(), cfg, params=ck["params"], state=ck["state"],
                      training=False)
    return Net(program, dict(ck.get("train", {})), with_stats(rt, ck.get("input_stats")),
               list(ck.get("history", [])))


# ---------------------------------------------------------------------------------------------------- data


def _streamed(data) -> bool:
    return isinstance(data, (torch.utils.data.DataLoader, torch.utils.data.Dataset))


def _stream(net: Net, data, test, cfg: TrainConfig):
    """A ``BatchStream`` over a DataLoader or a torch Dataset, with its test split in the same forms or a pair."""
    from bsdgraph.train.data import batches
    from bsdgraph.train.stream import BatchStream

    if test is None:
        raise UserError("fit: a streamed training set needs test= (a DataLoader, a torch Dataset or an (x, y) "
                        "pair): nothing can be held out of a stream")

    def loader(d, shuffle: bool, size: int):
        if isinstance(d, torch.utils.data.DataLoader):
            return d
        if isinstance(d, torch.utils.data.Dataset):
            return torch.utils.data.DataLoader(d, batch_size=size, shuffle=shuffle,
                                               generator=torch.Generator().manual_seed(cfg.seed))
        x, y = _pair(d, "test")
        return list(batches(x, y, size))

    want = expects(net.graph)
    return BatchStream(loader(data, True, cfg.batch_size), loader(test, False, cfg.eval_batch_size), want.shape,
                       want.per_sample if want.n_classes else 1, want.n_classes, name=net.graph.name)


def _known(options: Mapping[str, Any], cls, what: str) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UsageError(f"unknown {what} option(s) {unknown}; known: {', '.join(sorted(fields))}")
    return dict(options)


def _tensor(a, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    if isinstance(a, np.ndarray):
        if a.dtype.kind not in "biuf":
            raise UserError(f"{what} has dtype {a.dtype}; give numbers (np.asarray({what}, dtype=np.float32))")
        return torch.from_numpy(np.ascontiguousarray(a))
    raise UserError(f"{what} must be a numpy array or a torch tensor, got {type(a).__name__}")


def _pair(data, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, Dataset):
        return data.x_test, data.y_test
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = _tensor(data[0], f"{what}[0] (x)"), _tensor(data[1], f"{what}[1] (y)")
        if len(x) != len(y):
            raise UserError(f"{what}: x has {len(x)} samples but y has {len(y)}")
        return x, y
    raise UserError(f"{what} must be an (x, y) pair of arrays or a bsdgraph Dataset, got {type(data).__name__}")


def _dataset(net: Net, data, test) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, Mapping):
        try:
            arrays = [_tensor(data[k], k) for k in ("x_train", "y_train", "x_test", "y_test")]
        except KeyError as err:
            raise UserError(f"data: the dict has no {err.args[0]!r}; give x_train, y_train, x_test, y_test") from None
        return Dataset(*arrays, net.graph.name, "arrays", expects(net.graph).n_classes)
    x, y = _pair(data, "data")
    if test is not None:
        xt, yt = _pair(test, "test")
    else:   # hold out the end: no shuffling, so a time-ordered set keeps its future out of training
        cut = max(1, int(len(x) * 0.9))
        if cut >= len(x):
            raise UserError(f"data: {len(x)} sample(s) leave none to test on; give test=(x, y) or more samples")
        x, y, xt, yt = x[:cut], y[:cut], x[cut:], y[cut:]
    return Dataset(x, y, xt, yt, net.graph.name, "arrays", expects(net.graph).n_classes)


def _fit_to(net: Net, ds: Dataset) -> Dataset:
    """``ds`` checked against the network's input and output (the command line's checks), floats as float32."""
    ds = dataclasses.replace(ds, x_train=_floats(ds.x_train), x_test=_floats(ds.x_test))
    want = expects(net.graph)
    if want.task == "regression":
        ds = dataclasses.replace(ds, y_train=_floats(ds.y_train), y_test=_floats(ds.y_test))
    return check_against_model(ds, want.shape, want.n_classes, want.task, want.per_sample)


def _floats(a: torch.Tensor) -> torch.Tensor:
    return a if a.dtype == torch.float32 else a.to(torch.float32)


def _samples(graph: Graph, x, what: str) -> torch.Tensor:
    """``x`` as float32 samples of the input node's shape, or a UserError naming the node."""
    x = _floats(_tensor(x, what))
    inp, shape = graph.by_op(Op.INPUT)[0], expects(graph).shape
    if tuple(x.shape[1:]) != shape:
        if x.dim() >= 1 and math.prod(x.shape[1:]) == math.prod(shape) and inp.attrs["encoding"] != "sequence":
            return x.reshape(len(x), *shape)
        raise UserError(f"input node {inp.name!r} takes samples of shape {list(shape)}, got {what} of shape "
                        f"{list(x.shape)} (samples first: [N, {', '.join(map(str, shape))}])")
    return x


__all__ = ["Net", "fit", "load", "net", "train_run"]
