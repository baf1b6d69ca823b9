"""Tests of the training image loader: listing, labels, sharding, preprocessing, errors, resume."""

import gc
import multiprocessing

import numpy as np
import pytest
import torch
from PIL import Image

from improved_diffusion.errors import UserError
from improved_diffusion.image_datasets import (
    center_crop_arr,
    class_labels,
    list_image_files,
    load_data,
    random_crop_arr,
    read_image,
)

ATOL = 1e-6


def _write(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    """Six 12x10 RGB images in two classes, one in a subfolder, plus a non-image file."""
    root = tmp_path / "data"
    for i, name in enumerate(["cat_0.png", "cat_1.JPG", "dog_0.png", "dog_1.jpeg", "sub/dog_2.png", "cat_2.gif"]):
        _write(root / name, _rgb(12, 10, seed=i))
    (root / "notes.txt").write_text("not an image")
    return root


def _load(folder, **kw):
    args = dict(data_dir=str(folder), batch_size=2, image_size=8, rank=0, world_size=1)
    args.update(kw)
    return load_data(**args)


def test_listing_is_recursive_sorted_and_case_insensitive(folder):
    names = [p[len(str(folder)) + 1 :] for p in list_image_files(str(folder))]
    assert names == ["cat_0.png", "cat_1.JPG", "cat_2.gif", "dog_0.png", "dog_1.jpeg", "sub/dog_2.png"]


def test_class_labels_from_prefix():
    assert class_labels(["a/zebra_1.png", "b/ant_x_y.png", "zebra_2.png"]) == [1, 0, 1]


def test_batches_shape_range_and_labels(folder):
    data = _load(folder, class_cond=True, deterministic=True, batch_size=3)
    images, cond = next(data)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(cond["y"], torch.tensor([0, 0, 0]))
    assert next(data)[1]["y"].tolist() == [1, 1, 1]
    assert next(data)[1]["y"].tolist() == [0, 0, 0]  # endless: the next epoch starts over
    assert next(_load(folder))[1] == {}


def test_preprocessing_matches_the_rule(tmp_path):
    # 40x24 image, target 8: box-halve to 20x12 (12 >= 16 is false afterwards), bicubic to
    # 13x8, centre crop columns 2..10.
    arr = _rgb(24, 40, seed=3)
    path = _write(tmp_path / "d" / "x.png", arr)
    image = Image.fromarray(arr).resize((20, 12), resample=Image.BOX)
    image = image.resize((13, 8), resample=Image.BICUBIC)
    expected = np.asarray(image)[:, 2:10].astype(np.float32) / 127.5 - 1
    images, _ = next(load_data(data_dir=str(path.parent), batch_size=1, image_size=8, rank=0, world_size=1))
    np.testing.assert_allclose(images[0].numpy(), expected.transpose(2, 0, 1), atol=ATOL)


def test_small_images_are_upscaled(tmp_path):
    path = _write(tmp_path / "d" / "x.png", _rgb(4, 6))
    assert center_crop_arr(read_image(str(path)), 16).shape == (16, 16, 3)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16"])
def test_modes_convert_to_rgb(tmp_path, mode):
    gray = np.full((8, 8), 200, dtype=np.uint8)
    if mode == "I;16":
        image = Image.fromarray(np.full((8, 8), 200 * 257, dtype=np.uint16))
        assert image.mode == "I;16"
    elif mode == "P":
        image = Image.fromarray(np.stack([gray] * 3, -1)).convert("P", palette=Image.ADAPTIVE)
    elif mode == "RGBA":
        image = Image.fromarray(np.dstack([gray, gray, gray, np.full_like(gray, 128)]), "RGBA")
    else:
        image = Image.fromarray(gray, "L")
    image.save(tmp_path / "x.png")
    out = np.asarray(read_image(str(tmp_path / "x.png")))
    np.testing.assert_array_equal(out, np.full((8, 8, 3), 200, dtype=np.uint8))


def test_sharding_takes_every_nth_file(folder):
    seen = []
    for rank in range(3):
        data = _load(folder, deterministic=True, batch_size=2, rank=rank, world_size=3)
        seen.append(data.dataset.local_images)
    files = list_image_files(str(folder))
    assert seen == [files[0::3], files[1::3], files[2::3]]


def test_shuffle_is_seeded_and_resumable(folder):
    a = _load(folder, random_flip=True, seed=5)
    batches = [next(a)[0] for _ in range(7)]  # crosses two epoch boundaries
    b = _load(folder, random_flip=True, seed=5)
    for expected in batches[:3]:
        torch.testing.assert_close(next(b)[0], expected, rtol=0, atol=0)
    state = b.state_dict()
    c = _load(folder, random_flip=True, seed=5)
    c.load_state_dict(state)
    for expected in batches[3:]:
        torch.testing.assert_close(next(c)[0], expected, rtol=0, atol=0)
    other_seed = torch.cat([next(_load(folder, seed=6))[0] for _ in range(3)])
    assert not torch.equal(other_seed, torch.cat(batches[:3]))


def test_random_flip_mirrors(tmp_path):
    _write(tmp_path / "d" / "x.png", _rgb(8, 8))
    plain = next(load_data(data_dir=str(tmp_path / "d"), batch_size=16, image_size=8, rank=0, world_size=1))[0]
    flipped = next(
        load_data(data_dir=str(tmp_path / "d"), batch_size=16, image_size=8, random_flip=True, rank=0, world_size=1)
    )[0]
    is_flip = [torch.equal(f, plain[0].flip(-1)) for f in flipped]
    is_same = [torch.equal(f, plain[0]) for f in flipped]
    assert all(a or b for a, b in zip(is_flip, is_same)) and any(is_flip) and any(is_same)


@pytest.mark.parametrize("size", [(12, 10), (40, 64), (7, 9)])
def test_random_crop_shape_range_and_seed(size):
    image = Image.fromarray(_rgb(*size, seed=3))
    crops = [random_crop_arr(image, 8, np.random.default_rng(seed)) for seed in range(12)]
    assert all(c.shape == (8, 8, 3) and c.dtype == np.uint8 for c in crops)
    np.testing.assert_array_equal(random_crop_arr(image, 8, np.random.default_rng(4)), crops[4])
    assert len({c.tobytes() for c in crops}) > 1  # the side and the place vary with the seed


def test_random_crop_is_a_window_of_the_resized_image():
    """The crop is an 8x8 window of the image resized to a shorter side in [8, ceil(8 / 0.8)] = [8, 10]."""
    image = Image.fromarray(_rgb(12, 20, seed=1))
    for seed in range(8):
        crop = random_crop_arr(image, 8, np.random.default_rng(seed))
        windows = [
            resized[y : y + 8, x : x + 8]
            for side in range(8, 11)
            for resized in [np.asarray(image.resize((round(20 * side / 12), side), resample=Image.BICUBIC))]
            for y in range(resized.shape[0] - 7)
            for x in range(resized.shape[1] - 7)
        ]
        assert any(np.array_equal(crop, w) for w in windows), seed


def test_random_crop_loader_is_seeded_and_resumable(folder):
    a = _load(folder, random_crop=True, seed=2)
    batches = [next(a)[0] for _ in range(5)]
    assert all(b.shape == (2, 3, 8, 8) and b.min() >= -1 and b.max() <= 1 for b in batches)
    b = _load(folder, random_crop=True, seed=2)
    next(b)
    c = _load(folder, random_crop=True, seed=2)
    c.load_state_dict(b.state_dict())
    for expected in batches[1:]:
        torch.testing.assert_close(next(c)[0], expected, rtol=0, atol=0)
    centre = [next(d)[0] for d in [_load(folder, seed=2)] for _ in range(5)]
    assert not all(torch.equal(x, y) for x, y in zip(centre, batches))


def test_workers_give_the_same_batches(folder):
    expected = [next(d)[0] for d in [_load(folder, seed=1)] for _ in range(4)]
    data = _load(folder, seed=1, num_workers=1)
    for batch in expected:
        torch.testing.assert_close(next(data)[0], batch, rtol=0, atol=0)


def test_worker_error_is_one_line(folder):
    (folder / "zz_empty.png").write_bytes(b"")
    data = _load(folder, deterministic=True, batch_size=7, num_workers=1)
    with pytest.raises(UserError, match=r"^could not read image .*zz_empty\.png: the file is empty") as info:
        next(data)
    assert "\n" not in str(info.value)
    del data, info  # the traceback kept the loader in a reference cycle ...
    gc.collect()
    assert multiprocessing.active_children() == []  # ... and its worker still stopped


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "the file is empty"),
        (b"this is text, not a PNG", "cannot identify image file"),
        ("truncated", "truncated|broken|could not read image"),
    ],
)
def test_unreadable_files_are_named(tmp_path, content, match):
    path = tmp_path / "d" / "bad.png"
    if content == "truncated":
        _write(path, _rgb(32, 32))
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.parent.mkdir()
        path.write_bytes(content)
    with pytest.raises(UserError, match=rf"bad\.png.*({match})"):
        next(load_data(data_dir=str(path.parent), batch_size=1, image_size=8, rank=0, world_size=1))


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    _write(tmp_path / "d" / "big.png", _rgb(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UserError, match=r"refusing image .*big\.png: more pixels than PIL.Image.MAX_IMAGE_PIXELS"):
        next(load_data(data_dir=str(tmp_path / "d"), batch_size=1, image_size=8, rank=0, world_size=1))


def test_folder_errors(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    cases = [
        ("", r"--data_dir is empty"),
        (str(tmp_path / "missing"), r"--data_dir .*missing: no such folder"),
        (str(folder / "cat_0.png"), r"--data_dir .*cat_0\.png: not a folder"),
        (str(tmp_path / "empty"), r"--data_dir .*empty: no image files"),
        (str(tmp_path / "texts"), r"--data_dir .*texts: no image files"),
    ]
    for data_dir, match in cases:
        with pytest.raises(UserError, match=match):
            load_data(data_dir=data_dir, batch_size=1, image_size=8, rank=0, world_size=1)


def test_class_cond_needs_underscores(folder):
    _write(folder / "plain.png", _rgb(8, 8))
    with pytest.raises(UserError, match=r"--class_cond needs file names like .*plain\.png has no '_'"):
        _load(folder, class_cond=True)


def test_fewer_images_than_ranks(folder):
    with pytest.raises(UserError, match=r"has 6 image\(s\), fewer than the 8 processes"):
        _load(folder, rank=0, world_size=8)


def test_bad_sizes(folder):
    with pytest.raises(UserError, match=r"--batch_size 0: must be a positive integer"):
        _load(folder, batch_size=0)


def test_rank_defaults_come_from_dist_util(folder, monkeypatch):
    from improved_diffusion import dist_util

    monkeypatch.setattr(dist_util, "get_rank", lambda: 1)
    monkeypatch.setattr(dist_util, "get_world_size", lambda: 2)
    data = load_data(data_dir=str(folder), batch_size=1, image_size=8)
    assert data.dataset.local_images == list_image_files(str(folder))[1::2]


@pytest.mark.cuda
@pytest.mark.parametrize("num_workers", [0, 1])
def test_batches_are_pinned_for_the_gpu(folder, num_workers):
    """Pinned host memory: the trainer's non-blocking copy to the GPU does not wait."""
    batch, cond = next(_load(folder, num_workers=num_workers, class_cond=True))
    assert batch.is_pinned() and cond["y"].is_pinned()
