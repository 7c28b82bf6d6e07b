"""Fuzzing the command line: random argument vectors for every subcommand end in exit 0, 1 or 2 with a message,
never a traceback.

Arguments are drawn per subcommand from pools that reach deep code paths: the subcommand's real flags with valid,
edge and junk values, working and broken model files, data, checkpoints and NIR files made once per module, then
sometimes a token dropped, duplicated or replaced. Work stays tiny (models of a few dozen neurons, at most 2 epochs,
``bench`` with ``--threads 1`` and at most 2 steps) and nothing is timed. ``cli`` runs ``bsdgraph.cli.main.main``
in-process; a few ``python -m bsdgraph`` runs check the real entry point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tests.fuzz_helpers import (
    FUZZ, LONG, ROOT, TINY_IMAGE_MODEL, TINY_MODEL, assert_clean, cli, run_modules, tiny_arrays, write, write_npz,
)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The files the fuzzer picks from: good ones (made with the CLI itself) and bad ones. The tests run in its
    a_folder: defaults such as runs/<model> and recall.png land there."""
    root = tmp_path_factory.mktemp("cli-fuzz")
    cwd = os.getcwd()
    w = {"root": root}
    w["tiny"] = write(root / "tiny.py", TINY_MODEL)
    w["image"] = write(root / "tiny_image.py", TINY_IMAGE_MODEL)
    w["broken"] = write(root / "broken.py", "def build():\n    raise RuntimeError('broken on purpose')\n")
    w["npz"] = write_npz(root / "tiny.npz")
    w["image_npz"] = write_npz(root / "image.npz", tiny_arrays(40, 10, (1, 4, 4), 10))
    w["garbage"] = write(root / "garbage.bin", b"\x00\x01 not any format " * 8)
    w["empty"] = write(root / "empty.npz", b"")
    for name, model, data in (("run", w["tiny"], w["npz"]), ("image_run", w["image"], w["image_npz"])):
        assert_clean(cli("train", model, "--npz", data, "--out", root / name, "--epochs", "1"), codes=(0,))
    w["ck"], w["image_ck"] = root / "run" / "checkpoint.pt", root / "image_run" / "checkpoint.pt"
    w["torn_ck"] = write(root / "torn.pt", w["ck"].read_bytes()[:300])
    assert_clean(cli("export-nir", w["tiny"], "--checkpoint", w["ck"], "-o", root / "tiny.nir", "--with-backward"),
                 codes=(0,))
    assert_clean(cli("export-nir", w["image"], "--checkpoint", w["image_ck"], "-o", root / "image.nir"), codes=(0,))
    w["nir"], w["backward_nir"], w["image_nir"] = root / "tiny.nir", root / "tiny.backward.nir", root / "image.nir"
    assert_clean(cli("import-nir", w["nir"], "-o", root / "imported.py"), codes=(0,))  # + imported.weights.pt
    w["imported"], w["weights"] = root / "imported.py", root / "imported.weights.pt"  # weights, no training state
    w["x"] = root / "x.npz"
    np.savez(w["x"], x=np.random.default_rng(0).random((3, 16), np.float32))
    w["x_image"] = root / "x_image.npz"
    np.savez(w["x_image"], x=np.random.default_rng(0).random((2, 3, 1, 4, 4), np.float32))  # [T, B, ...]
    w["x_bad"] = root / "x_bad.npz"
    np.savez(w["x_bad"], x=np.full((3, 5), np.nan, np.float32))
    w["x_nan"] = root / "x_nan.npz"
    np.savez(w["x_nan"], x=np.full((3, 16), np.nan, np.float32))
    w["dir"] = root / "a_folder"
    for folder in ("a_folder", "out", "runs"):  # where fresh output names go
        (root / folder).mkdir()
    w["missing"] = root / "missing" / "nothing.py"
    os.chdir(w["dir"])
    yield w
    os.chdir(cwd)


# ---------------------------------------------------------------------------------------------------- value pools


@dataclass(frozen=True)
class Opt:
    """A flag's values: ``good`` ones parse (they may still be refused later: 0 epochs, a broken file), ``bad`` ones
    are argparse errors. ``good=None``: a flag without a value."""

    good: st.SearchStrategy | None
    bad: st.SearchStrategy = st.sampled_from(["x", "", "1.5"])


def ints(*good: str, huge: bool = False) -> Opt:
    return Opt(st.sampled_from(list(good) + (["99999999999999999999"] if huge else [])))


def floats() -> Opt:
    return Opt(st.sampled_from(["nan", "inf", "-inf", "0", "-1", "1e-3", "0.5", "1e308"]),
               st.sampled_from(["abc", "", "1,5"]))


def choice(good: list[str], bad: str = "bogus") -> Opt:
    return Opt(st.sampled_from(good), st.just(bad))


def paths(*items) -> Opt:
    return Opt(st.sampled_from([str(p) for p in items]), st.just(""))


def fresh(w, folder: str, suffix: str = "") -> st.SearchStrategy:
    return st.integers(0, 2 ** 20).map(lambda i: str(w["root"] / folder / f"n{i}{suffix}"))


