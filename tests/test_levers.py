"""The accuracy levers of issue 25: each option changes what it should and nothing else.

Validation split and best-checkpoint selection, early stopping, input standardisation, label smoothing, per-layer
lam and learning rates, batchnorm insertion, and the sweep runner."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bsdgraph import GraphBuilder
from bsdgraph.compiler.feedback import BSDConfig, derive_feedback, layer_of_params
from bsdgraph.compiler.model_file import load_model
from bsdgraph.compiler.passes import insert_batchnorm
from bsdgraph.compiler.program import compile_model
from bsdgraph.ir.diagnostics import GraphError
from bsdgraph.ir.graph import Op
from bsdgraph.runtime.losses import class_loss
from bsdgraph.train.checkpoint import load_checkpoint
from bsdgraph.train.config import TrainConfig, TrainingError
from bsdgraph.train.data import make_synthetic
from bsdgraph.train.prepare import VAL_SEED, holdout, input_stats
from bsdgraph.train.trainer import Trainer, best_epoch, evaluate, load_for_eval, make_runtime

ROOT = Path(__file__).resolve().parents[1]

MODEL = """
from bsdgraph import GraphBuilder
TRAIN = dict(epochs=3, batch_size=50, lr=1e-2)
def build():
    g = GraphBuilder("lev", T=3)
    h = g.lif(g.linear(g.input((12,)), 32))
    h = g.lif(g.linear(h, 24))
    g.output(g.linear(h, 4))
    return g.build()
