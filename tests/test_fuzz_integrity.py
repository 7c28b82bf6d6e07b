"""Fuzzing what bsdgraph must never trust: checkpoints (field corruptions with a valid checksum, flipped and torn
bytes without one), NIR files with hostile metadata and node names, ``--lif`` / ``--bsd`` and numeric flag values,
and damaged run directories (docs/reliability.md).

The properties, each of which fails if the product is wrong:

- a checkpoint corruption that is certainly wrong ends every command that reads the checkpoint in exit 1 with one
  ``error:`` line naming the file, and leaves the file byte-identical; a harmless one (classified below, with the
  reason) ends in exit 0; a successful ``--resume`` leaves a run directory that ``plot`` reads;
- a damaged checkpoint is never used: ``load_checkpoint`` refuses it or returns exactly what was written;
- no byte of a NIR file's metadata or node names ever runs as code, and none is mangled on the way;
- a bad ``KEY=VALUE`` or numeric flag is a usage error (exit 2) naming the flag, predicted by an oracle written
  from the documented rules, never exit 1 and never a traceback;
- a damaged run directory is resumed, plotted, refused or replaced as documented, never losing the checkpoint.
"""

from __future__ import annotations

import ast
import builtins
import copy
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from bsdgraph.train.checkpoint import TRAINING_KEYS, CheckpointError, digest, load_checkpoint, require
from tests.fuzz_helpers import (
    FUZZ, TINY_MODEL, assert_clean, cli, fresh_dir, tiny_arrays, write, write_npz,
)

# A tiny image MLP with a batchnorm: 1x4x4 inputs (so that `recall` can render B's images), a batchnorm between
# the linear layer and its LIF (running statistics in the checkpoint's `state`), 4 classes.
BN_MODEL = '''"""A tiny image MLP with batchnorm for the integrity fuzzer."""
from bsdgraph import GraphBuilder

TRAIN = dict(epochs=1, batch_size=20)


def build():
    g = GraphBuilder("tiny_bn", T=2)
    h = g.lif(g.batchnorm(g.linear(g.flatten(g.input((1, 4, 4))), 12)))
    g.output(g.linear(h, 4))
    return g.build()
'''


