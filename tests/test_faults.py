"""Fault injection: SIGKILL during training and during checkpoint writes, a full disk, NaN/Inf in weights and batches.

Kills use real processes (``ForkServer`` forks them from one interpreter that has imported bsdgraph, ~5 ms each
instead of a ~3 s interpreter start) at seeded random moments. What must hold after every kill:

- the checkpoint, if there is one, loads, and it holds every epoch the killed process had finished except at most
  the one whose checkpoint it was writing: at most one epoch of work is lost;
- the only other files a kill leaves are the killed writer's ``checkpoint.pt.tmp-<pid>`` (it never replaced the
  checkpoint, nothing reads it, and the next save removes it: ``bsdgraph/train/checkpoint.py``);
- ``--resume`` finishes the run, and because resume is exact, the weights at the end equal those of a run that was
  never killed, bit for bit, with ``metrics.jsonl`` holding each epoch once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from bsdgraph.train import rundir
from bsdgraph.train.checkpoint import load_checkpoint, save_checkpoint
from tests.fuzz_helpers import (
    LONG, TINY_MODEL, ForkServer, assert_clean, cli, read_marks, tiny_arrays, write, write_npz,
)

EPOCHS = 4
KILLS = 150 if LONG else 30            # SIGKILLs of training runs (the issue asks for 30+)
SAVE_KILLS = 150 if LONG else 30       # SIGKILLs of a process that does nothing but save checkpoints

# what `bsdgraph train` keeps in a run directory (bsdgraph/train/rundir.py); anything else is a leftover
RUN_FILES = {rundir.CHECKPOINT, rundir.METRICS, rundir.LOCK, rundir.MANIFEST, rundir.SNAPSHOT}


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = write(root / "tiny.py", TINY_MODEL)
    npz = write_npz(root / "tiny.npz", tiny_arrays(200, 40))
    return root, model, npz


def _argv(model, npz, out, resume: bool):
    # --backend cpu: the default on a GPU machine is triton, and CUDA does not survive the fork server's fork
    return ["train", model, "--npz", npz, "--out", out, "--epochs", EPOCHS, "--batch-size", "20", "--json",
            "--backend", "cpu", *(["--resume"] if resume else [])]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES) if out.exists() else []


def _check_after_kill(out: Path, pids: list[int], started: list[int], before: int) -> dict:
    """The invariants of a killed run (``pids[-1]``; earlier ones are the run's earlier killed processes, whose
    temporary files stay until a save succeeds); returns what happened, for the tally."""
    pid = pids[-1]
    ck_path = out / "checkpoint.pt"
    epoch = load_checkpoint(ck_path)["epoch"] if ck_path.exists() else 0  # raises if it does not load
    reached = max(started, default=before)  # the epoch this process was in (or the last one it started)
    # every epoch it finished is in the checkpoint, except possibly the one whose checkpoint it was writing
    assert epoch >= reached - 1, f"checkpoint at epoch {epoch}, but the process had started epoch {reached}"
    assert before <= epoch <= max(reached, before)
    harmless = {f"{name}.tmp-{p}" for p in pids for name in (rundir.CHECKPOINT, rundir.MANIFEST, rundir.SNAPSHOT)}
    harmless |= {"metrics.jsonl.tmp"}
    stray = [n for n in _leftovers(out) if n not in harmless]
    assert not stray, f"a killed run left {stray}"
    return {"epoch": epoch, "lost": reached - epoch if started else 0,
            "in_save": f"checkpoint.pt.tmp-{pid}" in _leftovers(out)}


def _final_params(out: Path) -> dict[str, torch.Tensor]:
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["epoch"] == EPOCHS
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1)), "metrics.jsonl lost or repeated an epoch"
    assert records == ck["history"]
    assert _leftovers(out) == [], f"left behind after a completed resume: {_leftovers(out)}"
    return ck["params"]


def test_sigkill_at_random_moments_loses_at_most_one_epoch_and_resume_is_exact(server, job):
    root, model, npz = job
    assert server.warm(_argv(model, npz, root / "warm-up", False)) == 0
    ref = root / "reference"
    status, seconds = server.run(_argv(model, npz, ref, False), root / "reference.log", root / "reference.marks")
    assert status == {"signal": 0, "code": 0}, (root / "reference.log").read_text()
    reference = _final_params(ref)

    rng = random.Random(20260)
    kills, tally, trial = 0, [], 0
    while kills < KILLS:
        trial += 1
        out, pids = root / f"trial{trial}", []
        for attempt in range(1, 100):  # kill this run again and again, then let it finish
            resume = (out / "checkpoint.pt").exists()
            before = load_checkpoint(out / "checkpoint.pt")["epoch"] if resume else 0
            log, marks = root / f"t{trial}-{attempt}.log", root / f"t{trial}-{attempt}.marks"
            pid = server.spawn("train", log, marks, argv=[str(a) for a in _argv(model, npz, out, resume)])
            if kills >= KILLS or attempt > 8:
                status = server.wait(pid)
                assert status == {"signal": 0, "code": 0}, log.read_text()
                break
            time.sleep(rng.uniform(0, seconds * (EPOCHS - before + 0.5) / EPOCHS))  # within what is left to do
            os.kill(pid, signal.SIGKILL)
            status = server.wait(pid)
            if status["signal"] != signal.SIGKILL:  # it finished before the kill landed
                assert status["code"] == 0, log.read_text()
                break
            kills += 1
            pids.append(pid)
            tally.append(_check_after_kill(out, pids, read_marks(marks), before))
        for key, value in _final_params(out).items():
            assert torch.equal(value, reference[key]), f"{key} differs from the run that was never killed"
    in_save = sum(t["in_save"] for t in tally)
    print(f"\n{kills} SIGKILLs in {trial} runs (an unkilled run takes {seconds:.2f} s): {in_save} landed inside a "
          f"checkpoint write, {sum(t['epoch'] == 0 for t in tally)} before the first checkpoint; epochs lost per "
          f"kill: max {max(t['lost'] for t in tally)}; every run resumed to bit-identical weights")
    assert kills >= KILLS


def test_sigkill_inside_save_checkpoint_leaves_the_old_or_the_new_checkpoint(server, tmp_path):
    """A child does nothing but rewrite one checkpoint (4 MB, so each write takes a while); whenever it is killed,
    the target is a complete checkpoint, either the last one it finished or the one it was writing."""
    numel = 1 << 20
    base = torch.arange(numel, dtype=torch.float32)
    rng = random.Random(7)
    target, outcomes = tmp_path / "checkpoint.pt", {"old": 0, "new": 0, "none": 0, "temp left": 0}
    for k in range(SAVE_KILLS):
        marks = tmp_path / f"k{k}.marks"
        pid = server.spawn("save", tmp_path / f"k{k}.log", marks, path=str(target), numel=numel)
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(pid, signal.SIGKILL)
        assert server.wait(pid)["signal"] == signal.SIGKILL
        done = read_marks(marks)
        # a kill inside the child's first write leaves its temporary file and no checkpoint: count it too (under
        # load the first write is often still running when the kill lands; found by `make fuzz` on a busy machine)
        outcomes["temp left"] += (tmp_path / f"checkpoint.pt.tmp-{pid}").exists()
        if not target.exists():
            assert not done, "a save completed, yet there is no checkpoint"
            outcomes["none"] += 1
            continue
        doc = load_checkpoint(target)
        assert torch.equal(doc["w"], base + doc["i"]), "the checkpoint is a mix of two writes"
        last = done[-1] if done else 0
        assert doc["i"] in (last, last + 1), f"checkpoint {doc['i']} after completed save {last}"
        outcomes["old" if doc["i"] == last else "new"] += 1
        target.unlink()  # the next child starts from nothing again
    save_checkpoint(target, {"i": 0})  # a successful save removes the dead writers' temporary files
    assert sorted(p.name for p in tmp_path.glob("checkpoint.pt*")) == ["checkpoint.pt"]
    print(f"\n{SAVE_KILLS} SIGKILLs inside save_checkpoint: {outcomes}")
    assert outcomes["temp left"] > 0, "no kill landed inside a write: the test did not test anything"


def test_a_run_killed_after_its_last_checkpoint_resumes_to_a_clean_folder(tmp_path):
    """Found by the kill test under load: the last process was killed after renaming its final checkpoint but before
    removing an earlier writer's temporary file; the resumed run had no epoch left, so no save removed it."""
    import subprocess

    model, npz, out = write(tmp_path / "tiny.py", TINY_MODEL), write_npz(tmp_path / "tiny.npz"), tmp_path / "run"
    assert_clean(cli("train", model, "--npz", npz, "--out", out, "--epochs", "1"), codes=(0,))
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    write(out / f"checkpoint.pt.tmp-{dead.pid}", b"half a checkpoint")
    assert_clean(cli("train", model, "--npz", npz, "--out", out, "--epochs", "1", "--resume"), codes=(0,))
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)


