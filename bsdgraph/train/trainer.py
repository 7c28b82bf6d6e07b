"""Training and evaluation: epochs of local BSD steps (or BPTT), metrics, health warnings, atomic checkpoints.

Resume is exact: a checkpoint holds weights of F and B, batchnorm statistics, optimiser state, the shuffling
generator's state and the step counter (which seeds Poisson encoding), so 2 epochs straight and 1 + resumed 1
give identical weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bsdgraph.runtime.common import set_group_lrs
from bsdgraph.train.calibrate import calibrate
from bsdgraph.train.checkpoint import (
    CheckpointError, load_checkpoint, remove_stale_temporaries, require, save_checkpoint,
)
from bsdgraph.train.data import Dataset, augment, batches
from bsdgraph.train.prepare import holdout, input_stats, standardize, standardized, with_stats
from bsdgraph.ir.graph import GroupOp, Op, Stream
from bsdgraph.compiler.model_file import Model
from bsdgraph.compiler.program import Program, compile_model
from bsdgraph.ir.params import init_params
from bsdgraph.ir.printer import to_json
from bsdgraph.train.config import TrainConfig, TrainingError
from bsdgraph.train.threads import ThreadTuner, cores, training_threads

SILENT, SATURATED = 0.001, 0.90  # firing-rate bounds of a healthy layer (spec: warn below 0.1 %, above 90 %)
# On a GPU reading a loss back drains the queue: the NaN guard reads the losses summed over this many steps (and at
# every epoch's end, before the checkpoint is written); on the CPU it reads them after every step, which is free.
CHECK_EVERY_ON_A_GPU = 50


def backends() -> dict[str, Callable]:
    """Backend name -> ``fn(program, **runtime keywords)`` building its runtime."""
    from bsdgraph.runtime.cpu import cpu_runtime
    from bsdgraph.runtime.reference import ReferenceRuntime
    from bsdgraph.runtime.triton import triton_runtime

    return {"reference": lambda program, **kw: ReferenceRuntime(program.graph, **kw), "cpu": cpu_runtime,
            "triton": triton_runtime}


def default_backend() -> str:
    """triton when a CUDA GPU is present, else the cpu backend."""
    return "triton" if torch.cuda.is_available() else "cpu"


def plan_backend(name: str, device=None):
    """The ``Backend`` (kernel table and primitives) of a plan-executor backend: cpu or triton."""
    require_backend(name)
    if name == "triton":
        from bsdgraph.runtime.triton import triton_backend

        return triton_backend(device)
    if name == "cpu":
        from bsdgraph.runtime.cpu import cpu_backend

        return cpu_backend()
    raise TrainingError(f"backend {name} does not run a plan: use --backend cpu (or triton)")


def require_backend(backend: str) -> None:
    if backend == "triton":
        from bsdgraph.runtime.triton import available

        ok, why = available()
        if not ok:
            raise TrainingError(f"--backend triton: {why}; use --backend cpu")


def make_runtime(program: Program, backend: str, cfg: TrainConfig, params=None, state=None, training: bool = True,
                 batch: int | None = None, compile: str = "off"):
    """The runtime of ``program`` (its rule: bsd | bptt) on ``backend``. Refuses, before anything is allocated,
    a model whose estimated memory (training at ``batch``, default the config's, and evaluating at its eval
    batch; or evaluating only) exceeds what the device has free."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # BPTT runs where BSD would
    check_memory(program, device, batch or cfg.batch_size, cfg.eval_batch_size, training)
    if program.rule == "bptt":
        from bsdgraph.runtime.bptt import BPTTRuntime

        if compile != "off":
            raise TrainingError(f"--compile {compile} compiles the BSD step; --rule bptt runs eagerly")

        try:
            return BPTTRuntime(program.forward, params, cfg.optim(), cfg.seed, state, device=device,
                               smoothing=program.bsd.label_smoothing)
        except ValueError as err:  # layer_lr that does not fit the network
            raise TrainingError(str(err)) from None
    require_backend(backend)
    if compile != "off" and backend != "cpu":
        raise TrainingError(f"--compile {compile} runs with --backend cpu only for now (the {backend} backend's "
                            "kernels are not traceable by torch.compile yet)")
    extra = {"compile": compile} if backend == "cpu" else {}
    try:
        return backends()[backend](program, params=params, opt=cfg.optim(), seed=cfg.seed, state=state, **extra)
    except ValueError as err:  # a compile mode this program cannot use: say why, one line
        raise TrainingError(str(err)) from None