class Trained:
    """The module's trained run, and what the tests derive from it (shown by its folder: hypothesis prints it)."""

    def __init__(self, root: Path, model: Path, npz: Path, x: Path, run: Path, doc: dict, other_graph: str,
                 dead_pid: int):
        self.root, self.model, self.npz, self.x, self.run = root, model, npz, x, run
        self.doc = doc                  # the checkpoint as torch.load(weights_only=True) reads it
        self.other_graph = other_graph  # the saved-graph JSON of another model (TINY_MODEL, F + B)
        self.dead_pid = dead_pid        # the pid of a process that has ended

    def __repr__(self) -> str:
        return f"Trained({self.root})"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    from bsdgraph.compiler.feedback import derive_feedback
    from bsdgraph.compiler.model_file import load_model
    from bsdgraph.ir.printer import to_json

    root = tmp_path_factory.mktemp("integrity")
    model = write(root / "tiny_bn.py", BN_MODEL)
    npz = write_npz(root / "tiny_bn.npz", tiny_arrays(60, 20, (1, 4, 4), 4))
    x = root / "x.npz"
    np.savez(x, x=np.random.default_rng(0).random((3, 1, 4, 4), np.float32))
    assert_clean(cli("train", model, "--npz", npz, "--out", root / "run", "--epochs", "2"), codes=(0,))
    doc = torch.load(root / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    other = load_model(write(root / "tiny.py", TINY_MODEL))
    ended = subprocess.Popen(["true"])
    ended.wait()
    return Trained(root, model, npz, x, root / "run", doc, to_json(derive_feedback(other.graph, other.bsd)),
                   ended.pid)


def copy_run(t: Trained, parent: Path) -> Path:
    run = fresh_dir(parent, "run")
    shutil.rmtree(run)
    shutil.copytree(t.run, run)
    return run


def same(a, b) -> bool:
    """Equal as checkpoint contents: tensors by dtype, shape and values, containers by type and order."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


# ----------------------------------------------------------------------------------------------- 1. field corruptions

# Commands that read a checkpoint, and the top-level keys each requires (`require(doc, path, keys)` in their code):
# eval and recall go through train.load_for_eval, export-nir and run through cli_interop.load_network, bench
# --energy through cli_bench, plot and --resume need a whole training checkpoint. Every command runs
# checkpoint_schema.problems() over every field the file holds, whether it needs that field or not.
EVAL_KEYS = {"graph", "rule", "params", "state", "epoch"}
WEIGHT_KEYS = {"params", "state"}
NEEDS = {"eval": EVAL_KEYS, "recall": EVAL_KEYS, "export-nir": WEIGHT_KEYS, "bench": WEIGHT_KEYS,
         "run": WEIGHT_KEYS, "plot": set(TRAINING_KEYS), "resume": set(TRAINING_KEYS)}
COMMANDS = tuple(NEEDS)
COMPARES_GRAPH = {"eval", "recall", "resume"}  # they check the saved graph (and rule) against the model file


def _argv(cmd: str, t: Trained, run: Path) -> tuple:
    ck = run / "checkpoint.pt"
    return {
        "eval": ("eval", t.model, "--checkpoint", ck, "--npz", t.npz),
        "recall": ("recall", t.model, "--checkpoint", ck, "--out", run / "recall.png"),
        "export-nir": ("export-nir", t.model, "--checkpoint", ck, "-o", run / "net.nir"),
        "bench": ("bench", t.model, "--energy", "--checkpoint", ck, "--npz", t.npz, "--threads", "1", "--steps", "1",
                  "--warmup", "0", "--energy-samples", "2"),
        "run": ("run", t.model, "--checkpoint", ck, "--input", t.x),
        "plot": ("plot", run, "--npz", t.npz),
        "resume": ("train", t.model, "--npz", t.npz, "--out", run, "--epochs", "3", "--resume"),
    }[cmd]


# A corruption edits a deep copy of the checkpoint and returns (what, verdict). The verdict is 1 (certainly wrong:
# every command must refuse it), 0 (harmless: every command must accept it), None (either, cleanly), or a dict
# {command: 1 | 0 | None} with "*" for the rest. Each belongs to a group of fields whose checks depend on each
# other (epoch and history; graph, params, state and optimizer): two corruptions of one example come from
# different groups, so that neither can undo or mask the other.
GROUP = {"graph": "weights", "params": "weights", "state": "weights", "optimizer": "weights", "epoch": "progress",
         "history": "progress", "format": "header", "version": "header", "checksum": "header"}
CORRUPTIONS: dict[str, tuple[str, object, bool]] = {}  # name -> (group, fn(draw, doc, t), after the checksum?)


def corruption(name: str, group: str, after_checksum: bool = False):
    def register(fn):
        CORRUPTIONS[name] = (group, fn, after_checksum)
        return fn

    return register


def _param_key(draw, doc, want=lambda k, v: True) -> str:
    return draw(st.sampled_from(sorted(k for k, v in doc["params"].items() if want(k, v))))


def _element(draw, t: torch.Tensor) -> int:
    return draw(st.integers(0, t.numel() - 1))


WRONG_TYPES = [None, 7, -1.5, "x", [], {"x": 1}, True, (1, 2), torch.zeros(3)]


@corruption("wrong type", "by field")
def _wrong_type(draw, doc, t):
    # A value of the wrong type for a field the schema knows. Not wrong, so left out: a string for `model` (any
    # path is a path) and 7 for `steps` (any whole number >= 0 is a step count).
    key = draw(st.sampled_from(["model", "rule", "target", "graph", "train", "params", "state", "rng", "epoch",
                                "steps", "history", "optimizer"]))
    value = draw(st.sampled_from([v for v in WRONG_TYPES if not (key == "model" and isinstance(v, str)) and not (
        key == "steps" and type(v) is int)]))
    doc[key] = value
    return f"{key} = {value!r}", 1, key


# Removing a key: a command refuses a file without a key it requires (format and version: every command), and
# accepts one without a key it never reads (a weights file of import-nir holds params and state only, and
# export-nir/run read it).
@corruption("remove key", "by field")
def _remove_key(draw, doc, t):
    key = draw(st.sampled_from(sorted(k for k in doc if k != "checksum")))
    del doc[key]
    verdict = {cmd: 1 if key in NEEDS[cmd] or key in ("format", "version") else 0 for cmd in COMMANDS}
    return f"remove {key}", verdict, key


@corruption("remove checksum", "header", after_checksum=True)
def _remove_checksum(draw, doc, t):
    del doc["checksum"]
    return "remove checksum", 1, "checksum"


@corruption("wrong checksum", "header", after_checksum=True)
def _wrong_checksum(draw, doc, t):
    doc["checksum"] = draw(st.sampled_from(["0" * 64, "", None, doc["checksum"][:-1], doc["checksum"].upper(), 5]))
    return f"checksum = {doc['checksum']!r}", 1, "checksum"


@corruption("format", "header")
def _format(draw, doc, t):
    doc["format"] = draw(st.sampled_from(["bsdgraph.weights", "", None, 2, "BSDGRAPH.CHECKPOINT", b"x"]))
    return f"format = {doc['format']!r}", 1, "format"


@corruption("version", "header")
def _version(draw, doc, t):
    # 1 is a real version (written before the checksum existed): the file is then read without verifying the
    # checksum, and this one is intact. 2.0 and True compare equal to 2 and 1: left open.
    value, verdict = draw(st.sampled_from([(3, 1), (0, 1), ("2", 1), (None, 1), (-1, 1), ([2], 1),
                                           (torch.zeros(3), 1), (torch.tensor([2, 2]), 1), (1, 0), (2.0, None),
                                           (True, None)]))
    doc["version"] = value
    return f"version = {value!r}", verdict, "version"


@corruption("non-finite weight", "weights")
def _nonfinite_weight(draw, doc, t):
    key = _param_key(draw, doc)  # F and B, weights, biases, batchnorm scales
    value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    doc["params"][key].view(-1)[_element(draw, doc["params"][key])] = value
    return f"{key} holds {value}", 1, "params"


@corruption("non-finite statistic", "weights")
def _nonfinite_statistic(draw, doc, t):
    key = draw(st.sampled_from(sorted(doc["state"])))
    value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    doc["state"][key].view(-1)[_element(draw, doc["state"][key])] = value
    return f"{key} holds {value}", 1, "state"


@corruption("negative variance", "weights")
def _negative_variance(draw, doc, t):
    key = draw(st.sampled_from(sorted(k for k in doc["state"] if k.endswith("running_var"))))
    doc["state"][key].view(-1)[_element(draw, doc["state"][key])] = -draw(st.sampled_from([1e-3, 1.0, 1e30]))
    return f"{key} holds a negative variance", 1, "state"


@corruption("statistic shape or presence", "weights")
def _statistic(draw, doc, t):
    key = draw(st.sampled_from(sorted(doc["state"])))
    how = draw(st.sampled_from(["missing", "short", "long", "2-d"]))
    s = doc["state"][key]
    if how == "missing":
        del doc["state"][key]
    else:
        doc["state"][key] = {"short": s[:-1], "long": torch.cat([s, s[:1]]), "2-d": s[None]}[how].clone()
    return f"{key} {how}", 1, "state"


@corruption("extra statistic", "weights")
def _extra_statistic(draw, doc, t):
    # A running statistic no batchnorm node has: unlike an extra weight, the schema does not look; never read
    # (left open).
    doc["state"]["ghost.running_mean"] = torch.zeros(3)
    return "extra state ghost.running_mean", None, "state"


@corruption("param shape", "weights")
def _param_shape(draw, doc, t):
    key = _param_key(draw, doc)
    p = doc["params"][key]
    how = draw(st.sampled_from(["short", "long", "flat", "extra axis"] + (["transposed"] if p.dim() == 2 else [])))
    doc["params"][key] = {"short": lambda: p[..., :-1], "long": lambda: torch.cat([p, p[..., :1]], -1),
                          "flat": lambda: p.reshape(-1)[:-1] if p.dim() == 1 else p.reshape(-1),
                          "extra axis": lambda: p[None], "transposed": lambda: p.t()}[how]().clone()
    return f"{key} {how}", 1, "params"


@corruption("param missing or extra", "weights")
def _param_presence(draw, doc, t):
    if draw(st.booleans()):
        key = _param_key(draw, doc)
        del doc["params"][key]
        return f"remove {key}", 1, "params"
    key = draw(st.sampled_from(["ghost.weight", "fc1.weight2", "fc1.scale", "bn1.running_mean", ""]))
    doc["params"][key] = torch.zeros(2)
    return f"extra param {key!r}", 1, "params"


@corruption("param dtype", "weights")
def _param_dtype(draw, doc, t):
    key = _param_key(draw, doc)
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.bool, torch.uint8, torch.float64, torch.float16,
                                  torch.bfloat16]))
    doc["params"][key] = doc["params"][key].to(dtype)
    # an integer weight is refused by the schema; another float width is not what bsdgraph writes (float32), and
    # either a refusal or a run in float32 is right, as long as it is clean
    return f"{key} as {dtype}", 1 if not dtype.is_floating_point else None, "params"


@corruption("optimizer moments", "weights")
def _optimizer_moments(draw, doc, t):
    i = draw(st.sampled_from(sorted(doc["optimizer"]["state"])))
    st_ = doc["optimizer"]["state"][i]
    key = draw(st.sampled_from(["exp_avg", "exp_avg_sq"]))
    how = draw(st.sampled_from(["nan", "inf", "shape", "negative", "integer", "step nan", "step negative",
                                "step text"]))
    if how in ("nan", "inf"):
        st_[key].view(-1)[_element(draw, st_[key])] = math.nan if how == "nan" else math.inf
    elif how == "shape":
        st_[key] = torch.cat([st_[key].reshape(-1), st_[key].reshape(-1)[:1]])
    elif how == "negative":  # a running mean of squares is never negative; sqrt of it is NaN in the next step
        key = "exp_avg_sq"
        st_[key] = -st_[key] - 1
    elif how == "integer":  # AdamW never holds integer moments; the fractions would be lost
        st_[key] = (st_[key] * 1e3).to(torch.int64)
    elif how == "step nan":
        st_["step"] = torch.tensor(math.nan)
    elif how == "step negative":  # the step count of AdamW's bias correction starts at 0 and counts up
        st_["step"] = torch.tensor(-5.0)
    else:
        st_["step"] = "x"
    return f"optimizer state {i} {key} {how}", 1, "optimizer"


@corruption("optimizer indices", "weights")
def _optimizer_indices(draw, doc, t):
    opt = doc["optimizer"]
    group = opt["param_groups"][0]
    n = len(group["params"])
    how = draw(st.sampled_from(["out of range", "missing", "duplicate", "negative", "state out of range",
                                "state key text", "param_groups not a list", "no state", "params not a list"]))
    if how == "out of range":
        group["params"] = group["params"] + [n + draw(st.integers(0, 10 ** 6))]
    elif how == "missing":
        group["params"] = group["params"][:-1]
    elif how == "duplicate":
        group["params"] = group["params"][:-1] + group["params"][:1]
    elif how == "negative":
        group["params"] = [-1] + group["params"][1:]
    elif how == "state out of range":
        opt["state"][n + draw(st.integers(0, 10))] = opt["state"][0]
    elif how == "state key text":
        opt["state"]["0"] = opt["state"].pop(0)
    elif how == "param_groups not a list":
        opt["param_groups"] = group
    elif how == "no state":
        del opt["state"]
    else:
        group["params"] = "0-11"
    return f"optimizer {how}", 1, "optimizer"


@corruption("optimizer hyper-parameters", "weights")
def _optimizer_hyper(draw, doc, t):
    # AdamW's settings in param_groups are loaded with the state and used by the next step (lr is reset per
    # epoch; the rest is not): values torch never writes are certainly wrong.
    group = doc["optimizer"]["param_groups"][0]
    key, value = draw(st.sampled_from([("betas", "x"), ("betas", (math.nan, 0.999)), ("betas", (0.9,)),
                                       ("eps", math.nan), ("eps", "x"), ("weight_decay", "x"),
                                       ("weight_decay", math.inf), ("amsgrad", True), ("betas", None)]))
    if value is None:
        del group[key]
    else:
        group[key] = value
    return f"optimizer {key} = {value!r}", 1, "optimizer"


@corruption("graph", "weights")
def _graph(draw, doc, t):
    how = draw(st.sampled_from(["truncated", "another model", "not JSON", "empty", "edited", "renamed"]))
    g = doc["graph"]
    if how == "truncated":
        doc["graph"] = g[: draw(st.integers(0, len(g) - 1))]
    elif how == "another model":
        doc["graph"] = t.other_graph
    elif how == "not JSON":
        doc["graph"] = "{" + g
    elif how == "empty":
        doc["graph"] = "{}"
    elif how == "edited":  # the same shapes, another threshold: only the commands that compare graphs can tell
        doc["graph"] = g.replace('"v_th": 0.3', '"v_th": 0.5')
        assert doc["graph"] != g
        return "graph edited (v_th)", {"*": None, **{c: 1 for c in COMPARES_GRAPH}}, "graph"
    else:
        doc["graph"] = g.replace('"name": "tiny_bn"', '"name": "other"', 1)
        assert doc["graph"] != g
        return "graph renamed", {"*": None, **{c: 1 for c in COMPARES_GRAPH}}, "graph"
    return f"graph {how}", 1, "graph"


@corruption("rng", "rng")
def _rng(draw, doc, t):
    r = doc["rng"]
    how = draw(st.sampled_from(["short", "long", "int64", "2-d", "zeros", "float"]))
    doc["rng"] = {"short": lambda: r[:-1].clone(), "long": lambda: torch.cat([r, r[:1]]), "int64": lambda: r.long(),
                  "2-d": lambda: r.reshape(2, -1).clone(), "zeros": lambda: torch.zeros_like(r),
                  "float": lambda: r.float()}[how]()
    return f"rng {how}", 1, "rng"


@corruption("epoch", "progress")
def _epoch(draw, doc, t):
    value = draw(st.sampled_from([-1, 1.5, True, 1, 3, 10 ** 30, "2", 2.0, None]))
    doc["epoch"] = value  # the history holds 2 records: any other value is a mismatch
    return f"epoch = {value!r}", 1, "epoch"


@corruption("history", "progress")
def _history(draw, doc, t):
    h = doc["history"]
    i = draw(st.integers(0, len(h) - 1))
    how = draw(st.sampled_from(["no losses", "no rates", "no epoch", "swapped", "truncated", "duplicated",
                                "a list", "text loss", "none rate", "renumbered", "not a list"]))
    if how in ("no losses", "no rates", "no epoch"):
        del h[i][how.split()[1]]
    elif how == "swapped":
        h[0], h[1] = h[1], h[0]
    elif how == "truncated":
        doc["history"] = h[:1]
    elif how == "duplicated":
        h.append(copy.deepcopy(h[-1]))
    elif how == "a list":
        h[i] = list(h[i].items())
    elif how == "text loss":
        h[i]["losses"][next(iter(h[i]["losses"]))] = "0.5"
    elif how == "none rate":
        h[i]["rates"][next(iter(h[i]["rates"]))] = None
    elif how == "renumbered":
        h[i]["epoch"] = 7
    else:
        doc["history"] = {"1": h[0], "2": h[1]}
    return f"history record {i + 1}: {how}", 1, "history"


@corruption("history metric", "progress")
def _history_metric(draw, doc, t):
    # Records that bsdgraph never writes and `plot` refuses (docs/reliability.md, defect 24): --resume copies the
    # history into metrics.jsonl, so it must refuse them too; the other commands never read the history.
    h = doc["history"][draw(st.integers(0, 1))]
    how = draw(st.sampled_from(["text metric", "no metric", "renamed rate", "extra loss", "bool metric"]))
    if how == "text metric":
        h["test_accuracy"] = "x"
    elif how == "no metric":
        del h["test_accuracy"]
    elif how == "renamed rate":
        h["rates"]["h9"] = h["rates"].pop(next(iter(h["rates"])))
    elif how == "extra loss":
        h["losses"]["ce9"] = 1.0
    else:
        h["test_accuracy"] = True
    return f"history {how}", {"*": None, "resume": 1}, "history"


@corruption("steps", "steps")
def _steps(draw, doc, t):
    value, verdict = draw(st.sampled_from([(-1, 1), (1.5, 1), (True, 1), ("6", 1), (None, 1), (10 ** 30, None)]))
    doc["steps"] = value
    return f"steps = {value!r}", verdict, "steps"


@corruption("train", "train")
def _train(draw, doc, t):
    key, value = draw(st.sampled_from([("bogus", 1), ("lr", "x"), ("lr", 0.0), ("lr", math.nan), ("epochs", 0),
                                       ("batch_size", 1.5), ("seed", 2 ** 70), ("augment", "yes"),
                                       ("schedule", "x"), ("init", None), ("init_band", (0.5, 0.1)),
                                       ("eval_batch_size", 0), ("clip", -1.0), ("weight_decay", "x"), (1, 2)]))
    doc["train"][key] = value
    return f"train[{key!r}] = {value!r}", 1, "train"


@corruption("train option removed", "train")
def _train_removed(draw, doc, t):
    # a training option the file does not record takes its default (a checkpoint older than the option has none)
    key = draw(st.sampled_from(sorted(doc["train"])))
    del doc["train"][key]
    return f"train without {key}", 0, "train"


@corruption("rule", "rule")
def _rule(draw, doc, t):
    value = draw(st.sampled_from(["bptt", "x", "BSD", "", None]))
    doc["rule"] = value
    if value == "bptt":  # a valid rule, not the one of this graph: the commands that compare graphs refuse it
        return "rule = 'bptt'", {"*": None, **{c: 1 for c in COMPARES_GRAPH}}, "rule"
    return f"rule = {value!r}", 1, "rule"


@corruption("target", "target")
def _target(draw, doc, t):
    value = draw(st.sampled_from(["input", "x", "", None, "LABELS"]))
    doc["target"] = value
    return f"target = {value!r}", None if value == "input" else 1, "target"


@corruption("model path", "model")
def _model(draw, doc, t):
    # The path of the model file trained, for display only (nothing imports it: docs/reliability.md): any string
    # is harmless.
    doc["model"] = draw(st.sampled_from(["/nonexistent/model.py", "", "x\n'\"; import os", str(t.model) + "x"]))
    return f"model = {doc['model']!r}", 0, "model"


@corruption("backend", "backend")
def _backend(draw, doc, t):
    # written for the record and never read (no schema check either): left open
    doc["backend"] = draw(st.sampled_from([5, "triton", None, "x"]))
    return f"backend = {doc['backend']!r}", None, "backend"


@corruption("extra key", "extra")
def _extra(draw, doc, t):
    # An unknown top-level key is covered by the checksum (so it is what was written) and read by nothing: a newer
    # bsdgraph may add fields (as `target` was added), and an older one must still read the file. Harmless.
    doc["zz_extra"] = draw(st.sampled_from([1, "x", [1, 2], {"a": torch.zeros(2)}, torch.zeros(2), None]))
    return f"extra key = {doc['zz_extra']!r}", 0, "zz_extra"


def _verdict(v, cmd: str):
    return v.get(cmd, v.get("*")) if isinstance(v, dict) else v


def _combine(verdicts: list, cmd: str):
    codes = [_verdict(v, cmd) for v in verdicts]
    return 1 if 1 in codes else 0 if all(c == 0 for c in codes) else None


class Corrupted:
    """A corrupted checkpoint and what was done to it; shown by what was done (hypothesis prints drawn values)."""

    def __init__(self, doc: dict, done: list):
        self.doc, self.done = doc, done

    def __repr__(self) -> str:
        return f"Corrupted({'; '.join(what for what, _ in self.done)})"


@st.composite
def corrupted(draw, t: Trained) -> Corrupted:
    """1-2 corruptions of the trained checkpoint, re-checksummed (unless one edits the checksum itself)."""
    doc = copy.deepcopy(t.doc)
    names = [draw(st.sampled_from(sorted(CORRUPTIONS)), label="corruption")]
    if draw(st.booleans(), label="two"):
        names.append(draw(st.sampled_from(sorted(CORRUPTIONS)), label="second"))
    done, touched = [], set()
    for name in sorted(names, key=lambda n: CORRUPTIONS[n][2]):  # the checksum edits last
        _, fn, after = CORRUPTIONS[name]
        if after:
            doc["checksum"] = digest(doc)
        try:
            what, verdict, key = fn(draw, doc, t)
        except (KeyError, IndexError, TypeError, AttributeError, StopIteration, AssertionError, RuntimeError):
            # the first corruption removed or replaced what the second edits (RuntimeError: a NaN written into a
            # tensor the first one made integer)
            assume(not done)
            raise
        group = GROUP.get(key, key)
        assume(group not in touched)  # a second edit of the same group could mask the first
        touched.add(group)
        done.append((what, verdict))
    if not any(CORRUPTIONS[n][2] for n in names):
        doc["checksum"] = digest(doc)
    return Corrupted(doc, done)


READ_ONLY = ("eval", "recall", "export-nir", "bench", "run", "plot")


@settings(FUZZ)
@given(data=st.data())
def test_corrupted_checkpoint_fields_are_refused_naming_the_file(trained, tmp_path, data):
    """A checkpoint whose checksum matches (an edited file, or one written by another program) and whose fields do
    not: every command that reads it refuses a certainly wrong field with one `error:` line naming the file and
    leaves the file as it was; it accepts a harmless edit; a --resume that succeeds leaves a run `plot` reads."""
    t = trained
    case = data.draw(corrupted(t), label="checkpoint")
    doc, done = case.doc, case.done
    run = copy_run(t, tmp_path)
    ck = run / "checkpoint.pt"
    torch.save(doc, ck)
    before = ck.read_bytes()
    extra = data.draw(st.sampled_from(["recall", "export-nir", "bench", "run", "plot"]), label="also")
    for cmd in [c for c in READ_ONLY if c in ("eval", extra)] + ["resume"]:
        want = _combine([v for _, v in done], cmd)
        r = cli(*_argv(cmd, t, run))
        what = "; ".join(w for w, _ in done)
        event(f"{cmd} exit {r.code}")
        assert_clean(r, codes=(0, 1, 2) if want is None else (want,))
        if r.code != 0:
            errors = [line for line in r.err.splitlines() if line.startswith(("error:", "bsdgraph: error:"))]
            assert len(errors) == 1, f"{what}: {cmd} printed {len(errors)} error lines:\n{r.err}"
            if want == 1:
                assert str(ck) in errors[0], f"{what}: {cmd}'s error does not name the checkpoint:\n{r.err}"
        if cmd != "resume" or r.code != 0:
            assert ck.read_bytes() == before, f"{what}: `{cmd}` (exit {r.code}) changed the checkpoint"
        else:  # resumed: the run directory is whole again
            from bsdgraph.tools.plot import read_metrics

            new = require(load_checkpoint(ck), ck)
            assert new["epoch"] == 3, what
            assert [rec["epoch"] for rec in read_metrics(run)] == [1, 2, 3], what


def _edit_optimizer_group(key, value):
    def edit(doc):
        doc["optimizer"]["param_groups"][0][key] = value
    return edit


def _edit_moment(key, fn):
    def edit(doc):
        doc["optimizer"]["state"][0][key] = fn(doc["optimizer"]["state"][0][key])
    return edit


def _edit_history(fn):
    def edit(doc):
        fn(doc["history"][1])
    return edit


# What the fuzzer above found, one reproduction each (the checkpoint re-checksummed after the edit, as an edited
# file or another program's would be): (edit, the commands to run, the exit code each must give).
FOUND = {
    "a multi-element tensor as version": (lambda d: d.__setitem__("version", torch.tensor([2, 2])), ("eval",), 1),
    "a float16 weight": (lambda d: d["params"].__setitem__("fc1.weight", d["params"]["fc1.weight"].half()),
                         ("run", "eval", "bench"), (0, 1)),
    "a float64 batchnorm statistic": (lambda d: d["state"].__setitem__("bn1.running_mean",
                                                                       d["state"]["bn1.running_mean"].double()),
                                      ("run", "eval"), (0, 1)),
    "AdamW betas 'x'": (_edit_optimizer_group("betas", "x"), ("resume", "eval"), 1),
    "AdamW eps 'x'": (_edit_optimizer_group("eps", "x"), ("resume", "eval"), 1),
    "AdamW weight decay inf": (_edit_optimizer_group("weight_decay", math.inf), ("resume", "eval"), 1),
    "AdamW amsgrad without its state": (_edit_optimizer_group("amsgrad", True), ("resume", "eval"), 1),
    "a negative AdamW step": (_edit_moment("step", lambda s: torch.tensor(-5.0)), ("resume", "eval"), 1),
    "a negative exp_avg_sq": (_edit_moment("exp_avg_sq", lambda m: -m - 1), ("resume", "eval"), 1),
    "an integer exp_avg_sq": (_edit_moment("exp_avg_sq", lambda m: (m * 1e3).to(torch.int64)), ("resume", "eval"),
                              1),
    "a text metric in the history": (_edit_history(lambda r: r.__setitem__("test_accuracy", "x")), ("resume",), 1),
    "a history record without its metric": (_edit_history(lambda r: r.pop("test_accuracy")), ("resume",), 1),
    "a renamed layer in the history": (_edit_history(lambda r: r["rates"].__setitem__("h9", r["rates"].pop("h1"))),
                                       ("resume",), 1),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_checkpoint_corruptions_the_fuzzer_found(trained, tmp_path, case):
    """Each: refused with one error line naming the checkpoint (exit 1), or for another float width, run or
    refused cleanly; never a traceback, a failure blamed on a layer mid-training, or a damaged record resumed."""
    edit, commands, codes = FOUND[case]
    doc = copy.deepcopy(trained.doc)
    edit(doc)
    doc["checksum"] = digest(doc)
    run = copy_run(trained, tmp_path)
    ck = run / "checkpoint.pt"
    torch.save(doc, ck)
    for cmd in commands:
        r = assert_clean(cli(*_argv(cmd, trained, run)), codes=codes if isinstance(codes, tuple) else (codes,))
        if r.code == 1:
            assert r.err.splitlines()[-1].startswith(f"error: {ck}: "), f"{cmd}: {r.err}"


# ---------------------------------------------------------------------------------------------------- 2. byte flips


def _pickle_end(raw: bytes) -> int:
    """Where torch's data.pkl (the dict and its plain values) ends inside the zip: flips before it hit the parser."""
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        infos = z.infolist()
    return infos[1].header_offset if len(infos) > 1 else len(raw)


@settings(FUZZ)
@given(cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)), region=st.sampled_from(["file", "pickle"]),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4))
def test_flipped_or_truncated_checkpoints_are_refused_or_intact(trained, tmp_path, cut, region, flips):
    """Damaged checkpoints are never used: load_checkpoint refuses a file whose bytes changed what it holds, or
    returns exactly what was written (a flip in unused zip bytes); `eval` exits 1 or 0 accordingly."""
    raw = bytearray((trained.run / "checkpoint.pt").read_bytes())
    if cut is not None:
        raw = raw[:int(len(raw) * cut)]
        what = f"truncated to {len(raw)} bytes"
    else:
        span = _pickle_end(bytes(raw)) if region == "pickle" else len(raw)
        for where, bits in flips:
            raw[int(where * span)] ^= bits
        what = f"flipped {[(int(w * span), b) for w, b in flips]}"
    ck = fresh_dir(tmp_path) / "checkpoint.pt"
    ck.write_bytes(bytes(raw))
    try:
        doc = load_checkpoint(ck)
    except CheckpointError:
        doc = None
    if doc is not None:
        assert same(doc, trained.doc), f"a damaged checkpoint was used ({what})"
    event("refused" if doc is None else "harmless (contents equal)")
    r = cli("eval", trained.model, "--checkpoint", ck, "--npz", trained.npz)
    assert_clean(r, codes=(1,) if doc is None else (0,))
    if doc is None:
        assert r.err.splitlines()[-1].startswith(f"error: {ck}: "), r.err


