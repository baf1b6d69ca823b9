"""
scripts/image_evaluate.py end to end on tiny inputs (run in-process, one run as a subprocess):
the table and the JSON beside the samples, .npz / folder / statistics-file sides giving the same
scores, identical sides scoring FID 0 and precision = recall = 1, the warnings (different image
sizes, fewer images than feature dimensions) and one-line errors that leave nothing written.
Feature networks here have random weights: the tests check the plumbing, not the quality.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from seeded_inception import seeded_state_dict

from improved_diffusion.digit_features import CACHE_FORMAT, DigitClassifier
from improved_diffusion.errors import UserError
from improved_diffusion.inception import WEIGHTS_ENV, WEIGHTS_FILE, InceptionV3FID

sys.path.insert(0, os.path.join(REPO, "scripts"))

import image_evaluate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SCORES = ("inception_score", "inception_score_std", "fid", "precision", "recall", "kid", "kid_std")


@pytest.fixture(scope="module")
def digit_cache(tmp_path_factory):
    """A digit classifier cache file with random weights (no training)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("digits") / "classifier.pt"
    torch.save({"format": CACHE_FORMAT, "state_dict": DigitClassifier().state_dict(), "held_out_accuracy": 0.5}, path)
    return str(path)


def _npz(path, n, side=12, channels=1, seed=0, labels=True):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, side, side, channels), dtype=np.uint8)
    arrays = [images, rng.integers(0, 10, size=n)] if labels else [images]
    np.savez(path, *arrays)
    return str(path)


def _run(capsys, *argv):
    image_evaluate.main([str(a) for a in argv])
    return capsys.readouterr()


def _digits(cache, *argv):
    return [*argv, "--features", "digits", "--digit_classifier", cache, "--progress", "False"]


def test_digits_table_and_json_beside_samples(tmp_path, capsys, digit_cache):
    ref = _npz(tmp_path / "ref.npz", 40, seed=0)
    samples = _npz(tmp_path / "samples_30x12x12x1.npz", 30, seed=1)
    out = _run(capsys, *_digits(digit_cache, ref, samples))
    table = out.out.splitlines()
    assert table[1] == "metric (digits features)     value"
    assert [line.split("  ")[0] for line in table[2:9]] == [
        "Inception Score",
        "FID",
        "precision",
        "recall",
        "KID",
        "class accuracy",
        "scores: " + str(tmp_path / "samples_30x12x12x1_eval_digits.json"),
    ]
    report = json.loads((tmp_path / "samples_30x12x12x1_eval_digits.json").read_text())
    assert set(SCORES) | {"class_accuracy"} <= set(report) and "sfid" not in report
    assert report["num_reference"] == 40 and report["num_samples"] == 30 and report["features"] == "digits"
    assert report["digit_classifier_held_out_accuracy"] == 0.5
    assert 0 <= report["class_accuracy"] <= 1 and report["fid"] > 0
    # 128-dimensional features from 40 and 30 images: FID is unreliable, and says so with the counts.
    assert f"warning: FID (reference {ref}): 40 images for 128-dimensional features" in out.err
    assert f"warning: FID (samples {samples}): 30 images for 128-dimensional features" in out.err


def test_identical_sides_and_every_kind_of_side_agree(tmp_path, capsys, digit_cache):
    ref = _npz(tmp_path / "ref.npz", 20, side=16, seed=2)
    _run(
        capsys, *_digits(digit_cache, ref, ref, "--out", tmp_path / "same.json", "--save_ref_stats", tmp_path / "s.npz")
    )
    same = json.loads((tmp_path / "same.json").read_text())
    assert abs(same["fid"]) < 1e-6 and same["precision"] == same["recall"] == 1.0
    # The same images as a folder of grey PNGs, and the reference as its statistics file.
    folder = tmp_path / "folder"
    folder.mkdir()
    with np.load(ref) as data:
        for i, image in enumerate(data["arr_0"]):
            Image.fromarray(image[..., 0]).save(folder / f"{i:03d}.png")
    _run(capsys, *_digits(digit_cache, tmp_path / "s.npz", folder))
    from_folder = json.loads((tmp_path / "folder_eval_digits.json").read_text())
    for key in SCORES:
        np.testing.assert_allclose(from_folder[key], same[key], rtol=1e-9, atol=1e-9, err_msg=key)
    assert "class_accuracy" not in from_folder  # a folder has no labels


