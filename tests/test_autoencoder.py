"""Autoencoders (TARGET = "input"): the model file, real learning with and without the frequency split, the Fréchet
distance in a trained classifier's feature space, and the reconstruction picture."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bsdgraph.cli.main import main
from bsdgraph.train.data import autoencode, make_synthetic
from bsdgraph.compiler.feedback import BSDConfig, derive_feedback
from bsdgraph.tools.frechet import FrechetError, frechet_distance, load_feature_net
from bsdgraph.compiler.model_file import ModelError, load_model
from bsdgraph.train.config import TrainConfig
from bsdgraph.train.trainer import Trainer, evaluate

ROOT = Path(__file__).resolve().parents[1]

AE = """
from bsdgraph import GraphBuilder
TARGET = "input"
TRAIN = dict(epochs=5, batch_size=16, lr=1e-2, init="calibrated")
BSD = dict(freq=True)
def build():
    g = GraphBuilder("tiny_ae", T=4)
    h = g.lif(g.conv2d(g.input((1, 8, 8)), 4, kernel=3, stride=2, padding=1))
    h = g.lif(g.linear(g.flatten(h), 32))
    g.output(g.linear(h, 64), task="regression")
    return g.build()
"""

# a fully convolutional autoencoder: transposed convolutions in F decode, B mirrors them with convolutions
AE_DECODER = """
from bsdgraph import GraphBuilder
TARGET = "input"
TRAIN = dict(epochs=5, batch_size=16, lr=1e-2, init="calibrated")
def build():
    g = GraphBuilder("tiny_conv_ae", T=4)
    h = g.lif(g.conv2d(g.input((1, 8, 8)), 8, kernel=3, stride=2, padding=1))
    h = g.lif(g.conv_transpose2d(h, 8, kernel=3, stride=2, padding=1, output_padding=1))
    g.output(g.conv2d(h, 1, kernel=3, padding=1), task="regression")
    return g.build()
"""

CLASSIFIER = """
from bsdgraph import GraphBuilder
TRAIN = dict(epochs=1, batch_size=32, lr=3e-3)
def build():
    g = GraphBuilder("tiny_cls", T=4)
    h = g.lif(g.linear(g.flatten(g.input((1, 8, 8))), 32))
    g.output(g.linear(h, 4))
    return g.build()
