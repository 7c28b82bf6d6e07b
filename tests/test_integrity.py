"""Security and data integrity, one reproduction per defect of the audit (docs/reliability.md, defects 37-52):
no code from data files, one writer per run directory, nothing foreign overwritten, strict flags, layouts that
need a transpose refused, verified checkpoints, memory refused before it is allocated, exit codes."""

from __future__ import annotations

import ast
import builtins
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import nir
import numpy as np
import pytest
import torch

from bsdgraph.interop import pysource
from bsdgraph.train.checkpoint import CheckpointError, digest, load_checkpoint
from bsdgraph.compiler.model_file import load_model
from tests.fuzz_helpers import ROOT, TINY_MODEL, assert_clean, cli, tiny_arrays, write, write_npz

MODELS = ROOT / "models"


@pytest.fixture
def tiny(tmp_path):
    return write(tmp_path / "tiny.py", TINY_MODEL), write_npz(tmp_path / "tiny.npz")


def _trained(tmp_path, tiny, out="run", *extra):
    model, npz = tiny
    assert_clean(cli("train", model, "--npz", npz, "--out", tmp_path / out, "--epochs", "1", *extra), codes=(0,))
    return tmp_path / out


# ---------------------------------------------------------------------------------------------------- generated code


def _crafted_nir(tmp_path, name: str) -> Path:
    assert_clean(cli("export-nir", MODELS / "fmnist_mlp.py", "-o", tmp_path / "m.nir"), codes=(0,))
    g = nir.read(tmp_path / "m.nir")
    g.metadata["name"] = name
    g.metadata["dt"] = name  # the note "the file records dt = ..." quotes it too
    nir.write(tmp_path / "evil.nir", g)
    return tmp_path / "evil.nir"


