"""The command line: exit codes (0 ok, 1 invalid model, 2 usage) and messages, never a traceback."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bsdgraph.cli.main import main
from bsdgraph.compiler.model_file import load_model

ROOT = Path(__file__).resolve().parents[1]
MLP = str(ROOT / "models" / "fmnist_mlp.py")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compile_all_stages(capsys):
    code, out, err = run(capsys, "compile", MLP)
    assert code == 0, err
    assert "== forward network F" in out and "== BSD graph" in out and "== plan" in out
    assert "%fc1_b : f32[T,B,784] = linear[in_features=1024, out_features=784" in out
    assert "linear_lif_forward" in out and "reco_loss_grad" in out and "weight_grad" in out


def test_compile_cnn_backward_shows_exact_transposed_convolutions(capsys):
    code, out, _ = run(capsys, "compile", str(ROOT / "models" / "fmnist_cnn.py"), "--emit", "backward")
    assert code == 0
    c = load_model(ROOT / "models" / "fmnist_cnn.py").graph["conv1"].shape[0]  # its first conv width
    assert f"%conv1_b : f32[T,B,1,28,28] = conv_t2d[in_channels={c}, out_channels=1" in out
    assert f"%pool1_b : f32[T,B,{c},28,28] = upsample2d[size=(28,28)]" in out


@pytest.mark.parametrize("model", ["fmnist_mlp.py", "fmnist_cnn.py", "cifar_cnn.py", "fmnist_ae.py"])
def test_every_model_file_compiles_to_json(capsys, model):
    code, out, _ = run(capsys, "compile", str(ROOT / "models" / model), "--json")
    doc = json.loads(out)
    assert code == 0 and set(doc) == {"model", "ir", "backward", "pairing", "plan", "step", "kernels"}
    assert doc["plan"]["kernels"]
    # each neuron type's generated twin and Triton source, listing the nodes of that type (F's and B's)
    assert doc["kernels"]["lif"]["nodes"] and "def forward_kernel(" in doc["kernels"]["lif"]["triton"]
    ast.parse(doc["kernels"]["lif"]["twin"])
    # the generated step: one statement per launch of the plan, and source Python accepts
    step = doc["step"]["step"]
    ast.parse(step)
    assert [f"K[{i}](C[{i}]" in step for i in range(len(doc["plan"]["launches"]))] == [True] * len(
        doc["plan"]["launches"])


def test_output_file(capsys, tmp_path):
    target = tmp_path / "plan.txt"
    code, out, err = run(capsys, "compile", MLP, "--emit", "plan", "-o", str(target))
    assert code == 0 and out == "" and target.read_text().startswith("== plan")
    code, _, err = run(capsys, "compile", MLP, "-o", str(tmp_path / "missing" / "x.txt"))
    assert code == 1 and "No such file or directory" in err


BAD_MODELS = {
    "syntax.py": ("def build(:\n", r"syntax.py:1: the model file failed to import: SyntaxError"),
    "raises_on_import.py": ("import math\nraise ValueError('nope')\n", r"raises_on_import.py:2: .*ValueError: nope"),
    "no_build.py": ("x = 1\n", r"has no build\(\) function"),
    "build_raises.py": ("def build():\n    return 1 / 0\n", r"build_raises.py:2: build\(\) raised ZeroDivisionError"),
    "wrong_type.py": ("def build():\n    return 42\n", r"build\(\) returned int, expected a bsdgraph Graph"),
    "bad_bsd.py": ("from models.fmnist_mlp import build\nBSD = {'lamda': 1}\n", r"unknown BSD option"),
    "bad_train.py": ("from models.fmnist_mlp import build\nTRAIN = 3\n", r"TRAIN must be a dict"),
    "invalid_graph.py": (
        "from bsdgraph import GraphBuilder\n"
        "def build():\n"
        "    g = GraphBuilder('bad')\n"
        "    h = g.lif(g.linear(g.input((4,)), 8), tau=-1.0)\n"
        "    g.output(g.linear(h, 2))\n"
        "    return g.build()\n",
        r"invalid_graph.py: node 'h1' \(lif\): tau must be > 0",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_MODELS))
def test_bad_model_files_exit_1_with_a_clear_message(capsys, tmp_path, monkeypatch, name):
    monkeypatch.syspath_prepend(str(ROOT))
    source, pattern = BAD_MODELS[name]
    path = tmp_path / name
    path.write_text(source)
    code, out, err = run(capsys, "compile", str(path))
    assert code == 1 and out == ""
    assert __import__("re").search(pattern, err), err
    assert "Traceback" not in err


def test_missing_file_and_usage_errors(capsys):
    assert run(capsys, "compile", "no/such/model.py")[0] == 1
    code, _, err = run(capsys, "compile", MLP, "--emit", "everything")
    assert code == 2 and "invalid choice" in err
    assert run(capsys)[0] == 2
    assert run(capsys, "--help")[0] == 0


def test_console_script_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def build():\n    raise RuntimeError('boom')\n")
    proc = subprocess.run([sys.executable, "-m", "bsdgraph", "compile", str(bad)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "RuntimeError: boom" in proc.stderr


@pytest.mark.parametrize("model,setting,noted", [
    ("fmnist_ae.py", "lam=0.3", True),        # every ReCo layer of the autoencoder has the frequency split
    ("fmnist_ae.py", "lam_high=1.2", False),
    ("fmnist_mlp.py", "lam_low=0.2", True),   # no spatial layer: no frequency split anywhere
    ("fmnist_mlp.py", "lam=0.3", False),
])
def test_a_lam_setting_that_reaches_no_reco_layer_is_noted(capsys, model, setting, noted):
    import argparse

    from bsdgraph.cli.common import apply_overrides

    args = argparse.Namespace(lif=[], bsd=[setting], encoding=None)
    edited = apply_overrides(load_model(ROOT / "models" / model), args)
    key, value = setting.split("=")
    assert getattr(edited.bsd, key) == float(value)  # applied either way
    err = capsys.readouterr().err
    assert (f"note: --bsd {setting} changes nothing here" in err) == noted, err


def test_version_names_the_package_and_torch(capsys):
    from bsdgraph.version import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"bsdgraph {__version__} (torch ")


def test_the_progress_bar_follows_stderr_not_stdout(monkeypatch):
    """`bsdgraph train ... | tee log` pipes stdout (the records become JSON lines) but the bar, on stderr, stays."""
    import io
    import sys

    from bsdgraph.train.trainer import tqdm_progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert tqdm_progress(io.StringIO()) is None
    bar = tqdm_progress(Terminal())
    assert bar is not None and list(bar(iter([1, 2]), 2, 0)) == [1, 2]
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert tqdm_progress() is not None   # the default stream is stderr, whatever stdout is


def test_eval_shows_a_progress_bar_on_a_terminal_and_counts_every_batch(monkeypatch):
    import io

    import torch

    from bsdgraph import GraphBuilder, derive_feedback
    from bsdgraph.runtime.cpu import cpu_runtime
    from bsdgraph.train.trainer import evaluate, tqdm_progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    g = GraphBuilder("m", T=2)
    g.output(g.linear(g.lif(g.linear(g.input((4,)), 6)), 3))
    rt = cpu_runtime(derive_feedback(g.build()), seed=0)
    x, y = torch.rand(25, 4), torch.arange(25) % 3
    seen = []
    bar = tqdm_progress(Terminal(), what="evaluating")

    def spy(it, total):
        seen.append(total)
        return bar(it, total)

    assert evaluate(rt, x, y, batch_size=10, progress=spy) == evaluate(rt, x, y, batch_size=10)
    assert seen == [3]  # 25 samples in batches of 10


SMALL_MODEL = """
from bsdgraph import GraphBuilder
TRAIN = dict(epochs=1, batch_size=32)
def build():
    g = GraphBuilder("small", T=2)
    g.output(g.linear(g.lif(g.linear(g.flatten(g.input((1, 8, 8))), 16)), 4))
    return g.build()