"""


@pytest.fixture(scope="module")
def images():
    """Four 8x8 prototype images plus noise: a low-dimensional image set an 8x8 autoencoder can learn."""
    return make_synthetic(256, 64, (1, 8, 8), 4, seed=0)


@pytest.fixture
def ae_file(tmp_path):
    path = tmp_path / "tiny_ae.py"
    path.write_text(AE)
    return path


@pytest.fixture
def npz(tmp_path, images):
    path = tmp_path / "img.npz"
    np.savez(path, x_train=images.x_train.numpy(), y_train=images.y_train.numpy(),
             x_test=images.x_test.numpy(), y_test=images.y_test.numpy())
    return path


def test_fmnist_ae_compiles_with_the_frequency_split_on_its_spatial_layers():
    model = load_model(ROOT / "models" / "fmnist_ae.py")
    assert model.target == "input" and model.graph.T == 8
    bsd = derive_feedback(model.graph, model.bsd)
    reco = {n.name: n.attrs for n in bsd.nodes if n.op.value == "reco"}
    assert [reco[k]["freq"] for k in sorted(reco)] == [True, True]  # stimulus (recall), conv1
    assert all(a["lam_low"] < a["lam_high"] for a in reco.values())
    assert bsd["mse2"].attrs["layer"] == 2 and bsd["out"].shape == (784,)


def test_target_input_needs_a_regression_output_as_large_as_the_stimulus(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(AE.replace("g.linear(h, 64), task=\"regression\"", "g.linear(h, 10)"))
    with pytest.raises(ModelError, match=r"TARGET = 'input' reconstructs the stimulus \(64 values\), but the "
                                         r"output 'out' is a classification output of 10 values"):
        load_model(bad)
    bad.write_text(AE.replace('TARGET = "input"', 'TARGET = "image"'))
    with pytest.raises(ModelError, match=r"TARGET must be one of \('labels', 'input'\), got 'image'"):
        load_model(bad)


def test_autoencode_makes_every_target_its_own_flattened_stimulus(images):
    ds = autoencode(images)
    assert ds.n_classes is None and ds.y_train.shape == (256, 64) and ds.y_train.dtype == torch.float32
    assert torch.equal(ds.y_test, images.x_test.reshape(64, -1))


@pytest.mark.parametrize("net,rule,freq", [("fc", "bsd", True), ("fc", "bsd", False), ("fc", "bptt", False),
                                          ("decoder", "bsd", True), ("decoder", "bptt", False)])
def test_a_short_training_run_learns_to_reconstruct(tmp_path, images, net, rule, freq):
    """Real learning: after 5 short epochs the test MSE is well below the untrained network's and below that of
    the best constant image (the per-pixel mean), which needs no learning of the input at all."""
    path = tmp_path / "ae.py"
    path.write_text(AE if net == "fc" else AE_DECODER)
    model = load_model(path)
    model = type(model)(**{**model.__dict__, "bsd": BSDConfig(freq=freq)})
    data = autoencode(images)
    trainer = Trainer(model, data, TrainConfig.from_model(model.train), tmp_path / "run", rule=rule,
                      backend="cpu")
    trainer.initialise()
    before = evaluate(trainer.rt, data.x_test, data.y_test)["mse"]
    history = trainer.run()
    mean_image = float(((data.y_test - data.y_train.mean(0)) ** 2).mean())
    after, record = history[-1]["test_mse"], (before, mean_image, [r["test_mse"] for r in history])
    if net == "decoder" and rule == "bsd":
        # BSD learns a convolutional decoder poorly (measured on Fashion-MNIST too, docs/experiments.md): a conv
        # readout has one bias per channel, so it cannot put out the mean image without input-driven spikes. It
        # must still beat the best single grey level (0.094 here; it reaches 0.080)
        grey = float(((data.y_test - data.y_train.mean()) ** 2).mean())
        assert after < 0.5 * before and after < 0.9 * grey, (*record, grey)
    else:
        assert after < 0.5 * before and after < 0.8 * mean_image, record


def test_frechet_distance_of_a_set_with_itself_is_zero_and_of_moved_sets_is_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)  # same covariance
    # b - mu = 2 (a - mu): C_b = 4 C_a, so FD = tr(C + 4C - 2 * 2C) = tr(C)
    mu = a.mean(0)
    assert frechet_distance(a, mu + 2 * (a - mu)) == pytest.approx(float(torch.cov(a.T).trace()), rel=1e-9)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, a[:, :3])


def run(capsys, *argv):
    code = main([str(v) for v in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_eval_with_frechet_and_plot_of_reconstructions(capsys, tmp_path, ae_file, npz):
    cls_file = tmp_path / "tiny_cls.py"
    cls_file.write_text(CLASSIFIER)
    code, _, err = run(capsys, "train", cls_file, "--npz", npz, "--out", tmp_path / "cls", "--json")
    assert code == 0, err
    code, _, err = run(capsys, "train", ae_file, "--npz", npz, "--out", tmp_path / "ae", "--epochs", 1,
                       "--bsd", "freq=False", "--json")
    assert code == 0, err
    # eval takes the same model edits as train: without them the graph is not the one trained
    code, _, err = run(capsys, "eval", ae_file, "--checkpoint", tmp_path / "ae" / "checkpoint.pt", "--npz", npz)
    assert code == 1 and "was trained on a different graph" in err
    code, out, err = run(capsys, "eval", ae_file, "--checkpoint", tmp_path / "ae" / "checkpoint.pt", "--npz", npz,
                         "--bsd", "freq=False", "--frechet-classifier", tmp_path / "cls" / "checkpoint.pt", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["test_mse"] > 0 and result["test_frechet"] > 0
    code, out, err = run(capsys, "plot", tmp_path / "ae", "--npz", npz)
    assert code == 0 and (tmp_path / "ae" / "reconstructions.png").stat().st_size > 1000, err
    # the classifier is no autoencoder, and the autoencoder is no classifier
    code, _, err = run(capsys, "eval", cls_file, "--checkpoint", tmp_path / "cls" / "checkpoint.pt", "--npz", npz,
                       "--frechet-classifier", tmp_path / "cls" / "checkpoint.pt")
    assert code == 2 and "is not an autoencoder" in err
    with pytest.raises(FrechetError, match="is a regression model .* not a classifier"):
        load_feature_net(tmp_path / "ae" / "checkpoint.pt", (1, 8, 8))
    with pytest.raises(FrechetError, match=r"takes \[1, 8, 8\] inputs but the images are \[1, 28, 28\]"):
        load_feature_net(tmp_path / "cls" / "checkpoint.pt", (1, 28, 28))
