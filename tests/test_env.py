"""Environment knobs: declared once in bsdgraph/env.py, read there only and at call time, documented in
docs/environment.md, and a bad value is one line naming the variable."""

import ast
import re
from pathlib import Path

import pytest

import bsdgraph
from bsdgraph import env

ROOT = Path(bsdgraph.__file__).parent
DOC = ROOT.parent / "docs" / "environment.md"
READERS = {"environ", "environb", "getenv", "getenvb"}


def environment_reads(path: Path) -> list[str]:
    """Where ``path`` touches the process environment through ``os`` (``os.environ``, ``os.getenv``, ``from os
    import environ``), as ``file:line`` strings."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in READERS:
            out.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "posix", "nt"):
            out += [f"{path.name}:{node.lineno} from {node.module} import {a.name}"
                    for a in node.names if a.name in READERS]
    return out


def test_only_env_reads_the_environment():
    readers = {str(p.relative_to(ROOT.parent)): environment_reads(p) for p in ROOT.rglob("*.py")
               if p != ROOT / "env.py"}
    assert not {k: v for k, v in readers.items() if v}, "read the environment through bsdgraph/env.py"


@pytest.mark.parametrize("source", [
    "import os\nx = os.environ.get('A')\n",
    "import os\nx = os.getenv('A')\n",
    "import os\nx = 'A' in os.environ\n",
    "from os import environ\n",
    "from os import getenv as g\n",
])
def test_the_check_sees_every_way_of_reading(tmp_path, source):
    mod = tmp_path / "m.py"
    mod.write_text(source)
    assert environment_reads(mod)


def test_every_knob_is_documented():
    rows = set(re.findall(r"^\| `([A-Z_]+)` \|", DOC.read_text(), flags=re.M))
    missing = sorted(set(env.KNOBS) - rows)
    assert not missing, f"add a row for each to docs/environment.md: {missing}"


def test_every_bsdgraph_variable_named_in_the_package_is_a_knob():
    """A ``BSDGRAPH_*`` name anywhere in the package (a message, a constant) is a knob declared in env.py."""
    named = set()
    for p in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                named |= set(re.findall(r"\bBSDGRAPH_[A-Z_]+\b", node.value))
    assert named - set(env.KNOBS) == set()


def test_knobs_are_declared_once_under_their_own_name():
    assert all(name == knob.name for name, knob in env.KNOBS.items())
    assert len({id(k) for k in env.KNOBS.values()}) == len(env.KNOBS)


@pytest.mark.parametrize("name", sorted(env.KNOBS))
def test_every_default_parses(monkeypatch, name):
    monkeypatch.delenv(name, raising=False)
    knob = env.KNOBS[name]
    assert knob.get() == (None if knob.default is None else knob.parse(knob.default))


def test_knobs_are_read_at_call_time(monkeypatch):
    monkeypatch.setenv("BSDGRAPH_DIST_TIMEOUT", "2.5")
    assert env.DIST_TIMEOUT.get() == 2.5
    monkeypatch.setenv("BSDGRAPH_DIST_TIMEOUT", "7")
    assert env.DIST_TIMEOUT.get() == 7.0
    monkeypatch.delenv("BSDGRAPH_DIST_TIMEOUT")
    assert env.DIST_TIMEOUT.get() == 300.0


@pytest.mark.parametrize("knob, values", [
    # only "0" turns these off: an empty value leaves them on, as before they were declared here
    (env.NATIVE, {"0": False, "1": True, "": True, "no": True}),
    (env.KEEP_HEAP, {"0": False, "1": True, "": True}),
    (env.MEMORY_CHECK, {"0": False, "1": True, "": True}),
    (env.TRITON_INTERPRET, {"1": True, "0": False, "": False, "true": False}),
    (env.LOCAL_RANK, {"3": 3, "0": 0}),
])
def test_switches_and_numbers_read_as_before(monkeypatch, knob, values):
    for raw, value in values.items():
        monkeypatch.setenv(knob.name, raw)
        assert knob.get() == value, raw


def test_unset_means_not_given(monkeypatch):
    for knob in (env.RANK, env.WORLD_SIZE, env.MASTER_ADDR, env.XDG_STATE_HOME):
        monkeypatch.delenv(knob.name, raising=False)
        assert knob.get() is None and not knob.is_set()
    monkeypatch.setenv("RANK", "")
    assert env.RANK.is_set()


@pytest.mark.parametrize("raw", ["soon", "", "0", "-5", "nan"])
def test_a_bad_timeout_is_one_line_naming_the_variable(monkeypatch, raw):
    from bsdgraph.parallel.distributed import DistributedError, timeout_s

    monkeypatch.setenv("BSDGRAPH_DIST_TIMEOUT", raw)
    message = f"BSDGRAPH_DIST_TIMEOUT={raw!r}: expected a number of seconds > 0"
    with pytest.raises(env.EnvError) as err:
        env.DIST_TIMEOUT.get()
    assert str(err.value) == message and err.value.exit_code == 1
    with pytest.raises(DistributedError) as err:  # what the communicator raises, word for word the same
        timeout_s()
    assert str(err.value) == message


def test_a_bad_rank_names_the_variable(monkeypatch):
    monkeypatch.setenv("RANK", "first")
    with pytest.raises(env.EnvError, match=r"^RANK='first': expected a whole number$"):
        env.RANK.get()


def test_the_ledger_follows_xdg_state_home_then_home(monkeypatch, tmp_path):
    from bsdgraph.tools import outputs

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert outputs.ledger() == tmp_path / "state" / "bsdgraph" / "written.jsonl"
    monkeypatch.setenv("XDG_STATE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert outputs.ledger() == tmp_path / ".local" / "state" / "bsdgraph" / "written.jsonl"
    monkeypatch.delenv("HOME")
    assert outputs.ledger() is None
