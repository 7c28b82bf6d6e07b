"""Tests of bsdgraph.train.data on real files written to tmp_path: IDX (plain and gzip) and .npz archives.

Every user-facing failure must be a DataError whose message is pinned with `match=`; the fuzz tests check that
damaged files (truncated, bytes flipped) give a valid parse or a DataError, never any other exception.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bsdgraph.train.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    Dataset,
    DataError,
    batches,
    check_against_model,
    find_fashion_mnist,
    load_idx_dataset,
    load_npz,
    make_synthetic,
    read_idx,
    subset,
)

# tmp_path is function-scoped; every example overwrites the one file it uses, so sharing it is safe. The number of
# examples comes from the profile in conftest.py (HYPOTHESIS_PROFILE=long searches deeper).
fuzz_settings = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(a: np.ndarray, code: int | None = None) -> bytes:
    """Serialise a as IDX: 00 00 <type code> <ndim>, big-endian uint32 dims, big-endian data."""
    code = IDX_CODES[a.dtype.type] if code is None else code
    header = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, a: np.ndarray, gz: bool = False) -> Path:
    raw = idx_bytes(a)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def sample_array(dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """Values spanning the dtype's range (min, max, negatives, fractions) so byte order errors would show."""
    n = int(np.prod(shape))
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.linspace(info.min, info.max, n).round()
    else:
        values = np.linspace(-3.5, 1e4, n)
    return values.astype(dtype).reshape(shape)


# ------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("dtype", list(IDX_CODES))
def test_read_idx_round_trip(tmp_path, dtype, shape, gz):
    a = sample_array(dtype, shape)
    got = read_idx(write_idx(tmp_path / "a.idx", a, gz))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, a)
    got[...] = 0  # writable: the caller may normalise in place


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    zipped_without_gz = tmp_path / "images-idx2-ubyte"
    zipped_without_gz.write_bytes(gzip.compress(idx_bytes(a)))
    plain_named_gz = tmp_path / "images-idx2-ubyte.gz"
    plain_named_gz.write_bytes(idx_bytes(a))
    np.testing.assert_array_equal(read_idx(zipped_without_gz), a)
    np.testing.assert_array_equal(read_idx(plain_named_gz), a)


VALID = idx_bytes(np.arange(6, dtype=np.uint8).reshape(2, 3))  # 12-byte header + 6 data bytes

IDX_ERRORS = {
    "empty": (b"", r"not an IDX file: it starts with nothing \(empty file\)"),
    "bad magic": (b"\x01\x02" + VALID[2:], r"not an IDX file: it starts with 01 02 08 02"),
    "text file": (b"hello world", r"not an IDX file: it starts with 68 65 6c 6c"),
    "unknown type code": (VALID[:2] + b"\x0a" + VALID[3:], r"unknown IDX type code 0x0A \(byte 2\)"),
    "zero dims": (b"\x00\x00\x08\x00", r"IDX header says 0 dimensions"),
    "truncated header": (VALID[:9], r"truncated IDX header: 2 dimensions need 12 header bytes, the file has 9"),
    "truncated data": (
        VALID[:-1],
        r"truncated IDX file: header says \(2, 3\) of uint8, i\.e\. 6 data bytes after the 12-byte header, "
        r"but only 5 are there",
    ),
    "trailing garbage": (VALID + b"xyz", r"3 bytes of trailing garbage after the 6 data bytes"),
    "truncated gzip": (gzip.compress(VALID)[:-6], r"corrupt gzip data \(EOFError"),
    "gzip bad crc": (gzip.compress(VALID)[:-8] + b"\0\0\0\0" + gzip.compress(VALID)[-4:], r"corrupt gzip data"),
    "gzip garbage body": (b"\x1f\x8b" + b"\xff" * 30, r"corrupt gzip data"),
}


@pytest.mark.parametrize("case", list(IDX_ERRORS))
def test_read_idx_errors(tmp_path, case):
    raw, pattern = IDX_ERRORS[case]
    path = tmp_path / "bad.idx"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=pattern) as info:
        read_idx(path)
    assert str(path) in str(info.value)  # the message says which file


