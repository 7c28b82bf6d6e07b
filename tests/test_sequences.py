"""Sequence tasks: a class per step (CE per step, B driven by per-step class codes), the text loader and the
character model's sampling, the sequence data generators, and the forecasting baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bsdgraph import BSDConfig, GraphBuilder, GraphError, derive_feedback
from bsdgraph.compiler.program import compile_graph
from bsdgraph.ir.params import init_params
from bsdgraph.runtime.bptt import BPTTRuntime
from bsdgraph.runtime.common import encode_target
from bsdgraph.runtime.cpu import cpu_runtime
from bsdgraph.runtime.reference import ReferenceRuntime
from bsdgraph.train.data import DataError, Dataset
from bsdgraph.train import series, text
from bsdgraph.train.trainer import evaluate

T, D, C = 5, 4, 6


def per_step_net(recurrent: bool = True):
    g = GraphBuilder("steps", T=T)
    x = g.input((D,), encoding="sequence")
    c = g.linear(x, 12)
    h = g.recurrent_lif(c) if recurrent else g.lif(c)
    g.output(g.linear(h, C), task="classification", target="sequence")
    return g.build()


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, T, D, generator=g) * 2, torch.randint(0, C, (n, T), generator=g)


def test_per_step_ce_and_its_b_stream_equal_the_reference_runtime():
    """One BSD step on the cpu backend == the reference (autograd) runtime: losses, every parameter."""
    bsd = derive_feedback(per_step_net())
    p = init_params(bsd, 0)
    ref, cpu = ReferenceRuntime(bsd, p), cpu_runtime(compile_graph(bsd), params=p)
    x, y = batch()
    for _ in range(2):
        r1, r2 = ref.step(x, y), cpu.step(x, y)
        assert r2.losses == pytest.approx(r1.losses, rel=1e-5)
    for k, w in ref.params.items():
        torch.testing.assert_close(cpu.params[k], w.detach(), rtol=1e-5, atol=1e-6)


def test_the_per_step_ce_gradient_is_autograds():
    """The closed form the kernel uses, (softmax(V[t]) - onehot(y[:, t])) / (B T), == autograd of the mean CE over
    all B*T steps, and the loss is torch's cross-entropy of the flattened steps."""
    from bsdgraph.runtime.losses import class_loss

    _, y = batch()
    v = torch.randn(T, 8, C, dtype=torch.float64, requires_grad=True)
    loss = class_loss(v, y, 1, True)
    (g,) = torch.autograd.grad(loss, v)
    z = v.detach().transpose(0, 1)
    manual = (torch.softmax(z, -1) - F.one_hot(y, C).double()) / y.numel()
    torch.testing.assert_close(manual.transpose(0, 1), g)
    want = F.cross_entropy(z.reshape(-1, C), y.reshape(-1))
    assert float(loss.detach()) == pytest.approx(float(want))


def test_b_is_driven_by_the_class_code_of_each_step():
    bsd = derive_feedback(per_step_net())
    target = next(n for n in bsd.nodes if n.op.value == "target")
    assert (target.attrs["encoding"], target.attrs["n_classes"]) == ("sequence", C)
    y = torch.tensor([[0, 5, 2, 2, 1], [3, 3, 0, 4, 5]])
    code = encode_target(target, y, T)
    assert code.shape == (T, 2, C)
    for t in range(T):
        assert torch.equal(code[t], F.one_hot(y[:, t], C).float())
    ce = next(n for n in bsd.nodes if n.op.value == "ce")
    assert ce.attrs["per_step"] is True


def test_bptt_takes_the_per_step_loss_and_evaluation_reports_every_step():
    f = per_step_net()
    rt = BPTTRuntime(f, seed=0)
    x, y = batch()
    out = rt.predict(x)
    assert out.shape == (8, T, C)
    result = evaluate(rt, x, y)
    per_step = [(out.argmax(-1)[:, t] == y[:, t]).double().mean().item() for t in range(T)]
    assert result["accuracy_per_step"] == pytest.approx(per_step, abs=1e-4)
    assert result["accuracy"] == pytest.approx(float((out.argmax(-1) == y).double().mean()))
    nll_bits = float(F.cross_entropy(out.reshape(-1, C), y.reshape(-1))) / np.log(2)
    want = F.cross_entropy(out.reshape(-1, C), y.reshape(-1))
    first = rt.step(x, y).losses["bptt"]   # the loss of the forward before this step's update
    assert first == pytest.approx(float(want), rel=1e-5)
    assert result["bits_per_step"] == pytest.approx(nll_bits, rel=1e-5)