"""


@pytest.fixture
def model(model_path):
    return load_model(model_path)


@pytest.fixture(scope="module")
def data():
    # samples far from 0 mean and unit scale, so that standardising them changes the numbers a network sees
    ds = make_synthetic(300, 100, (12,), 4, seed=1)
    return dataclasses.replace(ds, x_train=ds.x_train * 3 + 2, x_test=ds.x_test * 3 + 2)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "lev.py"
    path.write_text(MODEL)
    return path


def write_npz(path, data, scale: float = 1.0):
    """``data`` as an npz file for ``--npz`` (its stimulus times ``scale``)."""
    import numpy as np

    np.savez(path, x_train=data.x_train.numpy() * scale, y_train=data.y_train.numpy(),
             x_test=data.x_test.numpy() * scale, y_test=data.y_test.numpy())
    return path


def trainer(model, data, tmp_path, rule="bsd", **train):
    cfg = TrainConfig.from_model({**model.train, **train})
    return Trainer(model, data, cfg, tmp_path / f"run_{rule}", rule=rule, backend="cpu" if rule == "bsd" else None)


# ------------------------------------------------------------------------------------------ validation split


def test_the_validation_split_comes_from_the_training_split_alone_and_is_the_same_for_every_seed(data):
    kept, (xv, yv) = holdout(data, 0.2)
    assert len(xv) == 60 and kept.n_train == 240
    rows = {tuple(r.tolist()) for r in data.x_train}
    val_rows = [tuple(r.tolist()) for r in xv]
    assert all(r in rows for r in val_rows)                                      # drawn from training samples
    assert not set(val_rows) & {tuple(r.tolist()) for r in kept.x_train}          # none of them is trained on
    assert not set(val_rows) & {tuple(r.tolist()) for r in data.x_test}           # never a test sample
    assert torch.equal(kept.x_test, data.x_test) and torch.equal(kept.y_test, data.y_test)
    again = holdout(data, 0.2)[1][0]
    assert torch.equal(again, xv)  # a fixed draw (VAL_SEED), whatever the run's seed
    assert VAL_SEED == 20260


def test_best_epoch_is_the_best_validation_result_and_the_earliest_of_equals():
    acc = [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.7}, {"epoch": 3, "val_accuracy": 0.7},
           {"epoch": 4, "val_accuracy": 0.6}]
    assert best_epoch(acc) == 2
    mse = [{"epoch": 1, "val_mse": 0.3}, {"epoch": 2, "val_mse": 0.1}, {"epoch": 3, "val_mse": 0.2}]
    assert best_epoch(mse) == 2
    assert best_epoch([{"epoch": 1, "test_accuracy": 0.9}]) is None


def test_best_pt_holds_the_epoch_best_on_validation_and_evaluates_to_what_its_record_says(model, data, tmp_path):
    t = trainer(model, data, tmp_path, epochs=4, val_split=0.25)
    history = t.run()
    assert t.data.n_train == 225  # the held-out quarter is not trained on
    assert all("val_accuracy" in r and "best_epoch" in r for r in history)
    best = best_epoch(history)
    assert history[-1]["best_epoch"] == best
    ck = load_checkpoint(t.best_path)
    assert ck["epoch"] == best
    rt, _ = load_for_eval(model, t.best_path, "cpu")
    assert evaluate(rt, data.x_test, data.y_test)["accuracy"] == history[best - 1]["test_accuracy"]
    assert evaluate(rt, *t.val)["accuracy"] == history[best - 1]["val_accuracy"]


def test_early_stopping_stops_patience_epochs_after_the_best_and_a_resumed_run_stays_stopped(model, data,
                                                                                              tmp_path):
    t = trainer(model, data, tmp_path, epochs=10, val_split=0.2, patience=2)
    scripted = iter([0.5, 0.8, 0.6, 0.7, 0.9, 0.95])  # best at epoch 2, then two epochs without a better one

    def epoch():  # the loop's logic is under test, not learning: each epoch reports a scripted result
        val = next(scripted)
        rec = {"epoch": t.epoch + 1, "val_accuracy": val, "test_accuracy": 0.0, "warnings": [], "losses": {},
               "rates": {}}
        return {**rec, "best_epoch": best_epoch([*t.history, rec])}

    t._epoch = epoch
    assert [r["epoch"] for r in t.run()] == [1, 2, 3, 4]
    assert t.stopped_early() and load_checkpoint(t.best_path)["epoch"] == 2
    again = trainer(model, data, tmp_path, epochs=10, val_split=0.2, patience=2)
    again.resume()
    assert again.stopped_early() and again.run()[-1]["epoch"] == 4


def test_patience_without_a_validation_split_and_a_bad_split_are_refused():
    with pytest.raises(TrainingError, match="set val_split too"):
        TrainConfig(patience=3).check()
    with pytest.raises(TrainingError, match="val_split=1.0"):
        TrainConfig(val_split=1.0).check()


# ------------------------------------------------------------------------------------------ standardisation


def test_input_stats_are_per_channel_per_feature_and_per_sequence_feature():
    x = torch.randn(50, 3, 4, 4) * torch.tensor([1.0, 2.0, 5.0])[:, None, None] + 7
    s = input_stats(x, sequence=False)
    assert s["mean"].shape == (3, 1, 1)
    assert torch.allclose(s["std"].flatten(), x.transpose(0, 1).reshape(3, -1).std(1), rtol=1e-5)
    assert input_stats(torch.randn(50, 6), False)["mean"].shape == (6,)
    assert input_stats(torch.randn(50, 5, 6), True)["mean"].shape == (1, 6)
    constant = input_stats(torch.ones(10, 4), False)  # no division by ~0
    assert torch.equal(constant["std"], torch.ones(4))


def test_standardize_trains_on_standardised_samples_and_every_later_use_applies_the_same_statistics(
        model, data, tmp_path):
    t = trainer(model, data, tmp_path, epochs=2, standardize=True, val_split=0.1)
    kept, _ = holdout(data, 0.1)
    want = input_stats(kept.x_train, False)  # from the training samples only, not the validation or test ones
    assert torch.allclose(t.input_stats["mean"], want["mean"]) and torch.allclose(t.input_stats["std"], want["std"])
    assert abs(float(t.data.x_train.mean())) < 1e-5 and abs(float(t.data.x_train.std()) - 1) < 0.05
    history = t.run()
    ck = load_checkpoint(t.checkpoint_path)
    assert torch.equal(ck["input_stats"]["mean"], t.input_stats["mean"])
    rt, _ = load_for_eval(model, t.checkpoint_path, "cpu")
    assert evaluate(rt, data.x_test, data.y_test)["accuracy"] == history[-1]["test_accuracy"]
    raw = make_runtime(t.program, "cpu", t.cfg, params=ck["params"], state=ck["state"], training=False)
    standardised = (data.x_test - want["mean"]) / want["std"]
    assert torch.equal(rt.predict(data.x_test), raw.predict(standardised))
    assert not torch.equal(raw.predict(data.x_test), raw.predict(standardised))  # it matters here
    from bsdgraph.train.prepare import in_input_units

    images = torch.randn(4, 12)  # B generates standardised stimuli; recall shows them in the stimulus's own units
    assert torch.allclose(in_input_units(images, ck["input_stats"]), images * want["std"] + want["mean"])
    assert in_input_units(images, None) is images


def test_standardize_refuses_poisson_input(tmp_path, data):
    path = tmp_path / "p.py"
    path.write_text(MODEL.replace("g.input((12,))", 'g.input((12,), encoding="poisson")'))
    with pytest.raises(TrainingError, match="Poisson"):
        trainer(load_model(path), data, tmp_path, standardize=True)


# ------------------------------------------------------------------------------------------ label smoothing


def test_label_smoothing_is_the_ce_against_the_smoothed_distribution_and_bptt_uses_it_too(model):
    v = torch.randn(3, 8, 4)
    y = torch.randint(0, 4, (8,))
    z = v.mean(0)
    target = F.one_hot(y, 4).float() * 0.8 + 0.2 / 4
    want = -(target * z.log_softmax(1)).sum(1).mean()
    assert torch.allclose(class_loss(v, y, 1, False, 0.2), want, atol=1e-6)
    bsd = compile_model(dataclasses.replace(model, bsd=BSDConfig(label_smoothing=0.2))).graph
    assert [n.attrs["smoothing"] for n in bsd.by_op(Op.CE)] == [0.2]
    assert compile_model(model).graph.by_op(Op.CE)[0].attrs["smoothing"] == 0.0
    program = compile_model(dataclasses.replace(model, bsd=BSDConfig(label_smoothing=0.2)), "bptt")
    rt = make_runtime(program, "cpu", TrainConfig())
    assert rt.smoothing == 0.2 and torch.allclose(rt.loss(v, y), want, atol=1e-6)


def test_label_smoothing_out_of_range_is_refused():
    from bsdgraph.compiler.feedback import check_config

    with pytest.raises(GraphError, match="label_smoothing"):
        check_config(BSDConfig(label_smoothing=1.0))


# ------------------------------------------------------------------------------------------ per-layer lam


def test_layer_lam_sets_each_hidden_reco_layer_and_a_wrong_count_is_named(model):
    bsd = derive_feedback(model.graph, BSDConfig(layer_lam=(0.1, 0.9)))
    lams = {n.attrs["layer"]: n.attrs["lam"] for n in bsd.by_op(Op.RECO)}
    assert lams == {1: 0.1, 2: 0.9}
    plain = derive_feedback(model.graph, BSDConfig(lam=0.4))
    assert {n.attrs["lam"] for n in plain.by_op(Op.RECO)} == {0.4}
    with pytest.raises(GraphError, match="layer_lam has 3 values, but lev has 2 hidden"):
        derive_feedback(model.graph, BSDConfig(layer_lam=(0.1, 0.2, 0.3)))


# ------------------------------------------------------------------------------------------ per-layer lr


def test_layer_of_params_maps_f_and_b_weights_to_the_layer_whose_loss_trains_them(model):
    bsd = derive_feedback(model.graph, BSDConfig())
    layers = layer_of_params(bsd)
    assert layers["fc1"] == 1 and layers["fc2"] == 2 and layers["fc3"] == 3
    assert layers["fc1_b"] == 1  # B's bottom synapse: trained by the recall loss, layer 0, counted as 1
    assert layers["fc2_b"] == 1 and layers["fc3_b"] == 2  # B's mirror of fc(l+1) makes V̂_l, paired at layer l
    assert layer_of_params(model.graph) == {"fc1": 1, "fc2": 2, "fc3": 3}


@pytest.mark.parametrize("rule,backend,compile", [("bsd", "cpu", "off"), ("bsd", "cpu", "aot_eager"),
                                                  ("bsd", "reference", "off"), ("bptt", None, "off")])
def test_a_layers_first_update_scales_with_its_lr_multiplier(model, data, rule, backend, compile):
    """AdamW's first step moves a weight by -lr (wd p + m/(sqrt(v) + eps)), linear in lr: with the same gradients,
    a multiplier m moves each weight of its layer exactly m times as far (up to float rounding)."""
    program = compile_model(model, rule)
    x, y = data.x_train[:50], data.y_train[:50]
    moved = {}
    for mult in ((1.0, 1.0, 1.0), (0.5, 1.0, 3.0)):
        # aot_eager: the step traced by torch.compile, whose AdamW is tensor operations (local_adamw.traced_step)
        rt = make_runtime(program, backend or "cpu", TrainConfig(lr=1e-2, layer_lr=mult, clip=0.0), compile=compile)
        before = {k: v.detach().clone() for k, v in rt.params.items()}
        rt.step(x, y)
        moved[mult] = {k: rt.params[k].detach() - before[k] for k in before}
    layers = layer_of_params(program.graph)
    for k, d in moved[(0.5, 1.0, 3.0)].items():
        m = (0.5, 1.0, 3.0)[layers[k.rsplit(".", 1)[0]] - 1]
        # atol: a weight whose gradient is 0 moves by lr m wd p ~ 3e-7, a few float32 ulps of p (~3e-8 each)
        assert torch.allclose(d, m * moved[(1.0, 1.0, 1.0)][k], rtol=1e-4, atol=2e-7), (k, m)


def test_layer_lr_of_the_wrong_length_is_refused_and_a_resumed_run_keeps_its_groups(model, data, tmp_path):
    with pytest.raises(TrainingError, match="layer_lr has 2 multiplier"):
        trainer(model, data, tmp_path, layer_lr=(1.0, 2.0))
    t = trainer(model, data, tmp_path, epochs=1, layer_lr=(1.0, 2.0, 0.5), schedule="cosine")
    t.run()
    again = trainer(model, data, tmp_path, epochs=2, layer_lr=(1.0, 2.0, 0.5), schedule="cosine")
    again.resume()
    assert sorted(g["lr_scale"] for g in again.rt.optimizer.param_groups) == [0.5, 1.0, 2.0]
    assert again.run()[-1]["epoch"] == 2


# ------------------------------------------------------------------------------------------ batchnorm


def test_insert_batchnorm_puts_one_between_every_synapse_and_its_neurons_but_not_the_top(model):
    g = insert_batchnorm(model.graph)
    bns = g.by_op(Op.BATCHNORM)
    assert [n.name for n in bns] == ["bn_fc1", "bn_fc2"]
    assert [i.name for i in g.inputs("h1")] == ["bn_fc1"] and [i.name for i in g.inputs("bn_fc1")] == ["fc1"]
    assert g.inputs(g.by_op(Op.OUTPUT)[0].name)[0].op == Op.LINEAR
    assert insert_batchnorm(g) == g  # a layer that has one is left alone
    bsd = derive_feedback(g, BSDConfig())
    assert {"bn_fc1_b", "bn_fc2_b"} <= {n.name for n in bsd.by_op(Op.BATCHNORM)}  # B mirrors each


def test_batchnorm_statistics_are_checkpointed_and_restored(model, data, tmp_path):
    bn = dataclasses.replace(model, graph=insert_batchnorm(model.graph))
    t = trainer(bn, data, tmp_path, epochs=1)
    history = t.run()
    ck = load_checkpoint(t.checkpoint_path)
    assert {"bn_fc1.running_mean", "bn_fc1.running_var", "bn_fc2_b.running_mean"} <= set(ck["state"])
    assert not torch.equal(ck["state"]["bn_fc1.running_var"], torch.ones_like(ck["state"]["bn_fc1.running_var"]))
    rt, _ = load_for_eval(bn, t.checkpoint_path, "cpu")
    assert evaluate(rt, data.x_test, data.y_test)["accuracy"] == history[-1]["test_accuracy"]


# ------------------------------------------------------------------------------------------ command line


def test_the_command_line_takes_every_lever_and_eval_of_the_run_uses_best_pt(cli, tmp_path, data, model_path):
    npz = write_npz(tmp_path / "d.npz", data)
    out = tmp_path / "run"
    code, stdout, err = cli("train", model_path, "--npz", npz, "--out", out, "--epochs", 3, "--val-split", 0.2,
                            "--patience", 2, "--batchnorm", "--bsd", "label_smoothing=0.1", "--bsd",
                            "layer_lam=0.3,0.9", "--train", "standardize=true", "--train", "layer_lr=1,1,2",
                            "--json")
    assert code == 0, err
    records = [json.loads(line) for line in stdout.splitlines()]
    best = records[-1]["best_epoch"]
    assert f"best on the validation split: epoch {best}" in err
    assert "240 train + 60 validation / 100 test samples" in err
    ck = load_checkpoint(out / "best.pt")
    assert ck["train"]["standardize"] is True and ck["train"]["layer_lr"] == (1.0, 1.0, 2.0)
    assert "input_stats" in ck and any(n.startswith("bn_fc1") for n in ck["state"])
    code, stdout, err = cli("eval", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["checkpoint"].endswith("best.pt") and result["epoch"] == best
    assert result["test_accuracy"] == records[best - 1]["test_accuracy"]


def test_val_split_0_turns_off_a_split_set_elsewhere(cli, tmp_path, data, model_path):
    """--val-split 0 means none, and as a flag of its own it wins over --train val_split (as it would over the model
    file's TRAIN): no sample is held out, nothing is validated, no best.pt."""
    npz = write_npz(tmp_path / "d.npz", data)
    out = tmp_path / "run"
    code, stdout, err = cli("train", model_path, "--npz", npz, "--out", out, "--epochs", 1,
                            "--train", "val_split=0.2", "--val-split", "0", "--json")
    assert code == 0, err
    (record,) = [json.loads(line) for line in stdout.splitlines()]
    assert "val_accuracy" not in record and " validation" not in err and not (out / "best.pt").exists()
    code, _, err = cli("train", model_path, "--npz", npz, "--out", out, "--val-split", "-0.1", "--force")
    assert code == 2 and "between 0 and 1" in err


@pytest.mark.parametrize("argv,code,message", [
    (["--train", "nope=1"], 2, "unknown key 'nope'"),
    (["--train", "layer_lr=1,x"], 2, "expected a number"),
    (["--patience", "2"], 1, "set val_split too"),
    (["--bsd", "layer_lam=0.1"], 1, "layer_lam has 1 values"),
    (["--train", "standardize=true", "--encoding", "poisson"], 1, "Poisson"),
])
def test_bad_lever_options_are_one_line_errors(cli, tmp_path, data, model_path, argv, code, message):
    npz = write_npz(tmp_path / "d.npz", data, 1 / 5)  # in [0, 1]: Poisson input reads them as probabilities
    got, _, err = cli("train", model_path, "--npz", npz, "--out", tmp_path / "r", *argv)
    assert got == code and message in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------------------ sweep runner


def _sweep():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sweep
    finally:
        sys.path.pop(0)
    return sweep


def test_the_sweep_runs_a_grid_skips_what_finished_resumes_what_was_interrupted_and_writes_one_table(
        tmp_path, data, model_path, capsys):
    sweep = _sweep()
    npz = write_npz(tmp_path / "d.npz", data)
    grid = {"model": str(model_path), "common": ["--npz", str(npz), "--epochs", "2", "--val-split", "0.2"],
            "seeds": [0, 1], "variants": {"plain": [], "smooth": ["--bsd", "label_smoothing=0.1"]}}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    out = tmp_path / "out"
    # an interrupted run: one epoch checkpointed, not finished; the sweep must resume it, not start it again
    first = sweep.command(grid, "plain", 0, out)
    first[first.index("--epochs") + 1] = "1"
    import subprocess
    (out / "plain").mkdir(parents=True)
    subprocess.run(first, cwd=ROOT, check=True, capture_output=True)
    assert "--resume" in sweep.command(grid, "plain", 0, out)
    assert sweep.main([str(path), str(out), "--jobs", "2"]) == 0
    history = sweep.records(out / "plain" / "seed0")
    assert [r["epoch"] for r in history] == [1, 2]  # resumed: epoch 1 was not trained twice
    text = (out / "table.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| plain") or line.startswith("| smooth")]
    assert len(rows) == 2 and all("| 2/2 |" in r for r in rows)
    chosen = [sweep.summary(sweep.records(out / "smooth" / f"seed{s}"))["chosen"]["test_accuracy"] for s in (0, 1)]
    mean = 100 * sum(chosen) / 2
    assert f"| {mean:.2f} ±" in rows[1]
    capsys.readouterr()
    mtime = (out / "plain" / "seed0.done.json").stat().st_mtime
    assert sweep.main([str(path), str(out)]) == 0  # everything finished: nothing runs again
    assert (out / "plain" / "seed0.done.json").stat().st_mtime == mtime