def test_read_idx_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"IDX file not found: .*nope\.idx\. Fix: check the path"):
        read_idx(tmp_path / "nope.idx")
    with pytest.raises(DataError, match=r"cannot read IDX file .*: Is a directory"):
        read_idx(tmp_path)


def idx_fuzz_source() -> np.ndarray:
    return np.arange(60, dtype=np.int16).reshape(3, 4, 5)  # 16-byte header + 120 data bytes


def read_or_data_error(reader, path: Path):
    """reader(path), or None when it raises DataError; any other exception fails the test."""
    try:
        return reader(path)
    except DataError:
        return None


@fuzz_settings
@given(gz=st.booleans(), cut=st.floats(0, 1, exclude_max=True))
def test_read_idx_truncated_is_data_error(tmp_path, gz, cut):
    raw = idx_bytes(idx_fuzz_source())
    raw = gzip.compress(raw) if gz else raw
    path = tmp_path / "cut.idx"
    path.write_bytes(raw[: int(cut * len(raw))])
    with pytest.raises(DataError):
        read_idx(path)


@fuzz_settings
@given(gz=st.booleans(), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4))
def test_read_idx_flipped_bytes_parse_or_data_error(tmp_path, gz, flips):
    a = idx_fuzz_source()
    raw = bytearray(gzip.compress(idx_bytes(a)) if gz else idx_bytes(a))
    positions = [pos % len(raw) for pos, _ in flips]
    for pos, (_, mask) in zip(positions, flips):
        raw[pos] ^= mask
    path = tmp_path / "flipped.idx"
    path.write_bytes(bytes(raw))
    got = read_or_data_error(read_idx, path)
    if not gz and min(positions) >= 16:  # only data bytes changed: the parse must succeed, same shape
        assert got is not None and got.shape == a.shape


# ------------------------------------------------------------------------------------------ Fashion-MNIST