# ---------------------------------------------------------------------------------------------------- disk full


def _enospc(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _HalfWriter:
    """A file whose write puts half the bytes on disk, then fails as a full disk does."""

    def __init__(self, path, mode):
        self._fh = open(path, mode)

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        _enospc()

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


@pytest.mark.parametrize("where", ["write", "fsync", "rename", "metrics"])
def test_disk_full_while_saving_is_one_clear_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    import bsdgraph.train.checkpoint
    import bsdgraph.train.trainer

    model, npz, out = write(tmp_path / "tiny.py", TINY_MODEL), write_npz(tmp_path / "tiny.npz"), tmp_path / "run"
    assert_clean(cli("train", model, "--npz", npz, "--out", out, "--epochs", "1"), codes=(0,))
    ck, metrics = out / "checkpoint.pt", out / "metrics.jsonl"
    before = {p: p.read_bytes() for p in (ck, metrics)}
    with monkeypatch.context() as m:
        if where == "write":
            m.setattr(bsdgraph.train.checkpoint, "open", _HalfWriter, raising=False)
        elif where == "fsync":
            m.setattr(bsdgraph.train.checkpoint.os, "fsync", _enospc)
        elif where == "rename":  # only the checkpoint's rename: metrics.jsonl is rewritten with os.replace too
            real = os.replace
            m.setattr(bsdgraph.train.checkpoint.os, "replace",
                      lambda src, dst: _enospc() if ".pt.tmp-" in str(src) else real(src, dst))
        else:
            m.setattr(bsdgraph.train.trainer, "open", lambda *a, **k: _HalfWriter(*a[:2]), raising=False)
        r = assert_clean(cli("train", model, "--npz", npz, "--out", out, "--epochs", "2", "--resume"), codes=(1,))
    lines = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0], r.err
    if where == "metrics":  # the checkpoint of epoch 2 was written; metrics.jsonl is rebuilt from it on resume
        assert str(metrics) in lines[0] and load_checkpoint(ck)["epoch"] == 2
    else:
        assert str(ck) in lines[0] and "still holds epoch 1" in lines[0], lines[0]
        assert ck.read_bytes() == before[ck], "the previous checkpoint changed"
        assert metrics.read_bytes() == before[metrics]
    assert [p.name for p in out.iterdir() if ".tmp" in p.name] == []
    r = assert_clean(cli("train", model, "--npz", npz, "--out", out, "--epochs", "3", "--resume"), codes=(0,))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [rec["epoch"] for rec in records] == [1, 2, 3] and load_checkpoint(ck)["epoch"] == 3


