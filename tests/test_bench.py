"""bench runs and its numbers are sane (no timing assertions); activation memory does not grow with depth."""

import json

import pytest

from bsdgraph import BSDConfig, GraphBuilder, Op, derive_feedback
from bsdgraph.compiler.cost import launch_flops, plan_flops
from bsdgraph.cli.main import main
from bsdgraph.compiler.lower import lower
from bsdgraph.compiler.model_file import load_model
from bsdgraph.ir.params import init_params
from bsdgraph.runtime.cpu import cpu_runtime
from bsdgraph.runtime.executor import MemoryProbe
from tests.test_cpu_backend import batch


def mlp(hidden: int, width: int = 64):
    g = GraphBuilder(f"mlp{hidden}", T=4)
    h = g.flatten(g.input((1, 8, 8)))
    for _ in range(hidden):
        h = g.lif(g.linear(h, width))
    g.output(g.linear(h, 10))
    return derive_feedback(g.build())


def test_flops_of_the_fmnist_mlp_match_the_hand_count():
    bsd = derive_feedback(load_model("models/fmnist_mlp.py").graph, BSDConfig(recall_loss="reco"))  # the spec's L_0
    per_step = {la.index: launch_flops(lower(bsd), bsd, la, 128) for la in lower(bsd).launches}
    assert all(f >= 0 for f in per_step.values())
    # naive: F and B forward over T*B rows, their weight gradients, ReCo B x B: 7.0 GFLOP (spec: "about 7")
    naive = plan_flops(lower(bsd, dedup=False), bsd, 128, time_invariant=False)
    layers = [(784, 1024), (1024, 512), (512, 256), (256, 10)]
    dense = 2 * 4 * 128 * sum(a * b for a, b in layers)
    reco = 3 * 2 * 128 * 128 * 4 * (784 + 1024 + 512 + 256)
    assert naive == 4 * dense + reco
    engine = plan_flops(lower(bsd), bsd, 128)
    assert 1.9e9 < engine < 2.2e9 and engine < naive / 3  # time-invariant input + per-class B + B x R ReCo
    # the engine's count by hand: fc1 multiplies the stimulus once (B rows), B runs on R = 10 class rows, and
    # each GEMM's weight gradient costs what its forward costs
    T, B, R = 4, 128, 10
    f = 2 * B * 784 * 1024 + sum(2 * T * B * a * b for a, b in layers[1:])
    b = sum(2 * T * R * a * b for a, b in [(10, 256), (256, 512), (512, 1024), (1024, 784)])
    # ReCo against R rows: Gram, dB, dF each 2 B R D per step; against the time-invariant stimulus (reco0, no
    # dF) and the time-invariant first current (reco1) each product takes one step instead of T
    reco = 2 * B * R * (784 * 2 + 1024 * 3 + 3 * T * (512 + 256))
    assert engine == 2 * (f + b) + reco


def test_peak_activation_memory_does_not_grow_with_depth():
    """Layer-local learning frees a layer's activations after its update: 3 vs 6 hidden layers of equal width
    may differ by at most the parameter memory of the extra layers. What still grows is small: B runs first and
    its per-class rows (R <= 10 per layer) wait for their layer's loss."""
    x, y = batch(mlp(1), B=32, scale=2.0)
    peaks, params = {}, {}
    for depth in (3, 6):
        bsd = mlp(depth)
        rt = cpu_runtime(bsd, seed=0)
        probe = MemoryProbe(rt.plan)
        rt.observe(probe)
        rt.step(x, y)
        peaks[depth] = probe.peak
        params[depth] = sum(p.numel() * 4 for p in init_params(bsd, 0).values())
    assert peaks[6] - peaks[3] <= params[6] - params[3], (peaks, params)


