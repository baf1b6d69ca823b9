"""
What the data set scripts in this folder share: writing a whole image folder safely, with a
progress bar, in the layout ``image_datasets.load_data`` reads.

A folder is written under a temporary sibling name and renamed into place only when every
image is written, so an interrupted run never leaves a half data set that training would
silently use. File names are ``{label}_{index}.png``: with ``--class_cond True`` the training
script takes the class from the part before the first ``_`` (see SPEC "Data folders").
"""

import argparse
import os
import shutil
from collections.abc import Iterable

import numpy as np

from improved_diffusion.errors import UserError

STAGING_SUFFIX = ".partial"


def add_output_args(parser: argparse.ArgumentParser, default_out_dir: str) -> None:
    """Add ``--out_dir`` and ``--overwrite``, the output flags every data set script takes."""
    parser.add_argument(
        "--out_dir",
        default=default_out_dir,
        help="folder to create (default: %(default)s)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out_dir when it already holds files (default: refuse)",
    )


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """
    Refuse early to write into a folder that already holds files, unless ``overwrite``.

    :raises UserError: naming the folder and the flag that allows replacing it.
    """
    if os.path.isfile(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file, expected a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UserError(f"--out_dir {out_dir} already holds files; pass --overwrite to replace it")


def write_image_folder(
    out_dir: str,
    images: Iterable[tuple[str, np.ndarray]],
    total: int | None = None,
    desc: str = "writing",
    overwrite: bool = False,
) -> int:
    """
    Write named images as PNG files into a new folder, atomically as a whole.

    The images are written into ``{out_dir}.partial`` (removed first if a previous run left
    it), which is then renamed to ``out_dir``; an existing ``out_dir`` is replaced only with
    ``overwrite``.

    :param out_dir: the folder to create.
    :param images: ``(file_name, array)`` pairs; each array is (H, W) or (H, W, 3) uint8.
    :param total: number of images, for the progress bar (optional).
    :param desc: progress bar label.
    :param overwrite: replace an existing non-empty ``out_dir``.
    :return: the number of images written.
    :raises UserError: if ``out_dir`` holds files and ``overwrite`` is false, or nothing was written.
    """
    from PIL import Image
    from tqdm import tqdm

    check_out_dir(out_dir, overwrite)
    out_dir = os.path.normpath(out_dir)
    staging = out_dir + STAGING_SUFFIX
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    count = 0
    try:
        for name, array in tqdm(images, total=total, desc=desc, unit="img"):
            Image.fromarray(np.ascontiguousarray(array)).save(os.path.join(staging, name), format="PNG")
            count += 1
        if count == 0:
            raise UserError(f"no images to write into {out_dir}")
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return count


def positive_int(flag: str, value: int, allow_zero: bool = False) -> int:
    """Check a count flag: positive (or zero when ``allow_zero``, meaning "no limit")."""
    if value < 0 or (value == 0 and not allow_zero):
        expected = "a non-negative integer (0 = no limit)" if allow_zero else "a positive integer"
        raise UserError(f"{flag} must be {expected}, got {value}")
    return value
