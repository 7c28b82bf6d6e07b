"""Generated time series for sequence models: the Mackey-Glass chaotic series (no download needed).

    dx/dt = beta x(t - tau) / (1 + x(t - tau)^n) - gamma x(t),   beta = 0.2, gamma = 0.1, n = 10, tau = 17

integrated with 4th-order Runge-Kutta at step ``dt`` = 0.1 (the delayed term is read from the stored history,
linearly interpolated at half steps), from x = 1.2 on a constant history; the first ``washout`` time units are
dropped. tau = 17 is the standard chaotic setting (Mackey & Glass 1977; Farmer 1982).
"""

from __future__ import annotations

import numpy as np
import torch

from bsdgraph.train.data import Dataset


def mackey_glass(length: int, tau: float = 17.0, beta: float = 0.2, gamma: float = 0.1, n: float = 10.0,
                 dt: float = 0.1, sample_every: float = 1.0, washout: float = 500.0, x0: float = 1.2) -> np.ndarray:
    """``length`` samples of the series, one every ``sample_every`` time units (float64)."""
    if length < 1 or dt <= 0 or sample_every < dt or tau <= 0:
        raise ValueError("need length >= 1, dt > 0, sample_every >= dt and tau > 0")
    lag = int(round(tau / dt))
    stride = int(round(sample_every / dt))
    steps = int(round(washout / dt)) + length * stride
    x = np.empty(lag + steps + 1)
    x[: lag + 1] = x0

    def f(xt: float, xlag: float) -> float:
        return beta * xlag / (1.0 + xlag ** n) - gamma * xt

    for i in range(lag, lag + steps):
        lag0, lag1 = x[i - lag], x[i - lag + 1]
        lag_half = 0.5 * (lag0 + lag1)
        k1 = f(x[i], lag0)
        k2 = f(x[i] + 0.5 * dt * k1, lag_half)
        k3 = f(x[i] + 0.5 * dt * k2, lag_half)
        k4 = f(x[i] + dt * k3, lag1)
        x[i + 1] = x[i] + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    start = lag + int(round(washout / dt))
    return x[start + stride: start + stride * (length + 1): stride][:length]


def windows(series: np.ndarray, T: int, per_step: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sliding windows x[i] = series[i : i + T] as [N, T, 1]; the target is the next value, y[i] = series[i + T]
    as [N, 1], or with ``per_step`` the next value at every step, y[i] = series[i + 1 : i + T + 1] as [N, T, 1]."""
    n = len(series) - T
    idx = np.arange(T)[None, :] + np.arange(n)[:, None]
    y = series[idx + 1][..., None] if per_step else series[T:][:, None]
    return series[idx][..., None], y


def mackey_glass_dataset(T: int, n_train: int = 4000, n_test: int = 1000, sample_every: float = 1.0,
                         per_step: bool = False) -> Dataset:
    """One-step-ahead prediction windows: the first ``n_train + T`` samples make the training windows, the test
    windows come from the series after them (no overlap). Values are scaled to [0, 1] with the training part's
    range, so a test MSE reads in units of that range squared."""
    series = mackey_glass(n_train + n_test + 2 * T + 1, sample_every=sample_every)
    train, test = series[: n_train + T + 1], series[n_train + T + 1:]
    lo, hi = train.min(), train.max()
    scale = lambda a: ((a - lo) / (hi - lo)).astype(np.float32)  # noqa: E731
    (xtr, ytr), (xte, yte) = windows(scale(train), T, per_step), windows(scale(test), T, per_step)
    return Dataset(torch.from_numpy(xtr[:n_train]), torch.from_numpy(ytr[:n_train]), torch.from_numpy(xte[:n_test]),
                   torch.from_numpy(yte[:n_test]), "mackey-glass", f"Mackey-Glass tau=17 (generated, T={T})", None)