def check_memory(program: Program, device: str, batch: int, eval_batch: int, training: bool = True) -> None:
    """``memory.check_fits`` of training (or only evaluating) ``program``, as a TrainingError (exit 1)."""
    from bsdgraph.train import memory

    est = (memory.estimate(program, batch, optimizer=True, eval_batch=eval_batch) if training
           else memory.estimate(program, eval_batch, optimizer=False))
    try:
        memory.check_fits(est, device)
    except memory.MemoryBudgetError as err:
        raise TrainingError(str(err)) from None


def evaluate(rt, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             progress: Callable | None = None) -> dict[str, float]:
    """Accuracy (classification) or MSE (regression) of F alone on a split; ``progress(batches, total)`` wraps
    the batches (a progress bar)."""
    pairs = batches(x, y, batch_size)
    return evaluate_batches(rt, progress(pairs, -(-len(x) // batch_size)) if progress else pairs)


@torch.no_grad()
def evaluate_batches(rt, pairs) -> dict[str, float]:
    """``evaluate`` over (x, y) batches (a split in memory, or a stream)."""
    out = rt.graph.by_op(Op.OUTPUT)[0]
    correct, sq, n, nats, per_sample = 0, 0.0, 0, 0.0, 1
    for xb, yb in pairs:
        pred = rt.predict(xb)
        if out.attrs["task"] == "classification":   # per sample, or per step: correct is then [T]
            correct = correct + (pred.argmax(-1).cpu() == yb).sum(0)
            if out.attrs["target"] == "sequence":  # the held-out cross-entropy: bits per step (per character)
                nats += float(F.cross_entropy(pred.cpu().reshape(-1, pred.shape[-1]), yb.reshape(-1),
                                              reduction="sum"))
        else:
            sq += float(((pred.cpu().reshape(yb.shape) - yb) ** 2).sum())
            per_sample = int(yb[0].numel())
        n += len(yb)
    if out.attrs["task"] == "classification" and out.attrs["target"] == "sequence":
        per_step = (correct.double() / max(n, 1)) if n else torch.zeros(0)
        return {"accuracy": float(per_step.mean()) if n else 0.0,
                "accuracy_per_step": [round(float(a), 4) for a in per_step],
                "bits_per_step": nats / max(n * per_step.numel(), 1) / math.log(2)}
    if out.attrs["task"] == "classification":
        return {"accuracy": int(correct) / max(n, 1)}
    return {"mse": sq / max(n * per_sample, 1)}


def health_warnings(rates: dict[str, float], graph=None, calibrated: bool = False) -> list[str]:
    """Silent and saturated layers, each with advice that fits the run: ``--init calibrated`` where the run did not
    use it (a conv net without batchnorm: 33 % -> 66 % after 2 short epochs, every layer firing; docs/experiments.md
    "Silent layers"), else a batchnorm where the layer has none (it sets the current's scale whatever the weights
    learn), and a lower threshold."""
    out = []
    for name, r in rates.items():
        if r < SILENT:
            hints = [] if calibrated else ["--init calibrated (scales each layer's weights until it fires 5-25 %)"]
            node = graph[name] if graph is not None and name in graph else None
            # a neuron reading a synapse directly can take a batchnorm between them (a recurrent sum cannot)
            if node is not None and graph.inputs(name)[0].op in GroupOp.SYNAPSE:
                twin = name[:-2] if node.stream == Stream.B and name.endswith("_b") else name
                hints.append(f"g.batchnorm(...) on the current of {twin!r} in the model file (B mirrors it)")
            hints.append("a lower threshold (--lif v_th=0.15)")
            out.append(f"layer {name} is silent ({100 * r:.3f} % firing): it passes no information; try "
                       + ", or ".join(hints))
        elif r > SATURATED:
            out.append(f"layer {name} is saturated ({100 * r:.1f} % firing); try a higher v_th or a smaller lr")
    return out


def _check_finite(rt, losses: dict[str, float], where: str) -> None:
    for name, v in losses.items():
        if not math.isfinite(v):
            node = rt.graph[name] if name in rt.graph else None
            layer = f" (layer {node.attrs['layer']})" if node is not None else ""
            raise TrainingError(f"loss {name}{layer} is {v} {where}; training stopped")
    for key, p in rt.params.items():
        if not bool(torch.isfinite(p).all()):
            raise TrainingError(f"weights of layer {key.rsplit('.', 1)[0]} ({key}) are not finite {where}; "
                                "training stopped")
    for key, v in rt.state.items():  # batchnorm running statistics: NaN there spares the losses but not eval
        if not bool(torch.isfinite(v).all()):
            raise TrainingError(f"{key.rsplit('.', 1)[1]} of layer {key.rsplit('.', 1)[0]} ({key}) is not finite "
                                f"{where}; training stopped")


class Trainer:
    """Runs epochs, writes ``metrics.jsonl`` and ``checkpoint.pt`` into ``out`` after each epoch."""

    def __init__(self, model: Model | Program, data: Dataset, cfg: TrainConfig, out: Path, rule: str = "bsd",
                 backend: str | None = None, log: Callable[[dict], None] = lambda rec: None,
                 progress: Callable | None = None, compile: str = "off", say: Callable[[str], None] | None = None):
        """``model``: a compiled ``Program`` (its rule wins), or a ``Model`` compiled here for ``rule``. ``say``
        prints a note (default: to stderr), e.g. when BSDGRAPH_THREADS=auto changes the thread count."""
        self.program = model if isinstance(model, Program) else compile_model(model, rule)
        self.model, self.rule = self.program.model, self.program.rule
        self.graph = self.program.graph
        self.data, self.cfg, self.out = data, cfg, Path(out)
        self.compile = compile  # torch.compile of the step (runtime/executor.py): off | auto | inductor | aot_eager
        self.check_every: int | None = None  # steps between NaN checks (None: 1 on the CPU, CHECK_EVERY_ON_A_GPU)
        self.backend = backend or default_backend()
        self.log, self.progress = log, progress
        # CPU threads (train/threads.py): all cores but one unless the user chose; fixed for the run (the count
        # changes the results), or tuned on real steps with BSDGRAPH_THREADS=auto
        fixed = training_threads()
        torch.set_num_threads(fixed or cores())
        self.threads = ThreadTuner(cores(), say=say) if fixed is None and cores() > 1 else None
        if cfg.augment and len(data.sample_shape) != 3:
            raise TrainingError(f"--augment shifts and flips images, but samples have shape {data.sample_shape}")
        self.val, self.input_stats = self._prepare(data)
        self.rt = self._runtime()
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.epoch, self.history = 0, []
        self.checkpoint_path = self.out / "checkpoint.pt"
        self.best_path = self.out / "best.pt"  # with a validation split: the epoch best on it

    # -- set-up
    def _prepare(self, data) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, dict | None]:
        """Hold out the validation split and standardise the stimulus (train/prepare.py), as ``cfg`` asks:
        (x_val, y_val) or None, the input statistics or None. ``self.data`` becomes what the steps read."""
        cfg = self.cfg
        if not (cfg.val_split or cfg.standardize):
            return None, None
        wanted = ", ".join(k for k in ("val_split", "standardize") if getattr(cfg, k))
        if not isinstance(data, Dataset):
            raise TrainingError(f"{wanted} need(s) the training data in memory (arrays or a Dataset), not a stream")
        x = self.graph.by_op(Op.INPUT)[0]
        if cfg.standardize and x.attrs["encoding"] == "poisson":
            raise TrainingError("standardize shifts the stimulus below 0, but Poisson encoding reads it as a "
                                "spike probability in [0, 1]: drop standardize or use --encoding direct")
        if cfg.val_split and data.n_train < 2:
            raise TrainingError(f"val_split={cfg.val_split} needs at least 2 training samples, got {data.n_train}")
        val = None
        if cfg.val_split:
            data, val = holdout(data, cfg.val_split)
        stats = input_stats(data.x_train, x.attrs["encoding"] == "sequence") if cfg.standardize else None
        if stats is not None:
            data = standardized(data, stats)
            val = (standardize(val[0], stats), val[1]) if val else None
        self.data = data
        return val, stats

    def initialise(self) -> dict[str, tuple[float, float]]:
        """Apply ``init = calibrated`` on the first training batch (before any step)."""
        if self.cfg.init != "calibrated":
            return {}
        params = init_params(self.graph, self.cfg.seed)
        x, y = self.data.calibration_batch(256, self.cfg.seed)
        report = calibrate(self.graph, params, x, y, band=self.cfg.init_band)
        self.rt = self._runtime(params=params)
        return report

    def _runtime(self, params=None, state=None):
        """The one place a trainer builds its runtime (parallel/train_parallel.py overrides it)."""
        return make_runtime(self.program, self.backend, self.cfg, params=params, state=state, compile=self.compile)

    def resume(self, changing: frozenset[str] = frozenset()) -> None:
        """Continue the run of ``checkpoint.pt``. Its training options must be today's, but for ``epochs`` (a run
        is resumed to train longer) and the options in ``changing`` (those the user changed on purpose, e.g. with
        an explicit --lr); any other difference (an edited TRAIN dict) is refused, naming each option."""
        ck = require(load_checkpoint(self.checkpoint_path), self.checkpoint_path)
        self._check_options(ck.get("train", {}), changing)
        self._restore(ck)

    def _check_options(self, trained: dict[str, Any], changing: frozenset[str]) -> None:
        now = dataclasses.asdict(self.cfg)
        same = lambda a, b: (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list) else b)  # noqa: E731
        differ = [k for k in now if k != "epochs" and k in trained and not same(trained[k], now[k])
                  and k not in changing]
        if differ:
            listing = ", ".join(f"{k} {trained[k]!r} -> {now[k]!r}" for k in differ)
            raise TrainingError(f"{self.checkpoint_path}: the run trained with other options than it would resume "
                                f"with ({listing}); restore them in the model file's TRAIN, or pass each on the "
                                "command line (e.g. --lr) to change it on purpose")

    def _restore(self, ck: dict[str, Any]) -> None:
        if not same_graph(ck.get("graph"), self.graph) or ck.get("rule") != self.rule:
            raise CheckpointError(f"{self.checkpoint_path}: was written for another graph or rule "
                                  f"({ck.get('rule')}); train into a fresh --out directory or fix the model")
        self.rt = self._runtime(params=ck["params"], state=ck["state"])
        try:  # require() checked its structure; what torch still refuses is named, not a traceback
            self.rt.optimizer.load_state_dict(ck["optimizer"])
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"{self.checkpoint_path}: unusable checkpoint: optimizer state does not fit the "
                                  f"model ({type(err).__name__}: {err})") from None
        self.rt.steps = ck["steps"]
        self.gen.set_state(ck["rng"])
        self.epoch, self.history = ck["epoch"], list(ck["history"])

    def _save(self) -> None:
        payload = self._payload()
        # best.pt first: a run killed between the two files resumes before this epoch and writes both again
        if self.val is not None and best_epoch(self.history) == self.epoch:
            self._write(self.best_path, payload)
        self._write(self.checkpoint_path, payload)

    def _write(self, path: Path, payload: dict[str, Any]) -> None:
        try:
            save_checkpoint(path, payload)
        except (OSError, MemoryError) as err:  # disk full, quota, read-only, no memory for the serialised copy:
            # save_checkpoint left the previous checkpoint intact
            held = self.epoch - 1 if path == self.checkpoint_path else best_epoch(self.history[:-1])
            kept = f"it still holds epoch {held}" if path.is_file() else "no checkpoint was written"
            why, fix = ((err.strerror or str(err), "free space") if isinstance(err, OSError) else
                        (f"out of memory: {err}", "free memory or make the model smaller"))
            raise TrainingError(f"{path}: could not write the checkpoint of epoch {self.epoch} "
                                f"({why}); {kept}. Fix: {fix}, then train again with --resume") from None

    def _payload(self) -> dict[str, Any]:
        return {
            "model": str(self.model.path), "graph": to_json(self.graph), "rule": self.rule, "target": self.model.target,
            "backend": self.backend, "train": dataclasses.asdict(self.cfg),
            "params": {k: v.detach().cpu() for k, v in self.rt.params.items()},
            "state": {k: v.cpu() for k, v in self.rt.state.items()},
            "optimizer": self.rt.optimizer.state_dict(), "rng": self.gen.get_state(), "epoch": self.epoch,
            "steps": self.rt.steps, "history": self.history,
            **({"input_stats": self.input_stats} if self.input_stats else {}),
        }

    # -- the loop
    def run(self) -> list[dict]:
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.checkpoint_path)  # a run killed after its last save has no save to do it
        self._write_metrics(self.history, "w")
        while self.epoch < self.cfg.epochs and not self.stopped_early():
            record = self._epoch()
            self.epoch += 1
            self.history.append(record)
            self._save()
            self._write_metrics([record], "a")
            self.log(record)
        return self.history

    def stopped_early(self) -> bool:
        """Whether ``patience`` epochs have passed since the best validation epoch (training stops there)."""
        best = best_epoch(self.history)
        return bool(self.cfg.patience and best and len(self.history) - best >= self.cfg.patience)

    def _write_metrics(self, records: list[dict], mode: str) -> None:
        """Append records to metrics.jsonl, or ("w") replace it atomically with exactly the checkpoint's history:
        a run killed between its checkpoint and its metrics line, or in the middle of that line, would otherwise
        resume with a missing or torn record (docs/reliability.md, defect 18)."""
        path = self.out / "metrics.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in records)
        try:
            if mode == "a":
                with open(path, "a") as fh:
                    fh.write(text)
                return
            tmp = path.with_name(f"{path.name}.tmp")  # a killed writer's leftover is overwritten next time
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as err:
            raise TrainingError(f"{path}: could not write the metrics ({err.strerror or err}); the checkpoint of "
                                f"epoch {self.epoch} is intact. Fix: free space, then train again with "
                                "--resume") from None

    def _epoch(self) -> dict:
        lr = self.cfg.lr_at(self.epoch)
        set_lr(self.rt, lr)
        loss_sum: dict[str, Any] = {}
        rate_sum: dict[str, Any] = {}
        window: dict[str, Any] = {}  # losses since the last check (on the device: adding them reads nothing back)
        every = self.check_every or (1 if getattr(self.rt, "device", torch.device("cpu")).type == "cpu"
                                     else CHECK_EVERY_ON_A_GPU)
        n_batches, n_samples, start = 0, 0, time.perf_counter()
        it, total = self.data.train_batches(self.cfg.batch_size, self.gen)
        for xb, yb in (self.progress(it, total, self.epoch) if self.progress else it):
            if self.cfg.augment:
                xb = augment(xb, self.gen)
            if not bool(torch.isfinite(xb).all()):  # the loaders refuse such data; a Dataset built in Python may not
                stimulus = self.graph.by_op(Op.INPUT)[0].name
                raise TrainingError(f"the input batch of epoch {self.epoch + 1}, step {n_batches + 1} holds NaN or "
                                    f"Inf values (layer 0, the stimulus {stimulus!r}); training stopped")
            if self.threads:
                losses, rates = self.threads.run(lambda: step_values(self.rt, xb, yb), len(xb))
            else:
                losses, rates = step_values(self.rt, xb, yb)
            n_batches += 1
            n_samples += len(xb)
            for acc, values in ((loss_sum, losses), (rate_sum, rates), (window, losses)):
                for k, v in values.items():
                    acc[k] = acc.get(k, 0.0) + v
            if n_batches % every == 0 or n_batches == total:
                where = f"at epoch {self.epoch + 1}, step {n_batches}"
                _check_finite(self.rt, {k: float(v) for k, v in window.items()},
                              where + (f" (losses checked every {every} steps)" if every > 1 else ""))
                window = {}
        if window:  # a stream of unknown length ends without a last check
            _check_finite(self.rt, {k: float(v) for k, v in window.items()}, f"at the end of epoch {self.epoch + 1}")
        if n_batches == 0:
            raise TrainingError(f"epoch {self.epoch + 1} had no training batch: the data gave none")
        seconds = time.perf_counter() - start
        rates = {k: float(v) / n_batches for k, v in rate_sum.items()}
        test = evaluate_batches(self.rt, self.data.test_batches(self.cfg.eval_batch_size))
        val = {}
        if self.val is not None:
            val = {f"val_{k}": v for k, v in evaluate_batches(self.rt, batches(*self.val, self.cfg.eval_batch_size))
                   .items() if k in ("accuracy", "mse")}
            val["best_epoch"] = best_epoch([*self.history, {"epoch": self.epoch + 1, **val}])
        return {
            "epoch": self.epoch + 1, "lr": lr, **{f"test_{k}": v for k, v in test.items()}, **val,
            "losses": {k: float(v) / n_batches for k, v in loss_sum.items()}, "rates": rates,
            "warnings": health_warnings(rates, self.graph, self.cfg.init == "calibrated"),
            "seconds": round(seconds, 3),
            "samples_per_s": round(n_samples / seconds, 1), "threads": torch.get_num_threads(), "rule": self.rule,
            "backend": self.backend,
        }