def _member_data(raw: bytes, suffix: str) -> int:
    """Offset of the first byte of the zip member whose name ends with ``suffix``."""
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    return info.header_offset + 30 + name_len + extra_len


def test_a_version_byte_flipped_to_1_does_not_switch_off_the_checksum(trained, tmp_path):
    """Two flipped bytes: the version 2 -> 1 (the format written before checksums) and one of a weight. A version-1
    label must not make a file that carries a checksum skip its verification: the changed weight must be refused,
    not evaluated."""
    raw = bytearray((trained.run / "checkpoint.pt").read_bytes())
    at = raw.index(b"X\x07\x00\x00\x00version")  # the pickled key; its value follows a memo op (q, 1 byte)
    value = at + len(b"X\x07\x00\x00\x00version") + 2
    assert raw[value:value + 2] == b"K\x02", raw[at:value + 4]  # BININT1 2
    raw[value + 1] = 1
    weight = _member_data(bytes(raw), "/data/0")  # the first tensor stored: params['fc1.weight']
    raw[weight + 2] ^= 0x40
    ck = fresh_dir(tmp_path) / "checkpoint.pt"
    ck.write_bytes(bytes(raw))
    doc = torch.load(ck, weights_only=True)
    assert doc["version"] == 1 and not torch.equal(doc["params"]["fc1.weight"], trained.doc["params"]["fc1.weight"])
    with pytest.raises(CheckpointError):
        load_checkpoint(ck)
    assert_clean(cli("eval", trained.model, "--checkpoint", ck, "--npz", trained.npz), codes=(1,))