# Each payload, if it ever ran, would create the marker file and set a canary (the reproduction first).
PAYLOADS = [
    'x"""\nopen({marker!r}, "w").write("ran")\n"""',
    "x'''\nopen({marker!r}, 'w').write('ran')\n'''",
    'x\\"""\nopen({marker!r}, "w").write("ran")  # \\',
    '"""; import builtins; builtins.BSDGRAPH_CANARY = 1; """',
    "\u2028\"\"\"\nopen({marker!r}, 'w').write('ran')\r\n#",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_import_nir_never_turns_metadata_into_code(tmp_path, payload):
    marker = tmp_path / "ran.txt"
    name = payload.format(marker=str(marker))
    evil = _crafted_nir(tmp_path, name)
    assert_clean(cli("import-nir", evil, "--dt", "1e-3", "-o", tmp_path / "peer.py"), codes=(0,))
    source = (tmp_path / "peer.py").read_text()
    ast.parse(source)
    for argv in (("compile", tmp_path / "peer.py"), ("draw", tmp_path / "peer.py", "-o", tmp_path / "g.dot")):
        assert_clean(cli(*argv), codes=(0,))
    assert not marker.exists() and not hasattr(builtins, "BSDGRAPH_CANARY"), "metadata ran as code"
    assert load_model(tmp_path / "peer.py").graph.name == name  # kept exactly, only quoted


def test_generated_source_is_checked_before_it_is_written():
    shape = pysource.Shape(frozenset({"bsdgraph"}), frozenset({"g.add"}), frozenset({"Op"}))
    ok = ast.Module([ast.Expr(pysource.call(pysource.attr("g", "add"), [pysource.literal(-1.5)]))], [])
    assert "g.add(-1.5)" in pysource.checked_source(ok, shape)
    bad = {"an import": ast.parse("import os"), "another call": ast.parse("g.add(open('x'))"),
           "a lambda": ast.parse("f = lambda: 0"), "a foreign module": ast.parse("from os import system")}
    for what, tree in bad.items():
        with pytest.raises(pysource.SourceError):
            pysource.checked_source(tree, shape)  # `what` names the case in a failure's traceback
    with pytest.raises(pysource.SourceError, match="NaN"):
        pysource.literal(float("nan"))


# ---------------------------------------------------------------------------------------------------- run directories


def test_plot_never_imports_the_model_file_a_checkpoint_names(tmp_path, tiny):
    marker = tmp_path / "imported.txt"
    model = write(tmp_path / "marked.py", TINY_MODEL + f"\nopen({str(marker)!r}, 'a').write('x')\n")
    run = _trained(tmp_path, (model, tiny[1]))
    assert marker.read_text() == "x"  # train imported it once: the user named it
    r = assert_clean(cli("plot", run, "--npz", tiny[1]), codes=(0,))
    assert marker.read_text() == "x", "plot ran the model file the checkpoint names"
    assert f"{run / 'model_source.py'}" in r.err and (run / "model_source.py").read_text() == model.read_text()
    assert "wrote" in r.out and (run / "raster.png").is_file()


OWN_DATA = TINY_MODEL + """

def data():
    from bsdgraph.train.data import make_synthetic
    return make_synthetic(60, 20, (16,), 4, seed=0)
"""


def test_plot_of_a_run_on_the_models_own_data_asks_for_the_model_file(tmp_path, tiny):
    model = write(tmp_path / "own.py", OWN_DATA)
    run = tmp_path / "run"
    assert_clean(cli("train", model, "--out", run, "--epochs", "1"), codes=(0,))
    r = assert_clean(cli("plot", run), codes=(0,))
    assert "no raster: the run trained on its model file's own data()" in r.err and not (run / "raster.png").exists()
    assert_clean(cli("plot", run, "--model", run / "model_source.py"), codes=(0,))  # named: it may run
    assert (run / "raster.png").is_file()


def test_a_second_writer_of_a_run_directory_stops_naming_the_first(tmp_path, tiny):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(run / 'run.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
                               "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = assert_clean(cli("train", tiny[0], "--npz", tiny[1], "--out", run, "--epochs", "1"), codes=(1,))
        assert f"is being written by another `bsdgraph train` (pid {holder.pid})" in r.err
        assert not (run / "checkpoint.pt").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert_clean(cli("train", tiny[0], "--npz", tiny[1], "--out", run, "--epochs", "1"), codes=(0,))


def test_the_lock_is_held_for_the_whole_training(tmp_path, tiny, monkeypatch):
    import bsdgraph.train.trainer

    seen = []
    real = bsdgraph.train.trainer.Trainer._epoch

    def epoch(self):  # while an epoch runs, another process cannot take the lock
        fd = os.open(self.out / "run.lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(os.pread(fd, 32, 0).decode().strip())
        finally:
            os.close(fd)
        return real(self)

    monkeypatch.setattr(bsdgraph.train.trainer.Trainer, "_epoch", epoch)
    _trained(tmp_path, tiny)
    assert seen == [str(os.getpid())]


def test_train_replaces_nothing_it_did_not_write(tmp_path, tiny):
    model, npz = tiny
    foreign = tmp_path / "mine"
    write(foreign / "metrics.jsonl", "my own notes\n")
    r = assert_clean(cli("train", model, "--npz", npz, "--out", foreign, "--epochs", "1"), codes=(1,))
    assert "metrics.jsonl, which `bsdgraph train` did not write; pass --force" in r.err
    assert (foreign / "metrics.jsonl").read_text() == "my own notes\n"
    assert_clean(cli("train", model, "--npz", npz, "--out", foreign, "--epochs", "1", "--force"), codes=(0,))
    run = _trained(tmp_path, tiny)
    before = (run / "checkpoint.pt").read_bytes()
    r = assert_clean(cli("train", model, "--npz", npz, "--out", run, "--epochs", "1"), codes=(2,))
    assert "already holds a checkpoint: pass --resume" in r.err and (run / "checkpoint.pt").read_bytes() == before
    assert_clean(cli("train", model, "--npz", npz, "--out", run, "--epochs", "1", "--force", "--seed", "5"), codes=(0,))
    assert load_checkpoint(run / "checkpoint.pt")["train"]["seed"] == 5  # started over


def test_a_run_killed_before_its_first_checkpoint_trains_again_without_force(tmp_path, tiny, monkeypatch):
    import bsdgraph.train.trainer

    def killed(self):
        raise KeyboardInterrupt  # the closest in-process stand-in for a kill during epoch 1

    with monkeypatch.context() as m:
        m.setattr(bsdgraph.train.trainer.Trainer, "_epoch", killed)
        assert cli("train", tiny[0], "--npz", tiny[1], "--out", tmp_path / "run", "--epochs", "1").code == 130
    assert (tmp_path / "run" / "run.json").is_file() and not (tmp_path / "run" / "checkpoint.pt").exists()
    _trained(tmp_path, tiny)  # its own manifest marks the folder as bsdgraph's


def test_import_nir_replaces_only_what_it_wrote(tmp_path):
    assert_clean(cli("export-nir", MODELS / "fmnist_mlp.py", "-o", tmp_path / "m.nir"), codes=(0,))
    mine = write(tmp_path / "peer.py", "# my hand-written model\n")
    r = assert_clean(cli("import-nir", tmp_path / "m.nir", "-o", mine), codes=(1,))
    assert "peer.py exists and bsdgraph did not write it" in r.err and "--force" in r.err
    assert mine.read_text() == "# my hand-written model\n" and not (tmp_path / "peer.weights.pt").exists()
    assert_clean(cli("import-nir", tmp_path / "m.nir", "-o", mine, "--force"), codes=(0,))
    assert_clean(cli("import-nir", tmp_path / "m.nir", "-o", mine), codes=(0,))  # its own output: replaced
    mine.write_text(mine.read_text() + "# edited by hand\n")
    assert_clean(cli("import-nir", tmp_path / "m.nir", "-o", mine), codes=(1,))  # edited since: the user's now
    assert mine.read_text().endswith("# edited by hand\n")


def test_run_output_never_replaces_its_own_input(tmp_path):
    x = tmp_path / "x.npz"
    np.savez(x, x=np.random.default_rng(0).random((2, 1, 28, 28)).astype(np.float32))
    before = x.read_bytes()
    r = assert_clean(cli("run", MODELS / "fmnist_mlp.py", "--input", x, "-o", x), codes=(1,))
    assert "did not write it" in r.err and x.read_bytes() == before


# ---------------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("spelling, value", [("true", True), ("1", True), ("YES", True), ("on", True),
                                             ("False", False), ("0", False), ("no", False), ("off", False)])
def test_boolean_options_take_the_eight_spellings(spelling, value):
    from bsdgraph.compiler import options
    from bsdgraph.cli.common import bsd_options

    assert options.parse("--bsd", [f"recall={spelling}"], bsd_options()) == ({"recall": value}, [])


def test_every_bad_option_is_listed_and_blamed_on_its_flag(tiny):
    r = assert_clean(cli("eval", tiny[0], "--checkpoint", "none.pt", "--bsd", "recall=maybe", "--bsd", "lam=-1",
                         "--bsd", "nope=1", "--lif", "v_th=abc", "--lif", "reset=medium", "--lif", "tau"), codes=(2,))
    lines = r.err.splitlines()
    assert len(lines) == 6 and all(line.startswith(("bsdgraph: error: --bsd", "bsdgraph: error: --lif"))
                                   for line in lines), r.err
    for part in ("recall=maybe: expected a boolean", "nope=1: unknown key", "v_th=abc: expected a number",
                 "reset=medium: expected one of hard, soft", "tau: expected KEY=VALUE", "lam must be a finite"):
        assert part in r.err
    r = assert_clean(cli("eval", tiny[0], "--checkpoint", "none.pt", "--lif", "v_th=-1"), codes=(2,))
    assert r.err.startswith("bsdgraph: error: --lif: node 'h") and str(tiny[0]) not in r.err


@pytest.mark.parametrize("argv, message", [
    (["train", "M", "--epochs", "-1"], "argument --epochs: must be >= 1, got -1"),
    (["train", "M", "--lr", "nan"], "argument --lr: must be a finite number"),
    (["train", "M", "--seed", str(2 ** 64)], "argument --seed: must fit in 64 bits"),
    (["bench", "M", "--threads", "0"], "argument --threads: must be between 1 and 1024, got 0"),
    (["import-nir", "M", "--dt", "inf"], "argument --dt: must be a finite number > 0"),
    (["eval", "M", "--checkpoint", "c", "--limit-test", "0"], "argument --limit-test: must be >= 1"),
])
def test_bad_flag_values_are_usage_errors(argv, message):
    r = assert_clean(cli(*argv), codes=(2,))
    assert message in r.err


def test_recall_false_trains_every_shipped_image_model():
    import dataclasses

    from bsdgraph import Op
    from bsdgraph.train.data import make_synthetic
    from bsdgraph.compiler.feedback import derive_feedback, segment
    from bsdgraph.runtime.cpu import cpu_runtime

    for name in ("fmnist_mlp", "fmnist_cnn", "fmnist_ae", "cifar_cnn"):
        model = load_model(MODELS / f"{name}.py")
        bsd = derive_feedback(model.graph, dataclasses.replace(model.bsd, recall=False))  # "h1_b is dangling" before
        first = segment(model.graph)[0]  # layer 1: neither its synapse nor its neuron is mirrored in B
        assert f"{first.synapse}_b" not in bsd and f"{first.neuron}_b" not in bsd
        ds = make_synthetic(2, 1, model.graph.by_op(Op.INPUT)[0].shape, 10, seed=0)
        y = ds.y_train if model.target == "labels" else ds.x_train.reshape(2, -1)
        result = cpu_runtime(bsd, seed=0).step(ds.x_train, y)
        assert result.losses and "reco0" not in result.losses, name
        assert all(np.isfinite(v) for v in result.losses.values()), name


def test_a_population_output_gets_a_population_target():
    from bsdgraph import GraphBuilder
    from bsdgraph.compiler.feedback import derive_feedback
    from bsdgraph.ir.diagnostics import GraphError

    g = GraphBuilder("pop", T=2)
    g.output(g.linear(g.lif(g.linear(g.input((4,)), 6)), 6), population=3)
    f = g.build()
    assert f["out"].attrs["target"] == "population" and f["out"].attrs["n_classes"] == 2
    derive_feedback(f)  # B's target code is 6 wide: it fits
    g = GraphBuilder("pop", T=2)
    g.output(g.linear(g.lif(g.linear(g.input((4,)), 6)), 6), population=3, target="onehot")
    with pytest.raises(GraphError, match="target 'onehot' with population=3"):
        g.build()


# ---------------------------------------------------------------------------------------------------- data layouts


@pytest.mark.parametrize("model, stored, axes", [
    ("img", (6, 5, 3), (0, 3, 1, 2)),      # channel-last images for a (3, 6, 5) model
    ("seq", (3, 4), (0, 2, 1)),            # [N, D, T] for a model reading [N, T=4, D=3]
])
def test_data_that_needs_a_transpose_is_refused_with_it(tmp_path, model, stored, axes):
    text = {"img": "g.flatten(g.input((3, 6, 5)))", "seq": "g.input((3,), encoding='sequence')"}[model]
    path = write(tmp_path / f"{model}.py", TINY_MODEL.replace("g.input((16,))", text)
                 .replace('GraphBuilder("tiny", T=2)', 'GraphBuilder("tiny", T=4)'))
    arrays = tiny_arrays(shape=stored)
    npz = write_npz(tmp_path / "d.npz", arrays)
    r = assert_clean(cli("train", path, "--npz", npz, "--out", tmp_path / "r"), codes=(1,))
    assert f"Fix: x = np.transpose(x, {axes})" in r.err and not (tmp_path / "r" / "checkpoint.pt").exists()
    fixed = {k: np.transpose(v, axes) if k.startswith("x") else v for k, v in arrays.items()}
    assert_clean(cli("train", path, "--npz", write_npz(tmp_path / "t.npz", fixed), "--out", tmp_path / "r2",
                     "--epochs", "1"), codes=(0,))


# ---------------------------------------------------------------------------------------------------- checkpoints


def _rewrite(path: Path, edit, checksum: bool = True) -> Path:
    doc = torch.load(path, weights_only=True)
    edit(doc)
    if checksum:
        doc["checksum"] = digest(doc)
    torch.save(doc, path)
    return path


def test_a_checkpoint_carries_a_checksum_of_its_contents(tmp_path, tiny):
    ck = _trained(tmp_path, tiny) / "checkpoint.pt"
    doc = load_checkpoint(ck)
    assert doc["version"] == 2 and doc["checksum"] == digest(doc)
    _rewrite(ck, lambda d: d["params"]["fc1.weight"].mul_(1.0001), checksum=False)
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        load_checkpoint(ck)


@pytest.mark.parametrize("command", ["eval", "run", "export-nir", "resume", "bench"])
def test_non_finite_weights_are_refused_naming_the_parameter(tmp_path, tiny, command):
    ck = _rewrite(_trained(tmp_path, tiny) / "checkpoint.pt", lambda d: d["params"]["fc2.bias"].__setitem__(1, np.nan))
    x = tmp_path / "x.npz"
    np.savez(x, x=np.zeros((2, 16), np.float32))
    argv = {"eval": ["eval", tiny[0], "--checkpoint", ck, "--npz", tiny[1]],
            "run": ["run", tiny[0], "--checkpoint", ck, "--input", x],
            "export-nir": ["export-nir", tiny[0], "--checkpoint", ck, "-o", tmp_path / "m.nir"],
            "resume": ["train", tiny[0], "--npz", tiny[1], "--out", ck.parent, "--resume", "--epochs", "2"],
            "bench": ["bench", tiny[0], "--energy", "--checkpoint", ck, "--npz", tiny[1]]}[command]
    r = assert_clean(cli(*argv), codes=(1,))
    assert "fc2.bias (layer fc2) holds NaN or infinite values" in r.err and len(r.err.splitlines()) == 1, r.err


@pytest.mark.parametrize("field, edit, message", [
    ("rng", lambda d: d.__setitem__("rng", d["rng"][:100]), "rng must be a CPU generator state"),
    ("epoch", lambda d: d.__setitem__("epoch", -1), "epoch must be a whole number >= 0"),
    ("history", lambda d: d["history"].append({"epoch": 7}), "history record 2 is not the epoch record"),
    ("params", lambda d: d["params"].__setitem__("fc1.weight", torch.zeros(3, 3)), "has shape [3, 3], the graph"),
    ("optimizer", lambda d: d["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(2)),
     "optimizer exp_avg of parameter 0 has shape [2]"),
    ("steps", lambda d: d.__setitem__("steps", 1.5), "steps must be a whole number"),
    ("train", lambda d: d["train"].__setitem__("lr", "fast"), "train holds invalid training options"),
])
def test_a_loadable_but_wrong_checkpoint_is_one_line(tmp_path, tiny, field, edit, message):
    run = _trained(tmp_path, tiny)
    ck = _rewrite(run / "checkpoint.pt", edit)
    for argv in (["eval", tiny[0], "--checkpoint", ck, "--npz", tiny[1]],
                 ["train", tiny[0], "--npz", tiny[1], "--out", run, "--resume", "--epochs", "2"]):
        r = assert_clean(cli(*argv), codes=(1,))
        assert message in r.err and len(r.err.splitlines()) == 1, r.err


AUTOENCODER = TINY_MODEL.replace("g.output(g.linear(h, 4))", "g.output(g.linear(h, 16), task='regression')") + \
    '\nTARGET = "input"\n'


def test_frechet_with_one_test_sample_is_a_usage_error(tmp_path, tiny):
    classifier = _trained(tmp_path, tiny, "classifier") / "checkpoint.pt"
    ae = _trained(tmp_path, (write(tmp_path / "ae.py", AUTOENCODER), tiny[1]), "ae") / "checkpoint.pt"
    argv = ["eval", tmp_path / "ae.py", "--checkpoint", ae, "--npz", tiny[1], "--frechet-classifier", classifier]
    r = assert_clean(cli(*argv, "--limit-test", "1"), codes=(2,))  # a ValueError traceback before
    assert "needs at least 2, got 1 (--limit-test)" in r.err
    assert "Fréchet distance" in assert_clean(cli(*argv, "--limit-test", "5"), codes=(0,)).out


# ---------------------------------------------------------------------------------------------------- memory, pipes


def test_a_model_too_large_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    from bsdgraph.train import memory

    monkeypatch.setattr(memory, "available", lambda device="cpu": (8 * 2 ** 30, "a test's 8 GiB"))
    wide = write(tmp_path / "wide.py", TINY_MODEL.replace("g.input((16,)), 12", "g.input((784,)), 40000")
                 .replace("g.output(g.linear(h, 4))", "g.output(g.linear(g.lif(g.linear(h, 40000)), 4))"))
    npz = write_npz(tmp_path / "w.npz", tiny_arrays(shape=(784,)))
    # refused before any runtime (and so any weight) exists: building one would fail the test
    monkeypatch.setattr("bsdgraph.train.trainer.backends", lambda: pytest.fail("a runtime was built"))
    r = assert_clean(cli("train", wide, "--npz", npz, "--out", tmp_path / "r"), codes=(1,))
    assert "does not fit in memory: it needs about" in r.err and "8.6 GB are available (a test's 8 GiB)" in r.err


def test_a_closed_pipe_ends_quietly(tmp_path):
    # more text than a pipe holds (64 KiB), so that the writer surely meets the closed pipe: 150 layers
    deep = write(tmp_path / "deep.py", TINY_MODEL.replace("h = g.lif(g.linear(g.input((16,)), 12))",
                                                          "h = g.input((16,))\n    for _ in range(150):\n"
                                                          "        h = g.lif(g.linear(h, 12))"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(f"{sys.executable} -m bsdgraph compile {deep} | head -c 10; echo \" ${{PIPESTATUS[0]}}\"",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert done.stdout.endswith(" 141\n") and done.stderr == "", (done.stdout, done.stderr)  # was: error: Broken pipe
