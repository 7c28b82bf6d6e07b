"""Training end to end: real learning on a synthetic task, exact resume, NaN stops, atomic checkpoints, CLI."""

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from bsdgraph.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bsdgraph.cli.main import main
from bsdgraph.train.data import make_synthetic
from bsdgraph.compiler.model_file import load_model
from bsdgraph.train.trainer import Trainer, health_warnings
from bsdgraph.train.config import TrainConfig, TrainingError

MODEL = """
from bsdgraph import GraphBuilder
TRAIN = dict(epochs=4, batch_size=40, lr=1e-2)
BSD = dict()
def build():
    g = GraphBuilder("syn", T=4)
    h = g.lif(g.linear(g.input((16,), encoding="{enc}"), 64))
    g.output(g.linear(h, 4))
    return g.build()
"""


@pytest.fixture
def model_file(tmp_path):
    def make(enc="direct"):
        path = tmp_path / f"syn_{enc}.py"
        path.write_text(MODEL.replace("{enc}", enc))
        return path
    return make


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(400, 200, (16,), 4, seed=0)


@pytest.fixture
def npz(tmp_path, synthetic):
    path = tmp_path / "syn.npz"
    np.savez(path, x_train=synthetic.x_train.numpy(), y_train=synthetic.y_train.numpy(),
             x_test=synthetic.x_test.numpy(), y_test=synthetic.y_test.numpy())
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("rule", ["bsd", "bptt"])
def test_train_cli_learns_the_synthetic_task_and_eval_agrees(capsys, tmp_path, model_file, npz, rule):
    out_dir = tmp_path / f"run_{rule}"
    code, out, err = run(capsys, "train", model_file(), "--npz", npz, "--out", out_dir, "--rule", rule, "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["test_accuracy"] > 0.85, records[-1]  # chance is 0.25
    assert set(records[-1]["rates"]) >= {"h1"} and records[-1]["samples_per_s"] > 0
    assert "done: test accuracy" in err and (out_dir / "checkpoint.pt").is_file()
    code, out, _ = run(capsys, "eval", model_file(), "--checkpoint", out_dir / "checkpoint.pt", "--npz", npz,
                       "--json")
    assert code == 0 and json.loads(out)["test_accuracy"] == pytest.approx(records[-1]["test_accuracy"])
    code, out, err = run(capsys, "plot", out_dir, "--npz", npz, "--sample", 3)
    pngs = {"curves.png", "rates.png"} | ({"raster.png"} if rule == "bsd" else set())
    assert code == 0 and {p.name for p in out_dir.glob("*.png")} == pngs, err
    assert all((out_dir / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_plot_errors(capsys, tmp_path):
    code, _, err = run(capsys, "plot", tmp_path)
    assert code == 1 and "metrics.jsonl: not found" in err
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    code, _, err = run(capsys, "plot", tmp_path)
    assert code == 1 and "line 1 is not JSON" in err


@pytest.mark.parametrize("enc, compile", [("direct", "off"), ("poisson", "off"), ("poisson", "aot_eager")])
def test_resume_is_exact(tmp_path, model_file, synthetic, enc, compile):
    """Also for a compiled step (traced: the same graph Inductor would generate code for), whose learning-rate
    schedule and Poisson seeds are tensors and whose resumed runtime compiles afresh."""
    model = load_model(model_file(enc))
    cfg = TrainConfig.from_model(model.train, epochs=2, schedule="cosine")
    straight = Trainer(model, synthetic, cfg, tmp_path / "a", compile=compile)
    straight.run()
    first = Trainer(model, synthetic, TrainConfig.from_model(model.train, epochs=1, schedule="cosine"), tmp_path / "b",
                    compile=compile)
    first.run()
    # a new process would start here: only the checkpoint carries state across
    resumed = Trainer(model, synthetic, cfg, tmp_path / "b", compile=compile)
    resumed.resume()
    resumed.run()
    for k, p in straight.rt.params.items():
        assert torch.equal(p, resumed.rt.params[k]), k
    assert straight.history[-1]["losses"] == resumed.history[-1]["losses"]


def test_nan_stops_training_naming_the_layer_and_keeps_the_last_checkpoint(tmp_path, model_file, synthetic):
    model = load_model(model_file())
    trainer = Trainer(model, synthetic, TrainConfig.from_model(model.train, epochs=3), tmp_path)
    trainer.cfg = TrainConfig.from_model(model.train, epochs=1)
    trainer.run()
    ck = trainer.checkpoint_path
    digest = hashlib.sha256(ck.read_bytes()).hexdigest()
    trainer.cfg = TrainConfig.from_model(model.train, epochs=3)
    trainer.rt.params["fc1.weight"][0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"(loss reco1 \(layer 1\) is nan|layer fc1).* at epoch 2, step 1"):
        trainer.run()
    assert hashlib.sha256(ck.read_bytes()).hexdigest() == digest
    assert load_checkpoint(ck)["epoch"] == 1


def test_nan_checked_every_few_steps_still_stops_before_the_checkpoint(tmp_path, model_file, synthetic):
    """On a GPU the guard reads the losses summed over several steps (a read drains the device's queue): a NaN is
    then named at the next check, and the epoch's checkpoint is still never written over with it."""
    model = load_model(model_file())
    trainer = Trainer(model, synthetic, TrainConfig.from_model(model.train, epochs=1), tmp_path)
    trainer.run()
    digest = hashlib.sha256(trainer.checkpoint_path.read_bytes()).hexdigest()
    trainer.cfg, trainer.check_every = TrainConfig.from_model(model.train, epochs=2), 4
    trainer.rt.params["fc1.weight"][0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"at epoch 2, step 4 \(losses checked every 4 steps\)"):
        trainer.run()
    assert hashlib.sha256(trainer.checkpoint_path.read_bytes()).hexdigest() == digest


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    def crash(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert load_checkpoint(path)["epoch"] == 1


def test_unreadable_checkpoints_are_clear_errors(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"epoch": 1})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"something": 1}, path)
    with pytest.raises(CheckpointError, match="not a bsdgraph checkpoint"):
        load_checkpoint(path)


def test_health_warnings():
    w = health_warnings({"h1": 0.0, "h2": 0.2, "h3": 0.95})
    assert len(w) == 2 and "h1 is silent" in w[0] and "h3 is saturated" in w[1]


def test_silent_layer_advice_fits_the_run():
    """Calibration is suggested only to a run that did not use it; batchnorm only for a layer without one, named
    by its F layer when the silent layer is B's."""
    from bsdgraph import GraphBuilder, derive_feedback

    g = GraphBuilder("c", T=2)
    h1 = g.lif(g.conv2d(g.input((1, 6, 6)), 2, 3, padding=1))
    h2 = g.lif(g.batchnorm(g.conv2d(h1, 2, 3, padding=1)))
    g.output(g.linear(g.flatten(h2), 3))
    bsd = derive_feedback(g.build())
    (plain,) = health_warnings({"h1_b": 0.0}, bsd)
    assert "--init calibrated" in plain and "g.batchnorm(...) on the current of 'h1'" in plain and "v_th" in plain
    (calibrated,) = health_warnings({h2: 0.0}, bsd, calibrated=True)
    assert "--init calibrated" not in calibrated and "batchnorm" not in calibrated and "--lif v_th=0.15" in calibrated


def test_calibrated_init_brings_a_high_threshold_network_into_the_band(tmp_path, model_file, synthetic):
    from dataclasses import replace

    from bsdgraph.ir.graph import Op
    from bsdgraph.compiler.passes import set_attrs

    model = load_model(model_file())
    model = replace(model, graph=set_attrs(model.graph, Op.LIF, v_th=3.0))  # default init: silent
    trainer = Trainer(model, synthetic, TrainConfig.from_model(model.train, init="calibrated"), tmp_path)
    report = trainer.initialise()
    assert set(report) == {"fc1", "fc2_b"}
    assert all(0.05 <= rate <= 0.25 and factor > 1 for factor, rate in report.values()), report


def test_init_band_narrows_where_calibration_leaves_each_layer(tmp_path, model_file, synthetic):
    """The default band takes any rate in 5-25 %; init_band=[0.13, 0.16] (a TRAIN dict writes a list) must move a
    layer that starts elsewhere into it, so two inits that land at different rates start from similar ones."""
    model = load_model(model_file())
    cfg = TrainConfig.from_model({**model.train, "init_band": [0.13, 0.16]}, init="calibrated")
    assert cfg.init_band == (0.13, 0.16)
    report = Trainer(model, synthetic, cfg, tmp_path).initialise()
    assert set(report) == {"fc1", "fc2_b"}
    assert all(0.13 <= rate <= 0.16 for _, rate in report.values()), report
    default = Trainer(model, synthetic, TrainConfig.from_model(model.train, init="calibrated"), tmp_path).initialise()
    assert any(not 0.13 <= rate <= 0.16 for _, rate in default.values()), default  # the band did move something
    for bad in ([0.2, 0.1], [0, 0.5], (0.1,), "0.1,0.2", [0.1, 1.0]):
        with pytest.raises(TrainingError, match=r"init_band=.*0 < lo < hi < 1"):
            TrainConfig.from_model({"init_band": bad})


BAD = {
    "missing": (lambda p: None, r"error: .*missing.npz"),
    "shape": (lambda p: np.savez(p, x_train=np.zeros((4, 3, 3), np.float32), y_train=np.zeros(4, np.int64),
                                 x_test=np.zeros((2, 3, 3), np.float32), y_test=np.zeros(2, np.int64)),
              r"model expects \(16,\)"),
    "labels": (lambda p: np.savez(p, x_train=np.zeros((4, 16), np.float32), y_train=np.array([0, 1, 2, 9]),
                                  x_test=np.zeros((2, 16), np.float32), y_test=np.zeros(2, np.int64)),
               r"label 9 .* 4 classes"),
    "nan": (lambda p: np.savez(p, x_train=np.full((4, 16), np.nan, np.float32), y_train=np.zeros(4, np.int64),
                               x_test=np.zeros((2, 16), np.float32), y_test=np.zeros(2, np.int64)), r"x_train\[0, 0\] is nan"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_exits_1_with_a_message(capsys, tmp_path, model_file, case):
    make, pattern = BAD[case]
    path = tmp_path / ("missing.npz" if case == "missing" else f"{case}.npz")
    make(path)
    code, out, err = run(capsys, "train", model_file(), "--npz", path, "--out", tmp_path / "r", "--json")
    assert code == 1 and re.search(pattern, err), err
    assert "Traceback" not in err


def test_train_cli_usage_errors(capsys, tmp_path, model_file, npz):
    out_dir = tmp_path / "r"
    assert run(capsys, "train", model_file(), "--npz", npz, "--out", out_dir, "--epochs", "1")[0] == 0
    code, _, err = run(capsys, "train", model_file(), "--npz", npz, "--out", out_dir)
    assert code == 2 and "already holds a checkpoint" in err
    code, _, err = run(capsys, "train", model_file(), "--npz", npz, "--lif", "v_th")
    assert code == 2 and "expected KEY=VALUE" in err
    code, _, err = run(capsys, "train", model_file(), "--npz", npz, "--epochs", "0", "--out", tmp_path / "z")
    assert code == 2 and "argument --epochs: must be >= 1, got 0" in err
    code, _, err = run(capsys, "train", model_file(), "--npz", npz, "--lif", "v_th=-1", "--out", tmp_path / "z")
    assert code == 2 and "--lif: node" in err and "v_th=-1.0 must be above v_reset" in err
    code, _, err = run(capsys, "train", model_file(), "--resume", "--npz", npz, "--out", tmp_path / "none")
    assert code == 1 and "checkpoint not found" in err


def test_recall_renders_a_grid_for_image_models_and_refuses_others(capsys, tmp_path, model_file, npz):
    image_model = tmp_path / "img.py"
    image_model.write_text(MODEL.replace('g.input((16,), encoding="{enc}")', "g.flatten(g.input((1, 4, 4)))")
                           .replace("TRAIN = dict(epochs=4", "TRAIN = dict(epochs=1"))
    assert run(capsys, "train", image_model, "--npz", npz, "--out", tmp_path / "img")[0] == 0
    png = tmp_path / "recall.png"
    code, out, err = run(capsys, "recall", image_model, "--checkpoint", tmp_path / "img" / "checkpoint.pt",
                         "--out", png)
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG", err
    assert run(capsys, "train", model_file(), "--npz", npz, "--out", tmp_path / "flat", "--epochs", "1")[0] == 0
    code, _, err = run(capsys, "recall", model_file(), "--checkpoint", tmp_path / "flat" / "checkpoint.pt")
    assert code == 1 and "renders images" in err
