"""
Write an LSUN category (bedrooms by default) from its LMDB export as an image folder of
``{prefix}_{index:07d}.png`` files at ``--image_size``.

The LMDB export (e.g. ``bedroom_train_lmdb/``) maps keys to encoded images (WebP or JPEG),
decoded here with Pillow. Each image is resized and centre-cropped as the training data
loader does (box-filter halving, bicubic resize of the shorter side, centre square), so the
folder can be used at that size without further loss. Needs the optional ``lmdb`` package:
``pip install lmdb``.

Example::

    python datasets/lsun_bedroom.py --lmdb_path bedroom_train_lmdb --out_dir data/lsun_bedroom \\
        --image_size 256 --max_images 100000
"""

import argparse
import io
import os
import sys
from collections.abc import Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dataset_util import (
    add_output_args,
    check_out_dir,
    positive_int,
    write_image_folder,
)

from improved_diffusion.errors import UserError, run_main
from improved_diffusion.image_datasets import center_crop_arr


def _import_lmdb():
    try:
        import lmdb
    except ImportError:
        raise UserError("reading LSUN needs the lmdb package: pip install lmdb") from None
    return lmdb


def decode_image(value: bytes, image_size: int, key: bytes) -> np.ndarray:
    """
    Decode one LMDB value and bring it to ``image_size`` (resize, centre crop).

    :return: (image_size, image_size, 3) uint8.
    :raises UserError: naming the key when the value is not an image Pillow can read.
    """
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(value))
        image.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad data
        raise UserError(
            f"LMDB value for key {key.decode('utf-8', 'replace')!r} is not a readable image: {exc}"
        ) from exc
    return center_crop_arr(image.convert("RGB"), image_size)


def iter_lmdb_images(lmdb_path: str, image_size: int, max_images: int = 0) -> Iterator[tuple[bytes, np.ndarray]]:
    """
    Yield ``(key, image)`` for the first ``max_images`` entries (all when 0), in key order.

    :raises UserError: for a missing path or a folder that is not an LMDB environment.
    """
    lmdb = _import_lmdb()
    if not os.path.exists(lmdb_path):
        raise UserError(f"--lmdb_path {lmdb_path} does not exist")
    try:
        env = lmdb.open(
            lmdb_path,
            readonly=True,
            lock=False,
            readahead=False,
            max_readers=1,
            subdir=os.path.isdir(lmdb_path),
        )
    except lmdb.Error as exc:
        raise UserError(f"--lmdb_path {lmdb_path} is not an LMDB database: {exc}") from exc
    try:
        with env.begin(write=False) as txn:
            for count, (key, value) in enumerate(txn.cursor()):
                if max_images and count >= max_images:
                    break
                yield key, decode_image(value, image_size, key)
    finally:
        env.close()


def lmdb_length(lmdb_path: str) -> int:
    """The number of entries in the LMDB at ``lmdb_path`` (0 if it cannot be opened)."""
    lmdb = _import_lmdb()
    try:
        env = lmdb.open(
            lmdb_path,
            readonly=True,
            lock=False,
            max_readers=1,
            subdir=os.path.isdir(lmdb_path),
        )
    except lmdb.Error:
        return 0
    try:
        return env.stat()["entries"]
    finally:
        env.close()


def write_lsun_folder(
    lmdb_path: str,
    out_dir: str,
    image_size: int = 256,
    max_images: int = 0,
    prefix: str = "bedroom",
    overwrite: bool = False,
) -> int:
    """
    Write ``{prefix}_{index:07d}.png`` files (index from 0 in key order) into ``out_dir``.

    :return: the number of images written.
    """
    positive_int("--image_size", image_size)
    positive_int("--max_images", max_images, allow_zero=True)
    if not prefix or "_" in prefix or os.sep in prefix:
        raise UserError(f"--prefix must be non-empty without '_' or '{os.sep}', got {prefix!r}")
    _import_lmdb()
    check_out_dir(out_dir, overwrite)
    total = lmdb_length(lmdb_path) if os.path.exists(lmdb_path) else 0
    if max_images:
        total = min(total, max_images)

    def named() -> Iterator[tuple[str, np.ndarray]]:
        for index, (_, image) in enumerate(iter_lmdb_images(lmdb_path, image_size, max_images)):
            yield f"{prefix}_{index:07d}.png", image

    return write_image_folder(out_dir, named(), total=total or None, desc=prefix, overwrite=overwrite)


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lmdb_path",
        required=True,
        help="the LMDB export folder, e.g. bedroom_train_lmdb",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=256,
        help="side of the written images (default: %(default)s)",
    )
    parser.add_argument(
        "--max_images",
        type=int,
        default=0,
        help="stop after this many images (0 = all)",
    )
    parser.add_argument(
        "--prefix",
        default="bedroom",
        help="file name prefix, read as the class (default: %(default)s)",
    )
    add_output_args(parser, os.path.join("data", "lsun_bedroom"))
    return parser


def main() -> None:
    args = create_argparser().parse_args()
    count = write_lsun_folder(
        args.lmdb_path,
        args.out_dir,
        args.image_size,
        args.max_images,
        args.prefix,
        args.overwrite,
    )
    print(f"wrote {count} images to {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
