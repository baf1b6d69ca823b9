"""Tests for scripts/plot_progress.py: training curves from progress.csv into a PNG, one-line errors."""

import csv

import pytest
from PIL import Image
from script_loader import load_script

from improved_diffusion.errors import UserError

PLOT = load_script("plot_progress")


def _progress_csv(folder, rows=5):
    keys = ["step", "loss", "mse", "vb", "lr"] + [f"{t}_q{q}" for t in ("loss", "mse", "vb") for q in range(4)]
    with open(folder / "progress.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for i in range(rows):
            writer.writerow({k: (i + 1) * 10 if k == "step" else 1.0 / (i + 1) for k in keys} | {"vb_q3": ""})


def test_writes_a_png_beside_progress_csv(tmp_path, capsys):
    _progress_csv(tmp_path)
    PLOT.main([str(tmp_path)])
    image = Image.open(tmp_path / "progress.png")
    assert image.format == "PNG" and image.size[0] > 3 * image.size[1]  # four panels side by side
    assert f"wrote {tmp_path / 'progress.png'}" in capsys.readouterr().out


def test_reads_numbers_and_blank_cells(tmp_path):
    _progress_csv(tmp_path, rows=3)
    columns = PLOT.read_progress(str(tmp_path / "progress.csv"))
    assert columns["step"] == [10.0, 20.0, 30.0]
    assert columns["loss"] == [1.0, 0.5, 1.0 / 3]
    assert all(v != v for v in columns["vb_q3"])  # blank cells are NaN


def test_missing_or_empty_progress_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"no progress.csv in .*: pass a training log folder"):
        PLOT.main([str(tmp_path)])
    (tmp_path / "progress.csv").write_text("step,loss\n")
    with pytest.raises(UserError, match=r"progress.csv has no rows yet"):
        PLOT.main([str(tmp_path)])