# ---------------------------------------------------------------------------------------------------- NaN / Inf

BN_MODEL = '''
from bsdgraph import GraphBuilder
def build():
    g = GraphBuilder("bn", T=2)
    h = g.lif(g.batchnorm(g.linear(g.input((16,)), 12)))
    g.output(g.linear(h, 4))
    return g.build()
'''

INJECTIONS = {  # what is poisoned -> the message that must name the layer
    "F weight NaN": ("fc1.weight", float("nan"), r"layer 1\b|layer fc1\b"),
    "F bias Inf": ("fc1.bias", float("inf"), r"layer 1\b|layer fc1\b"),
    "B weight -Inf": ("fc2_b.weight", -float("inf"), r"layer 1\b|layer fc2_b\b"),
    "batchnorm statistic NaN": ("bn1.running_var", float("nan"), r"layer bn1\b"),
    "batch NaN": ("x", float("nan"), r"layer 0, the stimulus 'x'"),
    "batch Inf": ("x", float("inf"), r"layer 0, the stimulus 'x'"),
}


@pytest.mark.parametrize("case", sorted(INJECTIONS))
def test_nan_or_inf_stops_training_naming_the_layer_and_overwrites_nothing(tmp_path, case):
    import dataclasses

    from bsdgraph.train.data import make_synthetic
    from bsdgraph.compiler.model_file import load_model
    from bsdgraph.train.trainer import Trainer
    from bsdgraph.train.config import TrainConfig, TrainingError

    key, value, names = INJECTIONS[case]
    model = load_model(write(tmp_path / "bn.py", BN_MODEL))
    data = make_synthetic(60, 20, (16,), 4, seed=0)
    trainer = Trainer(model, data, TrainConfig(epochs=1, batch_size=20), tmp_path / "run")
    trainer.run()
    files = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "run").iterdir()}
    trainer.cfg = TrainConfig(epochs=2, batch_size=20)
    if key == "x":
        x = data.x_train.clone()
        x[7, 3] = value
        trainer.data = dataclasses.replace(data, x_train=x)
    else:
        table = trainer.rt.params if key in trainer.rt.params else trainer.rt.state
        table[key].view(-1)[0] = value
    with pytest.raises(TrainingError, match=names) as err:
        trainer.run()
    assert "at epoch 2, step" in str(err.value) or "of epoch 2, step" in str(err.value)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "run").iterdir()} == files
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1