@pytest.mark.slow  # 20 Inception forwards at 299x299 and four 2k x 2k eigen-decompositions on a CPU
def test_inception_features_with_stats_file(tmp_path, capsys, monkeypatch):
    weights = tmp_path / WEIGHTS_FILE
    key_shapes = [(k, list(v.shape)) for k, v in InceptionV3FID().state_dict().items()]
    torch.save(seeded_state_dict(key_shapes, 0), weights)
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    ref = _npz(tmp_path / "ref.npz", 10, side=8, channels=3, seed=3, labels=False)
    samples = _npz(tmp_path / "samples.npz", 10, side=10, channels=3, seed=4)
    out = _run(capsys, ref, samples, "--save_ref_stats", tmp_path / "ref_stats.npz", "--progress", "False")
    assert "warning: reference images are 8x8 but samples are 10x10: both are resized to 299x299" in out.err
    assert "warning: sFID (samples " in out.err and "10 images for 2023-dimensional features" in out.err
    report = json.loads((tmp_path / "samples_eval_inception.json").read_text())
    assert {"sfid", *SCORES} <= set(report) and "class_accuracy" not in report
    assert report["inception_weights"] == str(weights)
    with pytest.raises(UserError, match=r"REF .*ref_stats.npz holds inception features; pass --features inception"):
        image_evaluate.main(_digits("unused", str(tmp_path / "ref_stats.npz"), samples))


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"images": np.zeros((10, 8, 8, 3), np.uint8)}, r"has no arr_0 \(keys: images\); expected uint8 images"),
        ({"arr_0": np.zeros((0, 8, 8, 3), np.uint8)}, r"holds no images \(shape \(0, 8, 8, 3\)\)"),
        ({"arr_0": np.zeros((10, 8, 8, 3), np.float32)}, r"dtype float32, expected uint8 in 0..255"),
        ({"arr_0": np.zeros((10, 3, 8, 8), np.uint8)}, r"shape \(10, 3, 8, 8\), .* \(channels first\?"),
        ({"arr_0": np.zeros((9, 8, 8, 3), np.uint8)}, r"9 images; at least 10 are needed"),
        ({"arr_0": np.zeros((10, 8, 8, 3), np.uint8), "arr_1": np.zeros(3)}, r"arr_1 has shape \(3,\)"),
    ],
)
def test_bad_samples_are_one_line_errors_and_nothing_is_written(tmp_path, digit_cache, arrays, match):
    work = tmp_path / "work"
    work.mkdir()
    ref = _npz(work / "ref.npz", 20)
    np.savez(work / "bad.npz", **arrays)
    with pytest.raises(UserError, match=match):
        image_evaluate.main(_digits(digit_cache, ref, str(work / "bad.npz"), "--save_ref_stats", str(work / "r.npz")))
    assert sorted(os.listdir(work)) == ["bad.npz", "ref.npz"]


def test_other_bad_inputs(tmp_path, digit_cache):
    ref = _npz(tmp_path / "ref.npz", 20)
    with pytest.raises(UserError, match=r"nowhere.npz: no such file or folder"):
        image_evaluate.main(_digits(digit_cache, ref, str(tmp_path / "nowhere.npz")))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"junk.npz: not a readable .npz file"):
        image_evaluate.main(_digits(digit_cache, ref, str(tmp_path / "junk.npz")))
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    Image.new("RGB", (9, 8)).save(folder / "b.png")
    with pytest.raises(UserError, match=r"images differ in size \(.*b.png is 9x8, .*a.png is 8x8\)"):
        image_evaluate.main(_digits(digit_cache, ref, str(folder)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: no image files \(jpg, jpeg, png, gif\) found"):
        image_evaluate.main(_digits(digit_cache, ref, str(tmp_path / "empty")))
    with pytest.raises(UserError, match=r"--features 'clip': expected one of 'inception', 'digits'"):
        image_evaluate.main([ref, ref, "--features", "clip"])
    with pytest.raises(UserError, match=r"--nearest_k must be at least 1, got 0"):
        image_evaluate.main([ref, ref, "--nearest_k", "0"])
    with pytest.raises(UserError, match=r"--device 'gpu0': not a device name"):
        image_evaluate.main([ref, ref, "--device", "gpu0"])


def test_missing_weights_is_one_line_exit_2(tmp_path):
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    ref = _npz(tmp_path / "ref.npz", 10, channels=3)
    env = {k: v for k, v in os.environ.items() if k != WEIGHTS_ENV}
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "image_evaluate.py"), ref, ref],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no Inception weights given: ")
    assert WEIGHTS_FILE in lines[0] and "nothing is downloaded" in lines[0] and "--inception_weights PATH" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["ref.npz"]
