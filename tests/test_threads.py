"""Thread count of a training run (bsdgraph/train/threads.py): all cores but one by default, the user's choice
respected, and the opt-in tuner choosing by measured time per sample."""

import pytest
import torch

from bsdgraph.env import EnvError
from bsdgraph.train import threads
from bsdgraph.train.threads import ThreadTuner, training_threads


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_default_leaves_one_core_and_the_users_choice_wins(monkeypatch):
    monkeypatch.delenv("BSDGRAPH_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "cores", lambda: 8)
    assert training_threads() == 7
    monkeypatch.setattr(threads, "cores", lambda: 1)
    assert training_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)
    assert training_threads() == 3  # torch read OMP_NUM_THREADS itself: its count stands
    monkeypatch.setenv("BSDGRAPH_THREADS", "2")
    assert training_threads() == 2
    monkeypatch.setenv("BSDGRAPH_THREADS", "auto")
    assert training_threads() is None
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv("BSDGRAPH_THREADS", bad)
        with pytest.raises(EnvError, match=r"BSDGRAPH_THREADS='.*': expected 'auto' or a whole number >= 1"):
            training_threads()


class FakeMachine:
    """A clock whose steps take ``cost[threads]`` seconds per sample, and the thread count the tuner set."""

    def __init__(self, cost: dict[int, float]):
        self.cost, self.now, self.threads, self.sets = cost, 0.0, 2, []

    def clock(self) -> float:
        return self.now

    def set_threads(self, n: int) -> None:
        self.threads = n
        self.sets.append(n)

    def step(self, samples: int):
        self.now += self.cost[self.threads] * samples
        return self.threads


def _run(tuner: ThreadTuner, machine: FakeMachine, steps: int) -> list[int]:
    return [tuner.run(lambda: machine.step(10), 10) for _ in range(steps)]


@pytest.mark.parametrize("cost, kept", [({2: 3.0, 1: 1.0}, 1),    # busy machine: one thread is 3x faster
                                        ({2: 1.0, 1: 1.5}, 2),    # quiet: all threads
                                        ({2: 1.0, 1: 0.95}, 2)])  # one barely faster: not "clearly", keep all
def test_the_tuner_keeps_the_faster_count_after_timing_both_on_real_steps(cost, kept):
    machine, said = FakeMachine(cost), []
    tuner = ThreadTuner(2, every=20, probe=3, say=said.append, clock=machine.clock,
                        set_threads=machine.set_threads)
    ran = _run(tuner, machine, 20)
    assert ran[:8] == [2, 2, 2, 2, 1, 1, 1, 1]  # the probe: 4 steps each, the first after a switch not timed
    assert set(ran[8:]) == {kept} and tuner.current == kept
    assert bool(said) == (kept == 1) and (not said or said[0].startswith("threads: 1 (3.0x slower with 2"))


def test_the_tuner_rechecks_and_switches_back_when_the_machine_frees_up():
    machine, said = FakeMachine({2: 3.0, 1: 1.0}), []
    tuner = ThreadTuner(2, every=10, probe=2, say=said.append, clock=machine.clock, set_threads=machine.set_threads)
    _run(tuner, machine, 10)
    assert tuner.current == 1
    machine.cost = {2: 1.0, 1: 1.6}  # the other job ended
    ran = _run(tuner, machine, 10)
    assert ran[:6] == [2, 2, 2, 1, 1, 1] and set(ran[6:]) == {2}
    assert said[-1].startswith("threads: 2 (1.6x faster than one")


def test_a_training_run_uses_the_chosen_count_and_records_it(tmp_path, monkeypatch):
    from bsdgraph import GraphBuilder
    from bsdgraph.compiler.model_file import Model
    from bsdgraph.compiler.feedback import BSDConfig
    from bsdgraph.train.config import TrainConfig
    from bsdgraph.train.data import make_synthetic
    from bsdgraph.train.trainer import Trainer

    g = GraphBuilder("m", T=2)
    g.output(g.linear(g.lif(g.linear(g.flatten(g.input((1, 4, 4))), 8)), 3))
    model = Model(tmp_path / "m.py", g.build(), BSDConfig())
    data = make_synthetic(32, 8, (1, 4, 4), 3, seed=0)
    monkeypatch.setenv("BSDGRAPH_THREADS", "1")
    torch.set_num_threads(2)
    rec = Trainer(model, data, TrainConfig(epochs=1, batch_size=8), tmp_path / "run").run()[-1]
    assert rec["threads"] == 1 == torch.get_num_threads()