def test_other_class_negatives_and_populations_are_refused_for_per_step_classes():
    with pytest.raises(GraphError, match="negatives='other_class' compares one class per sample"):
        derive_feedback(per_step_net(), BSDConfig(negatives="other_class"))
    g = GraphBuilder("bad", T=2)
    g.output(g.linear(g.lif(g.linear(g.input((3,), encoding="sequence"), 4)), 6), task="classification",
             target="sequence", population=2)
    with pytest.raises(GraphError, match="a per-step class .* is one neuron per class"):
        g.build()


def test_a_short_run_of_per_step_classes_learns():
    from bsdgraph.runtime.common import OptimConfig

    bsd = derive_feedback(per_step_net())
    rt = cpu_runtime(compile_graph(bsd), seed=0, opt=OptimConfig(lr=1e-2))
    x = torch.rand(64, T, D) * 2
    y = (x[..., 0] > 1).long() * 2 + (x[..., 1] > 1).long()   # each step's class is a function of its input
    ce = [rt.step(x, y).losses["ce2"] for _ in range(80)]
    assert sum(ce[-5:]) / 5 < 0.85 * ce[0], ce[::10]   # measured 1.74 -> ~1.25


# ---------------------------------------------------------------------------------------------------- text


def test_the_alphabet_encodes_and_decodes_and_maps_strangers_to_one_symbol():
    ids = text.encode("Ab\n~é")
    assert ids.tolist()[:4] == [text.ALPHABET.index(c) for c in "Ab\n~"]
    assert ids[-1] == text.UNKNOWN and text.VOCAB == 97
    assert text.decode(text.encode("to be, or not")) == "to be, or not"


def test_text_windows_are_next_characters_and_the_test_split_is_the_end(tmp_path):
    body = "".join(chr(97 + (i * 7) % 26) for i in range(1000))
    ds = text.text_dataset(body, T=8, test_fraction=0.1)
    ids = text.encode(body)
    # window k: x = ids[8k : 8k + 8] (one-hot), y = ids[8k + 1 : 8k + 9]
    assert torch.equal(ds.x_train[3].argmax(-1), torch.from_numpy(ids[24:32]))
    assert torch.equal(ds.y_train[3], torch.from_numpy(ids[25:33]))
    assert torch.equal(ds.x_test[0].argmax(-1), torch.from_numpy(ids[900:908]))
    # no training window reaches into the held-out tenth
    assert ds.n_train * 8 + 1 <= 900
    assert ds.x_train.shape[1:] == (8, text.VOCAB) and ds.n_classes == text.VOCAB


