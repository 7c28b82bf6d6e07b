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


# ---------------------------------------------------------------------------------------------------- Lorenz-96


def lorenz96(length: int, n: int = 40, forcing: float = 8.0, dt: float = 0.05, sample_every: float = 0.05,
             washout: float = 20.0, seed: int = 0) -> np.ndarray:
    """``length`` states [length, n] of the Lorenz-96 system (Lorenz 1996), one every ``sample_every`` time units:

        dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F,   i cyclic, F = 8 (chaotic for n >= 4)

    integrated with 4th-order Runge-Kutta at step ``dt`` (0.05, the step of the data-assimilation literature) from
    x = F plus a small perturbation drawn from ``seed``; the first ``washout`` time units are dropped."""
    if length < 1 or n < 4 or dt <= 0 or sample_every < dt:
        raise ValueError("need length >= 1, n >= 4, dt > 0 and sample_every >= dt")

    i = np.arange(n)
    up, down2, down1 = (i + 1) % n, (i - 2) % n, (i - 1) % n

    def f(x: np.ndarray) -> np.ndarray:
        return (x[up] - x[down2]) * x[down1] - x + forcing

    x = forcing + 0.01 * np.random.default_rng(seed).standard_normal(n)
    stride = int(round(sample_every / dt))
    skip = int(round(washout / dt))
    out = np.empty((length, n))
    for step in range(skip + length * stride):
        k1 = f(x)
        k2 = f(x + 0.5 * dt * k1)
        k3 = f(x + 0.5 * dt * k2)
        k4 = f(x + dt * k3)
        x = x + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        j = step - skip + 1
        if j > 0 and j % stride == 0:
            out[j // stride - 1] = x
    return out


def lorenz96_dataset(T: int, n_train: int = 3000, n_test: int = 600, n: int = 40, seed: int = 0,
                     increments: bool = False) -> Dataset:
    """Next-state prediction at every step on all ``n`` channels: x [N, T, n], y [N, T, n] = the state one sample
    later, or with ``increments`` the change to it, x[t + 1] - x[t] (the prediction of the state is then
    x[t] + y, whose error is the error of y: the MSE means the same either way). Windows start every T samples (no
    two training windows share a step); the test windows come from the trajectory after the training part.
    Channels are standardised with the training part's mean and standard deviation (one over all channels: the
    system is symmetric under a cyclic shift), so an MSE of 1 is the variance of the data."""
    series = lorenz96((n_train + n_test) * T + 2, n=n, seed=seed)
    cut = n_train * T + 1
    train, test = series[:cut], series[cut:]
    mean, std = train.mean(), train.std()
    scaled = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731

    def cut_windows(a: np.ndarray, count: int):
        starts = np.arange(count) * T
        idx = starts[:, None] + np.arange(T)[None, :]
        return torch.from_numpy(a[idx]), torch.from_numpy(a[idx + 1] - a[idx] if increments else a[idx + 1])

    (xtr, ytr), (xte, yte) = cut_windows(scaled(train), n_train), cut_windows(scaled(test), n_test)
    what = "increments" if increments else "next states"
    return Dataset(xtr, ytr, xte, yte, "lorenz96", f"Lorenz-96 n={n} F=8, {what} (generated, T={T}, seed {seed})",
                   None)


# ---------------------------------------------------------------------------------------------------- baselines


def persistence_mse(ds: Dataset) -> float:
    """MSE on the test split of predicting that nothing changes: y[t] = x[t] (per-step next-value targets)."""
    return float(((ds.x_test - ds.y_test) ** 2).mean())


def linear_ar_mse(ds: Dataset, lags: int = 1) -> float:
    """MSE on the test split of a linear autoregressive model fitted by least squares on the training split:
    y[t] = sum_{k < lags} W_k x[t - k] + b, over the inputs of the same window (what the network sees). Fitted and
    scored on the steps t >= lags - 1 of each window, which have all their lags: with lags = 1 that is every step,
    as for the network."""
    def design(x: torch.Tensor) -> torch.Tensor:
        cols = [torch.cat([torch.zeros_like(x[:, :k]), x[:, : x.shape[1] - k]], 1) for k in range(lags)]
        return torch.cat(cols + [torch.ones(*x.shape[:2], 1, dtype=x.dtype)], -1)

    a = design(ds.x_train.double())[:, lags - 1:].reshape(-1, lags * ds.x_train.shape[-1] + 1)
    b = ds.y_train.double()[:, lags - 1:].reshape(-1, ds.y_train.shape[-1])
    w = torch.linalg.lstsq(a, b).solution
    pred = design(ds.x_test.double())[:, lags - 1:] @ w
    return float(((pred - ds.y_test.double()[:, lags - 1:]) ** 2).mean())


# ---------------------------------------------------------------------------------------------------- MNIST-1D


def mnist1d_dataset(seed: int = 42, num_samples: int = 5000) -> Dataset:
    """MNIST-1D from ``mnist1d.data.make_dataset`` (generated here from its templates, no download): x [N, 40, 1]
    standardised with the training split's mean and standard deviation, y [N] in 0..9; the package's own 80/20
    split. ``DataError`` naming the fix when the package is not installed."""
    from bsdgraph.train.data import DataError

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise DataError(f"MNIST-1D needs the mnist1d package ({err}). Fix: pip install mnist1d (make setup "
                        "installs it).") from None
    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    d = make_dataset(args)
    mean, std = d["x"].mean(), d["x"].std()
    as_x = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32)[..., None])  # noqa: E731
    return Dataset(as_x(d["x"]), torch.from_numpy(d["y"].astype(np.int64)), as_x(d["x_test"]),
                   torch.from_numpy(d["y_test"].astype(np.int64)), "mnist1d",
                   f"MNIST-1D (generated by mnist1d.make_dataset, seed {seed})", 10)
