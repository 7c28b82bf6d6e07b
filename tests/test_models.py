"""Every shipped model compiles; a short BSD run of each model of the paper's task families lowers its local
losses; a conv net's batchnorm statistics survive a checkpoint and give the same eval predictions."""

import tempfile
from pathlib import Path

import pytest
import torch

from bsdgraph import Op
from bsdgraph.train.data import make_synthetic, subset
from bsdgraph.train.macro import macro_dataset
from bsdgraph.train.text import text_dataset
from bsdgraph.train.calibrate import calibrate
from bsdgraph.ir.params import init_params
from bsdgraph.compiler.feedback import derive_feedback
from bsdgraph.compiler.lower import lower
from bsdgraph.compiler.model_file import load_model
from bsdgraph.runtime.cpu import cpu_runtime
from bsdgraph.train.config import TrainConfig
from bsdgraph.train.trainer import Trainer, load_for_eval

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted(p.stem for p in (ROOT / "models").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", MODELS)
def test_every_model_compiles_to_a_plan(name):
    model = load_model(ROOT / "models" / f"{name}.py")
    plan = lower(derive_feedback(model.graph, model.bsd))
    assert plan.launches and str(plan)


def _batch(model, n: int):
    """A fixed small batch the model can take: its own data when it brings some (a made-up text for the character
    model and a made-up table for the macro model, whose data `make data` fetches), else synthetic images."""
    if model.path.stem == "char_rnn":
        ds = text_dataset("the quick brown fox jumps over the lazy dog. " * 60, model.graph.T)
        return ds.x_train[:n], ds.y_train[:n]
    if model.path.stem == "macro_rnn":  # its table comes from `make data`: a made-up one with the same columns
        from tests.test_sequences import _macro_csv

        with tempfile.TemporaryDirectory() as tmp:
            ds = macro_dataset(model.graph.T, path=_macro_csv(Path(tmp) / "m.csv", quarters=80))
        return ds.x_train[:n], ds.y_train[:n]
    if model.data is not None:
        ds = subset(model.data(), n, 1)
        return ds.x_train, ds.y_train
    inp, out = model.graph.by_op(Op.INPUT)[0], model.graph.by_op(Op.OUTPUT)[0]
    ds = make_synthetic(n, 1, inp.shape, out.attrs["n_classes"], seed=0)
    return ds.x_train, ds.y_train


# (model, batch, steps): cifar_cnn is the paper-scale net, kept to 4 samples. fmnist_ae has its own learning test
# (tests/test_autoencoder.py); onb_bench is a timing shape (T = 500, 4096 neurons), not a task
LEARNING = [("fmnist_mlp", 32, 8), ("fmnist_cnn", 16, 8), ("cifar_cnn", 4, 5), ("mackey_glass_rnn", 64, 12),
            ("mackey_glass_seq2seq", 64, 12), ("fmnist_qif", 32, 8), ("char_rnn", 32, 10), ("mnist1d_rnn", 32, 10),
            ("lorenz96_rnn", 32, 10), ("macro_rnn", 32, 10)]


@pytest.mark.parametrize("name, n, steps", LEARNING, ids=[m for m, _, _ in LEARNING])
def test_a_short_bsd_run_lowers_the_local_losses(name, n, steps):
    # BSD has no global objective: each layer descends its own loss. On one fixed batch the sum of the layer-local
    # losses must fall clearly (>= 5 %) from the first two steps to the last two; a wiring mistake (a loss whose
    # gradient does not reach its weights, a sign error) leaves it flat or makes it rise.
    model = load_model(ROOT / "models" / f"{name}.py")
    bsd = derive_feedback(model.graph, model.bsd)
    x, y = _batch(model, n)
    params = init_params(bsd, 0)
    if model.train.get("init") == "calibrated":  # as the trainer starts such a model (one-hot inputs are quiet)
        calibrate(bsd, params, x, y)
    rt = cpu_runtime(bsd, params=params, seed=0)
    totals = [sum(rt.step(x, y).losses.values()) for _ in range(steps)]
    first, last = sum(totals[:2]) / 2, sum(totals[-2:]) / 2
    assert last < 0.95 * first, f"{name}: summed local losses {first:.4f} -> {last:.4f} over {steps} steps"


CONV = """
from bsdgraph import GraphBuilder
TRAIN = dict(epochs=1, batch_size=16)
def build():
    g = GraphBuilder("bn_net", T=2)
    h = g.lif(g.batchnorm(g.conv2d(g.input((1, 6, 6)), 3, kernel=3, padding=1)))
    g.output(g.linear(g.flatten(g.avgpool2d(h, 2)), 4))
    return g.build()
"""


def test_batchnorm_statistics_are_checkpointed_and_used_in_eval(tmp_path):
    path = tmp_path / "bn_net.py"
    path.write_text(CONV)
    model = load_model(path)
    data = make_synthetic(64, 32, (1, 6, 6), 4, seed=1)
    trainer = Trainer(model, data, TrainConfig.from_model(model.train), tmp_path / "run", backend="cpu")
    trainer.run()
    state = trainer.rt.state
    moved = [k for k, v in state.items() if k.endswith("running_mean") and float(v.abs().max()) > 0]
    assert moved, "training must move the running statistics (they start at 0)"
    rt, _ = load_for_eval(model, tmp_path / "run" / "checkpoint.pt", backend="cpu")
    assert state.keys() == rt.state.keys() and all(torch.equal(state[k], rt.state[k]) for k in state)
    # eval mode reads the running statistics: a batch of one sample gets the same scores as inside a large batch
    x = data.x_test
    alone = torch.cat([rt.predict(x[i:i + 1]) for i in range(4)])
    assert torch.allclose(alone, rt.predict(x)[:4], atol=1e-5)
    assert torch.equal(rt.predict(x), trainer.rt.predict(x))


def test_the_class_code_model_file_is_the_mlp_with_its_flags():
    # models/fmnist_mlp_code.py says (and docs/experiments.md relies on it) that it is exactly `fmnist_mlp.py
    # --class-code 20:200 --init calibrated --val-split 0.1` on a 12-epoch cosine schedule: the same graph but
    # for its name, the same initial weights, the same BSD options. Editing either file alone breaks that
    from bsdgraph.compiler.passes import use_class_code
    from bsdgraph.ir.printer import to_json

    plain, code = (load_model(ROOT / "models" / f"{m}.py") for m in ("fmnist_mlp", "fmnist_mlp_code"))
    flagged = use_class_code(plain.graph, 20, 200).replace(name=code.graph.name)
    assert to_json(flagged) == to_json(code.graph)
    a, b = init_params(flagged, seed=3), init_params(code.graph, seed=3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert code.bsd == plain.bsd
    assert code.train == {**plain.train, "epochs": 12, "schedule": "cosine", "init": "calibrated", "val_split": 0.1}