def test_a_flipped_pickle_byte_is_refused_not_a_traceback(trained, tmp_path):
    """One flipped byte in torch's data.pkl: the memo index stored after the key 'rule' (BINPUT). A later BINGET of
    that memo entry then fails inside torch's unpickler with a KeyError (the fuzzer also met IndexError, TypeError,
    AttributeError and AssertionError there): load_checkpoint must turn it into its one-line refusal."""
    raw = bytearray((trained.run / "checkpoint.pt").read_bytes())
    at = raw.index(b"X\x04\x00\x00\x00ruleq") + len(b"X\x04\x00\x00\x00ruleq")
    raw[at] ^= 0xFF
    ck = fresh_dir(tmp_path) / "checkpoint.pt"
    ck.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        load_checkpoint(ck)
    r = assert_clean(cli("eval", trained.model, "--checkpoint", ck, "--npz", trained.npz), codes=(1,))
    assert r.err.splitlines()[-1].startswith(f"error: {ck}: "), r.err


# ---------------------------------------------------------------------------------------------------- 3. hostile NIR

try:
    import nir
except ImportError:  # the checkpoint, flag and run-directory tests do not need it
    nir = None
needs_nir = pytest.mark.skipif(nir is None, reason="the `nir` package is not installed (pip install -e '.[test]')")

