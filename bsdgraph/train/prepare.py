"""What a run does to its data before the first step: hold out a validation split (``val_split``), and standardise
the stimulus by the training split's statistics (``standardize``); and the runtime wrapper that applies those
statistics wherever a checkpoint is used later (eval, predict, the notebook API).

The validation split is drawn from the training split only, by a fixed generator (``VAL_SEED``), so every seed
of a sweep selects its checkpoint on the same samples and none of them is ever a test sample. Overlapping windows of
one series (``Dataset.overlap``) are split in time instead: a random draw would validate on windows that share
all but one step with training windows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from bsdgraph.train.config import TrainingError
from bsdgraph.train.data import Dataset

VAL_SEED = 20260  # the draw of the validation split: fixed, whatever the run's seed
STD_FLOOR = 1e-6  # a constant channel (or feature) is shifted, not divided by ~0


def holdout(data: Dataset, fraction: float) -> tuple[Dataset, tuple[torch.Tensor, torch.Tensor]]:
    """(the training split without its held-out part, (x_val, y_val)): round(fraction * n) samples, at least one,
    at most all but one; a fixed random draw, or for windows of one series (``data.overlap``) the last ones, the
    ``overlap`` windows before them dropped (they share steps with both sides)."""
    n = data.n_train
    k = min(max(round(fraction * n), 1), n - 1)
    if data.overlap:
        if n - k - data.overlap < 1:
            raise TrainingError(f"val_split={fraction} of {n} overlapping windows leaves no training window once "
                                f"the {data.overlap} windows sharing steps with the validation part are dropped")
        keep, val = torch.arange(n - k - data.overlap), torch.arange(n - k, n)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED))
        keep, val = order[k:].sort().values, order[:k].sort().values  # sorted: the kept samples stay in file order
    return (dataclasses.replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep]),
            (data.x_train[val], data.y_train[val]))


def input_stats(x: torch.Tensor, sequence: bool) -> dict[str, torch.Tensor]:
    """Mean and standard deviation of samples ``x`` [N, ...], shaped to broadcast against one sample: per channel
    of an image [C, H, W], per feature of a flat sample [D], per feature over all steps of a sequence [T, D]."""
    dims = (0, 1) if sequence else (0,) if x.dim() <= 2 else (0, *range(2, x.dim()))
    x = x.double()
    mean, std = x.mean(dims, keepdim=True)[0], x.std(dims, keepdim=True)[0]
    std = torch.where(std < STD_FLOOR, torch.ones_like(std), std)
    return {"mean": mean.float(), "std": std.float()}


def standardize(x: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    return (x - stats["mean"].to(x.device)) / stats["std"].to(x.device)


def standardized(data: Dataset, stats: dict[str, torch.Tensor]) -> Dataset:
    return dataclasses.replace(data, x_train=standardize(data.x_train, stats), x_test=standardize(data.x_test, stats))


class Standardized:
    """A runtime for evaluation whose ``predict`` reads raw samples and standardises them first; everything else
    is the wrapped runtime's (its graph, weights). Training standardises its data once instead (Trainer)."""

    def __init__(self, rt: Any, stats: dict[str, torch.Tensor]):
        self._rt, self.input_stats = rt, stats

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self._rt.predict(standardize(x, self.input_stats))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rt, name)


def with_stats(rt: Any, stats: dict[str, torch.Tensor] | None) -> Any:
    """``rt`` as its run used it: standardising its input by ``stats`` (a checkpoint's ``input_stats``), if any."""
    return Standardized(rt, stats) if stats else rt


def refuse_stats(stats: dict[str, torch.Tensor] | None, source: Any) -> None:
    """Weights whose run standardised its input (``stats``), where the statistics would be lost (NIR, ``bsdgraph
    run``): refused rather than run on unstandardised input."""
    from bsdgraph.errors import UserError

    if stats:
        raise UserError(f"{source}: this run standardised its input (standardize=True), and NIR files and "
                        "`bsdgraph run` do not carry the statistics yet; use `bsdgraph eval` or bsdgraph.load, or "
                        "train without standardize")


def in_input_units(images: torch.Tensor, stats: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """B's recall [classes, *input shape] in the units of the raw stimulus: a standardised run's B generates
    standardised input (``stats``), which is shifted and scaled back for the picture."""
    return images if not stats else images * stats["std"] + stats["mean"]