# ---------------------------------------------------------------------------------------------------- failures inside


@pytest.mark.parametrize("error, shown", [
    ("execution", "error: while executing node 'fc1' (linear): ValueError: boom"),
    ("memory", "error: out of memory (DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 TB)"),
    ("numpy memory", "error: out of memory (Unable to allocate 6 TiB)"),
])
def test_a_failure_inside_training_is_one_line_naming_it(tmp_path, monkeypatch, error, shown):
    """The runtime's ExecutionError names the node that failed; running out of memory says so and what to shrink.
    Any other exception is a bug and is not dressed up as a message (the next test)."""
    from bsdgraph.ir.graph import Op
    from bsdgraph.runtime.common import ExecutionError
    from bsdgraph.train.trainer import Trainer

    raised = {"execution": ExecutionError("fc1", Op.LINEAR, ValueError("boom")),
              "memory": RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 TB"),
              "numpy memory": MemoryError("Unable to allocate 6 TiB")}[error]

    def fail(self):
        raise raised

    monkeypatch.setattr(Trainer, "_epoch", fail)
    model, npz = write(tmp_path / "tiny.py", TINY_MODEL), write_npz(tmp_path / "tiny.npz")
    r = assert_clean(cli("train", model, "--npz", npz, "--out", tmp_path / "run"), codes=(1,))
    assert r.err.strip().splitlines()[-1].startswith(shown), r.err


def test_a_bug_is_not_hidden_behind_a_message(tmp_path, monkeypatch):
    from bsdgraph.train.trainer import Trainer

    def fail(self):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(Trainer, "_epoch", fail)
    model, npz = write(tmp_path / "tiny.py", TINY_MODEL), write_npz(tmp_path / "tiny.npz")
    with pytest.raises(RuntimeError, match="an internal bug"):
        cli("train", model, "--npz", npz, "--out", tmp_path / "run")