def test_bench_cli_reports_sane_numbers(capsys):
    code = main(["bench", "models/fmnist_mlp.py", "--batch-size", "16", "--steps", "2", "--warmup", "1",
                 "--compare", "--json", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0
    # progress on stderr (stdout stays one JSON document): what is being timed, candidates named
    assert "timing bsdgraph-cpu, naive, bptt" in err and "1 warm-up + 2 interleaved rounds" in err
    rep = json.loads(out)
    names = [r["name"] for r in rep["results"]]
    assert names[:3] == ["bsdgraph-cpu", "naive", "bptt"]
    for r in rep["results"]:
        assert r["ms_step"] > 0 and r["samples_per_s"] > 0 and r["gflop_step"] > 0
        assert r["samples_per_s"] == pytest.approx(16 / (r["ms_step"] / 1e3), rel=0.01)
    engine, naive = rep["results"][0], rep["results"][1]
    assert engine["gflop_step"] < naive["gflop_step"] and rep["roofline_gflops"] > 0
    assert set(rep["speedup_vs"]) == set(names[1:])


def test_bench_usage_error(capsys):
    assert main(["bench", "models/fmnist_mlp.py", "--steps", "0"]) == 2


def test_energy_counts_follow_the_formula(capsys):
    from bsdgraph.tools.energy import estimate

    f = load_model("models/fmnist_mlp.py").graph
    layers = estimate(f, {"h1": 0.1, "h2": 0.2, "h3": 0.5})
    assert [e.synapse for e in layers] == ["fc1", "fc2", "fc3", "fc4"]
    assert layers[0].input_rate is None and layers[0].snn_ops == 4 * 784 * 1024  # analog input: MACs every step
    assert layers[1].snn_ops == pytest.approx(4 * 0.1 * 1024 * 512)  # T * rate * D_in * fan-out ACs
    assert layers[1].snn_pj == pytest.approx(layers[1].snn_ops * 0.9) and layers[1].ann_macs == 1024 * 512
    assert main(["compile", "models/fmnist_mlp.py", "--emit", "plan"]) == 0
    assert "ANN / SNN energy" in capsys.readouterr().out


def test_energy_of_a_residual_net_counts_every_synapse_and_the_spikes_of_both_operands_of_a_sum():
    from bsdgraph.tools.energy import estimate

    f = load_model("models/fmnist_resnet.py").graph
    rates = {n.name: 0.1 * (i + 1) for i, n in enumerate(f.by_op(Op.LIF))}
    layers = {e.synapse: e for e in estimate(f, rates)}
    assert set(layers) == {n.name for n in f.nodes if n.op in (Op.CONV2D, Op.LINEAR)}  # the shortcut's too
    # block2's convolutions read block1 = block1_b_h + pool(stem): the spikes of both, each an accumulate
    assert layers["block2_a"].input_rate == pytest.approx(rates["block1_b_h"] + rates["stem"])
    assert layers["fc1"].input_rate == pytest.approx(rates["block2_b_h"] + rates["block2_down_h"])
    assert layers["conv1"].input_rate is None  # the analog stimulus


def test_energy_of_a_recurrent_sequence_model_counts_the_recurrent_synapse_and_an_rnn_twin():
    from bsdgraph.tools.energy import estimate

    f = load_model("models/mackey_glass_rnn.py").graph  # T = 8, 1 -> rec 128 -> 64 -> 1, sequence input
    layers = {e.synapse: e for e in estimate(f, {"h1": 0.1, "h2": 0.2})}
    assert list(layers) == ["fc1", "h1_rec", "fc2", "fc3"]
    assert layers["fc1"].input_rate is None and layers["fc1"].snn_ops == 8 * 1 * 128  # analog sequence: MACs
    assert layers["h1_rec"].input_rate == 0.1  # its own layer's spikes, steps 0..6 reach it
    assert layers["h1_rec"].snn_ops == pytest.approx(7 * 0.1 * 128 * 128) and layers["h1_rec"].ann_macs == 7 * 128 ** 2
    assert layers["fc2"].ann_macs == 8 * 128 * 64  # the ANN twin is an RNN: it also runs every step


def test_energy_of_a_transposed_convolution_counts_its_whole_window():
    from bsdgraph.tools.energy import estimate

    g = GraphBuilder("dec", T=2)
    h = g.lif(g.conv2d(g.input((1, 8, 8)), 4, kernel=3, stride=2, padding=1))  # 4 x 4 x 4
    g.output(g.conv_transpose2d(h, 1, kernel=3, stride=2, padding=1, output_padding=1), task="regression")
    layers = {e.synapse: e for e in estimate(g.build(), {"h1": 0.25})}
    # conv: each of the 64 input pixels reaches 4 channels x 9 taps / 4 (stride 2) outputs; the transposed conv
    # scatters each of its 64 input spikes to all 1 x 9 taps of its window
    assert layers["conv1"].snn_ops == 2 * 64 * 4 * 9 / 4
    assert layers["deconv1"].snn_ops == pytest.approx(2 * 0.25 * 64 * 9)
    assert layers["deconv1"].ann_macs == 64 * 9


def test_sweep_writes_a_plot(capsys, tmp_path):
    png = tmp_path / "sweep.png"
    code = main(["bench", "models/onb_bench.py", "--sweep", "T=1,2", "--steps", "1", "--warmup", "0",
                 "--batch-size", "2", "--plot", str(png), "--json", "--threads", "1"])
    rep = json.loads(capsys.readouterr().out)
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert [r["T"] for r in rep["rows"]] == [1, 2] and all(r["bsdgraph"] > 0 and r["bptt"] > 0 for r in rep["rows"])
    assert main(["bench", "models/onb_bench.py", "--sweep", "depth=3"]) == 2


def test_onb_width_comes_from_the_environment_and_bad_values_are_refused(monkeypatch):
    from bsdgraph.ir.graph import Op
    from bsdgraph.compiler.model_file import ModelError

    monkeypatch.setenv("BSDGRAPH_ONB_NEURONS", "96")
    g = load_model("models/onb_bench.py").graph
    (inp,) = g.by_op(Op.INPUT)
    assert inp.shape == (96,) and inp.attrs["encoding"] == "sequence" and g["fc1"].attrs["out_features"] == 96
    monkeypatch.setenv("BSDGRAPH_ONB_NEURONS", "lots")
    with pytest.raises(ModelError, match="BSDGRAPH_ONB_NEURONS must be a positive integer"):
        load_model("models/onb_bench.py")


def test_compare_skips_the_hand_written_baselines_for_a_sequence_stimulus(monkeypatch):
    # the naive and snnTorch steps repeat one image over T: on per-step input they would time other work
    from bsdgraph.tools.bench import _batch, baselines

    monkeypatch.setenv("BSDGRAPH_ONB_NEURONS", "32")
    model = load_model("models/onb_bench.py")
    g = model.graph.replace(T=3)
    x, y = _batch(g, 2)
    assert x.shape == (2, 3, 32)
    fns, flops, notes = baselines(model, g, derive_feedback(g, model.bsd), x, y)
    assert set(fns) == {"bptt"} and flops["bptt"] > 0
    assert any(n.startswith("naive: skipped") and "direct-encoded" in n for n in notes)
    fns["bptt"]()  # BPTT takes the per-step stimulus as it is


def test_floor_script_measures_every_part_and_the_floor_is_their_sum():
    import re
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "bench/floor.py", "--rounds", "2", "--threads", "1"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    patterns = (r"-> +([0-9.]+) ms at 100 % of the roofline", r"AdamW, .*\(cold\) +([0-9.]+) ms",
                r"fixed cost .* ([0-9.]+) ms", r"floor = .* ([0-9.]+) ms")
    gemm, adamw, fixed, floor = (float(re.search(p, out).group(1)) for p in patterns)
    assert min(gemm, adamw, fixed) > 0, out
    assert abs(floor - (gemm + adamw + fixed)) <= 0.02, out  # printed with 2 decimals


def test_bench_times_the_compiled_step_beside_the_eager_one(capsys):
    code = main(["bench", "models/fmnist_mlp.py", "--batch-size", "8", "--steps", "1", "--warmup", "0", "--json",
                 "--threads", "1", "--compile", "aot_eager"])
    rep = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [r["name"] for r in rep["results"]] == ["bsdgraph-cpu", "bsdgraph-cpu (aot_eager)"]
    assert rep["compile_seconds"] > 0 and rep["launches_per_step"] == 28
    assert any("pays for its compile after" in n for n in rep["notes"])