def write_fashion(folder: Path, gz: bool = True, n_train: int = 8, n_test: int = 5, **override) -> Path:
    """A tiny Fashion-MNIST look-alike (7x7 images); `override` replaces arrays by role (train_labels, ...)."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 7, 7), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 7, 7), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    arrays.update(override)
    folder.mkdir(parents=True, exist_ok=True)
    for role, a in arrays.items():
        name = FASHION_MNIST_FILES[role]
        write_idx(folder / (f"{name}.gz" if gz else name), a, gz)
    return folder


def test_find_fashion_mnist_debian_layout(tmp_path):
    """The Debian package puts the four .gz files directly in the folder (checked with dpkg -L)."""
    folder = write_fashion(tmp_path / "fashion-mnist", gz=True)
    assert find_fashion_mnist(folder) == folder


@pytest.mark.parametrize("sub", ["raw", "FashionMNIST/raw", "data/fashion"])
def test_find_fashion_mnist_known_subfolders(tmp_path, sub):
    folder = write_fashion(tmp_path / sub, gz=False)
    assert find_fashion_mnist(tmp_path) == folder


def test_find_fashion_mnist_missing_says_where_and_how_to_fix(tmp_path):
    with pytest.raises(DataError, match=r"Fashion-MNIST not found: looked in .*empty.*train-images-idx3-ubyte\[\.gz\]"
    ) as info:
        find_fashion_mnist(tmp_path / "empty")
    message = str(info.value)
    for fix in ("apt-get install dataset-fashion-mnist", "--data-dir DIR", "--npz FILE", FASHION_MNIST_DIR):
        assert fix in message


def test_find_fashion_mnist_partial_names_missing_files(tmp_path):
    folder = write_fashion(tmp_path / "d")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"Found 3 of 4 in .*d; missing: t10k-labels-idx1-ubyte\. Fix: `apt-get"):
        find_fashion_mnist(folder)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_load_idx_dataset(tmp_path, gz):
    folder = write_fashion(tmp_path, gz=gz)
    ds = load_idx_dataset(folder)
    assert (ds.n_train, ds.n_test, ds.sample_shape, ds.n_classes) == (8, 5, (1, 7, 7), 10)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    raw = read_idx(folder / "train-images-idx3-ubyte.gz" if gz else folder / "train-images-idx3-ubyte")
    torch.testing.assert_close(ds.x_train[:, 0], torch.from_numpy(raw).float() / 255)
    assert ds.source == str(folder) and ds.name == "fashion-mnist"


IDX_DATASET_ERRORS = {
    "count mismatch": (
        {"train_labels": np.zeros(7, np.uint8)},
        r"train split: 8 images in .*train-images-idx3-ubyte\.gz but 7 labels in .*; the counts must match",
    ),
    "label out of range": (
        {"test_labels": np.array([0, 1, 10, 3, 4], np.uint8)},
        r"t10k-labels-idx1-ubyte\.gz: label 10 at index 2 is outside 0\.\.9",
    ),
    "images not 3-D": (
        {"train_images": np.zeros((8, 49), np.uint8)},
        r"train-images-idx3-ubyte\.gz: expected uint8 images of shape \[N, H, W\], got uint8 \(8, 49\)",
    ),
    "labels not 1-D": (
        {"train_labels": np.zeros((8, 1), np.uint8)},
        r"expected integer labels of shape \[N\], got uint8 \(8, 1\)",
    ),
    "image size differs": (
        {"test_images": np.zeros((5, 6, 6), np.uint8)},
        r"train images are \(7, 7\) but test images are \(6, 6\)",
    ),
}


@pytest.mark.parametrize("case", list(IDX_DATASET_ERRORS))
def test_load_idx_dataset_errors(tmp_path, case):
    override, pattern = IDX_DATASET_ERRORS[case]
    with pytest.raises(DataError, match=pattern):
        load_idx_dataset(write_fashion(tmp_path, **override))


def test_real_fashion_mnist():
    try:
        find_fashion_mnist()
    except DataError:
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
    ds = load_idx_dataset()
    assert (ds.n_train, ds.n_test, ds.sample_shape, ds.n_classes) == (60000, 10000, (1, 28, 28), 10)
    assert ds.x_train.dtype == torch.float32 and 0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1
    # Fashion-MNIST is balanced: 6000 train and 1000 test images per class.
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10


# ------------------------------------------------------------------------------------------------- npz


def valid_arrays(n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "x_train": rng.integers(0, 256, (n_train, 2, 3), dtype=np.uint8),
        "y_train": np.arange(n_train) % 3,
        "x_test": rng.integers(0, 256, (n_test, 2, 3), dtype=np.uint8),
        "y_test": np.arange(n_test) % 3,
    }


def save_npz(path: Path, **override) -> Path:
    arrays = valid_arrays()
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})  # None drops the array
    return path


def test_load_npz_uint8_images_are_scaled(tmp_path):
    arrays = valid_arrays()
    ds = load_npz(save_npz(tmp_path / "toy.npz"))
    assert isinstance(ds, Dataset)
    assert (ds.n_train, ds.n_test, ds.sample_shape, ds.n_classes) == (6, 4, (2, 3), 3)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    torch.testing.assert_close(ds.x_test, torch.from_numpy(arrays["x_test"]).float() / 255)
    assert ds.name == "toy" and ds.source == str(tmp_path / "toy.npz")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_load_npz_float_x_kept_as_given(tmp_path, dtype):
    x = np.linspace(-2, 3, 6 * 4).reshape(6, 4).astype(dtype)  # outside [0, 1] on purpose: not rescaled
    ds = load_npz(save_npz(tmp_path / "f.npz", x_train=x, x_test=x[:4]))
    assert ds.x_train.dtype == torch.float32
    torch.testing.assert_close(ds.x_train, torch.from_numpy(x.astype(np.float32)))


def test_load_npz_integer_x_within_0_1_not_scaled(tmp_path):
    x = (np.arange(12).reshape(6, 2) % 2).astype(np.int64)
    ds = load_npz(save_npz(tmp_path / "b.npz", x_train=x, x_test=x[:4]))
    torch.testing.assert_close(ds.x_train, torch.from_numpy(x).float())


def test_load_npz_scale_is_decided_for_both_splits(tmp_path):
    x_test = np.ones((4, 2, 3), np.uint8)  # max 1 alone would not be scaled; x_train's 255 decides for both
    ds = load_npz(save_npz(tmp_path / "s.npz", x_test=x_test))
    torch.testing.assert_close(ds.x_test, torch.full((4, 2, 3), 1 / 255))


def test_load_npz_float_y_is_regression(tmp_path):
    y = np.linspace(0, 1, 6 * 2).reshape(6, 2)
    ds = load_npz(save_npz(tmp_path / "r.npz", y_train=y, y_test=y[:4]))
    assert ds.n_classes is None and ds.y_train.dtype == torch.float32 and ds.y_train.shape == (6, 2)


def test_load_npz_n_classes_over_both_splits(tmp_path):
    ds = load_npz(save_npz(tmp_path / "c.npz", y_test=np.array([0, 7, 1, 2], np.uint8)))
    assert ds.n_classes == 8


NAN_X = np.zeros((6, 2, 3), np.float32)
NAN_X[1, 0, 2] = np.nan
NPZ_ERRORS = {
    "missing arrays": (
        {"y_test": None, "x_test": None},
        r"missing array\(s\) x_test, y_test; the archive holds \['x_train', 'y_train'\]\. Fix: save it again",
    ),
    "nan in x": ({"x_train": NAN_X}, r"x_train\[1, 0, 2\] is nan; 1 non-finite value\(s\) in x_train"),
    "inf in y": ({"y_test": np.array([0.5, np.inf, 1, 2])}, r"y_test\[1\] is inf"),
    "float32 overflow": (
        {"y_train": np.array([0, 1, 2, 3, 1e300, 4])},
        r"y_train\[4\] is inf after conversion to float32",
    ),
    "string dtype": ({"y_train": np.array(list("abcdef"))}, r"y_train has dtype <U1; expected a real numeric dtype"),
    "complex dtype": ({"x_test": np.zeros((4, 2, 3), np.complex64)}, r"x_test has dtype complex64"),
    "length mismatch": ({"y_train": np.arange(5)}, r"x_train has 6 samples but y_train has 5"),
    "empty train": (
        {"x_train": np.zeros((0, 2, 3), np.uint8), "y_train": np.zeros(0, np.int64)},
        r"x_train is empty \(shape \(0, 2, 3\)\)",
    ),
    "empty test": ({"y_test": np.zeros(0, np.int64)}, r"y_test is empty"),
    "sample shape mismatch": (
        {"x_test": np.zeros((4, 3, 2), np.uint8)},
        r"x_train samples are \(2, 3\) but x_test samples are \(3, 2\)",
    ),
    "negative label": ({"y_train": np.array([0, 1, -1, 2, 0, 1])}, r"y_train\[2\] is -1, outside 0\.\.: class labels"),
    "integer x beyond 255": (
        {"x_test": np.full((4, 2, 3), 256, np.int32)},
        r"x_test\[0, 0, 0\] is 256, outside 0\.\.255: integer x is read as 8-bit pixel values",
    ),
    "1-D x": ({"x_train": np.zeros(6, np.float32)}, r"x_train has shape \(6,\); expected \[N, \*sample_shape\]"),
    "3-D y": ({"y_train": np.zeros((6, 2, 2), dtype=np.int64)}, r"integer y_train \(class labels\) has shape "
             r"\(6, 2, 2\); expected one label per sample, shape \(N,\), or one per step"),
    "y dtypes differ": ({"y_test": np.zeros(4, np.float32)}, r"y_train is torch\.int64 but y_test is torch\.float32"),
    "pickled objects": (
        {"y_train": np.array([0, 1, 2, 3, 4, None], dtype=object)},
        r"array y_train holds pickled Python objects; bsdgraph loads with allow_pickle=False",
    ),
}


@pytest.mark.parametrize("case", list(NPZ_ERRORS))
def test_load_npz_errors(tmp_path, case):
    override, pattern = NPZ_ERRORS[case]
    path = save_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(DataError, match=pattern) as info:
        load_npz(path)
    assert str(path) in str(info.value)


def test_load_npz_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"npz file not found: .*nope\.npz"):
        load_npz(tmp_path / "nope.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataError, match=r"a \.npy file \(one array\), not an \.npz archive"):
        load_npz(tmp_path / "one.npy")
    (tmp_path / "text.npz").write_text("x_train,y_train\n")
    with pytest.raises(DataError, match=r"not an \.npz archive \(it starts with 78 5f 74"):
        load_npz(tmp_path / "text.npz")
    raw = save_npz(tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"corrupt or unreadable \.npz archive \(BadZipFile"):
        load_npz(tmp_path / "cut.npz")


def test_load_npz_member_that_is_not_npy(tmp_path):
    path = tmp_path / "raw.npz"
    with zipfile.ZipFile(path, "w") as z:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            z.writestr(key, b"not an array")
    with pytest.raises(DataError, match=r"member x_train is not a numpy array"):
        load_npz(path)


@fuzz_settings
@given(compressed=st.booleans(), cut=st.floats(0, 1, exclude_max=True))
def test_load_npz_truncated_is_data_error(tmp_path, compressed, cut):
    path = tmp_path / "t.npz"
    (np.savez_compressed if compressed else np.savez)(path, **valid_arrays())
    raw = path.read_bytes()
    path.write_bytes(raw[: int(cut * len(raw))])
    with pytest.raises(DataError):
        load_npz(path)


@fuzz_settings
@given(
    compressed=st.booleans(),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_load_npz_flipped_bytes_parse_or_data_error(tmp_path, compressed, flips):
    path = tmp_path / "f.npz"
    (np.savez_compressed if compressed else np.savez)(path, **valid_arrays())
    raw = bytearray(path.read_bytes())
    for pos, mask in flips:
        raw[pos % len(raw)] ^= mask
    path.write_bytes(bytes(raw))
    got = read_or_data_error(load_npz, path)
    assert got is None or isinstance(got, Dataset)


# ------------------------------------------------------------------------------------ check_against_model


def dataset(x_train, y_train, x_test=None, y_test=None, n_classes=10) -> Dataset:
    x_test = x_train[:2] if x_test is None else x_test
    y_test = y_train[:2] if y_test is None else y_test
    return Dataset(x_train, y_train, x_test, y_test, name="t", source="mem.npz", n_classes=n_classes)


def test_check_against_model_same_shape_returns_dataset_unchanged():
    ds = dataset(torch.rand(4, 1, 28, 28), torch.arange(4))
    assert check_against_model(ds, (1, 28, 28), n_classes=10) is ds


@pytest.mark.parametrize(("data_shape", "model_shape"), [((784,), (1, 28, 28)), ((1, 28, 28), (784,))])
def test_check_against_model_reshapes_flat_and_unflat(data_shape, model_shape):
    ds = dataset(torch.rand(4, *data_shape), torch.arange(4))
    fitted = check_against_model(ds, model_shape, n_classes=10)
    assert fitted.sample_shape == model_shape and fitted.x_test.shape == (2, *model_shape)
    torch.testing.assert_close(fitted.x_train.reshape(4, -1), ds.x_train.reshape(4, -1))


def test_check_against_model_shape_mismatch():
    ds = dataset(torch.rand(4, 3, 32, 32), torch.arange(4))
    with pytest.raises(DataError, match=r"mem\.npz: model expects \(1, 28, 28\) per sample, data has \(3, 32, 32\)"):
        check_against_model(ds, (1, 28, 28))


def test_check_against_model_label_beyond_model_classes():
    y = torch.zeros(400, dtype=torch.int64)
    y[345] = 12
    ds = dataset(torch.rand(400, 4), y, y_test=torch.zeros(2, dtype=torch.int64), n_classes=13)
    with pytest.raises(DataError, match=r"label 12 at y_train\[345\] but the model has 10 classes"):
        check_against_model(ds, (4,), n_classes=10)
    assert check_against_model(ds, (4,), n_classes=13) is ds


def test_check_against_model_label_beyond_model_classes_in_test_split():
    ds = dataset(torch.rand(4, 4), torch.zeros(4, dtype=torch.int64), y_test=torch.tensor([1, 3]))
    with pytest.raises(DataError, match=r"label 3 at y_test\[1\] but the model has 3 classes"):
        check_against_model(ds, (4,), n_classes=3)


def test_check_against_model_task_mismatch():
    regression = dataset(torch.rand(4, 4), torch.rand(4), n_classes=None)
    with pytest.raises(DataError, match=r"the model is a classifier but y_train holds float targets"):
        check_against_model(regression, (4,), n_classes=10)
    assert check_against_model(regression, (4,), task="regression") is regression
    classification = dataset(torch.rand(4, 4), torch.arange(4))
    with pytest.raises(DataError, match=r"the model does regression but y_train holds integer labels"):
        check_against_model(classification, (4,), task="regression")
    with pytest.raises(ValueError, match=r"task must be one of"):
        check_against_model(classification, (4,), task="ranking")


# ------------------------------------------------------------------------------------- batches, subset


@given(n=st.integers(1, 50), batch_size=st.integers(1, 60), shuffle=st.booleans(), seed=st.integers(0, 2**31))
def test_batches_cover_every_index_once(n, batch_size, shuffle, seed):
    x = torch.arange(n).float().unsqueeze(1)
    y = torch.arange(n)
    got = list(batches(x, y, batch_size, shuffle, torch.Generator().manual_seed(seed)))
    assert [len(b) for _, b in got] == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    seen = torch.cat([b for _, b in got])
    assert sorted(seen.tolist()) == list(range(n))
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in got)  # x and y stay paired
    if not shuffle:
        assert seen.tolist() == list(range(n))


def test_batches_reproducible_from_generator_seed():
    x, y = torch.rand(100, 3), torch.arange(100)

    def order(seed: int) -> list[int]:
        return torch.cat([b for _, b in batches(x, y, 16, True, torch.Generator().manual_seed(seed))]).tolist()

    assert order(7) == order(7)
    assert order(7) != order(8)


def test_batches_errors():
    with pytest.raises(DataError, match=r"batch size must be at least 1, got 0"):
        batches(torch.zeros(3, 1), torch.zeros(3), 0, False)
    with pytest.raises(DataError, match=r"x has 3 samples but y has 2"):
        batches(torch.zeros(3, 1), torch.zeros(2), 2, False)


def test_subset_takes_the_first_samples():
    ds = make_synthetic(20, 10, (4,), 3, seed=0)
    small = subset(ds, n_train=5, n_test=100)  # more than there are keeps all
    assert (small.n_train, small.n_test) == (5, 10)
    assert torch.equal(small.x_train, ds.x_train[:5]) and torch.equal(small.y_test, ds.y_test)
    assert subset(ds).n_train == 20
    with pytest.raises(DataError, match=r"subset: n_test must be at least 1, got 0"):
        subset(ds, n_test=0)


# ------------------------------------------------------------------------------------------- synthetic


def test_make_synthetic_is_deterministic_and_well_formed():
    a = make_synthetic(50, 20, (2, 4), 5, seed=3)
    b = make_synthetic(50, 20, (2, 4), 5, seed=3)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    assert not torch.equal(a.x_train, make_synthetic(50, 20, (2, 4), 5, seed=4).x_train)
    assert (a.n_train, a.n_test, a.sample_shape, a.n_classes) == (50, 20, (2, 4), 5)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert 0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1
    assert torch.bincount(a.y_train).tolist() == [10] * 5  # balanced


def test_make_synthetic_is_learnable():
    """The docstring's claim: with 16 values per sample and 10 classes, nearest class mean scores > 95 %."""
    ds = make_synthetic(500, 500, (16,), 10, seed=0)
    means = torch.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(ds.x_test, means).argmin(1) == ds.y_test).float().mean()
    assert accuracy > 0.95


