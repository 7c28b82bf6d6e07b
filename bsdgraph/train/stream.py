"""Training data that is streamed, not held in memory: batches from a torch ``DataLoader`` (or any re-iterable of
(x, y) batches), read afresh every epoch, each batch checked against the model as it arrives.

``BatchStream`` offers what the trainer reads of a ``Dataset`` (``train_batches``, ``test_batches``, ``n_train``,
``sample_shape``, ``calibration_batch``), so ``Trainer`` runs either. Shuffling is the loader's job
(``DataLoader(..., shuffle=True)``); the trainer's seed does not reach it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from bsdgraph.train.data import DataError


@dataclass(frozen=True)
class BatchStream:
    train: Iterable                 # re-iterable: each iteration is one epoch of (x, y) batches
    test: Iterable
    sample_shape: tuple[int, ...]   # what x's samples must be (the model's input)
    labels_per_sample: int          # 1, or T for a class (or target) per step
    n_classes: int | None           # None for regression
    name: str = "stream"
    source: str = "a torch DataLoader"

    @property
    def n_train(self) -> int:
        return _count(self.train)

    @property
    def n_test(self) -> int:
        return _count(self.test)

    def train_batches(self, batch_size: int, generator: torch.Generator | None = None):
        """(batches, how many or None): the loader's batches (its own batch size and order)."""
        return self._checked(self.train, "training"), _length(self.train)

    def test_batches(self, batch_size: int):
        return self._checked(self.test, "test")

    def calibration_batch(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` training samples (or fewer: the first batches up to n)."""
        xs, ys, have = [], [], 0
        for x, y in self._checked(self.train, "training"):
            xs.append(x)
            ys.append(y)
            have += len(x)
            if have >= n:
                break
        return torch.cat(xs)[:n], torch.cat(ys)[:n]

    def _checked(self, loader: Iterable, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, batch in enumerate(loader):
            yield self._check(batch, split, i)

    def _check(self, batch, split: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        where = f"{self.source}: {split} batch {i}"
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise DataError(f"{where} is a {type(batch).__name__}, not an (x, y) pair. Fix: make the dataset "
                            "return (x, y) for each sample")
        x, y = (torch.as_tensor(v) for v in batch)
        if tuple(x.shape[1:]) != self.sample_shape:
            if x.dim() > 1 and math.prod(x.shape[1:]) == math.prod(self.sample_shape):
                x = x.reshape(len(x), *self.sample_shape)
            else:
                raise DataError(f"{where}: x has shape {list(x.shape)}; the model takes samples of shape "
                                f"{list(self.sample_shape)}")
        if len(y) != len(x):
            raise DataError(f"{where}: x has {len(x)} samples but y has {len(y)}")
        if self.n_classes is None:
            return x.to(torch.float32), y.to(torch.float32)
        if y.is_floating_point():
            raise DataError(f"{where}: y holds floats ({y.dtype}) but the model is a classifier. Fix: return class "
                            "indices as integers")
        want = (len(y),) if self.labels_per_sample == 1 else (len(y), self.labels_per_sample)
        if tuple(y.shape) != want:
            raise DataError(f"{where}: y has shape {list(y.shape)}, expected {list(want)}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
            raise DataError(f"{where}: a label outside 0..{self.n_classes - 1} ({int(y.min())}..{int(y.max())})")
        return x.to(torch.float32), y.to(torch.int64)


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _count(loader: Iterable) -> int:
    """Samples per epoch: the loader's dataset length when it has one, else counted by one pass."""
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        try:
            return len(dataset)
        except TypeError:
            pass
    return sum(len(batch[0]) for batch in loader)
