"""A real multivariate series for forecasting: US quarterly macroeconomic data, 1959Q1-2009Q3 (203 quarters), as
statsmodels ships it (``statsmodels/datasets/macrodata``: compiled by Skipper Seabold from FRED and the Bureau of
Labor Statistics, public domain).

``make data`` fetches it once (``python -m bsdgraph.train.macro fetch``): ``pip download --no-deps`` of one pinned
statsmodels wheel, from which only the CSV and the attribution are read (statsmodels is never installed). Nothing
is downloaded at run time; without the file, ``macro_dataset`` says how to get it.

The 10 channels are the usual stationary forms: annualised growth rates, 400 (ln v[q] - ln v[q-1]) in percent, of
real GDP, consumption, investment, government spending, disposable income, the price level (CPI), money (M1) and
population, and the levels of the 3-month T-bill rate and the unemployment rate (the file's ``infl`` and
``realint`` are the CPI's growth and the T-bill rate minus it, so they would repeat channels).
"""

from __future__ import annotations

import ast
import csv
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from bsdgraph.train.data import DataError, Dataset

MACRO_DIR = Path(__file__).resolve().parents[2] / "data" / "macrodata"
MACRO_CSV = MACRO_DIR / "macrodata.csv"
WHEEL = "statsmodels==0.15.0"   # pinned: the file is the same in every recent release; one wheel, any interpreter
IN_WHEEL = "statsmodels/datasets/macrodata/"
GROWTH = ("realgdp", "realcons", "realinv", "realgovt", "realdpi", "cpi", "m1", "pop")
LEVELS = ("tbilrate", "unemp")
CHANNELS = GROWTH + LEVELS


def read_macro_csv(path: Path) -> np.ndarray:
    """[quarters, 10] float64 in ``CHANNELS`` order, the growth rates already taken (one quarter fewer than the
    file). ``DataError`` for a file that is missing, not this table, or not positive where a logarithm is taken."""
    if not path.exists():
        raise DataError(f"{path}: the US macro data is not there. Fix: run `make data` (it downloads one "
                        f"statsmodels wheel from PyPI and keeps its macrodata.csv), or pass --npz FILE.")
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read it as a CSV table ({err})") from None
    missing = [c for c in CHANNELS if not rows or c not in rows[0]]
    if missing:
        raise DataError(f"{path}: not the macrodata table (no column {', '.join(missing)})")
    try:
        table = np.array([[float(r[c]) for c in CHANNELS] for r in rows], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: a value is not a number ({err})") from None
    g = len(GROWTH)
    if len(table) < 3 or not np.all(np.isfinite(table)) or np.any(table[:, :g] <= 0):
        raise DataError(f"{path}: needs at least 3 quarters of finite values, positive where growth is taken")
    growth = 400.0 * np.diff(np.log(table[:, :g]), axis=0)
    return np.concatenate([growth, table[1:, g:]], axis=1)


def macro_dataset(T: int = 8, test_fraction: float = 0.2, path: Path = MACRO_CSV) -> Dataset:
    """Next-quarter prediction at every step on all 10 channels: x [N, T, 10], y [N, T, 10] = the values one
    quarter later. The last ``test_fraction`` of the quarters is the test part: its windows (every start, so they
    overlap) lie wholly inside it, and no training target comes from it; a validation split takes the last
    training windows (``Dataset.overlap``). Channels are standardised with the
    training part's mean and standard deviation, so predicting 0 (the training mean) scores each channel's test
    variance in those units."""
    series = read_macro_csv(path)
    cut = int(round(len(series) * (1.0 - test_fraction)))
    train, test = series[:cut], series[cut:]
    if min(len(train), len(test)) < T + 1:
        raise DataError(f"{path}: {len(series)} quarters leave fewer than T + 1 = {T + 1} on one side of the "
                        f"train/test cut")
    mean, std = train.mean(0), train.std(0)
    std[std == 0] = 1.0

    def windows(a: np.ndarray):
        a = ((a - mean) / std).astype(np.float32)
        idx = np.arange(len(a) - T)[:, None] + np.arange(T)[None, :]
        return torch.from_numpy(a[idx]), torch.from_numpy(a[idx + 1])

    (xtr, ytr), (xte, yte) = windows(train), windows(test)
    return Dataset(xtr, ytr, xte, yte, "macrodata",
                   f"US macro data 1959Q2-2009Q3, 10 channels, next quarter (statsmodels macrodata, T={T})", None,
                   overlap=T)


def mean_mse(ds: Dataset) -> float:
    """MSE on the test split of predicting the training mean (0 after standardising) for every channel."""
    return float((ds.y_test.double() ** 2).mean())


# ---------------------------------------------------------------------------------------------------- set-up


def extract(wheel: Path, dest: Path) -> Path:
    """``dest/macrodata.csv`` and ``dest/SOURCE.txt`` from a statsmodels wheel (a zip). The attribution is read
    from the dataset module's string constants by parsing it, never by running it."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        if IN_WHEEL + "macrodata.csv" not in names:
            raise DataError(f"{wheel}: no {IN_WHEEL}macrodata.csv in this archive")
        table = z.read(IN_WHEEL + "macrodata.csv")
        module = z.read(IN_WHEEL + "data.py").decode("utf-8", "replace") if IN_WHEEL + "data.py" in names else ""
    strings = {}
    for node in ast.parse(module).body if module else ():
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            strings.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "macrodata.csv.tmp"
    tmp.write_bytes(table)
    os.replace(tmp, dest / "macrodata.csv")
    (dest / "SOURCE.txt").write_text(
        f"US macroeconomic data from the PyPI wheel {wheel.name} ({IN_WHEEL}macrodata.csv).\n\n"
        f"{strings.get('DESCRSHORT', '').strip()}\nCopyright: {strings.get('COPYRIGHT', '').strip()}\n"
        f"Source:\n{strings.get('SOURCE', '').strip()}\n", encoding="utf-8")
    return dest / "macrodata.csv"


def fetch_macrodata(dest: Path = MACRO_DIR) -> Path:
    """Download the pinned statsmodels wheel (no dependencies, never installed) and extract the table from it."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                        "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                        "--platform", "manylinux_2_28_x86_64", WHEEL, "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("statsmodels-*.whl")
        return extract(wheel, dest)


if __name__ == "__main__":   # `python -m bsdgraph.train.macro fetch` (the Makefile's data target)
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m bsdgraph.train.macro fetch")
    print(f"wrote {fetch_macrodata()}")