def best_epoch(history: list[dict]) -> int | None:
    """The epoch (1-based) of the best validation result in ``history``: highest accuracy, or lowest MSE; the
    earliest of equals. None without validation results."""
    scored = [(r["val_accuracy"], -r["epoch"]) if "val_accuracy" in r else (-r["val_mse"], -r["epoch"])
              for r in history if "val_accuracy" in r or "val_mse" in r]
    return -max(scored)[1] if scored else None


def set_lr(rt, lr: float) -> None:
    """The learning rate of ``rt`` from now on (a compiled runtime also keeps it in a tensor its step reads)."""
    if hasattr(rt, "set_lr"):
        rt.set_lr(lr)
        return
    set_group_lrs(rt.optimizer, lr)


def step_values(rt, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """One training step's losses and firing rates as the runtime leaves them: on a GPU 0-d device tensors, read
    back only where the trainer checks them (every ``CHECK_EVERY_ON_A_GPU`` steps and at the epoch's end)."""
    if hasattr(rt, "step_values"):
        return rt.step_values(x, y)
    result = rt.step(x, y)
    return result.losses, result.rates


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (its stderr is no terminal, yet a bar shows in the notebook)."""
    return "ipykernel" in sys.modules


def tqdm_progress(stream=None, what: str | None = None):
    """A tqdm progress bar when ``stream`` (default: stderr at call time) is a terminal or the process is a Jupyter
    kernel (tqdm.auto: a notebook widget where ipywidgets is installed, text otherwise), else None: per epoch
    (``progress(it, total, epoch)``), or, given ``what``, one bar so named (``progress(it, total)``)."""
    stream = stream if stream is not None else sys.stderr
    if not stream.isatty() and not in_notebook():
        return None
    if stream.isatty():
        from tqdm import tqdm
    else:
        from tqdm.auto import tqdm

    if what is not None:
        return lambda it, total: tqdm(it, total=total, desc=what, leave=False, file=stream)
    return lambda it, total, epoch: tqdm(it, total=total, desc=f"epoch {epoch + 1}", leave=False, file=stream)


def same_graph(saved: str | None, graph) -> bool:
    """Whether a checkpoint's saved graph JSON is ``graph``, after reading it back (so attributes added since it
    was written take their defaults instead of making an old checkpoint look like another model's)."""
    from bsdgraph.ir.printer import from_json
    from bsdgraph.ir.diagnostics import GraphError

    try:
        return isinstance(saved, str) and to_json(from_json(saved)) == to_json(graph)
    except GraphError:
        return False


def load_for_eval(model: Model | Program, checkpoint: Path, backend: str | None = None):
    """A runtime holding a checkpoint's weights, checked against ``model``'s graph (compiled for the checkpoint's
    rule)."""
    ck = require(load_checkpoint(checkpoint), checkpoint, ("graph", "rule", "params", "state", "epoch"))
    cfg = TrainConfig.from_model(dict(ck.get("train", {})))  # require() checked it
    program = model if isinstance(model, Program) and model.rule == ck["rule"] else compile_model(
        model.model if isinstance(model, Program) else model, ck["rule"])
    if not same_graph(ck.get("graph"), program.graph):
        raise CheckpointError(f"{checkpoint}: was trained on a different graph than {program.model.path}")
    rt = make_runtime(program, backend or default_backend(), cfg, params=ck["params"], state=ck["state"],
                      training=False)
    return with_stats(rt, ck.get("input_stats")), ck