PIECES = ['"""', "'''", '"', "'", "\\", "\n", "\r", "\r\n", "#", "\x00", "\u2028", "\u2029", "\x0b", "\x0c",
          "\x85", "{}", "{0}", "%s", ")", "(", "]", ";", "\t", " ", "x", "é", "\\n", "\\x00", "\\'", "<<", "${x}"]


class Export(tuple):
    """(NIR graph of TINY_MODEL, an input for `bsdgraph run`), shown by name: hypothesis prints its arguments."""

    def __repr__(self) -> str:
        return "Export(tiny.nir)"


@pytest.fixture(scope="module")
def mlp_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-nir")
    model = write(root / "tiny.py", TINY_MODEL)
    assert_clean(cli("export-nir", model, "-o", root / "tiny.nir"), codes=(0,))
    x = root / "x.npz"
    np.savez(x, x=np.random.default_rng(0).random((3, 16), np.float32))
    return Export((nir.read(root / "tiny.nir"), x))


@st.composite
def hostile(draw, payload: str) -> str:
    """A string made of quote, escape, comment and line-break characters around a payload that, run as code,
    sets a canary."""
    parts = draw(st.lists(st.one_of(st.sampled_from(PIECES), st.just(payload), st.text(max_size=4)), max_size=8))
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), payload)
    return "".join(parts)


def _payload(token: str, marker: Path) -> str:
    return f"import builtins; builtins.PWNED_{token} = 1; open({str(marker)!r}, 'w').close()"


def _h5_string(group, key: str, value: str) -> None:
    """Store ``value`` as NIR metadata the way another writer could: a variable-length UTF-8 string, or fixed-length
    bytes where it holds a NUL (h5py's variable-length strings cannot)."""
    if key in group:
        del group[key]
    group.create_dataset(key, data=np.bytes_(value.encode()) if "\x00" in value else value)


def _node_name(s: str) -> str:
    """An HDF5 group name: no '/' or NUL; never '.' or empty."""
    return "n" + s.replace("/", "|").replace("\x00", "0")


@needs_nir
@settings(FUZZ)
@given(data=st.data(), token=st.from_regex(r"[a-z0-9]{8}", fullmatch=True),
       follow=st.sampled_from(["compile", "run", "draw"]))
def test_hostile_nir_metadata_never_becomes_code(mlp_export, tmp_path, data, token, follow):
    """import-nir -o writes the graph name, the dt note, other metadata and node names as literals: whatever they
    hold (quotes, backslashes, line breaks, NULs, a payload), the generated file parses, never runs any of it, and
    gives the name back unchanged."""
    import h5py

    graph, x = mlp_export
    folder = fresh_dir(tmp_path)
    marker = folder / f"pwned_{token}"
    payload = _payload(token, marker)
    name, dt, other = (data.draw(hostile(payload), label=label) for label in ("name", "dt", "other"))
    g = copy.deepcopy(graph)
    renamed = {}
    for node in data.draw(st.lists(st.sampled_from(sorted(g.nodes)), unique=True, max_size=3), label="rename"):
        new = _node_name(data.draw(hostile(payload), label=f"node {node}"))
        assume(new not in g.nodes and new not in renamed.values())
        renamed[node] = new
    g.nodes = {renamed.get(k, k): v for k, v in g.nodes.items()}
    g.edges = [(renamed.get(a, a), renamed.get(b, b)) for a, b in g.edges]
    path = folder / "net.nir"
    try:
        nir.write(path, g)
    except Exception:  # noqa: BLE001 -- a name nir or HDF5 cannot store is not a file anyone can have
        assume(False)
    with h5py.File(path, "r+") as f:
        meta = f["node/metadata"]
        _h5_string(meta, "name", name)
        _h5_string(meta, "dt", dt)
        _h5_string(meta, "notes", other)
        _h5_string(meta, "x_" + other.replace("/", "|").replace("\x00", "0"), payload)
    written = nir.read(path)
    stored = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in written.metadata.items()}
    out = folder / "model.py"

    def no_canary(step: str) -> None:
        assert not hasattr(builtins, f"PWNED_{token}"), f"the payload ran during {step}"
        assert not marker.exists(), f"the payload ran during {step}"

    r = assert_clean(cli("import-nir", path, "--dt", "1e-3", "-o", out), codes=(0, 1))
    event(f"import exit {r.code}")
    no_canary("import-nir")
    if r.code != 0:
        return
    from bsdgraph.compiler.model_file import load_model

    ast.parse(out.read_text())
    loaded = load_model(out)
    no_canary("load_model")
    assert loaded.graph.name == (str(stored["name"]) or "net"), (loaded.graph.name, stored["name"])
    names = {n.name for n in loaded.graph.nodes}
    assert set(renamed.values()) <= names, (sorted(renamed.values()), sorted(names))
    argv = {"compile": ("compile", out), "run": ("run", out, "--input", x), "draw": ("draw", out, "-o",
                                                                                     folder / "net.dot")}[follow]
    assert_clean(cli(*argv), codes=(0,))
    no_canary(follow)


