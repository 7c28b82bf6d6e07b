"""The tutorials under docs/tutorials/ run end to end (each is a percent-format script a notebook can open), in a
fresh directory, and what they print holds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.py"))


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_the_tutorial_runs(path, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if path.stem == "01_first_network":
        accuracy = float(re.findall(r"test accuracy ([\d.]+) %", done.stdout)[-1])
        assert accuracy > 80   # a 4-class task of noisy prototypes; measured 100 % at epoch 2
        corr = [float(c) for c in re.findall(r"with the class mean image (-?[\d.]+)", done.stdout)]
        assert len(corr) == 4 and min(corr) > 0.8   # B generates each class's mean image (measured 0.96-1.00)
        assert (tmp_path / "runs" / "tutorial-01" / "tutorial.nir").is_file()
    if path.stem == "02_residual_network":
        finals = {rule: float(re.findall(rf"{rule}: test accuracy .* ([\d.]+) %", done.stdout)[-1])
                  for rule in ("BSD", "BPTT")}
        assert min(finals.values()) > 80, finals  # measured 100 % for both at epoch 4
        assert "block2_a_b_via_stem" in done.stdout  # the per-operand mirrors it explains
        assert (tmp_path / "runs" / "tutorial-02" / "resnet.png").is_file()


def test_every_tutorial_is_a_percent_format_notebook():
    assert TUTORIALS
    for path in TUTORIALS:
        text = path.read_text()
        assert text.startswith("# %% [markdown]\n# # "), path.name   # a title cell first