def test_a_bad_grid_is_one_line(tmp_path, capsys):
    sweep = _sweep()
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"model": "m.py", "seeds": [], "variants": {"a/b": []}}))
    assert sweep.main([str(path), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "seeds must be a non-empty list" in err and "directory names" in err


# ------------------------------------------------------------------------------------------ distributed codes


def code_graph(k=6, width=40, seed=3, T=3):
    g = GraphBuilder("code", T=T)
    h = g.lif(g.linear(g.input((12,)), 32))
    g.output(g.linear(h, width), classes=5, code=k, code_seed=seed)
    return g.build()


def test_class_codes_are_distinct_k_hot_patterns_fixed_by_their_seed():
    from bsdgraph.runtime.losses import class_codes

    attrs = {"n_classes": 10, "code_active": 10, "code_seed": 7}
    codes = class_codes(attrs, 100)
    assert codes.shape == (10, 100) and torch.equal(codes.sum(1), torch.full((10,), 10.0))
    assert set(codes.unique().tolist()) == {0.0, 1.0}
    assert len({tuple(r.tolist()) for r in codes}) == 10
    assert torch.equal(codes, class_codes(dict(attrs), 100))        # the same seed, the same code
    assert not torch.equal(codes, class_codes({**attrs, "code_seed": 8}, 100))
    assert class_codes({"n_classes": 10, "code_active": 0, "code_seed": 0}, 10) is None  # one-hot: no code


def test_a_class_code_drives_b_and_each_classs_own_pattern_decodes_to_that_class():
    from bsdgraph.runtime.common import encode_target, readout

    f = code_graph()
    bsd = derive_feedback(f, BSDConfig())
    target = bsd.by_op(Op.TARGET)[0]
    assert target.attrs["encoding"] == "code" and target.attrs["code_active"] == 6
    patterns = encode_target(target, torch.arange(5), 3)
    assert patterns.shape == (3, 5, 40) and torch.equal(patterns.sum(-1), torch.full((3, 5), 6.0))
    scores = readout(f.by_op(Op.OUTPUT)[0], patterns)
    assert torch.equal(scores.argmax(1), torch.arange(5))
    assert torch.allclose(scores.diagonal(), torch.full((5,), 10.0))  # CODE_SCALE x cosine 1 to its own pattern
    noisy = patterns + 0.3 * torch.randn(patterns.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(readout(f.by_op(Op.OUTPUT)[0], noisy).argmax(1), torch.arange(5))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_cpu_gradient_of_the_code_ce_equals_autograd_of_the_reference(smoothing):
    from bsdgraph.runtime.cpu import cpu_runtime
    from bsdgraph.runtime.reference import ReferenceRuntime

    bsd = derive_feedback(code_graph(), BSDConfig(label_smoothing=smoothing))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 12, generator=gen) * 2, torch.randint(0, 5, (16,), generator=gen)
    ref, ref_losses, _ = ReferenceRuntime(bsd, seed=4).gradients(x, y)
    got, got_losses = cpu_runtime(bsd, seed=4).gradients(x, y)
    assert abs(float(ref_losses["ce2"].detach()) - got_losses["ce2"]) < 1e-5
    for k in ref:  # float32 rounding of the same arithmetic in another order: 1e-6 of each gradient's scale
        assert float((ref[k] - got[k]).abs().max()) <= 1e-6 * float(ref[k].abs().max()) + 1e-8, k
    assert float(ref["fc2.weight"].abs().max()) > 0


def test_use_class_code_widens_the_top_linear_and_refuses_what_it_cannot_code(model):
    from bsdgraph.compiler.passes import use_class_code

    g = use_class_code(model.graph, 10, 100, seed=2)
    out = g.by_op(Op.OUTPUT)[0]
    assert g["fc3"].attrs["out_features"] == 100 and out.shape == (100,)
    assert (out.attrs["target"], out.attrs["n_classes"], out.attrs["code_active"], out.attrs["code_seed"]) == (
        "code", 4, 10, 2)
    with pytest.raises(GraphError, match="give only 3 codes for 4 classes"):
        use_class_code(model.graph, 1, 3)
    g = GraphBuilder("r", T=2)
    g.output(g.linear(g.input((4,)), 4), task="regression")
    with pytest.raises(GraphError, match="a class code replaces"):
        use_class_code(g.build(), 2, 8)


def test_a_class_code_survives_a_nir_round_trip_and_bptt_trains_on_it(data, tmp_path):
    from bsdgraph.interop.nir_export import export_nir
    from bsdgraph.interop.nir_import import import_nir
    from bsdgraph.ir.params import init_params, init_state

    f = code_graph()
    back = import_nir(export_nir(f, init_params(f, 0), init_state(f))).graph
    out = back.by_op(Op.OUTPUT)[0]
    assert {k: out.attrs[k] for k in ("target", "n_classes", "code_active", "code_seed")} == {
        "target": "code", "n_classes": 5, "code_active": 6, "code_seed": 3}
    ds = make_synthetic(400, 200, (12,), 5, seed=2)
    path = tmp_path / "code.py"
    path.write_text(MODEL.replace("g.output(g.linear(h, 4))", "g.output(g.linear(h, 40), classes=5, code=6)"))
    # chance is 0.2; measured after 6 epochs: BSD 0.475, BPTT 0.965 (one-hot: 0.605 and 0.97)
    for rule, floor in (("bsd", 0.35), ("bptt", 0.8)):
        history = trainer(load_model(path), ds, tmp_path, rule=rule, epochs=6).run()
        assert history[-1]["test_accuracy"] > floor, (rule, history[-1]["test_accuracy"])


def test_plot_of_a_standardised_run_feeds_the_raster_standardised_samples(cli, tmp_path, data, model_path,
                                                                           monkeypatch):
    from bsdgraph.tools import plot

    out = tmp_path / "run"
    npz = write_npz(tmp_path / "d.npz", data)
    assert cli("train", model_path, "--npz", npz, "--out", out, "--epochs", 1, "--train", "standardize=true")[0] == 0
    seen = {}

    def raster(graph, params, state, x, *rest):  # what the raster would run F and B on
        seen["x"] = x
        return out / "raster.png"

    monkeypatch.setattr(plot, "plot_raster", raster)
    code, _, err = cli("plot", out)
    assert code == 0, err
    stats = load_checkpoint(out / "checkpoint.pt")["input_stats"]
    assert torch.allclose(seen["x"], (data.x_test[:1] - stats["mean"]) / stats["std"])


def test_fit_with_a_validation_split_leaves_the_net_at_its_best_epoch(tmp_path, data, model_path, monkeypatch):
    import bsdgraph

    monkeypatch.setenv("BSDGRAPH_THREADS", "1")  # the measured history below is one thread's
    net = bsdgraph.net(str(model_path))
    history = bsdgraph.fit(net, (data.x_train, data.y_train), test=(data.x_test, data.y_test), epochs=5,
                           out=tmp_path / "fit", progress=False, val_split=0.2, standardize=True)
    best = best_epoch(history)
    # measured: epoch 4 is the best on validation (53.3 %), its test accuracy 57 %, the last epoch's 56 %
    assert best == 4 and history[3]["test_accuracy"] != history[4]["test_accuracy"]
    assert net.evaluate((data.x_test, data.y_test))["accuracy"] == history[best - 1]["test_accuracy"]


def test_a_validation_split_of_series_windows_is_later_in_time_and_shares_no_step(data):
    """Overlapping windows of one series (Dataset.overlap): the validation part is the last windows, and the
    ``overlap`` windows before it, which share steps with both sides, are trained on by neither."""
    windows = dataclasses.replace(data, overlap=3)
    kept, (xv, yv) = holdout(windows, 0.2)
    n = data.n_train
    assert torch.equal(xv, data.x_train[n - 60:]) and torch.equal(yv, data.y_train[n - 60:])
    assert torch.equal(kept.x_train, data.x_train[:n - 63]) and kept.n_train == 237
    with pytest.raises(TrainingError, match="leaves no training window"):
        holdout(dataclasses.replace(data, overlap=n), 0.2)