@needs_nir
def test_a_graph_name_that_closes_the_docstring_runs_nothing(mlp_export, tmp_path):
    """The issue's reproduction: a NIR graph name holding \"\"\" and then Python that writes a file; the imported
    model is compiled; no file appears and the name comes back as it was."""
    graph, _ = mlp_export
    marker = tmp_path / "owned.txt"
    name = f'evil"""\nopen({str(marker)!r}, "w").write("owned")\n"""'
    g = copy.deepcopy(graph)
    g.metadata["name"] = name
    g.metadata["dt"] = name
    nir.write(tmp_path / "evil.nir", g)
    assert_clean(cli("import-nir", tmp_path / "evil.nir", "--dt", "1e-3", "-o", tmp_path / "evil.py"), codes=(0,))
    assert_clean(cli("compile", tmp_path / "evil.py"), codes=(0,))
    assert not marker.exists()
    from bsdgraph.compiler.model_file import load_model

    assert load_model(tmp_path / "evil.py").graph.name == name
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- 4. flag values

# The documented rules (bsdgraph/compiler/options.py docstring, `bsdgraph train --help`), written out independently: a key
# is known or not; a number is a finite float; a boolean one of eight spellings, any case; a choice one of its
# values exactly. Then the ranges the graph and BSD validation apply (tau, alpha > 0, v_th > v_reset; BSD numbers
# >= 0), on the values that parsed, the last assignment of a key winning.
BOOLEAN_SPELLINGS = ("true", "false", "1", "0", "yes", "no", "on", "off")
LIF_SPEC = {"tau": float, "v_th": float, "v_reset": float, "reset": ("hard", "soft"), "surrogate": ("atan",),
            "alpha": float}
BSD_SPEC = {"lam": float, "negatives": ("all", "other_class"), "distill_on": ("current", "membrane"), "eps": float,
            "recall": bool, "recall_loss": ("reco", "mse"), "freq": bool, "freq_r": float, "lam_low": float,
            "lam_high": float, "reco_rows": ("sample", "step", "each_step"), "label_smoothing": float,
            "layer_lam": tuple, "recurrent_credit": ("step", "through_time"), "backward_recurrence": bool,
            "backward_membrane": bool}
LIF_DEFAULTS = {"tau": 2.0, "v_th": 0.3, "v_reset": 0.0, "alpha": 2.0}  # TINY_MODEL's one LIF layer
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # where str.splitlines() breaks a line


def _oracle(items: list[str], spec: dict) -> tuple[dict, int]:
    """(values that parse, how many items are bad)."""
    values, bad = {}, 0
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        kind = spec.get(key)
        if not sep or not key or kind is None:
            bad += 1
        elif kind is float:
            try:
                v = float(raw)
            except ValueError:
                v = math.nan
            if math.isfinite(v):
                values[key] = v
            else:
                bad += 1
        elif kind is tuple:  # comma-separated finite numbers (nothing: none)
            try:
                parts = [float(p) for p in raw.split(",")] if raw else []
            except ValueError:
                parts = [math.nan]
            if all(map(math.isfinite, parts)):
                values[key] = tuple(parts)
            else:
                bad += 1
        elif kind is bool:
            if raw.lower() in BOOLEAN_SPELLINGS:
                values[key] = raw.lower() in ("true", "1", "yes", "on")
            else:
                bad += 1
        elif raw in kind:
            values[key] = raw
        else:
            bad += 1
    return values, bad


def _range_problems(lif: dict, bsd: dict) -> int:
    a = {**LIF_DEFAULTS, **lif}
    n = (a["tau"] <= 0) + (a["v_th"] <= a["v_reset"]) + (a["alpha"] <= 0)
    clash = bsd.get("reco_rows") == "step" and (bsd.get("freq") is True or bsd.get("negatives") == "other_class")
    clash += bsd.get("reco_rows") == "each_step" and bsd.get("freq") is True
    smoothing = not 0 <= bsd.get("label_smoothing", 0.0) < 1
    negative_lam = any(v < 0 for v in bsd.get("layer_lam", ()))
    return n + clash + smoothing + negative_lam + sum(1 for k in ("lam", "eps", "freq_r", "lam_low", "lam_high")
                                                      if bsd.get(k, 0.0) < 0)


def test_the_oracle_knows_the_product_schema():
    """The oracle's keys and kinds are the product's (a new option must be added to both)."""
    from bsdgraph.cli.common import bsd_options, lif_options

    for spec, schema in ((LIF_SPEC, lif_options()), (BSD_SPEC, bsd_options())):
        assert set(spec) == set(schema)
        for key, kind in spec.items():
            assert (schema[key].type, schema[key].choices) == ((kind, None) if isinstance(kind, type)
                                                               else (str, kind)), key


def _case(s: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(s, st.lists(st.booleans(), min_size=8, max_size=8)).map(
        lambda p: "".join(c.upper() if up else c for c, up in zip(p[0], p[1] + [False] * len(p[0]))))


VALUES = st.one_of(
    _case(st.sampled_from(BOOLEAN_SPELLINGS + ("maybe", "y", "n", "t", "f", "2", "truee", "0.0"))),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(-10, 10).map(lambda v: f"{v:g}"),
    st.sampled_from(["nan", "inf", "-inf", "Infinity", "", "1e400", "-1e400", "1e-400", "-0", "1_0", " 0.5 ", "0x10",
                     "hard", "soft", "atan", "all", "other_class", "current", "membrane", "reco", "mse", "Hard",
                     "mse ", "١٢", "0.3.1", "1,5", "+1", ".5", "5."]),
    st.text(max_size=6),
)
KEYS = st.one_of(st.sampled_from(sorted(LIF_SPEC | BSD_SPEC)),
                 st.sampled_from(["", "V_TH", "lam ", " tau", "bogus", "v_th.x", "=", "lif"]), st.text(max_size=4))


def _fitting(kind) -> st.SearchStrategy:
    """Values a key of this kind takes (most of them: numbers may still be out of range)."""
    if kind is float:
        return st.one_of(st.floats(0.01, 5).map(repr), st.floats(-1, 1).map(lambda v: f"{v:g}"),
                         st.sampled_from(["1e-3", "2", " 0.5 ", "1_0", "+1", ".5"]))
    if kind is bool:
        return _case(st.sampled_from(BOOLEAN_SPELLINGS)).map(lambda v: f" {v}")
    if kind is tuple:
        return st.lists(_fitting(float), max_size=3).map(",".join)
    return st.sampled_from(kind)


@st.composite
def assignments(draw, spec: dict) -> str:
    """KEY=VALUE items: half of them a key of ``spec`` with a value of its kind, the rest anything."""
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(spec)))
        return f"{key}={draw(_fitting(spec[key]))}"
    how = draw(st.sampled_from(["pair", "pair", "pair", "no =", "two ="]))
    key, value = draw(KEYS), draw(VALUES)
    return {"pair": f"{key}={value}", "no =": key + value.replace("=", ""), "two =": f"{key}={value}={value}"}[how]


