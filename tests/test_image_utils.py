"""Tests of improved_diffusion.image_utils: uint8 conversion, grids, PNG files."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from improved_diffusion.image_utils import (
    grid_path_for,
    make_grid,
    save_png,
    save_sample_grid,
    to_uint8_nhwc,
)


def _images(n, h=4, w=5, c=3):
    rng = np.random.default_rng(n)
    return rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def test_to_uint8_nhwc_uses_the_original_formula():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).reshape(1, 1, 1, 7).repeat(2, 3, 1, 1)
    x[1] *= -1
    out = to_uint8_nhwc(x)
    assert out.dtype == np.uint8
    assert out.shape == (2, 1, 7, 3)
    # ((x + 1) * 127.5).clamp(0, 255) truncated to uint8, computed independently in float64.
    expected = np.clip((x.double().numpy() + 1) * 127.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 0, 63, 127, 254, 255, 255])


def test_to_uint8_nhwc_moves_channels_last():
    x = torch.rand(3, 3, 6, 5) * 2 - 1
    out = to_uint8_nhwc(x)
    assert out.shape == (3, 6, 5, 3)
    np.testing.assert_array_equal(out[:, :, :, 1], to_uint8_nhwc(x[:, 1:2])[..., 0])


def test_to_uint8_nhwc_rejects_non_4d():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        to_uint8_nhwc(torch.zeros(3, 4, 4))


def test_make_grid_layout_and_padding():
    images = _images(5)
    grid = make_grid(images, nrow=3, padding=2, pad_value=7)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (5 + 2) + 2, 3)
    for i in range(5):
        row, col = divmod(i, 3)
        top, left = 2 + row * 6, 2 + col * 7
        np.testing.assert_array_equal(grid[top : top + 4, left : left + 5], images[i])
    # The missing sixth cell and all separators hold the pad value.
    np.testing.assert_array_equal(grid[8:12, 16:21], np.full((4, 5, 3), 7, np.uint8))
    np.testing.assert_array_equal(grid[:2], np.full((2, grid.shape[1], 3), 7, np.uint8))


def test_make_grid_default_is_square_ish_and_no_padding_concatenates():
    images = _images(4, h=2, w=2)
    assert make_grid(images).shape == (2 * 4 + 2, 2 * 4 + 2, 3)
    tiled = make_grid(images, nrow=2, padding=0)
    expected = np.concatenate(
        [np.concatenate([images[0], images[1]], axis=1), np.concatenate([images[2], images[3]], axis=1)], axis=0
    )
    np.testing.assert_array_equal(tiled, expected)
    # A single row never gets wider than the number of images.
    assert make_grid(_images(2), nrow=8, padding=0).shape == (4, 10, 3)


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((2, 4, 4), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.float32), "dtype"),
        (np.zeros((0, 4, 4, 3), np.uint8), "at least one"),
    ],
)
def test_make_grid_rejects_bad_input(images, match):
    with pytest.raises(ValueError, match=match):
        make_grid(images)


def test_save_png_round_trips_and_leaves_no_temp_files(tmp_path):
    array = _images(1, h=6, w=7)[0]
    folder = tmp_path / "out"
    save_png(str(folder / "x.png"), array)
    with Image.open(folder / "x.png") as im:
        assert im.format == "PNG"
        np.testing.assert_array_equal(np.asarray(im), array)
    assert os.listdir(folder) == ["x.png"]


def test_save_png_greyscale(tmp_path):
    array = _images(1, c=1)[0]
    save_png(str(tmp_path / "g.png"), array)
    with Image.open(tmp_path / "g.png") as im:
        np.testing.assert_array_equal(np.asarray(im), array[..., 0])


def test_grid_path_for():
    assert grid_path_for("/a/samples_4x8x8x3.npz") == "/a/samples_4x8x8x3.png"
    assert grid_path_for("/a/samples_4x8x8x3") == "/a/samples_4x8x8x3.png"


def test_save_sample_grid_beside_npz(tmp_path):
    images = _images(6)
    path = save_sample_grid(str(tmp_path / "samples_6x4x5x3.npz"), images)
    assert path == str(tmp_path / "samples_6x4x5x3.png")
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im), make_grid(images))


def test_save_sample_grid_rows_by_label(tmp_path):
    images = _images(5)
    labels = np.array([3, 1, 3, 3, 1])
    path = save_sample_grid(str(tmp_path / "s"), images, labels=labels, rows_by_label=True)
    with Image.open(path) as im:
        grid = np.asarray(im)
    # Row 0 = class 1 (images 1, 4, blank), row 1 = class 3 (images 0, 2, 3).
    blank = np.zeros_like(images[0])
    expected = make_grid(np.stack([images[1], images[4], blank, images[0], images[2], images[3]]), nrow=3)
    np.testing.assert_array_equal(grid, expected)


def test_save_sample_grid_rows_by_label_needs_matching_labels(tmp_path):
    with pytest.raises(ValueError, match="needs labels"):
        save_sample_grid(str(tmp_path / "s"), _images(2), rows_by_label=True)
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        save_sample_grid(str(tmp_path / "s"), _images(3), labels=[0, 1], rows_by_label=True)