def out_file(w, suffix: str) -> Opt:
    return Opt(st.one_of(fresh(w, "out", suffix), st.sampled_from(
        [str(w["missing"].parent / f"x{suffix}"), str(w["dir"]), str(w["root"] / "x.xyz")])), st.just(""))


FLAG = Opt(None)
JUNK = ["--bogus", "-x", "--", "-", "--json=1", "--help", "\x00", "é", "--epochs"]


def table(w) -> dict[str, tuple[Opt, dict[str, Opt]]]:
    """Per subcommand: (the positional, {flag: values}). Heavy work stays bounded: <= 2 epochs, bench steps <= 2,
    no model bigger than fmnist_mlp.py, backends cpu/reference (triton runs interpreted here: its own tests)."""
    mlp = ROOT / "models" / "fmnist_mlp.py"
    model = paths(w["tiny"], w["image"], w["imported"], w["broken"], w["missing"], w["npz"], w["dir"], w["garbage"],
                  mlp)
    network = paths(w["tiny"], w["image"], w["imported"], w["nir"], w["image_nir"], w["backward_nir"], w["broken"],
                    w["garbage"], w["missing"], mlp)  # what export-nir, run and draw read: model files and NIR files
    ck = paths(w["ck"], w["image_ck"], w["weights"], w["torn_ck"], w["garbage"], w["npz"], w["missing"], w["dir"])
    backend = choice(["cpu", "reference"])
    data = {"--npz": paths(w["npz"], w["image_npz"], w["garbage"], w["empty"], w["missing"], w["dir"]),
            "--data-dir": paths(w["dir"], w["missing"], w["root"]), "--limit-test": ints("0", "-1", "1", "5")}
    lif = ["v_th=0.5", "tau=nan", "v_th", "=3", "foo=1", "reset=soft", "v_th=-1", "tau=1e308"]
    bsd = ["lam=0.3", "lam=-1", "negatives=other_class", "freq=true", "recall=false", "distill_on=membrane",
           "bogus=1", "lam"]
    out_dir = Opt(st.one_of(fresh(w, "runs"), st.sampled_from(
        [str(w["root"] / "run"), str(w["garbage"]), str(w["missing"].parent / "deeper" / "r")])), st.just(""))
    nir_args = {"--dt": floats(), "--steps": ints("0", "-1", "1", "3")}
    return {
        "compile": (model, {"--emit": choice(["ir", "backward", "plan", "dot", "all"]), "--json": FLAG,
                            "-o": out_file(w, ".txt")}),
        "train": (model, {"--epochs": ints("1", "2", "0", "-1"), "--batch-size": ints("7", "20", "0", "-3", huge=True),
                          "--lr": floats(), "--seed": ints("0", "-1", "7", huge=True), "--backend": backend,
                          "--rule": choice(["bsd", "bptt"]), "--init": choice(["default", "calibrated"]),
                          "--schedule": choice(["constant", "cosine"]), "--augment": FLAG,
                          "--lif": Opt(st.sampled_from(lif)), "--bsd": Opt(st.sampled_from(bsd)),
                          "--encoding": choice(["direct", "poisson"]), "--limit-train": ints("0", "-1", "1", "9"),
                          "--out": out_dir, "--resume": FLAG, "--json": FLAG, **data}),
        "eval": (model, {"--checkpoint": ck, "--backend": backend, "--json": FLAG, **data}),
        "plot": (paths(w["root"] / "run", w["root"] / "image_run", w["dir"], w["missing"], w["npz"]),
                 {"--model": model, "--sample": ints("0", "-1", "3", huge=True), **data}),
        "recall": (model, {"--checkpoint": ck, "--out": out_file(w, ".png")}),
        "bench": (model, {"--backend": backend, "--batch-size": ints("1", "2", "0", "-1"),
                          "--steps": ints("1", "2", "0", "-1"), "--warmup": ints("0", "1", "-1"),
                          "--threads": ints("1", "0", "-1"), "--compare": FLAG, "--json": FLAG, "--energy": FLAG,
                          "--checkpoint": ck, "--energy-samples": ints("1", "5", "0", "-2"),
                          "--sweep": Opt(st.sampled_from(["T=1,2", "width=2,3", "batch=1,2", "T=", "x=1", "T=a",
                                                          "T=-1", "T=0,1", "T"])),
                          "--plot": out_file(w, ".png"), **data}),
        "export-nir": (network, {"--checkpoint": ck, "--dt": floats(), "--with-backward": FLAG,
                               "-o": out_file(w, ".nir")}),
        "import-nir": (paths(w["nir"], w["backward_nir"], w["garbage"], w["tiny"], w["missing"], w["dir"]),
                       {**nir_args, "-o": out_file(w, ".py")}),
        "run": (network,
                {"--input": paths(w["x"], w["x_image"], w["x_bad"], w["x_nan"], w["npz"], w["garbage"], w["missing"],
                                  w["dir"]),
                 "--checkpoint": ck, **nir_args, "-o": out_file(w, ".npz")}),
        "draw": (network,
                 {**nir_args, "-o": Opt(st.one_of(out_file(w, ".png").good, out_file(w, ".dot").good,
                                                  st.just(str(w["root"] / "out" / "pic.svg"))))}),
    }


