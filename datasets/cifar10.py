"""
Write CIFAR-10 as class-labelled image folders ``train/`` and ``test/`` of
``{class}_{index:05d}.png`` (class = ``airplane``, ``automobile``, ... from ``batches.meta``;
index = position in the split, from 0).

Reads the standard python archive ``cifar-10-python.tar.gz`` (``cifar-10-batches-py/``
``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``: pickled dicts with
bytes keys, ``b"data"`` an (N, 3072) uint8 array of channel-major 32x32 images, ``b"labels"``
a list of ints). The archive may come from anywhere, so it is unpickled with an allowlist:
only the few NumPy functions that rebuild an array are accepted, anything else is refused.
``--download`` fetches the archive through torchvision (optional: ``pip install torchvision``)
when no local copy is given.

Example::

    python datasets/cifar10.py --archive cifar-10-python.tar.gz --out_dir data/cifar10
    python scripts/image_train.py --data_dir data/cifar10/train --image_size 32 ...
"""

import argparse
import io
import os
import pickle
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dataset_util import add_output_args, check_out_dir, write_image_folder

from improved_diffusion.errors import UserError, run_main

ARCHIVE_NAME = "cifar-10-python.tar.gz"
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
META = "batches.meta"
SIDE = 32

# The globals an array pickle needs (NumPy 1 and 2 spell the module differently; Python 3
# pickles of bytes at protocol 2 go through _codecs.encode). Nothing else may be loaded.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
    ("numpy.core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
    ("numpy._core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
    ("_codecs", "encode"): __import__("codecs").encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds NumPy arrays and plain containers, and refuses everything else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def safe_unpickle(data: bytes, source: str) -> Any:
    """
    Unpickle CIFAR batch data (bytes keys and strings kept as bytes) with the allowlist above.

    :raises UserError: naming ``source`` when the data is not such a pickle or needs other globals.
    """
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # pickle raises many types for corrupt data
        raise UserError(f"could not unpickle {source}: {exc}") from exc


def read_cifar_archive(
    path: str,
) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """
    Read every split of a CIFAR-10 python archive.

    :param path: ``cifar-10-python.tar.gz`` (any tar compression).
    :return: ``(class_names, splits)``: the 10 names in label order, and for ``"train"`` and
        ``"test"`` a pair (N, 32, 32, 3) uint8 images and (N,) int64 labels.
    :raises UserError: naming the archive and member for a missing, truncated or malformed archive.
    """
    if not os.path.isfile(path):
        raise UserError(f"--archive {path} does not exist")
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            needed = [META] + [name for names in SPLITS.values() for name in names]
            missing = [name for name in needed if name not in members]
            if missing:
                raise UserError(f"--archive {path} is not a CIFAR-10 python archive: no {', '.join(missing)}")
            blobs = {name: tar.extractfile(members[name]).read() for name in needed}
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"could not read --archive {path}: {exc}") from exc
    class_names = _class_names(blobs[META], f"{path}:{META}")
    splits = {}
    for split, names in SPLITS.items():
        batches = [_read_batch(blobs[name], f"{path}:{name}", len(class_names)) for name in names]
        splits[split] = (
            np.concatenate([b[0] for b in batches]),
            np.concatenate([b[1] for b in batches]),
        )
    return class_names, splits


def _class_names(data: bytes, source: str) -> list[str]:
    meta = safe_unpickle(data, source)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names:
        raise UserError(f"{source} has no list b'label_names'")
    decoded = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    if any(not n or "_" in n or os.sep in n for n in decoded):
        raise UserError(f"{source}: class names must be non-empty, without '_' or '{os.sep}': {decoded}")
    return decoded


def _read_batch(data: bytes, source: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_unpickle(data, source)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise UserError(f"{source} is not a CIFAR batch (a dict with b'data' and b'labels')")
    pixels = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64).reshape(-1)
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * SIDE * SIDE:
        raise UserError(f"{source}: b'data' must be (N, {3 * SIDE * SIDE}) uint8, got {pixels.dtype} {pixels.shape}")
    if len(labels) != len(pixels):
        raise UserError(f"{source}: {len(labels)} labels for {len(pixels)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{source}: labels must lie in 0..{num_classes - 1}")
    # Stored channel-major: (N, 3, 32, 32) -> (N, 32, 32, 3).
    return pixels.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1), labels


def download_archive(root: str) -> str:
    """
    Download ``cifar-10-python.tar.gz`` into ``root`` through torchvision and return its path.

    :raises UserError: when torchvision is missing or the download fails.
    """
    try:
        from torchvision.datasets import CIFAR10
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise UserError(f"--download needs torchvision (pip install torchvision): {exc}") from exc
    try:
        CIFAR10(root=root, train=True, download=True)
    except Exception as exc:  # network errors come in many types
        raise UserError(f"could not download CIFAR-10 through torchvision: {exc}") from exc
    return os.path.join(root, ARCHIVE_NAME)


def write_cifar_folders(archive: str, out_dir: str, overwrite: bool = False) -> dict[str, int]:
    """
    Write ``out_dir/train`` and ``out_dir/test`` from a CIFAR-10 python archive.

    :return: images written per split.
    """
    for split in SPLITS:
        check_out_dir(os.path.join(out_dir, split), overwrite)
    class_names, splits = read_cifar_archive(archive)
    counts = {}
    for split, (images, labels) in splits.items():

        def named(images: np.ndarray = images, labels: np.ndarray = labels) -> Iterator[tuple[str, np.ndarray]]:
            for index, (image, label) in enumerate(zip(images, labels)):
                yield f"{class_names[label]}_{index:05d}.png", image

        counts[split] = write_image_folder(
            os.path.join(out_dir, split),
            named(),
            total=len(images),
            desc=split,
            overwrite=overwrite,
        )
    return counts


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", default="", help=f"local {ARCHIVE_NAME}")
    parser.add_argument("--download", action="store_true", help="fetch the archive through torchvision")
    add_output_args(parser, os.path.join("data", "cifar10"))
    return parser


def main() -> None:
    args = create_argparser().parse_args()
    if bool(args.archive) == args.download:
        raise UserError(f"give exactly one of --archive PATH (a local {ARCHIVE_NAME}) or --download")
    if args.archive:
        counts = write_cifar_folders(args.archive, args.out_dir, args.overwrite)
    else:
        with tempfile.TemporaryDirectory() as root:
            counts = write_cifar_folders(download_archive(root), args.out_dir, args.overwrite)
    print(", ".join(f"wrote {n} {split} images to {os.path.join(args.out_dir, split)}" for split, n in counts.items()))


if __name__ == "__main__":
    run_main(main)
