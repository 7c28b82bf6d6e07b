"""``bsdgraph plot RUN_DIR``: learning curves, firing rates and a spike raster of one test sample through F and B."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bsdgraph.errors import UserError
from bsdgraph.ir.graph import GroupOp, Op, Stream
from bsdgraph.ir.neurons import is_spiking
from bsdgraph.train.records import is_epoch_record


def _plt():
    """pyplot on the file-only Agg backend, imported on first use (it costs ~0.5 s; other commands skip it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class PlotError(UserError):
    """A run directory whose metrics cannot be plotted; the message names the file and why (exit 1)."""


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: not found (is {run_dir} a run directory written by `bsdgraph train --out`?)")
    try:
        records = [(i, json.loads(line)) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    except json.JSONDecodeError as err:
        raise PlotError(f"{path}: line {err.lineno} is not JSON ({err.msg})") from None
    except UnicodeDecodeError as err:  # found by fuzzing: a traceback
        raise PlotError(f"{path}: not UTF-8 text (byte {err.start}); bsdgraph train writes JSON lines") from None
    for i, rec in records:
        if not is_epoch_record(rec, records[0][1]):
            raise PlotError(f"{path}: line {i} is not an epoch record of this run (bsdgraph train writes epoch, "
                            "test_accuracy or test_mse, losses and rates, the same layers on every line); delete the "
                            "line, or train again with --resume, which rewrites the file from the checkpoint")
    return [rec for _, rec in records]


def plot_curves(records: list[dict], out: Path) -> Path:
    epochs = [r["epoch"] for r in records]
    metric = "test_accuracy" if "test_accuracy" in records[0] else "test_mse"
    fig, (ax1, ax2) = _plt().subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [100 * r[metric] if metric == "test_accuracy" else r[metric] for r in records], "o-")
    ax1.set(xlabel="epoch", ylabel="test accuracy (%)" if metric == "test_accuracy" else "test MSE",
            title="test metric")
    ax1.grid(alpha=0.3)
    for name in records[0]["losses"]:
        ax2.plot(epochs, [r["losses"][name] for r in records], "o-", label=name)
    ax2.set(xlabel="epoch", ylabel="mean local loss", title="per-layer local losses")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        epoch_axis(ax)
    return _save(fig, out / "curves.png")


def epoch_axis(ax) -> None:
    """Whole epochs on the x axis (matplotlib's default put ticks at 1.25, 1.5, ... for a short run)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_rates(records: list[dict], out: Path) -> Path:
    epochs = [r["epoch"] for r in records]
    fig, ax = _plt().subplots(figsize=(7, 4))
    for name in records[0]["rates"]:
        style = "--" if name.endswith("_b") else "-"
        ax.plot(epochs, [100 * r["rates"][name] for r in records], style, marker="o", label=name)
    ax.axhline(0.1, color="grey", lw=0.8)
    ax.set(xlabel="epoch", ylabel="firing rate (%)", yscale="log",
           title="firing rate per layer (solid: F, dashed: B; grey: silent below 0.1 %)")
    ax.legend(fontsize=8)
    epoch_axis(ax)
    return _save(fig, out / "rates.png")


def raster_label(y: torch.Tensor, names: tuple[str, ...] | None) -> str:
    """" (label 9: Ankle boot)" for a class label (its name when the data names its classes), "" for an image
    target (an autoencoder's)."""
    if y.numel() != 1:
        return ""
    c = int(y)
    return f" (label {c}: {names[c]})" if names and 0 <= c < len(names) else f" (label {c})"


@torch.no_grad()
def plot_raster(graph, params, state, x: torch.Tensor, y: torch.Tensor, out: Path,
                names: tuple[str, ...] | None = None) -> Path:
    """Spikes of every LIF layer of F and B for one sample (neurons x time steps); ``names`` are the classes'."""
    from bsdgraph.runtime.reference import Ctx, run_graph

    env = run_graph(graph, Ctx(params, state, graph.T, x, y, False, 0))
    lifs = [n for n in graph.by_op(*GroupOp.NEURON) if is_spiking(n)]
    fig, axes = _plt().subplots(1, len(lifs), figsize=(2.2 * len(lifs), 5), squeeze=False)
    for ax, n in zip(axes[0], lifs):
        s = env[n.name][:, 0].reshape(graph.T, -1).T  # [neurons, T]
        ax.imshow(s.numpy(), aspect="auto", interpolation="nearest", cmap="Greys")
        side = "B" if n.stream == Stream.B else "F"
        ax.set_title(f"{n.name} ({side})\n{100 * float(s.mean()):.1f} %", fontsize=9)
        ax.set_xlabel("t")
    axes[0][0].set_ylabel("neuron")
    fig.suptitle(f"spike raster of test sample{raster_label(y[0], names)} through F and B")
    return _save(fig, out / "raster.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


@torch.no_grad()
def recall_images(graph, params, state) -> torch.Tensor:
    """What B recalls for every class: its bottom reconstruction V̂_0 averaged over time, [classes, C, H, W]."""
    from bsdgraph.compiler.feedback import pairing
    from bsdgraph.runtime.reference import Ctx, run_graph

    target = graph.by_op(Op.TARGET)
    bottom = [p for p in pairing(graph) if p.layer == 0 and p.b_side]
    if not target or not bottom:
        raise PlotError("this graph has no recall layer (B was derived without recall): nothing to render")
    shape = graph.by_op(Op.INPUT)[0].shape
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise PlotError(f"the stimulus has shape {list(shape)}; recall renders images [1 or 3, H, W] only")
    classes = torch.arange(target[0].attrs["n_classes"])
    env = run_graph(graph, Ctx(params, state, graph.T, None, classes, False, 0), frozenset({Stream.B}))
    return env[bottom[0].b_side].mean(0).reshape(len(classes), *shape)


def plot_recall(images: torch.Tensor, out: Path, names: list[str] | None = None) -> Path:
    plt = _plt()
    n = len(images)
    cols = min(n, 5)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(2 * cols, 2.2 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, img) in enumerate(zip(axes.flat, images)):
        pic = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
        lo, hi = float(pic.min()), float(pic.max())
        ax.imshow(((pic - lo) / (hi - lo + 1e-12)).numpy(), cmap="gray" if img.shape[0] == 1 else None)
        ax.set_title(names[i] if names else f"class {i}", fontsize=9)
    fig.suptitle("recall: what the backward network B generates from each class code (min-max scaled)")
    return _save(fig, out)


@torch.no_grad()
def reconstruct(graph, params, state, x: torch.Tensor) -> torch.Tensor:
    """What F of a checkpoint (BSD or BPTT) outputs for images ``x``, shaped like ``x``."""
    from bsdgraph.runtime.common import readout
    from bsdgraph.runtime.reference import Ctx, run_graph

    env = run_graph(graph, Ctx(params, state, graph.T, x, None, False, 0), frozenset({Stream.F}))
    out = graph.by_op(Op.OUTPUT)[0]
    return readout(out, env[out.name]).reshape(x.shape)


def plot_reconstructions(originals: torch.Tensor, recon: torch.Tensor, out: Path) -> Path:
    """An autoencoder's test images [N, C, H, W] (top row) above F's reconstructions (bottom row), both shown on the
    pixel scale [0, 1] without rescaling, so that a faint or saturated reconstruction looks it; per-image MSE."""
    plt = _plt()
    n = len(originals)
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 3.1), squeeze=False)
    for j in range(n):
        mse = float(((recon[j] - originals[j]) ** 2).mean())
        for row, img in enumerate((originals[j], recon[j])):
            ax = axes[row][j]
            pic = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
            ax.imshow(pic.clamp(0, 1).numpy(), cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1)
            ax.axis("off")
        axes[1][j].text(0.5, -0.04, f"{mse:.4f}", fontsize=7, ha="center", va="top", transform=axes[1][j].transAxes)
    fig.suptitle("test images (top) and the autoencoder's reconstructions (bottom, per-image MSE)", fontsize=9)
    return _save(fig, out / "reconstructions.png")
