"""
Draw the training curves of a log folder: ``progress.csv`` -> ``progress.png`` beside it.

Four panels against the training step: the loss, its simple (``mse``) and variational-bound
(``vb``) terms, each with its four timestep quartiles (``_q0`` = the least noisy quarter of t),
and the learning rate. Needs matplotlib (``pip install matplotlib``; ``make demo`` installs it).

    python scripts/plot_progress.py logs/my_run            # writes logs/my_run/progress.png
"""

import argparse
import csv
import math
import os
from typing import Dict, List, Optional, Sequence

from improved_diffusion.errors import UserError, run_main
from improved_diffusion.fileio import atomic_write

TERMS = ("loss", "mse", "vb")


def read_progress(path: str) -> Dict[str, List[float]]:
    """The numeric columns of a ``progress.csv`` (empty cells become NaN)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise UserError(f"could not read {path}: {exc.strerror or exc}") from exc
    if not rows:
        raise UserError(f"{path} has no rows yet: train for at least --log_interval steps")
    columns: Dict[str, List[float]] = {}
    for key in rows[0]:
        try:
            columns[key] = [float(row[key]) if row.get(key) not in ("", None) else math.nan for row in rows]
        except ValueError:
            continue  # a text column
    if "step" not in columns:
        raise UserError(f"{path} has no 'step' column: not a training progress.csv")
    return columns


def plot_progress(columns: Dict[str, List[float]], out_path: str) -> str:
    """Draw the four panels into ``out_path`` (PNG, written atomically); returns the path."""
    try:
        import matplotlib  # optional: only this script draws
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib (make demo installs it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = columns["step"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, term in zip(axes, TERMS):
        for suffix, style in [("", dict(color="black", lw=2))] + [(f"_q{q}", dict(lw=1)) for q in range(4)]:
            if term + suffix in columns:
                ax.plot(steps, columns[term + suffix], label=(term + suffix), **style)
        ax.set_title(term)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    if "lr" in columns:
        axes[3].plot(steps, columns["lr"], color="tab:purple")
    axes[3].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    atomic_write(out_path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return out_path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("log_dir", help="the training log folder (holds progress.csv)")
    parser.add_argument("--out", default="", help="the PNG to write (default: LOG_DIR/progress.png)")
    args = parser.parse_args(argv)
    path = os.path.join(args.log_dir, "progress.csv")
    if not os.path.isfile(path):
        raise UserError(f"no progress.csv in {args.log_dir}: pass a training log folder (--log_dir of image_train.py)")
    out = plot_progress(read_progress(path), args.out or os.path.join(args.log_dir, "progress.png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
