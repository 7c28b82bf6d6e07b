"""Test-wide set-up.

The suite is the CPU suite, also on a machine with a GPU: its tensors are CPU tensors, which compiled Triton
kernels cannot read, and its reference comparisons run on the CPU. So CUDA is hidden from torch here (before
torch first asks the driver) and the kernels run in Triton's interpreter. TRITON_INTERPRET must be in the
environment before any ``@triton.jit`` decorator runs (Triton reads it when the kernel object is created), so
it is set at conftest import time, before any test module imports ``kernels``. The GPU checks are
``bench/gpu_check.py`` and ``bench/gpu_run.sh`` (bench/GPU_CHECK.md).
"""

import atexit
import os
import shutil
import tempfile

os.environ["CUDA_VISIBLE_DEVICES"] = ""
# bsdgraph records the files it writes (bsdgraph/tools/outputs.py) under XDG_STATE_HOME: the suite keeps its own record,
# not the user's; child processes (the fork server, `python -m bsdgraph`) inherit it. Each process importing this
# file (the session, every xdist worker) makes its own and removes it when it exits: no directory left per run.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="bsdgraph-test-state-")
atexit.register(shutil.rmtree, os.environ["XDG_STATE_HOME"], ignore_errors=True)
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

assert not torch.cuda.is_available(), "CUDA must be hidden before torch initialises it (see the docstring)"

from hypothesis import HealthCheck, settings  # noqa: E402

# Interpreted kernels are slow and shared CI machines are noisy: no per-example deadline, few examples by
# default; `HYPOTHESIS_PROFILE=long` for a deeper search.
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def cli(capsys):
    """``bsdgraph.cli.main.main`` on string arguments, returning (exit code, stdout, stderr)."""
    from bsdgraph.cli.main import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run
