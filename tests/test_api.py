"""The Python API (bsdgraph/api.py): build, fit, predict, evaluate, load, on arrays a test makes itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import bsdgraph
from bsdgraph.api import fit, load, net
from bsdgraph.errors import UserError


def toy_graph():
    g = bsdgraph.GraphBuilder("toy", T=4)
    h = g.lif(g.linear(g.input((6,)), 64), v_th=0.2)
    g.output(g.linear(h, 3))
    return g


def toy_data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 6)) * 2).astype(np.float32)
    y = (x[:, 0] > 1).astype(np.int64) + (x[:, 1] > 1)
    return x, y


def test_fit_predict_evaluate_and_load_round_trip(tmp_path):
    """A network built in Python trains on numpy arrays; predict and evaluate agree; load gives the same network
    back from the run directory alone (and it records the graph, not a file)."""
    x, y = toy_data()
    n = net(toy_graph(), bsd={"lam": 0.5}, train={"batch_size": 32})
    records = fit(n, (x, y), epochs=2, out=tmp_path / "run", progress=False, lr=5e-3)
    assert [r["epoch"] for r in records] == [1, 2] and n.history == records
    scores = n.predict(x[:50])
    assert scores.shape == (50, 3)
    acc = n.evaluate((x[:50], y[:50]))["accuracy"]
    assert acc == pytest.approx(float((scores.argmax(1) == torch.from_numpy(y[:50])).double().mean()))
    again = load(tmp_path / "run")
    assert torch.equal(again.predict(x[:50]), scores)
    assert again.history[-1]["test_accuracy"] == records[-1]["test_accuracy"]
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["model"] == "<toy>"
    assert bsdgraph.from_json((tmp_path / "run" / "model_source.py").read_text()) == n.graph


def test_fit_learns_and_holds_out_the_end_without_a_test_split(tmp_path):
    x, y = toy_data(600)
    n = net(toy_graph(), train={"init": "calibrated"})
    records = fit(n, (torch.from_numpy(x), torch.from_numpy(y)), epochs=6, out=tmp_path / "r", progress=False,
                  lr=1e-2, batch_size=32)
    # the most frequent class is 52 % of the data; measured 88 % after 6 epochs
    assert records[-1]["test_accuracy"] > 0.75
    # the held-out tenth is the end of the arrays: evaluating on it gives the recorded test accuracy
    assert n.evaluate((x[540:], y[540:]))["accuracy"] == pytest.approx(records[-1]["test_accuracy"])


def test_a_model_file_and_overrides(tmp_path):
    n = net("models/fmnist_mlp.py", bsd={"lam": 0.3}, train={"epochs": 1})
    assert n.program.bsd.lam == 0.3 and n.train["epochs"] == 1
    reco = [m for m in n.program.graph.nodes if m.op == bsdgraph.Op.RECO]
    assert reco and {m.attrs["lam"] for m in reco} == {0.3}


@pytest.mark.parametrize("call, message", [
    (lambda n: n.predict(np.zeros((2, 5), np.float32)), r"input node 'x' takes samples of shape \[6\], got x of "
                                                          r"shape \[2, 5\]"),
    (lambda n: n.evaluate((np.zeros((4, 6)), np.zeros(3, np.int64))), "x has 4 samples but y has 3"),
    (lambda n: n.evaluate((np.zeros((4, 6)), np.full(4, 7))), "label 7 at y_test\\[0\\] but the model has 3 classes"),
    (lambda n: n.predict("abc"), "x must be a numpy array or a torch tensor, got str"),
    (lambda n: net(toy_graph(), bsd={"lamda": 1}), r"unknown bsd option\(s\) \['lamda'\]"),
    (lambda n: net(toy_graph(), train={"epochs": 0}), "epochs"),
    (lambda n: net(42), "bsdgraph.net takes a GraphBuilder, a Graph, a Model or a model file's path, got int"),
])
def test_bad_input_is_a_clear_user_error(call, message):
    n = net(toy_graph())
    with pytest.raises(UserError, match=message):
        call(n)


def test_fit_refuses_a_run_directory_that_holds_a_checkpoint(tmp_path):
    x, y = toy_data(100)
    n = net(toy_graph())
    fit(n, (x, y), epochs=1, out=tmp_path / "r", progress=False)
    with pytest.raises(UserError, match="already holds a checkpoint: pass overwrite=True"):
        fit(n, (x, y), epochs=1, out=tmp_path / "r", progress=False)
    assert fit(n, (x, y), epochs=1, out=tmp_path / "r", progress=False, overwrite=True)


class _Samples(torch.utils.data.Dataset):
    """A map-style torch Dataset that counts what is read (the API must stream it, never hold it)."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = torch.from_numpy(x), torch.from_numpy(y), 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


def test_fit_streams_a_torch_dataset_and_a_dataloader(tmp_path):
    """Each epoch reads every training sample once through the loader; the result learns like the arrays do."""
    x, y = toy_data(600)
    train, test = _Samples(x[:540], y[:540]), _Samples(x[540:], y[540:])
    n = net(toy_graph(), train={"init": "calibrated"})
    records = fit(n, train, test=test, epochs=6, out=tmp_path / "r", progress=False, lr=1e-2, batch_size=32)
    # calibration reads the first 256 samples (8 batches of 32) once, then 6 epochs read all 540
    assert train.reads == 256 + 6 * 540
    assert records[-1]["test_accuracy"] > 0.75
    loader = torch.utils.data.DataLoader(_Samples(x[:540], y[:540]), batch_size=64, shuffle=True)
    m = net(toy_graph())
    records = fit(m, loader, test=(x[540:], y[540:]), epochs=1, out=tmp_path / "s", progress=False)
    assert len(records) == 1 and records[0]["samples_per_s"] > 0


@pytest.mark.parametrize("batch, message", [
    ((torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)), r"training batch 0: x has shape \[4, 5\]; the model "
                                                            r"takes samples of shape \[6\]"),
    ((torch.zeros(4, 6), torch.full((4,), 9)), r"training batch 0: a label outside 0..2 \(9..9\)"),
    ((torch.zeros(4, 6), torch.zeros(4)), "y holds floats"),
])
def test_a_bad_streamed_batch_names_itself(tmp_path, batch, message):
    from bsdgraph.train.data import DataError

    n = net(toy_graph())
    with pytest.raises(DataError, match=message):
        fit(n, torch.utils.data.DataLoader([batch], batch_size=None), test=toy_data(20), epochs=1,
            out=tmp_path / "r", progress=False)


def test_a_stream_needs_a_test_split(tmp_path):
    x, y = toy_data(50)
    with pytest.raises(UserError, match="a streamed training set needs test="):
        fit(net(toy_graph()), _Samples(x, y), out=tmp_path / "r", progress=False)


def test_plot_of_a_fit_run_draws_curves_and_says_why_there_is_no_raster(tmp_path, capsys):
    """A run bsdgraph.fit trained on arrays held in Python: `bsdgraph plot RUN` draws what the run directory holds
    and says why it draws no raster (it does not fall back to Fashion-MNIST, which a model of other inputs refuses)."""
    from bsdgraph.cli.main import main

    x, y = toy_data()
    fit(net(toy_graph()), (x, y), epochs=1, out=tmp_path / "run", progress=False)
    assert main(["plot", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert "curves.png" in out and "rates.png" in out and "raster.png" not in out
    assert "no raster: the run trained on data held in Python (arrays)" in err