@settings(FUZZ)
@given(lif=st.lists(assignments(LIF_SPEC), max_size=3), bsd=st.lists(assignments(BSD_SPEC), max_size=3))
def test_lif_and_bsd_values_are_usage_errors_exactly_when_bad(tmp_path, lif, bsd):
    """--lif / --bsd are checked before the checkpoint is read: exit 2 with one `--lif` / `--bsd` line per problem
    exactly when the oracle finds one, else exit 1 for the missing checkpoint."""
    model, npz = write(tmp_path / "tiny.py", TINY_MODEL), tmp_path / "x.npz"
    lif_values, lif_bad = _oracle(lif, LIF_SPEC)
    bsd_values, bsd_bad = _oracle(bsd, BSD_SPEC)
    problems = lif_bad + bsd_bad + _range_problems(lif_values, bsd_values)
    flags = [f"--lif={item}" for item in lif] + [f"--bsd={item}" for item in bsd]
    r = cli("eval", model, "--checkpoint", tmp_path / "missing.pt", "--npz", npz, *flags)
    event(f"exit {r.code}")
    assert_clean(r, codes=(2,) if problems else (1,))
    lines = [line for line in r.err.splitlines() if line.strip() and not line.startswith("note: ")]
    if problems:
        for line in lines:
            assert line.startswith(("bsdgraph: error: --lif", "bsdgraph: error: --bsd")), \
                f"a line that is not one problem of a flag: {line!r}\n{r.err}"
        assert len(lines) >= problems, f"{problems} problem(s) predicted, {len(lines)} reported:\n{r.err}"
    else:
        assert lines[-1].startswith("error: ") and "checkpoint not found" in lines[-1], r.err


@pytest.mark.parametrize("item", ["v_th=a\nb", "v_th=1\rx", "tau=\u2028", "reset=hard\x0bsoft"])
def test_a_line_break_in_a_flag_value_stays_on_its_problem_line(tmp_path, item):
    """Each problem is one line naming its flag, whatever the value holds: a line break inside a value must not
    start a line that names no flag."""
    model = write(tmp_path / "tiny.py", TINY_MODEL)
    r = assert_clean(cli("eval", model, "--checkpoint", tmp_path / "missing.pt", "--npz", tmp_path / "x.npz",
                         f"--lif={item}"), codes=(2,))
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bsdgraph: error: --lif"), r.err


COUNT1, COUNT0 = ("count", 1), ("count", 0)
THREADS = ("count", 1, 1024)  # torch.set_num_threads takes a C int; bsdgraph bounds it
NUMERIC_FLAGS = {  # (subcommand, flag) -> the declared type
    ("train", "--epochs"): COUNT1, ("train", "--batch-size"): COUNT1, ("train", "--lr"): ("number", 0, 10),
    ("train", "--seed"): ("seed",), ("train", "--limit-train"): COUNT1, ("train", "--limit-test"): COUNT1,
    ("eval", "--limit-test"): COUNT1, ("bench", "--steps"): COUNT1, ("bench", "--threads"): THREADS,
    ("bench", "--warmup"): COUNT0, ("bench", "--energy-samples"): COUNT1, ("run", "--steps"): COUNT1,
    ("run", "--dt"): ("number", 0, math.inf), ("import-nir", "--dt"): ("number", 0, math.inf),
    ("import-nir", "--steps"): COUNT1, ("plot", "--sample"): COUNT0,
}
NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # what argparse takes for a value, not an option


def _valid(kind: tuple, raw: str, separate: bool) -> bool:
    if separate and raw.startswith("-") and len(raw) > 1 and not NEGATIVE_NUMBER.match(raw) and " " not in raw:
        return False  # argparse reads it as an option: "expected one argument"
    try:
        if kind[0] in ("count", "seed"):
            v = int(raw)
            if kind[0] == "seed":
                return -2 ** 63 <= v < 2 ** 63
            return kind[1] <= v <= (kind[2] if len(kind) > 2 else math.inf)
        v = float(raw)
        return math.isfinite(v) and kind[1] < v < kind[2]
    except ValueError:
        return False


@settings(FUZZ)
@given(which=st.sampled_from(sorted(NUMERIC_FLAGS)), separate=st.booleans(), raw=st.one_of(
    st.text(max_size=8), st.integers(-2 ** 70, 2 ** 70).map(str), st.floats().map(repr),
    st.sampled_from(["0", "1", "-1", "1e-3", "10", "nan", "inf", " 5 ", "1_0", "٣", "-0", "0.5", "2**3", "-x", "--",
                     "-", "--help", "-h", "-5 ", "1e308", "9" * 30])))
def test_numeric_flags_refuse_bad_values_as_usage_errors(tmp_path, which, separate, raw):
    """A numeric flag's value is checked when the command line is read: exit 2 naming the flag for a bad value,
    never exit 1 (the work it would reach: a missing file) and never a traceback."""
    sub, flag = which
    target = {"plot": tmp_path / "no-run", "import-nir": tmp_path / "missing.nir"}.get(sub, tmp_path / "missing.py")
    extra = {"eval": ["--checkpoint", tmp_path / "missing.pt"], "run": ["--input", tmp_path / "x.npz"]}.get(sub, [])
    argv = [sub, target, *extra, *([flag, raw] if separate else [f"{flag}={raw}"])]
    valid = _valid(NUMERIC_FLAGS[which], raw, separate)
    r = cli(*argv)
    event(f"exit {r.code}")
    assert_clean(r, codes=(1,) if valid else (2,))
    if not valid:
        last = [line for line in r.err.splitlines() if line.strip()][-1]
        assert "error:" in last and (flag in last or raw.startswith("-")), r.err


@pytest.mark.parametrize("sub, flag", sorted(NUMERIC_FLAGS))
def test_a_double_dash_as_a_flag_value_is_a_usage_error(trained, tmp_path, sub, flag):
    """`--epochs=--`: Python's argparse drops a "--" value and stores [] without calling the flag's type, so the
    value reaches the command unchecked. It must still be a usage error naming the flag (exit 2), never a
    traceback or a run with a list where a number belongs."""
    t = trained
    if sub == "import-nir":
        assert_clean(cli("export-nir", t.model, "--checkpoint", t.run / "checkpoint.pt", "-o", tmp_path / "m.nir"),
                     codes=(0,))
    argv = {"train": ["train", t.model, "--npz", t.npz, "--out", tmp_path / "run"],
            "eval": ["eval", t.model, "--checkpoint", t.run / "checkpoint.pt", "--npz", t.npz],
            "bench": ["bench", t.model, "--npz", t.npz, "--energy", "--threads", "1", "--steps", "1"],
            "run": ["run", t.model, "--input", t.x],
            "import-nir": ["import-nir", tmp_path / "m.nir"],
            "plot": ["plot", copy_run(t, tmp_path), "--npz", t.npz]}[sub]
    r = assert_clean(cli(*argv, f"{flag}=--"), codes=(2,))
    assert flag in r.err, r.err


def test_a_thread_count_torch_cannot_take_is_a_usage_error(trained):
    """`bench --threads 3449720151` passes `count(1)` and then overflows torch.set_num_threads (a C int)."""
    t = trained
    r = assert_clean(cli("bench", t.model, "--npz", t.npz, "--threads", "3449720151", "--steps", "1"), codes=(2,))
    assert "--threads" in r.err, r.err


# ------------------------------------------------------------------------------------------------ 5. run directories

MANIFEST_DAMAGE = {  # run.json -> still a manifest bsdgraph wrote?
    "keep": True, "missing": False, "random bytes": False, "empty": False, "a list": False, "null": False,
    "another format": False, "truncated": False,
}
LOCK_DAMAGE = ["keep", "missing", "garbage", "dead pid", "empty", "directory"]
SNAPSHOT_DAMAGE = ["keep", "missing", "garbage", "bytes"]


