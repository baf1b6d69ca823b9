"""
Turning model outputs into image files: the original's ``[-1, 1] -> uint8`` conversion, a
grid of samples, and atomic PNG writing (Pillow only, no torchvision).

Sample archives (``samples_{N}x{H}x{W}x3.npz``) hold uint8 NHWC arrays exactly as the
original wrote them; :func:`save_sample_grid` puts a PNG preview of the first samples beside
such an archive (same stem, ``.png``).
"""

import math
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .fileio import atomic_write


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """
    Convert model samples in ``[-1, 1]`` to the bytes the original stores in sample archives.

    Uses the original's formula ``((x + 1) * 127.5).clamp(0, 255)`` followed by a cast to
    uint8 (which truncates toward zero), then moves channels last.

    :param x: (N, C, H, W) float tensor, nominally in ``[-1, 1]``, on any device.
    :return: (N, H, W, C) uint8 NumPy array.
    """
    if x.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    pixels = ((x.detach().float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _check_nhwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected uint8 images of shape (N, H, W, C) with C in 1/2/3/4, got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got dtype {images.dtype}")
    return images


def make_grid(
    images: np.ndarray,
    nrow: Optional[int] = None,
    padding: int = 2,
    pad_value: int = 0,
) -> np.ndarray:
    """
    Tile images into one picture, row by row, with ``padding`` pixels between and around them.

    :param images: (N, H, W, C) uint8 array, N >= 1.
    :param nrow: images per row; default ``ceil(sqrt(N))`` (a square-ish grid).
    :param padding: pixels of ``pad_value`` between neighbours and along the border.
    :param pad_value: grey level 0..255 of the padding.
    :return: (rows * (H + padding) + padding, nrow * (W + padding) + padding, C) uint8 array.
    """
    images = _check_nhwc(images)
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    if nrow is None:
        nrow = int(math.ceil(math.sqrt(n)))
    if nrow <= 0 or padding < 0:
        raise ValueError(f"nrow must be positive and padding non-negative, got nrow={nrow}, padding={padding}")
    ncol = min(nrow, n)
    nrows = int(math.ceil(n / nrow))
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    for i in range(n):
        row, col = divmod(i, nrow)
        top = padding + row * (h + padding)
        left = padding + col * (w + padding)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def save_png(path: str, array: np.ndarray) -> None:
    """
    Write an image atomically as PNG.

    :param path: destination file.
    :param array: (H, W, C) uint8 with C in 1/2/3/4, or (H, W) uint8 (greyscale).
    """
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W) or (H, W, C) array, got {array.dtype} {array.shape}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    image = Image.fromarray(np.ascontiguousarray(array))
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def grid_path_for(npz_path_or_stem: str) -> str:
    """The PNG preview path for a sample archive: the same stem with ``.png``."""
    stem, ext = os.path.splitext(npz_path_or_stem)
    return (stem if ext.lower() == ".npz" else npz_path_or_stem) + ".png"


def _rows_by_label(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Lay out one row per distinct label (ascending), blank cells where a row is short."""
    classes = sorted(set(int(y) for y in labels))
    rows = [np.flatnonzero(labels == y) for y in classes]
    width = max(len(r) for r in rows)
    cells = np.zeros((len(classes) * width,) + images.shape[1:], dtype=np.uint8)
    for r, idx in enumerate(rows):
        cells[r * width : r * width + len(idx)] = images[idx]
    return make_grid(cells, nrow=width)


def save_sample_grid(
    npz_path_or_stem: str,
    images: np.ndarray,
    labels: Optional[Union[np.ndarray, Sequence[int]]] = None,
    rows_by_label: bool = False,
) -> str:
    """
    Save a PNG grid of ``images`` beside a sample archive (``x.npz`` or stem ``x`` -> ``x.png``).

    :param npz_path_or_stem: the archive path, or its path without extension.
    :param images: (N, H, W, C) uint8; pass only the samples that should appear.
    :param labels: (N,) int class labels, needed when ``rows_by_label``.
    :param rows_by_label: one row per class (ascending label), in sample order within a row.
    :return: the PNG path written.
    """
    images = _check_nhwc(images)
    if rows_by_label:
        if labels is None:
            raise ValueError("rows_by_label needs labels")
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"got {len(labels)} labels for {len(images)} images")
        grid = _rows_by_label(images, labels)
    else:
        grid = make_grid(images)
    path = grid_path_for(npz_path_or_stem)
    save_png(path, grid)
    return path