@pytest.mark.parametrize("content, message", [
    (b"", "the text file is empty"),
    (b"  \n\n ", "the text file is empty"),
    (b"abc\x00def", "looks like a binary file"),
    (b"caf\xe9 au lait", r"not UTF-8 \(byte 0xe9 at offset 3\)"),
])
def test_a_bad_text_file_is_one_line_and_exit_1(tmp_path, content, message, capsys):
    from bsdgraph.cli.main import main

    path = tmp_path / "t.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        text.read_text(path)
    code = main(["train", "models/char_rnn.py", "--text", str(path), "--epochs", "1", "--out",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "Traceback" not in err[0]


def test_text_for_a_model_that_is_no_character_model_is_a_usage_error(tmp_path, capsys):
    from bsdgraph.cli.main import main

    (tmp_path / "t.txt").write_text("hello " * 100)
    code = main(["train", "models/fmnist_mlp.py", "--text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "r")])
    assert code == 2 and "--text needs a character model" in capsys.readouterr().err


def test_the_unigram_baseline_is_the_most_frequent_character():
    ds = text.text_dataset("aaab" * 300, T=4)
    base = text.unigram_baseline(ds)
    assert base["accuracy"] == pytest.approx(0.75, abs=0.02)
    # entropy of (3/4, 1/4) is 0.81 bits; add-one smoothing over 97 symbols moves a little mass to the others
    assert 0.81 < base["bits_per_step"] < 1.0


def test_sampling_continues_the_prime_deterministically(tmp_path, capsys):
    """A trained toy character model: sample prints the prime and `length` more characters, the same for the same
    seed; at temperature 0 it is the argmax of predict at the last step of the window."""
    from bsdgraph.cli.main import main
    from bsdgraph.tools.sample import generate

    corpus = tmp_path / "c.txt"
    corpus.write_text("abcd" * 400)
    run = tmp_path / "run"
    assert main(["train", "models/char_rnn.py", "--text", str(corpus), "--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    args = ["sample", "models/char_rnn.py", "--checkpoint", str(run / "checkpoint.pt"), "--prime", "abc",
            "--length", "12", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("abc") and len(first.rstrip("\n")) == 15

    from bsdgraph.compiler.model_file import load_model
    from bsdgraph.train.trainer import load_for_eval

    model = load_model("models/char_rnn.py")
    rt, _ = load_for_eval(model, run / "checkpoint.pt", None)
    greedy = generate(rt, model.graph.T, "abc", 1, temperature=0)
    window = text.encode(("\n" * model.graph.T + "abc")[-model.graph.T:])
    scores = rt.predict(text.one_hot(window)[None])[0, -1]
    scores[text.UNKNOWN] = -float("inf")
    assert greedy == text.ALPHABET[int(scores.argmax())]


# ---------------------------------------------------------------------------------------------------- generators


def test_lorenz96_is_deterministic_per_seed_and_follows_its_equation():
    a, b, c = series.lorenz96(30, seed=1), series.lorenz96(30, seed=1), series.lorenz96(30, seed=2)
    assert np.array_equal(a, b) and not np.allclose(a, c)
    # one RK4 step of the stated equation from a[i] gives a[i + 1] (dt = sample_every = 0.05)
    x = a[10]

    def f(x):
        return (np.roll(x, -1) - np.roll(x, 2)) * np.roll(x, 1) - x + 8.0

    k1 = f(x)
    k2 = f(x + 0.025 * k1)
    k3 = f(x + 0.025 * k2)
    k4 = f(x + 0.05 * k3)
    np.testing.assert_allclose(x + 0.05 / 6 * (k1 + 2 * k2 + 2 * k3 + k4), a[11], rtol=1e-12)


def test_the_lorenz96_dataset_predicts_the_next_state_on_every_channel():
    ds = series.lorenz96_dataset(T=6, n_train=20, n_test=5)
    assert ds.x_train.shape == (20, 6, 40) and ds.y_test.shape == (5, 6, 40)
    assert torch.equal(ds.y_train[:, :-1], ds.x_train[:, 1:])       # y[t] is x[t + 1]
    assert torch.equal(ds.y_train[3, -1], ds.x_train[4, 0])          # windows follow each other
    assert abs(float(ds.x_train.mean())) < 0.2 and abs(float(ds.x_train.std()) - 1) < 0.2


def test_mnist1d_is_generated_offline_and_deterministic():
    a, b = series.mnist1d_dataset(seed=3, num_samples=200), series.mnist1d_dataset(seed=3, num_samples=200)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == (160, 40, 1) and set(a.y_train.tolist()) <= set(range(10))
    assert not torch.equal(series.mnist1d_dataset(seed=4, num_samples=200).x_train, a.x_train)


def test_the_baselines_are_exact_where_they_should_be():
    """Persistence is exact on a constant series; least-squares AR(1) is exact on a linear one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, 3, generator=g, dtype=torch.float64)
    A = torch.tensor([[0.5, 0.1, 0.0], [0.0, 0.9, -0.2], [0.3, 0.0, 0.7]], dtype=torch.float64)
    y = x @ A.T + 0.25
    ds = Dataset(x[:40].float(), y[:40].float(), x[40:].float(), y[40:].float(), "lin", "lin", None)
    assert series.linear_ar_mse(ds, lags=1) < 1e-10
    assert series.persistence_mse(ds) > 0.1
    flat = Dataset(x[:40].float(), x[:40].float(), x[40:].float(), x[40:].float(), "c", "c", None)
    assert series.persistence_mse(flat) == 0


def test_per_step_reco_rows_match_the_reference_and_compare_single_steps():
    """reco_rows='step': cpu == reference == triton (interpreted), and the loss is ReCo over [T*B, D] rows (so a
    change at one step of one sample moves only that row's cosines)."""
    from bsdgraph.runtime.losses import per_step, reco_loss
    from bsdgraph.runtime.triton import triton_runtime

    bsd = derive_feedback(per_step_net(), BSDConfig(reco_rows="step"))
    assert {n.attrs["rows"] for n in bsd.nodes if n.op.value == "reco"} == {"step"}
    p = init_params(bsd, 0)
    x, y = batch()
    runs = [ReferenceRuntime(bsd, p), cpu_runtime(compile_graph(bsd), params=p),
            triton_runtime(compile_graph(bsd), device="cpu", params=p)]
    results = [rt.step(x, y) for rt in runs]
    for r in results[1:]:
        assert r.losses == pytest.approx(results[0].losses, rel=1e-5)
    for rt in runs[1:]:
        for k, w in runs[0].params.items():
            torch.testing.assert_close(rt.params[k], w.detach(), rtol=1e-5, atol=1e-6)
    a, b = torch.randn(T, 3, 4, dtype=torch.float64), torch.randn(T, 3, 4, dtype=torch.float64)
    rows_a = torch.stack([a[t, s] for t in range(T) for s in range(3)])
    rows_b = torch.stack([b[t, s] for t in range(T) for s in range(3)])
    assert torch.equal(per_step(a), rows_a)
    assert float(reco_loss(per_step(a), per_step(b), None, 0.6, "all", 1e-8)) == pytest.approx(
        float(reco_loss(rows_a, rows_b, None, 0.6, "all", 1e-8)))


def test_per_step_reco_rows_refuse_what_they_cannot_mean():
    with pytest.raises(GraphError, match="reco_rows='step' compares single steps"):
        derive_feedback(per_step_net(), BSDConfig(reco_rows="step", freq=True))
    # per-class B (dedup) has no per-step rows: a classifier with reco_rows='step' runs B on every sample
    from bsdgraph.compiler.lower import can_dedup

    g = GraphBuilder("c", T=2)
    g.output(g.linear(g.lif(g.linear(g.input((3,)), 4)), 2))
    f = g.build()
    assert can_dedup(derive_feedback(f)) and not can_dedup(derive_feedback(f, BSDConfig(reco_rows="step")))


def test_lorenz96_increments_are_the_next_state_minus_this_one():
    states, steps = series.lorenz96_dataset(T=6, n_train=8, n_test=2), \
        series.lorenz96_dataset(T=6, n_train=8, n_test=2, increments=True)
    assert torch.equal(steps.x_test, states.x_test)
    torch.testing.assert_close(steps.y_train, states.y_train - states.x_train)
    # predicting 0 change is persistence: the same MSE
    assert float((steps.y_test ** 2).mean()) == pytest.approx(series.persistence_mse(states), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- macro data


def _macro_csv(path, quarters: int = 40, seed: int = 0, replace: dict | None = None):
    """A made-up table with macrodata's columns (positive levels, rates around 5)."""
    from bsdgraph.train import macro

    rng = np.random.default_rng(seed)
    cols = ["year", "quarter", *macro.CHANNELS, "infl", "realint"]
    lines = [",".join(f'"{c}"' for c in cols)]
    level = np.full(len(macro.GROWTH), 100.0)
    for q in range(quarters):
        level = level * np.exp(rng.normal(0.005, 0.01, len(level)))
        rates = 5 + rng.normal(0, 1, len(macro.LEVELS))
        row = {"year": 1959 + q // 4, "quarter": q % 4 + 1, **dict(zip(macro.GROWTH, level)),
               **dict(zip(macro.LEVELS, rates)), "infl": 0, "realint": 0}
        row.update((replace or {}).get(q, {}))
        lines.append(",".join(str(row[c]) for c in cols))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_macro_series_takes_growth_rates_and_levels_in_channel_order(tmp_path):
    from bsdgraph.train import macro

    path = tmp_path / "m.csv"
    path.write_text('"year","quarter","realgdp","realcons","realinv","realgovt","realdpi","cpi","m1","tbilrate",'
                    '"unemp","pop","infl","realint"\n'
                    "1959,1,100,10,1,2,3,4,5,2.5,6.0,7,0,0\n"
                    "1959,2,101,10,2,2,3,4,5,3.5,5.0,7,0,0\n"
                    "1959,3,101,20,2,2,3,4,5,4.5,4.0,7,0,0\n")
    s = macro.read_macro_csv(path)
    assert s.shape == (2, 10)
    np.testing.assert_allclose(s[0, :3], [400 * np.log(1.01), 0, 400 * np.log(2)])      # gdp, cons, inv
    np.testing.assert_allclose(s[1, :3], [0, 400 * np.log(2), 0])
    np.testing.assert_allclose(s[:, 3:8], 0)                                             # flat levels: no growth
    np.testing.assert_allclose(s[:, 8:], [[3.5, 5.0], [4.5, 4.0]])                      # rates as they are, from q 2


def test_the_macro_dataset_is_next_quarter_windows_with_a_later_test_part(tmp_path):
    from bsdgraph.train import macro

    ds = macro.macro_dataset(T=4, test_fraction=0.25, path=_macro_csv(tmp_path / "m.csv", quarters=41))
    # 40 quarters of growth: 30 train (26 windows of 4 with a next quarter), 10 test (6 windows)
    assert ds.x_train.shape == (26, 4, 10) and ds.x_test.shape == (6, 4, 10) and ds.overlap == 4
    assert torch.equal(ds.y_train[:, :-1], ds.x_train[:, 1:]) and torch.equal(ds.y_train[3, -1], ds.x_train[4, -1])
    assert abs(float(ds.x_train.mean())) < 0.2                                           # the training part's scale
    again = macro.macro_dataset(T=4, test_fraction=0.25, path=_macro_csv(tmp_path / "n.csv", quarters=41))
    assert torch.equal(again.x_test, ds.x_test)
    # every training target is earlier than every test input: the last training target is quarter 29, and the
    # first test window starts at quarter 30 (unscaled, the series' rows)
    s = macro.read_macro_csv(tmp_path / "m.csv")
    mean, std = s[:30].mean(0), s[:30].std(0)
    np.testing.assert_allclose(ds.y_train[-1, -1].numpy(), (s[29] - mean) / std, rtol=1e-5)
    np.testing.assert_allclose(ds.x_test[0, 0].numpy(), (s[30] - mean) / std, rtol=1e-5)


@pytest.mark.parametrize("content, message", [
    (None, "make data"),
    ('"year","quarter"\n1959,1\n', "no column"),
    ("not, a, table\n\x00\x01", "no column"),
])
def test_a_missing_or_wrong_macro_file_is_one_clear_error(tmp_path, content, message):
    from bsdgraph.train import macro

    path = tmp_path / "m.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        macro.macro_dataset(path=path)


def test_a_macro_value_that_cannot_be_grown_is_refused(tmp_path):
    from bsdgraph.train import macro

    with pytest.raises(DataError, match="positive"):
        macro.read_macro_csv(_macro_csv(tmp_path / "m.csv", replace={5: {"realinv": 0}}))
    with pytest.raises(DataError, match="not a number"):
        macro.read_macro_csv(_macro_csv(tmp_path / "n.csv", replace={5: {"cpi": "n/a"}}))


def test_the_table_and_its_attribution_come_out_of_a_wheel_without_running_it(tmp_path):
    import zipfile

    from bsdgraph.train import macro

    wheel = tmp_path / "statsmodels-0-py3-none-any.whl"
    table = _macro_csv(tmp_path / "t.csv").read_bytes()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(macro.IN_WHEEL + "macrodata.csv", table)
        z.writestr(macro.IN_WHEEL + "data.py", 'import os\nos.system("touch ran")\nCOPYRIGHT = """Public."""\n'
                   'SOURCE = """FRED."""\nDESCRSHORT = "US macro"\n')
    out = macro.extract(wheel, tmp_path / "dest")
    assert out.read_bytes() == table
    source = (tmp_path / "dest" / "SOURCE.txt").read_text()
    assert "Public." in source and "FRED." in source and "US macro" in source
    assert not (tmp_path / "ran").exists() and not list(tmp_path.glob("**/ran"))
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as z:
        z.writestr("other.txt", "x")
    with pytest.raises(DataError, match="no statsmodels/datasets/macrodata/macrodata.csv"):
        macro.extract(tmp_path / "empty.whl", tmp_path / "dest2")