def _damage(run: Path, t: Trained, manifest: str, lock: str, snapshot: str, lines: list, line_bytes: bool,
            checkpoint: bool) -> None:
    m = run / "run.json"
    if manifest == "missing":
        m.unlink()
    elif manifest == "random bytes":
        m.write_bytes(b"\xff\x00{\x8a not json")
    elif manifest == "empty":
        m.write_text("")
    elif manifest == "a list":
        m.write_text("[1, 2]")
    elif manifest == "null":
        m.write_text("null")
    elif manifest == "another format":
        m.write_text(json.dumps({**json.loads(m.read_text()), "format": "other.run"}))
    elif manifest == "truncated":
        m.write_text(m.read_text()[:20])
    lk = run / "run.lock"
    if lock == "missing":
        lk.unlink()
    elif lock == "garbage":
        lk.write_bytes(b"\x00\xffnot a pid\n" * 3)
    elif lock == "dead pid":
        lk.write_text(f"{t.dead_pid}\n")
    elif lock == "empty":
        lk.write_text("")
    elif lock == "directory":
        lk.unlink()
        lk.mkdir()
    s = run / "model_source.py"
    if snapshot == "missing":
        s.unlink()
    elif snapshot == "garbage":
        s.write_text("def build(:\n    raise SystemExit(3)\n")
    elif snapshot == "bytes":
        s.write_bytes(b"\xff\xfe\x00garbage")
    if lines:
        metrics = run / "metrics.jsonl"
        old = metrics.read_bytes().splitlines(keepends=True)
        for i, line in lines:
            old.insert(min(i, len(old)), (line if line_bytes else line.encode()) + b"\n")
        metrics.write_bytes(b"".join(old))
    if not checkpoint:
        (run / "checkpoint.pt").unlink()


def _garbage(lines: list, line_bytes: bool) -> bool:
    """Is some inserted line not an epoch record? Bytes that are not UTF-8 text never are; text is unless it is
    all white space (a line of white space is skipped; splitlines() breaks only at white space characters)."""
    for _, line in lines:
        if line_bytes:
            try:
                line = line.decode()
            except UnicodeDecodeError:
                return True
        if line.strip():
            return True
    return False


@settings(FUZZ)
@given(manifest=st.sampled_from(sorted(MANIFEST_DAMAGE)), lock=st.sampled_from(LOCK_DAMAGE),
       snapshot=st.sampled_from(SNAPSHOT_DAMAGE), checkpoint=st.sampled_from([True, False]),
       line_bytes=st.booleans(), data=st.data(),
       cmd=st.sampled_from(["resume", "resume", "fresh", "fresh", "force", "force", "plot"]))
def test_damaged_run_directories_are_resumed_refused_or_replaced(trained, tmp_path, manifest, lock, snapshot,
                                                                 checkpoint, line_bytes, data, cmd):
    """A finished run whose run.json, run.lock, model_source.py or metrics.jsonl was damaged (and perhaps its
    checkpoint lost): --resume continues it (exit 0) and leaves a whole run; a fresh run refuses a directory that
    holds a checkpoint (exit 2) or files bsdgraph cannot tell it wrote (exit 1), and --force replaces them; plot
    draws it or names the bad line. A refused command never changes the checkpoint or the files it refused to
    replace."""
    t = trained
    line = st.binary(max_size=12) if line_bytes else st.text(max_size=12)
    lines = data.draw(st.lists(st.tuples(st.integers(0, 3), line), max_size=2), label="metrics lines")
    run = copy_run(t, tmp_path)
    _damage(run, t, manifest, lock, snapshot, lines, line_bytes, checkpoint)
    ck = run / "checkpoint.pt"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "run.lock"}
    own = MANIFEST_DAMAGE[manifest]
    if cmd == "plot":
        r = cli("plot", run, "--npz", t.npz)
        want = (1,) if _garbage(lines, line_bytes) else (0,)
    else:
        argv = ["train", t.model, "--npz", t.npz, "--out", run, "--epochs", "3"]
        argv += {"resume": ["--resume"], "fresh": [], "force": ["--force"]}[cmd]
        r = cli(*argv)
        if lock == "directory":
            want = (1,)  # nothing can lock it: an OSError naming run.lock
        elif cmd == "resume":
            want = (0,) if checkpoint else (1,)
        elif cmd == "force":
            want = (0,)
        elif checkpoint:
            want = (2,)  # "already holds a checkpoint: pass --resume ... --force"
        else:
            foreign = not own and any(name in before for name in ("metrics.jsonl", "model_source.py", "run.json"))
            want = (1,) if foreign else (0,)
    event(f"{cmd} exit {r.code}")
    assert_clean(r, codes=want)
    if r.code != 0:
        assert r.err.splitlines()[-1].startswith(("error:", "bsdgraph: error:")), r.err
        after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name in before}
        if cmd != "resume":  # --resume rewrites run.json and model_source.py before it reads the checkpoint
            assert after == before, f"`{cmd}` (exit {r.code}) changed files it refused"
        assert after.get("checkpoint.pt") == before.get("checkpoint.pt"), f"`{cmd}` changed the checkpoint"
    elif cmd != "plot":
        from bsdgraph.tools.plot import read_metrics
        from bsdgraph.train.rundir import is_run_dir

        assert require(load_checkpoint(ck), ck)["epoch"] == 3
        assert [rec["epoch"] for rec in read_metrics(run)] == [1, 2, 3]
        assert is_run_dir(run) and (run / "model_source.py").is_file()
    else:
        assert before.get("checkpoint.pt") == (ck.read_bytes() if ck.exists() else None)


HOLDER = r'''
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
print("locked", flush=True)
time.sleep(120)
'''


def test_a_run_directory_locked_by_a_live_process_is_refused_naming_it(trained, tmp_path):
    """While another process holds RUN/run.lock, every training into RUN (fresh, --resume, --force) stops with exit
    1 naming that process, and changes nothing; once it is gone, --resume goes on."""
    run = copy_run(trained, tmp_path)
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / "run.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"], ["--force"]):
            r = assert_clean(cli("train", trained.model, "--npz", trained.npz, "--out", run, "--epochs", "3", *extra),
                             codes=(1,))
            assert f"pid {holder.pid}" in r.err, r.err
            assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != "run.lock"} == \
                {k: v for k, v in files.items() if k != "run.lock"}
    finally:
        holder.kill()
        holder.wait()
    assert_clean(cli("train", trained.model, "--npz", trained.npz, "--out", run, "--epochs", "3", "--resume"),
                 codes=(0,))


@pytest.mark.parametrize("name", ["run.lock", "run.json", "model_source.py", "metrics.jsonl", "checkpoint.pt"])
def test_a_run_file_that_is_a_symlink_never_writes_through_it(trained, tmp_path, name):
    """A run directory whose file is a symbolic link to a file elsewhere (a copied or hand-assembled run): training
    replaces the link or refuses, and never writes into the file it points to."""
    run = copy_run(trained, tmp_path)
    precious = write(tmp_path / "precious.txt", "precious data\n")
    if name == "checkpoint.pt":  # the link target must be a valid checkpoint for --resume to read it
        precious = tmp_path / "precious.pt"
        shutil.copy(run / name, precious)
    content = precious.read_bytes()
    (run / name).unlink()
    os.symlink(precious, run / name)
    r = assert_clean(cli("train", trained.model, "--npz", trained.npz, "--out", run, "--epochs", "3", "--resume"),
                     codes=(0, 1))
    assert precious.read_bytes() == content, f"`train --resume` wrote through {name} into {precious}: {r.err}"


def test_plot_of_metrics_that_are_not_utf8_is_a_clean_error(trained, tmp_path):
    """A metrics.jsonl holding bytes that are not UTF-8 (a torn write, a binary file in its place): `plot` names
    the file and the line (exit 1); `--resume` rewrites it from the checkpoint."""
    run = copy_run(trained, tmp_path)
    with open(run / "metrics.jsonl", "ab") as fh:
        fh.write(b"\xff\xfe not text\n")
    r = assert_clean(cli("plot", run, "--npz", trained.npz), codes=(1,))
    assert str(run / "metrics.jsonl") in r.err.splitlines()[-1], r.err
    assert_clean(cli("train", trained.model, "--npz", trained.npz, "--out", run, "--epochs", "3", "--resume"),
                 codes=(0,))
    assert_clean(cli("plot", run, "--npz", trained.npz), codes=(0,))