"""


def small_npz(tmp_path, seed: int, n: int = 40, train: int = 30):
    """(model file, npz) of SMALL_MODEL and n random 8x8 samples of 4 classes, the first `train` for training."""
    rng = np.random.default_rng(seed)
    x, y = rng.random((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 4, n)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=x[:train], y_train=y[:train], x_test=x[train:], y_test=y[train:])
    model = tmp_path / "m.py"
    model.write_text(SMALL_MODEL)
    return model, npz


def test_plot_of_a_run_directory_uses_the_data_the_run_trained_on(capsys, tmp_path):
    """The run records its --npz (path and SHA-256); `plot RUN_DIR` draws the raster from it without being told,
    and refuses the file once it has changed (the raster would show other data)."""
    model, npz = small_npz(tmp_path, 0, n=60, train=40)
    code, _, err = run(capsys, "train", str(model), "--npz", str(npz), "--out", str(tmp_path / "r"))
    assert code == 0, err
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert manifest["data"] == "npz" and manifest["data_path"] == str(npz.resolve())
    code, out, err = run(capsys, "plot", str(tmp_path / "r"))
    assert code == 0 and "raster.png" in out and f"using the run's data, {npz.resolve()}" in err
    with open(npz, "ab") as f:
        f.write(b"!")
    code, _, err = run(capsys, "plot", str(tmp_path / "r"))
    assert code == 2 and "changed since the run trained on it" in err


def test_resume_refuses_options_that_changed_unless_changed_on_purpose(capsys, tmp_path):
    """An edited TRAIN dict would silently change the rest of a run: --resume names it; the same change given on
    the command line (--lr) is taken as meant. More epochs are what resuming is for."""
    model, npz = small_npz(tmp_path, 1)
    args = ["train", str(model), "--npz", str(npz), "--out", str(tmp_path / "r")]
    assert run(capsys, *args)[0] == 0
    model.write_text(SMALL_MODEL.replace("batch_size=32", "batch_size=32, lr=2e-3"))
    code, _, err = run(capsys, *args, "--resume", "--epochs", "2")
    assert code == 1 and "lr 0.001 -> 0.002" in err and "pass each on the command line" in err
    code, _, err = run(capsys, *args, "--resume", "--epochs", "2", "--lr", "2e-3")
    assert code == 0, err
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_remembers_the_options_the_run_was_started_with(capsys, tmp_path):
    """--lr given when the run started need not be repeated: the run directory records it, and a resume without
    it keeps the run's learning rate (instead of the model file's, or a refusal)."""
    model, npz = small_npz(tmp_path, 2)
    args = ["train", str(model), "--npz", str(npz), "--out", str(tmp_path / "r")]
    assert run(capsys, *args, "--lr", "0.02")[0] == 0
    assert json.loads((tmp_path / "r" / "run.json").read_text())["train_flags"] == {"lr": 0.02}
    code, _, err = run(capsys, *args, "--resume", "--epochs", "2")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == [0.02, 0.02]


def test_compile_and_draw_take_the_training_edits_or_a_run_directory(capsys, tmp_path):
    """`compile`/`draw` accept --bsd / --lif like train; given a run directory they show the graph its checkpoint
    trained (here with lam 0.2 and v_th 0.4 from the training command), with no model file needed."""
    model, npz = small_npz(tmp_path, 3)
    edits = ["--bsd", "lam=0.2", "--lif", "v_th=0.4"]
    code, out, _ = run(capsys, "compile", str(model), "--emit", "backward", *edits)
    assert code == 0 and "lam=0.2" in out and "v_th=0.4" in out
    assert run(capsys, "draw", str(model), "-o", str(tmp_path / "m.dot"), *edits)[0] == 0
    assert run(capsys, "train", str(model), "--npz", str(npz), "--out", str(tmp_path / "r"), *edits)[0] == 0
    model.unlink()   # the run directory alone
    code, from_run, _ = run(capsys, "compile", str(tmp_path / "r"), "--emit", "backward")
    assert code == 0 and from_run.splitlines()[1:] == out.splitlines()[1:]
    code, _, err = run(capsys, "draw", str(tmp_path / "r"), "-o", str(tmp_path / "r.dot"))
    assert code == 0 and (tmp_path / "r.dot").read_text() == (tmp_path / "m.dot").read_text()
    code, _, err = run(capsys, "compile", str(tmp_path / "r"), "--bsd", "lam=0.5")
    assert code == 2 and "a run directory shows the graph it trained" in err


def test_eval_of_a_run_directory_needs_nothing_else(capsys, tmp_path):
    """`eval RUN_DIR`: the run's checkpoint, graph and recorded data; the same figure as eval with the model
    file, checkpoint and --npz spelled out."""
    model, npz = small_npz(tmp_path, 4)
    assert run(capsys, "train", str(model), "--npz", str(npz), "--out", str(tmp_path / "r"))[0] == 0
    code, spelled, _ = run(capsys, "eval", str(model), "--checkpoint", str(tmp_path / "r" /
                                                                                     "checkpoint.pt"),
                           "--npz", str(npz), "--json")
    code2, short, err = run(capsys, "eval", str(tmp_path / "r"), "--json")
    assert code == code2 == 0, err
    assert json.loads(short)["test_accuracy"] == json.loads(spelled)["test_accuracy"]
    assert run(capsys, "eval", str(model))[0] == 2   # a model file needs --checkpoint


def test_recall_and_export_nir_of_a_run_directory(capsys, tmp_path):
    """`recall RUN_DIR` and `export-nir RUN_DIR` need no model file: the same NIR file as with the model file and
    --checkpoint spelled out, and B's recall grid from the run's checkpoint."""
    pytest.importorskip("nir")
    import nir

    model, npz = small_npz(tmp_path, 5)
    assert run(capsys, "train", str(model), "--npz", str(npz), "--out", str(tmp_path / "r"))[0] == 0
    ck = str(tmp_path / "r" / "checkpoint.pt")
    assert run(capsys, "export-nir", str(model), "--checkpoint", ck, "-o", str(tmp_path / "m.nir"))[0] == 0
    code, _, err = run(capsys, "export-nir", str(tmp_path / "r"), "-o", str(tmp_path / "r.nir"), "--with-backward")
    assert code == 0, err
    a, b = nir.read(tmp_path / "m.nir"), nir.read(tmp_path / "r.nir")
    assert sorted(a.nodes) == sorted(b.nodes)
    assert all(np.array_equal(a.nodes[k].weight, b.nodes[k].weight) for k in a.nodes if hasattr(a.nodes[k], "weight"))
    assert (tmp_path / "r.backward.nir").is_file()
    code, out, err = run(capsys, "recall", str(tmp_path / "r"), "--out", str(tmp_path / "recall.png"))
    assert code == 0 and (tmp_path / "recall.png").stat().st_size > 0, err
    assert run(capsys, "recall", str(model), "--out", str(tmp_path / "x.png"))[0] == 2   # a file needs --checkpoint


def test_train_is_a_thin_layer_on_the_api_and_says_what_it_does(capsys, tmp_path, monkeypatch):
    """`bsdgraph train` runs bsdgraph.api.train_run, the function bsdgraph.fit runs: same trainer, same run
    directory rules; the command adds its flags and data to the run's record and prints."""
    import bsdgraph.api as api

    model, npz = small_npz(tmp_path, 0)
    calls, real = [], api.train_run

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "train_run", spy)
    code, _, err = run(capsys, "train", str(model), "--npz", str(npz), "--out", str(tmp_path / "r"), "--lr", "0.01")
    assert code == 0, err
    (kw,) = calls
    assert kw["record"]["train_flags"] == {"lr": 0.01} and kw["record"]["data"] == "npz" and not kw["resume"]
    assert "training " in err and "done: test accuracy" in err   # said through train_run's `say`
    fit_calls = len(calls)
    x = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
    api.fit(api.net(str(model)), (x, np.arange(20) % 4), epochs=1, out=tmp_path / "f", progress=False)
    assert len(calls) == fit_calls + 1 and calls[-1]["record"]["argv"] == ["<python api>"]


def test_a_notebook_gets_a_progress_bar_though_its_stderr_is_no_terminal(monkeypatch):
    import io
    import sys
    import types

    from bsdgraph.train.trainer import tqdm_progress

    assert tqdm_progress(io.StringIO()) is None
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))  # what a Jupyter kernel has loaded
    bar = tqdm_progress(io.StringIO())
    assert bar is not None and list(bar(iter([1, 2, 3]), 3, 0)) == [1, 2, 3]