REQUIRED = {"eval": ("--checkpoint",), "recall": ("--checkpoint",), "run": ("--input",), "export-nir": ("-o",),
            "draw": ("-o",)}


@st.composite
def argvs(draw, w, sub):
    """Most vectors are well formed (argparse accepts them: the work reaches the command's own checks); a third
    are damaged (a bad value, a missing value, a dropped, duplicated or junk token): mostly usage errors."""
    positional, opts = table(w)[sub]
    damaged = draw(st.integers(0, 2)) == 0
    argv = [sub, draw(positional.good)]
    if sub == "bench":  # bounded work unless the fuzzer overrides them below (argparse keeps the last value)
        argv += ["--threads", "1", "--steps", "1", "--warmup", "0"]
    chosen = draw(st.lists(st.sampled_from(sorted(opts)), max_size=5, unique=True))
    for flag in [f for f in REQUIRED.get(sub, ()) if f not in chosen] + chosen:
        argv.append(flag)
        if opts[flag].good is not None:
            argv.append(draw(opts[flag].bad if damaged and draw(st.booleans()) else opts[flag].good))
    if sub in ("train", "eval", "plot", "bench") and not any(a in argv for a in ("--npz", "--data-dir")):
        argv += ["--npz", str(w["npz"])]  # never the real Fashion-MNIST (cli() also hides it)
    for _ in range(draw(st.integers(1, 2)) if damaged else 0):
        i = draw(st.integers(1, len(argv)))
        how = draw(st.sampled_from(["drop", "junk", "duplicate"]))
        if how == "drop" and i < len(argv):
            del argv[i]
        elif how == "junk":
            argv.insert(i, draw(st.sampled_from(JUNK)))
        elif i < len(argv):
            argv.insert(i, argv[i])
    return argv


def assert_message(r):
    """exit 2: argparse's or our usage line; exit 1: an `error:` line or the invalid-model summary."""
    assert_clean(r)
    last = [line for line in r.err.splitlines() if line.strip()][-1:] or [""]
    if r.code == 2:
        assert "error:" in r.err, r.err
    elif r.code == 1:
        assert last[0].startswith("error: ") or "invalid model" in last[0], r.err


# Heavier subcommands (a training step, a matplotlib figure) get a third of the profile's examples each: the ci
# profile stays within the suite's time budget, the long profile still tries hundreds per subcommand.
HEAVY = {"train", "plot", "recall", "bench", "draw"}
SUBCOMMANDS = ["compile", "train", "eval", "plot", "recall", "bench", "export-nir", "import-nir", "run", "draw"]


def _examples(sub: str) -> int:
    n = settings.default.max_examples
    return max(4, n // 3) if sub in HEAVY else n


def _fuzz_subcommand(sub: str):
    """One test per subcommand (so that --hypothesis-show-statistics reports each), run in a scratch folder where
    defaults such as runs/<model> and recall.png land."""

    @settings(FUZZ, max_examples=_examples(sub))
    @given(data=st.data())
    def test(ws, data):
        r = cli(*data.draw(argvs(ws, sub), label="argv"))
        event(f"exit {r.code}")  # the mix of outcomes, in --hypothesis-show-statistics
        assert_message(r)

    test.__name__ = f"test_random_{sub.replace('-', '_')}_argument_vectors_never_show_a_traceback"
    return test


for _sub in SUBCOMMANDS:
    globals()[_fuzz_subcommand(_sub).__name__] = _fuzz_subcommand(_sub)


@FUZZ
@given(argv=st.lists(st.sampled_from(SUBCOMMANDS + JUNK + ["-h", "--version", "compile.py"]), max_size=3))
def test_argument_vectors_without_a_subcommand(argv):
    r = cli(*argv)
    assert_message(r)
    if not argv or (argv[0] not in SUBCOMMANDS and not {"-h", "--help"} & set(argv)):
        assert r.code == 2, r


def test_the_real_entry_point_prints_no_traceback(ws):
    """`python -m bsdgraph` over the failure kinds: usage error, broken model, bad data, bad checkpoint, bad NIR
    file, bad input. Each costs a fresh interpreter (~3 s here): they run side by side, two of them unless the
    profile is long."""
    cases = [
        (1, ["train", ws["tiny"], "--npz", ws["garbage"], "--out", ws["root"] / "sub1"]),
        (1, ["compile", ws["broken"]]),
        (2, ["train", ws["tiny"], "--epochs", "x"]),
        (1, ["eval", ws["tiny"], "--checkpoint", ws["torn_ck"], "--npz", ws["npz"]]),
        (1, ["import-nir", ws["garbage"], "--dt", "1e-3"]),
        (1, ["run", ws["tiny"], "--input", ws["x_bad"]]),
    ]
    cases = cases if LONG else cases[:2]
    for (want, argv), proc in zip(cases, run_modules([argv for _, argv in cases], cwd=ws["dir"])):
        assert proc.returncode == want, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.strip(), (argv, proc.stderr)