def test_make_synthetic_errors():
    with pytest.raises(DataError, match=r"make_synthetic: need .* got n_train=10, n_test=5, n_classes=1"):
        make_synthetic(10, 5, (4,), 1, seed=0)


def test_augment_shifts_and_flips_reproducibly():
    from bsdgraph.train.data import augment

    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).reshape(2, 1, 4, 5)
    assert torch.equal(augment(x, torch.Generator(), shift=0, flip=False), x)
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    # every output pixel is an input pixel of the same image or zero fill
    for i in range(2):
        assert set(a[i].flatten().tolist()) <= set(x[i].flatten().tolist()) | {0.0}


def test_labels_must_match_the_models_output_per_sample_or_per_step():
    """One-hot rows for a per-sample classifier are named as such; a per-step classifier needs y [N, T]."""
    from bsdgraph.train.data import Dataset, DataError, check_against_model

    x = torch.zeros(6, 4)
    onehot = Dataset(x, torch.eye(6, dtype=torch.int64)[:, :4].clone(), x, torch.zeros(6, dtype=torch.int64),
                     name="t", source="t.npz", n_classes=4)
    onehot.y_train[4:, 0] = 1
    with pytest.raises(DataError, match=r"y_train has shape \(6, 4\) but the model predicts one class per sample.*"
                                        r"not one-hot rows"):
        check_against_model(onehot, (4,), 4, "classification", 1)
    flat = Dataset(x, torch.zeros(6, dtype=torch.int64), x, torch.zeros(6, dtype=torch.int64), name="t",
                   source="t.npz", n_classes=4)
    with pytest.raises(DataError, match=r"one class per step, shape \(N, 5\)"):
        check_against_model(flat, (4,), 4, "classification", 5)
    steps = Dataset(x, torch.zeros(6, 5, dtype=torch.int64), x, torch.full((6, 5), 4), name="t", source="t.npz",
                    n_classes=5)
    with pytest.raises(DataError, match=r"label 4 at y_test\[0, 0\] but the model has 4 classes"):
        check_against_model(steps, (4,), 4, "classification", 5)


