"""Data layer: read datasets from disk, validate them, and hand training fixed-shape tensors.

Two on-disk formats are supported:

* IDX (the MNIST file format), plain or gzip, e.g. Fashion-MNIST as installed by the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz``);
* ``.npz`` archives holding ``x_train, y_train, x_test, y_test``.

Every problem a user can cause (a missing file, a corrupt archive, a NaN, a label the model cannot
represent) raises :class:`DataError`, whose message names the file, the array and the first bad index and says
how to fix it: the CLI prints ``str(err)`` and exits 1, so the message has to stand on its own.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import math
import tokenize
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bsdgraph.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# Role -> standard file name. The Debian package installs the ``.gz`` forms directly in FASHION_MNIST_DIR;
# the unpacked names are what ``gunzip`` and most download scripts leave behind.
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Folders below the data dir that also get searched: Debian uses none, torchvision downloads to
# ``FashionMNIST/raw``, the zalando repository keeps them in ``data/fashion``.
_SUBDIRS = ("", "raw", "fashion-mnist", "data/fashion", "FashionMNIST/raw")

_FASHION_CLASSES = 10
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot")
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_FIX_MISSING = (
    "Fix: `apt-get install dataset-fashion-mnist` (installs it in {default}), or pass `--data-dir DIR` with "
    "these files, or `--npz FILE` with arrays x_train, y_train, x_test, y_test."
)


class DataError(UserError):
    """A data problem the user can fix; the message says what, where, and how."""


@dataclass(frozen=True)
class Dataset:
    """Train and test split as tensors. x is float32; y is int64 (classification) or float32 (regression)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    source: str
    n_classes: int | None  # None for regression
    class_names: tuple[str, ...] | None = None  # what the classes are called (rasters, recall grids), if known
    # > 0: the training samples are windows of one series in time order, one step apart, each sharing steps with
    # the next ``overlap`` windows; a validation split then holds out the last windows and drops the ``overlap``
    # before them, so that validation is later in time than training and shares no step with it
    overlap: int = 0

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    # what the trainer reads (a streamed ``train/stream.py:BatchStream`` offers the same)
    def train_batches(self, batch_size: int, generator: torch.Generator | None = None):
        """(shuffled minibatches of the training split, their number)."""
        return (batches(self.x_train, self.y_train, batch_size, shuffle=True, generator=generator),
                math.ceil(self.n_train / batch_size))

    def test_batches(self, batch_size: int):
        return batches(self.x_test, self.y_test, batch_size)

    def calibration_batch(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` training samples drawn by ``seed`` (what calibrated init measures firing rates on)."""
        idx = torch.randperm(self.n_train, generator=torch.Generator().manual_seed(seed))[:n]
        return self.x_train[idx], self.y_train[idx]


# ---------------------------------------------------------------------------------------------------- IDX

# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzip, detected by content) into a native-byte-order array."""
    path = Path(path)
    raw = _read_bytes(path, what="IDX file")
    if raw[:2] == _GZIP_MAGIC:
        raw = _gunzip(raw, path)
    dtype, dims, offset = _parse_idx_header(raw, path)
    expected = math.prod(dims) * dtype.itemsize
    found = len(raw) - offset
    if found < expected:
        raise DataError(
            f"{path}: truncated IDX file: header says {_shape(dims)} of {dtype.name}, i.e. {expected} data bytes "
            f"after the {offset}-byte header, but only {found} are there. Fix: download or copy the file again."
        )
    if found > expected:
        raise DataError(
            f"{path}: {found - expected} bytes of trailing garbage after the {expected} data bytes that the header "
            f"({_shape(dims)} of {dtype.name}) announces. Fix: download or copy the file again."
        )
    data = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=offset)
    return data.reshape(dims).astype(dtype.newbyteorder("="))  # astype copies: the result is writable


def _read_bytes(path: Path, what: str, limit: int = -1) -> bytes:
    """The first `limit` bytes of path (all when -1)."""
    if not path.exists():
        raise DataError(f"{what} not found: {path}. Fix: check the path.")
    try:
        with path.open("rb") as f:
            return f.read(limit)
    except OSError as err:  # a directory, no permission, I/O error
        raise DataError(f"cannot read {what} {path}: {err.strerror or err}. Fix: check the path.") from err


def _gunzip(raw: bytes, path: Path) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"{path}: corrupt gzip data ({type(err).__name__}: {err}). Fix: download or copy the file again; "
            f"`gzip -t {path}` checks it."
        ) from err


def _parse_idx_header(raw: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """Return (dtype, dims, header length) from the magic ``00 00 <type> <ndim>`` and ndim big-endian uint32s."""
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataError(
            f"{path}: not an IDX file: it starts with {raw[:4].hex(' ') or 'nothing (empty file)'}, an IDX file "
            f"starts with 00 00 <type> <ndim> (gzip files with 1f 8b). Fix: pass the *-idx?-ubyte[.gz] files."
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X} (byte 2); known codes are {known}.")
    if ndim == 0:
        raise DataError(f"{path}: IDX header says 0 dimensions (byte 3); a dataset file has at least one.")
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(
            f"{path}: truncated IDX header: {ndim} dimensions need {offset} header bytes, the file has {len(raw)}."
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return np.dtype(_IDX_DTYPES[code]), dims, offset


# ------------------------------------------------------------------------------------------ Fashion-MNIST


def find_fashion_mnist(data_dir: str | Path | None = None) -> Path:
    """Return the folder holding the four Fashion-MNIST IDX files (``.gz`` or not), searching data_dir or
    FASHION_MNIST_DIR and the known subfolders of it (_SUBDIRS)."""
    root = Path(data_dir if data_dir is not None else FASHION_MNIST_DIR)
    for sub in _SUBDIRS:
        if len(_fashion_files(root / sub)) == len(FASHION_MNIST_FILES):
            return root / sub
    wanted = ", ".join(f"{name}[.gz]" for name in FASHION_MNIST_FILES.values())
    where = f"{root} (does not exist)" if not root.is_dir() else f"{root} and its subfolders {list(_SUBDIRS[1:])}"
    # Name the folder that came closest, so a half-copied dataset says which files are missing.
    best = max((root / sub for sub in _SUBDIRS), key=lambda folder: len(_fashion_files(folder)))
    found = _fashion_files(best)
    missing = [name for role, name in FASHION_MNIST_FILES.items() if role not in found]
    detail = f" Found {len(found)} of 4 in {best}; missing: {', '.join(missing)}." if found else ""
    raise DataError(
        f"Fashion-MNIST not found: looked in {where} for {wanted}.{detail} "
        + _FIX_MISSING.format(default=FASHION_MNIST_DIR)
    )


def _fashion_files(folder: Path) -> dict[str, Path]:
    """Role -> existing file in folder; the unpacked name wins over ``.gz`` (no decompression needed)."""
    found = {}
    for role, name in FASHION_MNIST_FILES.items():
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
    return found


def load_idx_dataset(data_dir: str | Path | None = None, name: str = "fashion-mnist") -> Dataset:
    """Load MNIST-format IDX files: uint8 images [N, H, W] -> float32 [N, 1, H, W] / 255, labels -> int64."""
    folder = find_fashion_mnist(data_dir)
    files = _fashion_files(folder)
    arrays = {role: read_idx(path) for role, path in files.items()}
    for split in ("train", "test"):
        _check_idx_split(arrays[f"{split}_images"], arrays[f"{split}_labels"], files, split)
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(
            f"{folder}: train images are {_shape(arrays['train_images'].shape[1:])} but test images are "
            f"{_shape(arrays['test_images'].shape[1:])}; both splits must have the same image size."
        )

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32)[:, None] / 255)

    return Dataset(
        x_train=images(arrays["train_images"]),
        y_train=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        x_test=images(arrays["test_images"]),
        y_test=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        name=name,
        source=str(folder),
        n_classes=_FASHION_CLASSES,
        # the IDX format is also MNIST's (digits): the names only where the folder says Fashion-MNIST (Debian's,
        # torchvision's FashionMNIST/raw, the zalando repository's data/fashion)
        class_names=FASHION_NAMES if "fashion" in str(folder).lower() else None,
    )


def _check_idx_split(images: np.ndarray, labels: np.ndarray, files: dict[str, Path], split: str) -> None:
    img_path, lab_path = files[f"{split}_images"], files[f"{split}_labels"]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{img_path}: expected uint8 images of shape [N, H, W], got {images.dtype} {_shape(images.shape)}. "
            f"Fix: pass the *-images-idx3-ubyte files there."
        )
    if labels.ndim != 1 or labels.dtype.kind not in "ui":
        raise DataError(
            f"{lab_path}: expected integer labels of shape [N], got {labels.dtype} {_shape(labels.shape)}. "
            f"Fix: pass the *-labels-idx1-ubyte files there."
        )
    if len(images) != len(labels):
        raise DataError(
            f"{split} split: {len(images)} images in {img_path} but {len(labels)} labels in {lab_path}; "
            f"the counts must match. Fix: take both files from the same release."
        )
    if len(images) == 0 or 0 in images.shape:  # training would "finish" at once and report 0 % accuracy
        raise DataError(f"{img_path}: the {split} split is empty (shape {_shape(images.shape)}). Fix: take the "
                        f"files of a release that holds at least one sample of at least one pixel.")
    bad = np.flatnonzero((labels < 0) | (labels >= _FASHION_CLASSES))
    if bad.size:
        raise DataError(
            f"{lab_path}: label {labels[bad[0]]} at index {bad[0]} is outside 0..{_FASHION_CLASSES - 1}. "
            f"Fix: download or copy the file again."
        )


# ---------------------------------------------------------------------------------------------------- npz

# What np.load and zipfile raise on damaged archives, found by flipping every byte of small archives:
# NotImplementedError for a flipped compression method, RuntimeError for a flipped "encrypted" flag.
# The reliability suite added SyntaxError and TokenError (numpy parses an .npy header as a Python literal: a damaged
# "(60, 16)" can leave it unparseable) and MemoryError (a header claiming a 6 TiB shape): docs/reliability.md.
_NPZ_READ_ERRORS = (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError,
                    SyntaxError, tokenize.TokenError, MemoryError)
_NPZ_FIX = "Fix: save it again with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)."


def load_npz(path: str | Path) -> Dataset:
    """Load ``x_train, y_train, x_test, y_test`` from an .npz archive (see the module docstring for the rules).

    x: bool/integer/float; integers are 8-bit pixels (0..255, divided by 255 unless already within 0..1),
    floats are kept as given; all become float32. y: integers -> classification (int64, n_classes = max + 1),
    floats -> regression (float32).
    """
    path = Path(path)
    raw = _read_npz_arrays(path)
    # One decision for both splits, so that x_train and x_test end up on the same scale.
    scale = any(a.dtype.kind in "biu" and a.size and a.max() > 1 for a in (raw["x_train"], raw["x_test"]))
    xs = {key: _as_x(raw[key], key, path, scale) for key in ("x_train", "x_test")}
    ys = {key: _as_y(raw[key], key, path) for key in ("y_train", "y_test")}
    _check_npz_shapes(xs, ys, path)
    is_classification = ys["y_train"].dtype == torch.int64
    n_classes = int(max(ys["y_train"].max(), ys["y_test"].max())) + 1 if is_classification else None
    names = _class_names(raw.get("class_names"), n_classes, path)
    return Dataset(**xs, **ys, name=path.stem, source=str(path), n_classes=n_classes, class_names=names)


def _class_names(a: np.ndarray | None, n_classes: int | None, path: Path) -> tuple[str, ...] | None:
    """The optional ``class_names`` array of an .npz: one string per class, in label order."""
    if a is None:
        return None
    if a.dtype.kind != "U" or a.ndim != 1 or n_classes is None or len(a) < n_classes:
        raise DataError(f"{path}: class_names must be a 1-D array of strings with one name per class (labels "
                        f"0..{(n_classes or 1) - 1}), got {a.dtype} {_shape(a.shape)}. "
                        "Fix: np.savez(..., class_names=np.array(['cat', 'dog', ...])).")
    return tuple(str(v) for v in a)


def _read_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    head = _read_bytes(path, "npz file", limit=6)
    if head.startswith(b"\x93NUMPY"):
        raise DataError(f"{path}: a .npy file (one array), not an .npz archive. {_NPZ_FIX}")
    if not head.startswith(b"PK"):
        # Checked here because np.load would try to unpickle it and report a misleading "pickled data" error.
        starts = head.hex(" ") or "nothing: empty file"
        raise DataError(f"{path}: not an .npz archive (it starts with {starts}, a zip archive with 50 4b). {_NPZ_FIX}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            present = list(archive.files)
            missing = [key for key in _NPZ_KEYS if key not in present]
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {', '.join(missing)}; the archive holds {present or 'no arrays'}. "
                    f"{_NPZ_FIX}"
                )
            keys = _NPZ_KEYS + (("class_names",) if "class_names" in present else ())
            return {key: _read_member(archive, key, path) for key in keys}
    except _NPZ_READ_ERRORS as err:
        reason = f"{type(err).__name__}: {err}"
        raise DataError(f"{path}: corrupt or unreadable .npz archive ({reason}). {_NPZ_FIX}") from err


def _read_member(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        member = archive[key]
    except ValueError as err:
        if "allow_pickle" not in str(err):
            raise
        raise DataError(
            f"{path}: array {key} holds pickled Python objects; bsdgraph loads with allow_pickle=False because "
            f"unpickling can run arbitrary code. Fix: save plain numeric arrays (e.g. np.asarray(v, np.float32))."
        ) from err
    if not isinstance(member, np.ndarray):  # NpzFile hands back raw bytes for members not stored as .npy
        raise DataError(f"{path}: member {key} is not a numpy array (no {key}.npy in the archive). {_NPZ_FIX}")
    return member


def _as_x(a: np.ndarray, key: str, path: Path, scale: bool) -> torch.Tensor:
    _check_array(a, key, path)
    if a.ndim < 2:
        raise DataError(
            f"{path}: {key} has shape {_shape(a.shape)}; expected [N, *sample_shape]. "
            f"Fix: for one feature per sample save it as shape (N, 1)."
        )
    if a.dtype.kind == "f":
        return torch.from_numpy(_to_float32(a, key, path))
    _check_in_range(a, key, path, 0, 255, "integer x is read as 8-bit pixel values; save other data as float")
    out = a.astype(np.float32)
    return torch.from_numpy(out / 255 if scale else out)


def _as_y(a: np.ndarray, key: str, path: Path) -> torch.Tensor:
    _check_array(a, key, path)
    if a.dtype.kind == "f":
        return torch.from_numpy(_to_float32(a, key, path))
    if a.ndim not in (1, 2):
        raise DataError(
            f"{path}: integer {key} (class labels) has shape {_shape(a.shape)}; expected one label per sample, "
            f"shape (N,), or one per step of a sequence, shape (N, T). Fix: save class indices, not one-hot rows "
            f"(np.argmax(y, axis=-1))."
        )
    _check_in_range(a, key, path, 0, None, "class labels must be >= 0")
    return torch.from_numpy(a.astype(np.int64))


def _check_array(a: np.ndarray, key: str, path: Path) -> None:
    if a.dtype.kind not in "biuf":
        raise DataError(
            f"{path}: {key} has dtype {a.dtype}; expected a real numeric dtype (bool, integer or float). "
            f"Fix: convert it, e.g. np.asarray({key}, dtype=np.float32)."
        )
    if a.ndim == 0 or len(a) == 0:
        raise DataError(f"{path}: {key} is empty (shape {_shape(a.shape)}). Fix: save at least one sample per split.")


def _to_float32(a: np.ndarray, key: str, path: Path) -> np.ndarray:
    _check_finite(a, key, path, "")
    with np.errstate(over="ignore"):  # overflow is reported by the check below, with the index
        out = a.astype(np.float32)
    _check_finite(out, key, path, " after conversion to float32 (its magnitude exceeds 3.4e38)")
    return out


def _check_finite(a: np.ndarray, key: str, path: Path, why: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        where = _index(bad)
        raise DataError(
            f"{path}: {_at(key, where)} is {a[where]}{why}; {int(bad.sum())} non-finite value(s) in {key} in all. "
            f"Fix: drop or impute those samples before saving."
        )


def _check_in_range(a: np.ndarray, key: str, path: Path, lo: int, hi: int | None, rule: str) -> None:
    bad = (a < lo) if hi is None else (a < lo) | (a > hi)
    if bad.any():
        where = _index(bad)
        allowed = f"{lo}.." + ("" if hi is None else str(hi))
        raise DataError(f"{path}: {_at(key, where)} is {a[where]}, outside {allowed}: {rule}.")


def _check_npz_shapes(xs: dict[str, torch.Tensor], ys: dict[str, torch.Tensor], path: Path) -> None:
    for split in ("train", "test"):
        x, y = xs[f"x_{split}"], ys[f"y_{split}"]
        if len(x) != len(y):
            raise DataError(
                f"{path}: x_{split} has {len(x)} samples but y_{split} has {len(y)}; they must match one to one."
            )
    if xs["x_train"].shape[1:] != xs["x_test"].shape[1:]:
        raise DataError(
            f"{path}: x_train samples are {_shape(xs['x_train'].shape[1:])} but x_test samples are "
            f"{_shape(xs['x_test'].shape[1:])}; both splits must have the same sample shape."
        )
    y_train, y_test = ys["y_train"], ys["y_test"]
    if y_train.dtype != y_test.dtype:
        raise DataError(
            f"{path}: y_train is {y_train.dtype} but y_test is {y_test.dtype}; use integer labels in both "
            f"(classification) or float targets in both (regression)."
        )
    if y_train.shape[1:] != y_test.shape[1:]:
        raise DataError(
            f"{path}: y_train targets are {_shape(y_train.shape[1:])} but y_test targets are "
            f"{_shape(y_test.shape[1:])}; both splits must have the same target shape."
        )


# ------------------------------------------------------------------------------------ fitting to a model

_TASKS = ("classification", "regression")


@dataclass(frozen=True)
class Expects:
    """What a forward graph's data must be: samples of ``shape`` ([T, *input] for a sequence input), the ``task``,
    ``n_classes`` (None for regression) and ``per_sample`` targets (classes: 1, or T for a class per step;
    regression: the values the output gives per sample)."""

    shape: tuple[int, ...]
    task: str
    n_classes: int | None
    per_sample: int


def expects(graph) -> Expects:
    from bsdgraph.ir.graph import Op

    inp, out = graph.by_op(Op.INPUT)[0], graph.by_op(Op.OUTPUT)[0]
    shape = (graph.T, *inp.shape) if inp.attrs["encoding"] == "sequence" else tuple(inp.shape)
    steps = graph.T if out.attrs["target"] == "sequence" else 1  # one target per step
    classification = out.attrs["task"] == "classification"
    return Expects(tuple(shape), out.attrs["task"], out.attrs["n_classes"] if classification else None,
                   steps if classification else steps * math.prod(out.shape))


def check_against_model(
    ds: Dataset, sample_shape: Sequence[int], n_classes: int | None = None, task: str = "classification",
    target_size: int | None = None,
) -> Dataset:
    """Check that ds can feed a model taking `sample_shape` per sample; return ds, reshaped to `sample_shape`
    when only the layout differs (flat [784] data for a (1, 28, 28) model, or the other way round).
    `target_size`: for regression, the number of values the model's output gives per sample; for classification,
    the number of labels per sample (1, or T for a class per step)."""
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
    _check_task(ds, task)
    ds = _fit_sample_shape(ds, tuple(int(d) for d in sample_shape))
    if task == "classification":
        for key in ("y_train", "y_test"):
            y = getattr(ds, key)
            if target_size is not None:
                _check_label_steps(y, key, target_size, ds.source)
            if n_classes is not None:
                _check_labels_fit(y, key, n_classes, ds.source)
    if task == "regression" and target_size is not None:
        for key in ("y_train", "y_test"):
            _check_targets_fit(getattr(ds, key), key, target_size, ds.source)
    return ds


def _check_task(ds: Dataset, task: str) -> None:
    is_classification = not ds.y_train.dtype.is_floating_point
    if task == "classification" and not is_classification:
        raise DataError(
            f"{ds.source}: the model is a classifier but y_train holds float targets ({ds.y_train.dtype}), which "
            f"bsdgraph reads as regression. Fix: save class labels as integers (y.astype(np.int64))."
        )
    if task == "regression" and is_classification:
        raise DataError(
            f"{ds.source}: the model does regression but y_train holds integer labels, which bsdgraph reads as "
            f"classes. Fix: save regression targets as floats (y.astype(np.float32))."
        )


def _fit_sample_shape(ds: Dataset, shape: tuple[int, ...]) -> Dataset:
    """``ds`` reshaped to ``shape`` per sample where that is only a change of layout: flat data for a shaped model
    (C order, as np.reshape), a shaped sample for a flat model, or axes of size 1 added or dropped. The same values
    in axes of another order (channel-last images, sequences stored [N, D, T]) would be scrambled by a reshape:
    refused, with the transpose that fixes them."""
    have = ds.sample_shape
    if have == shape:
        return ds
    if math.prod(have) != math.prod(shape):
        raise DataError(
            f"{ds.source}: model expects {_shape(shape)} per sample, data has {_shape(have)} "
            f"({math.prod(shape)} vs {math.prod(have)} values). Fix: pick a model built for this data, "
            f"or resize the data to {_shape(shape)}."
        )
    squeezed = [tuple(d for d in s if d != 1) for s in (have, shape)]
    if squeezed[0] != squeezed[1] and min(len(s) for s in squeezed) > 1:
        axes = _transpose_to(have, shape)
        what, fix = (("the same axes in another order (channel-last images or sequences stored [N, D, T] look like "
                      "this)", f"x = np.transpose(x, {(0, *(a + 1 for a in axes))}) for x_train and x_test")
                     if axes else ("another layout of as many values", f"store the samples as {_shape(shape)}"))
        raise DataError(f"{ds.source}: model expects {_shape(shape)} per sample, data has {_shape(have)}: {what}, "
                        f"and a reshape would scramble every sample. Fix: {fix}.")
    return dataclasses.replace(
        ds, x_train=ds.x_train.reshape(ds.n_train, *shape), x_test=ds.x_test.reshape(ds.n_test, *shape)
    )


def _transpose_to(have: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axes order of ``have`` that gives ``shape`` (the first in lexicographic order, which keeps the other
    axes in their order when sizes repeat), or None."""
    if len(have) != len(shape) or len(have) > 6:
        return None
    return next((p for p in itertools.permutations(range(len(have))) if tuple(have[i] for i in p) == shape), None)


def _check_label_steps(y: torch.Tensor, key: str, steps: int, source: str) -> None:
    """One label per sample (steps == 1: y is [N]) or one per step (y is [N, T])."""
    want = (len(y),) if steps == 1 else (len(y), steps)
    if tuple(y.shape) != want:
        what = "one class per sample, shape (N,)" if steps == 1 else f"one class per step, shape (N, {steps})"
        onehot = y.dim() == 2 and bool(((y == 0) | (y == 1)).all()) and bool((y.sum(1) == 1).all())
        fix = ("save class indices, not one-hot rows (np.argmax(y, axis=1))" if onehot and steps == 1 else
               "save labels of that shape, or use a model whose output matches them")
        raise DataError(f"{source}: {key} has shape {_shape(tuple(y.shape))} but the model predicts {what}. "
                        f"Fix: {fix}.")


def _check_labels_fit(y: torch.Tensor, key: str, n_classes: int, source: str) -> None:
    bad = (y < 0) | (y >= n_classes)
    if bool(bad.any()):
        flat = int(torch.argmax(bad.reshape(-1).to(torch.uint8)))
        at = tuple(int(i) for i in np.unravel_index(flat, tuple(y.shape)))
        i = at[0] if len(at) == 1 else ", ".join(map(str, at))
        raise DataError(
            f"{source}: label {int(y.reshape(-1)[flat])} at {key}[{i}] but the model has {n_classes} classes (labels 0.."
            f"{n_classes - 1}). Fix: use a model with at least {int(y.max()) + 1} classes, or relabel the data."
        )


def _check_targets_fit(y: torch.Tensor, key: str, size: int, source: str) -> None:
    per_sample = math.prod(y.shape[1:])
    if per_sample != size:
        raise DataError(
            f"{source}: the model's output gives {size} value(s) per sample but {key} holds {per_sample} "
            f"(shape {_shape(y.shape)}). Fix: save targets of shape (N, {size}), or make the top linear "
            f"{per_sample} wide."
        )


# ------------------------------------------------------------------------------------------- iteration


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches (x[idx], y[idx]) covering every sample once; the last batch may be smaller. With shuffle the
    order is torch.randperm(len(x), generator=generator), so a seeded generator reproduces it."""
    # Checked here, not inside the generator, so that a bad call fails where it is made.
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}. Fix: pass --batch-size N with N >= 1.")
    if len(x) != len(y):
        raise DataError(f"batches: x has {len(x)} samples but y has {len(y)}; they must match one to one.")
    order = torch.randperm(len(x), generator=generator) if shuffle else None
    return _iter_batches(x, y, batch_size, order)


def _iter_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, order: torch.Tensor | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(x), batch_size):
        if order is None:  # slices are views: no copy in the unshuffled case
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


def autoencode(ds: Dataset) -> Dataset:
    """The data set of an autoencoder (a model file with ``TARGET = "input"``): every sample's target is its own
    stimulus, flattened to [N, D] float32 (a regression output is flat); the labels are dropped. The targets are
    views of x, so no memory is copied."""
    flat = {k: getattr(ds, f"x_{k}").reshape(len(getattr(ds, f"x_{k}")), -1).float() for k in ("train", "test")}
    return dataclasses.replace(ds, y_train=flat["train"], y_test=flat["test"], name=f"{ds.name} (target = input)",
                               n_classes=None)


def subset(ds: Dataset, n_train: int | None = None, n_test: int | None = None) -> Dataset:
    """The first n_train / n_test samples of each split (None keeps all; more than there are keeps all)."""
    for flag, n in (("n_train", n_train), ("n_test", n_test)):
        if n is not None and n < 1:
            raise DataError(f"subset: {flag} must be at least 1, got {n}. Fix: pass a positive sample count.")
    return dataclasses.replace(
        ds,
        x_train=ds.x_train[:n_train],
        y_train=ds.y_train[:n_train],
        x_test=ds.x_test[:n_test],
        y_test=ds.y_test[:n_test],
    )


# ------------------------------------------------------------------------------------------- synthetic

SYNTHETIC_NOISE = 0.2  # std of the Gaussian noise added to the class prototypes


def make_synthetic(
    n_train: int, n_test: int, shape: Sequence[int], n_classes: int, seed: int = 0
) -> Dataset:
    """A small, learnable, deterministic classification task for tests of training.

    Each class has a prototype drawn uniformly from [0, 1]^shape; a sample is its class prototype plus Gaussian
    noise (std SYNTHETIC_NOISE), clipped to [0, 1]. Labels are balanced (i % n_classes, shuffled). The same
    arguments give the same tensors (torch's CPU generator, seeded). Train and test share the prototypes.

    How separable: two prototypes lie about sqrt(D / 6) apart (D values per sample) while the noise along that
    direction has std 0.2, so the task gets easier with D. Test accuracy of the nearest-class-mean classifier (a
    linear one; means from 2000 train samples, 2000 test samples, seeds 0..4), measured:

        D = 4: 64-73 %   D = 8: 88-95 %   D = 16: 99.6-99.9 %   D >= 64: 100 %     (10 classes)
        D = 2: 59-97 %   D = 4: 90-100 %  D >= 16: >= 99 %                         (2 classes)

    So shape (16,) or larger with 10 classes is a task any working trainer should learn to > 95 %.
    """
    shape = tuple(int(d) for d in shape)
    if n_train < 1 or n_test < 1 or n_classes < 2 or not shape or min(shape) < 1:
        raise DataError(
            f"make_synthetic: need n_train >= 1, n_test >= 1, n_classes >= 2 and a non-empty shape of positive "
            f"sizes; got n_train={n_train}, n_test={n_test}, n_classes={n_classes}, shape={shape}."
        )
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand((n_classes, *shape), generator=g)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(n) % n_classes)[torch.randperm(n, generator=g)]
        noise = torch.randn((n, *shape), generator=g) * SYNTHETIC_NOISE
        return (prototypes[labels] + noise).clamp(0.0, 1.0), labels

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    return Dataset(x_train, y_train, x_test, y_test, f"synthetic-{seed}", "make_synthetic", n_classes)


def _index(mask: np.ndarray) -> tuple[int, ...]:
    """Index of the first True in mask (C order)."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


def _at(key: str, where: tuple[int, ...]) -> str:
    return f"{key}[{', '.join(map(str, where))}]"


def _shape(dims: Sequence[int]) -> str:
    return str(tuple(int(d) for d in dims))


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 2, flip: bool = True) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (zero fill) and random horizontal flips of [N, C, H, W] images.

    Drawn from ``generator`` (the training loop's shuffling generator), so a resumed run draws the same ones."""
    n, _, h, w = x.shape
    dy, dx = (torch.randint(-shift, shift + 1, (2, n), generator=generator) if shift else torch.zeros(2, n, dtype=int))
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift))
    rows = (torch.arange(h)[None, :] + shift - dy[:, None])  # [n, h]
    cols = (torch.arange(w)[None, :] + shift - dx[:, None])  # [n, w]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    idx_r = rows[:, None, :, None].expand(n, x.shape[1], h, w + 2 * shift)
    out = padded.gather(2, idx_r)
    return out.gather(3, cols[:, None, None, :].expand(n, x.shape[1], h, w))
