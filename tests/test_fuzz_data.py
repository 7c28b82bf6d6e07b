"""Fuzzing data files: truncated and corrupted IDX and npz files, wrong dtypes, NaN/Inf pixels, out-of-range labels,
empty sets. Each case is fed to ``bsdgraph train`` (one epoch of a tiny model) and must end in exit 0 (the data is
still valid) or exit 1 with one ``error:`` line naming the file; a mutation that is certainly wrong must give exit 1.
Run folders (``metrics.jsonl`` and ``checkpoint.pt``, as a killed or edited run leaves them) go through ``plot``.
"""

from __future__ import annotations

import gzip
import io
import re
import shutil
import struct
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from bsdgraph.train.checkpoint import save_checkpoint
from tests.fuzz_helpers import (
    FUZZ, TINY_IMAGE_MODEL, TINY_MODEL, assert_clean, case_dir, cli, tiny_arrays, write, write_npz,
)

IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def idx_bytes(a: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(">u1").tobytes()


def _train(model_source: str, folder, data_flag: str, data_path):
    model = write(folder / "model.py", model_source)
    shutil.rmtree(folder / "run", ignore_errors=True)  # hypothesis may run an example twice
    argv = ["train", model, data_flag, data_path, "--out", folder / "run", "--epochs", "1", "--batch-size", "8"]
    r = assert_clean(cli(*argv), codes=(0, 1))
    event(f"exit {r.code}")
    if r.code == 1:
        lines = [line for line in r.err.splitlines() if line.strip()]
        assert lines[-1].startswith("error: "), r.err
        named = str(data_path) in lines[-1] or any(name in lines[-1] for name in IDX_FILES.values())
        assert named or "split" in lines[-1], f"the message names no file: {r.err}"
    return r


# ---------------------------------------------------------------------------------------------------- IDX


# Each mutation edits the four files of a valid set in place and says whether the result must be refused: True
# (must), None (either outcome is right: a flipped pixel is still a pixel). `c` holds draw, files, arrays, role.


def _flip(c):
    raw = c.files[c.role]
    i, x = c.draw(st.integers(0, len(raw) - 1)), c.draw(st.integers(1, 255))
    c.files[c.role] = raw[:i] + bytes([raw[i] ^ x]) + raw[i + 1:]
    # a flipped pixel or label byte may still be valid data, and so are labels retyped as int8 (0x08 ^ 1)
    return True if i < 4 + 4 * raw[3] and not (i == 2 and x == 1 and "labels" in c.role) else None


def _type_code(c):
    code = c.draw(st.sampled_from([0x00, 0x09, 0x0B, 0x0D, 0x0E, 0x42]))
    c.files[c.role] = c.files[c.role][:2] + bytes([code]) + c.files[c.role][3:]
    return None if code == 0x09 and "labels" in c.role else True  # int8 labels 0..9 are still labels


def _dims(c):
    raw = c.files[c.role]
    dims = list(struct.unpack(f">{raw[3]}I", raw[4:4 + 4 * raw[3]]))
    dims[c.draw(st.integers(0, len(dims) - 1))] = c.draw(st.sampled_from([0, 2 ** 32 - 1, 99999]))
    c.files[c.role] = raw[:4] + struct.pack(f">{len(dims)}I", *dims) + raw[4 + 4 * len(dims):]
    return True


def _gzip_corrupt(c):
    gz = gzip.compress(c.files[c.role])
    i, cut = c.draw(st.integers(0, len(gz) - 1)), c.draw(st.booleans())
    c.files[c.role] = gz[:i] if cut else gz[:i] + bytes([gz[i] ^ 0xFF]) + gz[i + 1:]
    # gzip's trailer (CRC, length) catches any flipped data byte; the header's MTIME, XFL, OS (bytes 4..9) nobody
    return True if cut or not 4 <= i < 10 else None


def _label_range(c):
    labels = c.arrays["train_labels"].copy()
    labels[c.draw(st.integers(0, len(labels) - 1))] = c.draw(st.integers(10, 255))
    c.files["train_labels"] = idx_bytes(labels)
    return True


def _truncate(c):
    c.files[c.role] = c.files[c.role][:c.draw(st.integers(0, len(c.files[c.role]) - 1))]
    return True


def _ndim(c):
    c.files[c.role] = c.files[c.role][:3] + bytes([c.draw(st.sampled_from([0, 2, 4, 200]))]) + c.files[c.role][4:]
    return True


def _trailing(c):
    c.files[c.role] += c.draw(st.binary(min_size=1, max_size=20))
    return True


def _gzip(c):
    c.files[c.role] = gzip.compress(c.files[c.role])
    return False  # gzip is detected by content: still valid


def _replace(value):
    def mutate(c):
        c.files[c.role] = value
        return True
    return mutate


def _count(c):
    split = c.role.split("_")[0]
    c.files[f"{split}_labels"] = idx_bytes(np.append(c.arrays[f"{split}_labels"], 1).astype(np.uint8))
    return True


def _empty_set(c):
    split = c.role.split("_")[0]
    c.files[f"{split}_images"] = idx_bytes(np.zeros((0, 4, 4), np.uint8))
    c.files[f"{split}_labels"] = idx_bytes(np.zeros((0,), np.uint8))
    return True


def _images(role: str, hw: tuple[int, int]):
    def mutate(c):
        c.files[role] = idx_bytes(np.zeros((len(c.arrays[role]), *hw), np.uint8))
        return True
    return mutate


def _labels_as_images(c):
    c.files["train_images"] = c.files["train_labels"]
    return True


IDX_MUTATIONS = {
    "none": lambda c: False, "truncate": _truncate, "flip": _flip, "type code": _type_code, "ndim": _ndim,
    "dims": _dims, "trailing": _trailing, "gzip": _gzip, "gzip corrupt": _gzip_corrupt,
    "empty file": _replace(b""), "missing": _replace(None), "folder": _replace("folder"),
    "label range": _label_range, "count": _count, "empty set": _empty_set,
    "no pixels": _images("train_images", (0, 0)), "image size": _images("test_images", (5, 5)),
    "labels as images": _labels_as_images,
}


@dataclass
class _Case:
    draw: object
    files: dict
    arrays: dict
    role: str


@st.composite
def idx_sets(draw):
    """({role: bytes}, must_fail, what): a valid 1x4x4, 10-class IDX set with zero or one mutation."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    arrays = {}
    for split, n in (("train", draw(st.integers(1, 12))), ("test", draw(st.integers(1, 6)))):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 4, 4)).astype(np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 10, n).astype(np.uint8)
    files = {role: idx_bytes(a) for role, a in arrays.items()}
    case = _Case(draw, files, arrays, draw(st.sampled_from(sorted(files))))
    kind = draw(st.sampled_from(sorted(IDX_MUTATIONS)))
    return files, IDX_MUTATIONS[kind](case), f"{kind} {case.role}"


@FUZZ
@given(case=idx_sets())
def test_corrupted_idx_files_end_in_a_clean_error(tmp_path, case):
    files, must_fail, what = case
    folder = case_dir(tmp_path, files)
    data = folder / "data"
    data.mkdir(exist_ok=True)
    for role, content in files.items():
        path = data / IDX_FILES[role]
        if content == "folder":
            path.mkdir(exist_ok=True)
        elif content is not None:
            path.write_bytes(content)
    r = _train(TINY_IMAGE_MODEL, folder, "--data-dir", data)
    if must_fail:
        assert r.code == 1, f"trained on broken IDX data ({what})"
    elif must_fail is False:
        assert r.code == 0, f"refused valid IDX data ({what}): {r.err}"


# ---------------------------------------------------------------------------------------------------- npz

# name -> (make it from the valid array, must fail as x?, must fail as y?); None: either outcome is right
BAD_ARRAYS = {
    "complex": (lambda a: a.astype(np.complex64), True, True),
    "strings": (lambda a: a.astype(str), True, True),
    "objects": (lambda a: np.array([object()] * len(a), dtype=object), True, True),
    "datetime": (lambda a: np.zeros(len(a), "datetime64[s]"), True, True),
    "structured": (lambda a: np.zeros(len(a), [("a", "f4")]), True, True),
    "scalar": (lambda a: np.float32(1.0), True, True),
    "empty": (lambda a: a[:0], True, True),
    "one fewer": (lambda a: a[:-1], True, True),
    "flat": (lambda a: a.reshape(len(a), -1)[:, 0], True, False),
    "extra axis": (lambda a: a[..., None], True, True),       # only one split changes: the splits disagree
    "float16": (lambda a: a.astype(np.float16), False, True),  # float y means regression: not for a classifier
    "bool": (lambda a: a > 0.5, False, False),
}


def _poke(a: np.ndarray, value, draw) -> np.ndarray:
    a = a.copy()
    a.reshape(-1)[draw(st.integers(0, a.size - 1))] = value
    return a


def _savez(arrays: dict, compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _array_edit(target: str, edit, verdict=True):
    """A mutation of one array: ``target`` "x" or "y" picks the x_/y_ array of the drawn split."""
    def mutate(draw, arrays, key):
        k = key.replace("y_", "x_") if target == "x" else key.replace("x_", "y_")
        arrays[k] = edit(arrays[k], draw)
        return _savez(arrays), verdict
    return mutate


def _bad_array(draw, arrays, key):
    make, bad_x, bad_y = BAD_ARRAYS[draw(st.sampled_from(sorted(BAD_ARRAYS)))]
    arrays[key] = make(arrays[key])
    return _savez(arrays), bad_x if key.startswith("x") else bad_y


def _drop_key(draw, arrays, key):
    del arrays[key]
    return _savez(arrays), True


def _npy(draw, arrays, key):
    buf = io.BytesIO()
    np.save(buf, arrays[key])
    return buf.getvalue(), True


def _truncate_npz(draw, arrays, key):
    raw = _savez(arrays)
    return raw[:draw(st.integers(0, len(raw) - 1))], True


def _flip_npz(draw, arrays, key):
    raw = _savez(arrays)
    i = draw(st.integers(0, len(raw) - 1))
    return raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:], None  # a pixel byte stays a pixel


NPZ_MUTATIONS = {
    "none": lambda draw, arrays, key: (_savez(arrays), False),
    "nan": _array_edit("x", lambda a, draw: _poke(a, np.nan, draw)),
    "inf": _array_edit("x", lambda a, draw: _poke(a, -np.inf, draw)),
    "overflow": _array_edit("x", lambda a, draw: _poke(a.astype(np.float64), 1e300, draw)),
    "label range": _array_edit("y", lambda a, draw: _poke(a, 4 + draw(st.integers(0, 100)), draw)),
    "negative label": _array_edit("y", lambda a, draw: _poke(a, -draw(st.integers(1, 5)), draw)),
    "huge label": _array_edit("y", lambda a, draw: _poke(a, 2 ** 62, draw)),
    "float labels": _array_edit("y", lambda a, draw: a.astype(np.float32)),
    "one-hot": _array_edit("y", lambda a, draw: np.eye(4, dtype=np.int64)[a]),
    "pixels 0..255": _array_edit("x", lambda a, draw: (a * 255).astype(np.uint8), verdict=False),
    "pixels 300": _array_edit("x", lambda a, draw: _poke((a * 255).astype(np.int16), 300, draw)),
    "array": _bad_array,
    "drop key": _drop_key,
    "extra key": lambda draw, arrays, key: (_savez({**arrays, "notes": np.arange(3)}), False),
    "npy": _npy,
    "compressed": lambda draw, arrays, key: (_savez(arrays, compressed=True), False),
    "pickled": lambda draw, arrays, key: (_savez({**arrays, key: np.array([{"a": 1}] * 3, dtype=object)}), True),
    "truncate": _truncate_npz,
    "flip": _flip_npz,
    "empty file": lambda draw, arrays, key: (b"", True),
    "huge header": lambda draw, arrays, key: (_with_header(arrays, key, "(1599999999984,)"), True),  # ~6 TiB
}


@st.composite
def npz_files(draw):
    """(bytes, must_fail, what): the tiny 16-feature, 4-class set with zero or one mutation; must_fail True (must
    be refused), False (must train) or None (either is right)."""
    arrays = tiny_arrays(draw(st.integers(2, 30)), draw(st.integers(1, 10)))
    key, kind = draw(st.sampled_from(sorted(arrays))), draw(st.sampled_from(sorted(NPZ_MUTATIONS)))
    raw, must_fail = NPZ_MUTATIONS[kind](draw, arrays, key)
    return raw, must_fail, f"{kind} {key}"


def _with_header(arrays: dict, key: str, shape: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for k, v in arrays.items():
            member = io.BytesIO()
            np.save(member, v)
            data = member.getvalue()
            if k == key:  # same header length: numpy pads it with spaces to a multiple of 64
                head_len = struct.unpack("<H", data[8:10])[0]
                head = data[10:10 + head_len].decode("latin1")
                start, end = head.index("(") , head.index(")") + 1
                new = (head[:start] + shape + head[end:]).ljust(head_len - 1)[:head_len - 1] + "\n"
                data = data[:10] + new.encode("latin1") + data[10 + head_len:]
            z.writestr(f"{k}.npy", data)
    return out.getvalue()


@FUZZ
@given(case=npz_files())
def test_corrupted_npz_files_end_in_a_clean_error(tmp_path, case):
    raw, must_fail, what = case
    folder = case_dir(tmp_path, raw)
    path = write(folder / "data.npz", raw)
    r = _train(TINY_MODEL, folder, "--npz", path)
    if must_fail:
        assert r.code == 1, f"trained on broken npz data ({what})"
    elif must_fail is False:
        assert r.code == 0, f"refused valid npz data ({what}): {r.err}"


# ---------------------------------------------------------------------------------------------------- run folders

RECORD_EDITS = {  # a damaged line of metrics.jsonl -> must `plot` refuse it?
    "torn line": (lambda line: line[: len(line) // 2], True),
    "blank line": (lambda line: "", False),
    "empty object": (lambda line: "{}", True),
    "a list": (lambda line: "[1, 2]", True),
    "a number": (lambda line: "1", True),
    "null": (lambda line: "null", True),
    "no losses": (lambda line: line.replace('"losses"', '"losses_"'), True),
    "text metric": (lambda line: line.replace('"test_accuracy": ', '"test_accuracy": "x", "_": '), True),
    "epoch as text": (lambda line: line.replace('"epoch": ', '"epoch": "1", "_": '), True),
    "renamed layer": (lambda line: line.replace('"h1"', '"h9"'), True),
    "NaN loss": (lambda line: re.sub(r'"reco0": [^,}]+', '"reco0": NaN', line), False),
    "duplicate": (lambda line: line + "\n" + line, False),
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run-fuzz")
    model, npz = write(root / "tiny.py", TINY_MODEL), write_npz(root / "tiny.npz")
    assert_clean(cli("train", model, "--npz", npz, "--out", root / "run", "--epochs", "2"), codes=(0,))
    return root, model, npz


@settings(FUZZ, max_examples=max(3, settings.default.max_examples // 5))  # ~1.5 s of figures when the run is fine
@given(edit=st.sampled_from(sorted(RECORD_EDITS)), line=st.integers(0, 1), checkpoint=st.sampled_from(
    ["keep", "torn", "missing", "weights file"]))
def test_damaged_run_folders_plot_or_end_in_a_clean_error(trained_run, tmp_path, edit, line, checkpoint):
    """What a killed or hand-edited run leaves behind: `bsdgraph plot` draws it or says which line or file is
    wrong (a torn metrics line is what a kill in the middle of its append leaves)."""
    root, model, npz = trained_run
    run = case_dir(tmp_path, edit, line, checkpoint)
    shutil.rmtree(run)
    shutil.copytree(root / "run", run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    change, must_fail = RECORD_EDITS[edit]
    lines[line] = change(lines[line])
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    ck = run / "checkpoint.pt"
    if checkpoint == "torn":
        ck.write_bytes(ck.read_bytes()[:200])
    elif checkpoint == "missing":
        ck.unlink()
    elif checkpoint == "weights file":  # what import-nir writes next to a model: weights, no training state
        save_checkpoint(ck, {"kind": "bsdgraph.weights", "params": {}, "state": {}})
    r = assert_clean(cli("plot", run, "--model", model, "--npz", npz), codes=(0, 1))
    event(f"exit {r.code}")
    if must_fail or checkpoint in ("torn", "weights file"):
        assert r.code == 1, f"plotted a damaged run ({edit}, checkpoint {checkpoint})"
    else:
        assert r.code == 0, r.err


REGRESSION_MODEL = '''
from bsdgraph import GraphBuilder
def build():
    g = GraphBuilder("reg", T=2)
    h = g.lif(g.linear(g.input((16,)), 8))
    g.output(g.linear(h, 3), task="regression")
    return g.build()
'''


@pytest.mark.parametrize("width, backend, code, message", [
    (3, "reference", 0, "done: test MSE"),
    (3, "cpu", 0, "done: test MSE"),  # ReCo gets labels only for negatives='other_class' (was defect 9)
    (1, "reference", 1, "the model's output gives 3 value(s) per sample but y_train holds 1"),
    (4, "reference", 1, "the model's output gives 3 value(s) per sample but y_train holds 4"),
])
def test_regression_targets_fit_the_output_or_end_in_a_clean_error(tmp_path, width, backend, code, message):
    rng = np.random.default_rng(0)
    arrays = {f"x_{s}": rng.random((n, 16), np.float32) for s, n in (("train", 12), ("test", 4))}
    arrays |= {f"y_{s}": rng.random((n, width) if width > 1 else (n,), np.float32) for s, n in (("train", 12),
                                                                                              ("test", 4))}
    model, npz = write(tmp_path / "reg.py", REGRESSION_MODEL), write_npz(tmp_path / "reg.npz", arrays)
    r = assert_clean(cli("train", model, "--npz", npz, "--out", tmp_path / "run", "--epochs", "1", "--backend",
                         backend), codes=(code,))
    assert message in r.err, r.err
