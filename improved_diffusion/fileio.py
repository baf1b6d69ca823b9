"""
Safe reading and writing of the files users keep: checkpoints, sample archives, images, JSON.

Every write goes to a temporary name in the destination folder, is flushed to disk, and is
then renamed over the destination (``os.replace``), so a crash or a full disk never leaves a
half-written file under the real name, and the previous file stays intact. Every
``torch.load`` of a file that may come from someone else uses ``weights_only=True``, and
every failure to read names the file.
"""

import io
import json
import os
import tempfile
from typing import Any, BinaryIO, Callable, Iterable

import blobfile as bf
import numpy as np
import torch

from .errors import UserError

TMP_PREFIX = ".tmp-"


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """
    Write a file so that ``path`` holds either its old content or the complete new one.

    :param path: destination path (local file system).
    :param write: called with a binary file object open on a temporary file in the same folder.
    :raises UserError: if the write fails (for example a full disk); the temporary file is removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise UserError(f"could not write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        remove_quietly(tmp)
        raise


def remove_quietly(path: str) -> None:
    """Delete ``path`` if it exists; errors (already gone, no permission) are ignored."""
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_npz(path: str, *arrays: np.ndarray) -> None:
    """``np.savez(path, *arrays)`` (keys ``arr_0``, ``arr_1``, ...) through :func:`atomic_write`."""
    atomic_write(path, lambda f: np.savez(f, *arrays))


def atomic_save_json(obj: Any, path: str) -> None:
    """Write ``obj`` as indented, key-sorted JSON through :func:`atomic_write`."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_bytes(path: str) -> bytes:
    """Read a whole file (local or any blobfile URL); a missing or unreadable file is a UserError."""
    try:
        with bf.BlobFile(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise UserError(f"file not found: {path}") from exc
    except OSError as exc:
        raise UserError(f"could not read {path}: {exc}") from exc


def torch_load_bytes(data: bytes, path: str, **kwargs: Any) -> Any:
    """
    Deserialize a checkpoint read from ``path`` with ``weights_only=True``.

    A file that needs arbitrary unpickling is refused (nothing of it runs), and a truncated,
    empty or corrupt file gives a UserError that names ``path``.
    """
    kwargs.setdefault("map_location", "cpu")
    kwargs["weights_only"] = True
    if len(data) == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes)")
    try:
        return torch.load(io.BytesIO(data), **kwargs)
    except Exception as exc:  # torch raises several unrelated types for bad files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UserError(
                f"refusing to load {path}: it holds pickled Python objects, not only tensors "
                "(only weights_only files are loaded)"
            ) from exc
        raise UserError(f"could not load checkpoint {path} (truncated or corrupt?): {msg}") from exc


def safe_torch_load(path: str, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file."""
    return torch_load_bytes(read_bytes(path), path, **kwargs)


def remove_stale_temporaries(folder: str, names: Iterable[str] = ("model", "ema_", "opt", "state")) -> int:
    """
    Delete temporaries left by writes that were killed mid-way (``.tmp-<name>...`` files made by
    :func:`atomic_write`) whose destination name starts with one of ``names``. Call it from the
    one process that writes, before writing. Returns how many files were removed.
    """
    removed = 0
    try:
        entries = os.listdir(folder)
    except OSError:
        return 0
    for entry in entries:
        if entry.startswith(TMP_PREFIX) and entry[len(TMP_PREFIX) :].startswith(tuple(names)):
            try:
                os.remove(os.path.join(folder, entry))
                removed += 1
            except OSError:
                pass
    return removed