def test_class_names_come_from_the_npz_or_a_fashion_mnist_folder_and_reach_the_raster_title(tmp_path):
    from bsdgraph.train.data import FASHION_NAMES, load_idx_dataset

    ds = load_npz(save_npz(tmp_path / "named.npz", class_names=np.array(["cat", "dog", "eel"])))
    assert ds.class_names == ("cat", "dog", "eel")
    assert load_npz(save_npz(tmp_path / "plain.npz")).class_names is None
    for bad in (np.array(["cat", "dog"]), np.array([1, 2, 3]), np.array([["a", "b", "c"]])):
        with pytest.raises(DataError, match="class_names must be a 1-D array of strings with one name per class"):
            load_npz(save_npz(tmp_path / "bad.npz", class_names=bad))
    # IDX files are also MNIST's digits: names only where the folder says Fashion-MNIST
    assert load_idx_dataset(write_fashion(tmp_path / "fashion-mnist")).class_names == FASHION_NAMES
    assert load_idx_dataset(write_fashion(tmp_path / "digits")).class_names is None
    from bsdgraph.tools.plot import raster_label

    assert raster_label(torch.tensor(9), FASHION_NAMES) == " (label 9: Ankle boot)"
    assert raster_label(torch.tensor(2), None) == " (label 2)" and raster_label(torch.zeros(4), None) == ""
