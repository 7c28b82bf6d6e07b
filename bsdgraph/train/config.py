"""The training options (a model's ``TRAIN`` dict, overridden by flags), checked before anything runs, and the
error training reports when it cannot go on."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from bsdgraph.errors import UserError
from bsdgraph.runtime.common import OptimConfig
from bsdgraph.train.calibrate import TARGET_BAND


class TrainingError(UserError):
    """Training cannot go on (a NaN/Inf, a checkpoint that does not fit); the message names the layer or file."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4      # what every shipped model uses (torch's AdamW default, 0.01, is 100x that)
    clip: float = 1.0
    seed: int = 0
    schedule: str = "constant"      # constant | cosine (per epoch, down to lr / 100)
    init: str = "default"           # default | calibrated
    # the firing-rate band init = calibrated scales each layer into; a layer already inside it is left alone, so a
    # narrow band makes the starting scale depend less on where a seed's default init happens to land
    init_band: tuple[float, float] = TARGET_BAND
    augment: bool = False           # random +-2 px shifts and horizontal flips of image inputs
    eval_batch_size: int = 1000
    # model selection (docs/experiments.md, "Accuracy levers"): a fraction of the training split held out as a
    # validation split (a fixed draw, the same for every seed), evaluated after each epoch; best.pt keeps the epoch
    # best on it, and with patience > 0 training stops after that many epochs without a better one
    val_split: float = 0.0
    patience: int = 0
    # the stimulus shifted and scaled by the training split's mean and standard deviation (per channel of an image,
    # per feature of a flat sample); the statistics travel in the checkpoint and are applied wherever it is used
    standardize: bool = False
    # learning-rate multipliers of F's layers 1..L (bottom to top; B's mirrors of a layer take its value); () all 1
    layer_lr: tuple[float, ...] = ()

    @classmethod
    def from_model(cls, train: dict[str, Any], **overrides: Any) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(train) - known)
        if unknown:
            raise TrainingError(f"unknown TRAIN option(s) {unknown} in the model file; known: {sorted(known)}")
        merged = {**train, **{k: v for k, v in overrides.items() if v is not None}}
        for key in ("init_band", "layer_lr"):  # written as lists in a TRAIN dict (and in a checkpoint's JSON)
            if isinstance(merged.get(key), list):
                merged[key] = tuple(merged[key])
        cfg = cls(**merged)
        cfg.check()
        return cfg

    def check(self) -> None:
        bad = [f"{k}={getattr(self, k)!r}" for k in ("epochs", "batch_size", "eval_batch_size")
               if not _is_int(getattr(self, k)) or getattr(self, k) < 1]
        bad += [f"lr={self.lr!r}"] if not (_is_number(self.lr) and 0 < self.lr < 10) else []
        # a TRAIN dict is user input: a string seed or weight decay would otherwise fail deep inside torch
        bad += [f"weight_decay={self.weight_decay!r}"] if not (_is_number(self.weight_decay)
                                                              and 0 <= self.weight_decay < 10) else []
        bad += [f"clip={self.clip!r}"] if not (_is_number(self.clip) and self.clip >= 0) else []
        bad += [f"seed={self.seed!r}"] if not (_is_int(self.seed) and -2 ** 63 <= self.seed < 2 ** 63) else []
        bad += [f"augment={self.augment!r}"] if not isinstance(self.augment, bool) else []
        bad += [f"schedule={self.schedule!r}"] if self.schedule not in ("constant", "cosine") else []
        bad += [f"init={self.init!r}"] if self.init not in ("default", "calibrated") else []
        band = self.init_band
        bad += [f"init_band={band!r}"] if not (isinstance(band, tuple) and len(band) == 2 and all(map(_is_number, band))
                                               and 0 < band[0] < band[1] < 1) else []
        bad += [f"val_split={self.val_split!r}"] if not (_is_number(self.val_split) and 0 <= self.val_split < 1) else []
        bad += [f"patience={self.patience!r}"] if not (_is_int(self.patience) and self.patience >= 0) else []
        bad += [f"standardize={self.standardize!r}"] if not isinstance(self.standardize, bool) else []
        bad += [f"layer_lr={self.layer_lr!r}"] if not (isinstance(self.layer_lr, tuple) and all(
            _is_number(m) and 0 < m <= 100 for m in self.layer_lr)) else []
        if bad:
            raise TrainingError(f"invalid training option(s): {', '.join(bad)} (epochs/batch sizes are integers "
                                ">= 1, 0 < lr < 10, 0 <= weight_decay < 10, clip >= 0 (0: off), seed a 64-bit "
                                "integer, augment True|False, schedule constant|cosine, init default|calibrated, "
                                "init_band a pair of firing rates 0 < lo < hi < 1, 0 <= val_split < 1, patience "
                                "an integer >= 0 (0: off), standardize True|False, layer_lr multipliers 0 < m <= "
                                "100, one per layer)")
        if self.patience and not self.val_split:
            raise TrainingError(f"patience={self.patience} stops training when the validation split stops "
                                "improving, but there is none: set val_split too (e.g. --val-split 0.1)")

    def lr_at(self, epoch: int) -> float:
        if self.schedule == "cosine" and self.epochs > 1:
            return self.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * epoch / (self.epochs - 1))))
        return self.lr

    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, weight_decay=self.weight_decay, clip=self.clip, layer_lr=self.layer_lr)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


BACKENDS = ("reference", "cpu", "triton")
