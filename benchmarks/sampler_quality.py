"""
Quality per network evaluation (NFE) of the samplers on the digits: for a trained digit model
(the demo's, ``make demo``), the class accuracy of its class-conditional samples and the FID
against held-out real digits, both on the features of the digit classifier, for each sampler at
several NFE, with the wall time per sample; then classifier-free guidance at several scales for a
model trained with ``--class_dropout_prob 0.1``. Prints one JSON line per run, then a Markdown
table (for ``benchmarks/README.md``).

    .venv/bin/python benchmarks/sampler_quality.py --model_path demo_out/train/ema_0.99_001500.pt \\
        --cfg_model_path demo_cfg/train/ema_0.99_001500.pt --num_samples 1000 --threads 2

The scores are those of ``improved_diffusion.digit_eval.digit_scores`` (the demo's): the class
accuracy by the digit classifier of ``improved_diffusion.digit_features`` and the FID on its
penultimate features against the digits it holds out of the bundled MNIST subset. Another feature
network plugs in with ``--features MODULE:FUNCTION``: ``FUNCTION(device)`` returns a function
mapping (N, H, W, C) uint8 images to ``(features (N, D), logits (N, K))`` NumPy arrays, and the
Fréchet distance is ``improved_diffusion.evaluation``'s. Without those modules the script says
what is missing in one line.
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

try:  # the evaluator's modules
    from improved_diffusion import digit_eval, evaluation
except ImportError as exc:
    digit_eval = evaluation = None
    MISSING = exc.name
else:
    MISSING = ""

FeatureFn = Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]
# scorer(images (N, H, W, C) uint8, labels (N,)) -> at least {"class_accuracy", "fid"}
Scorer = Callable[[np.ndarray, np.ndarray], Dict[str, Any]]
# sampler -> target NFE (heun: 2 N - 1, so the nearest below for an even target)
DEFAULT_RUNS = "ancestral:25,50,100,250;ddim:10,20,50;dpm++2m:10,20,50;dpm++2m-sde:10,20,50;heun:10,20"


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


def make_scorer(spec: str, image_size: int, device: torch.device) -> Scorer:
    """
    ``digits``: :func:`digit_eval.digit_scores` with the cached digit classifier. ``MODULE:FUNCTION``:
    class accuracy of the logits and FID on the features of ``FUNCTION(device)`` against the held-out
    real digits at ``image_size`` (:func:`digit_eval.real_digits`).
    """
    if spec == "digits":
        classifier = digit_eval.load_digit_classifier(log=print, device=device)[0]
        return lambda images, labels: digit_eval.digit_scores(images, labels, classifier)
    module, _, name = spec.partition(":")
    features: FeatureFn = getattr(importlib.import_module(module), name)(device)
    real_images, _ = digit_eval.real_digits(image_size, held_out=True)
    real_stats = evaluation.feature_statistics(features(real_images)[0])

    def score(images: np.ndarray, labels: np.ndarray) -> Dict[str, Any]:
        feats, logits = features(images)
        return {
            "class_accuracy": float((logits.argmax(axis=1) == labels).mean()),
            "fid": evaluation.frechet_distance(*real_stats, *evaluation.feature_statistics(feats)),
        }

    return score


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
        image_shape=(flags["image_channels"], flags["image_size"], flags["image_size"]),
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
            f"sampler_quality.py needs the evaluator's improved_diffusion.digit_eval and evaluation (digit-classifier "
            f"features, frechet_distance): {MISSING} is missing; merge the evaluator branch first"
        )
    torch.set_num_threads(args.threads)
    plan = [(args.model_path, sampler, steps, 1.0) for sampler, steps in parse_runs(args.runs)]
    if args.cfg_model_path:
        scales = [float(w) for w in args.guidance_scales.split(",")]
        for sampler in args.cfg_sampler.split(","):
            if sampler not in SAMPLERS:
                raise UserError(f"--cfg_sampler {args.cfg_sampler}: expected samplers among {', '.join(SAMPLERS)}")
            plan += [(args.cfg_model_path, sampler, args.cfg_steps, w) for w in scales]
    models = {path: load_model(path) for path in dict.fromkeys(p[0] for p in plan)}  # checked before any work
    scorers: Dict[int, Scorer] = {}
    rows = []
    for path, sampler, steps, scale in plan:
        model, flags = models[path]
        size = flags["image_size"]
        if size not in scorers:
            scorers[size] = make_scorer(args.features, size, torch.device("cpu"))
        images, labels, seconds = run_one(model, flags, sampler, steps, scale, args)
        scores = scorers[size](images, labels)
        row = dict(
            model=os.path.basename(os.path.dirname(os.path.abspath(path))),
            sampler=sampler,
            steps=steps,
            nfe=network_evaluations(sampler, steps),
            guidance_scale=scale,
            seconds_per_sample=round(seconds, 4),
            class_accuracy=scores["class_accuracy"],
            fid=scores["fid"],
            fid_real_baseline=scores.get("fid_real_baseline"),
        )
        print(json.dumps(dict(row, threads=args.threads, num_samples=args.num_samples)), flush=True)
        rows.append(row)
    print(markdown_table(rows))


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    """The rows as the Markdown table of ``benchmarks/README.md`` (FID real: the real-vs-real baseline)."""
    lines = [
        "| model | sampler | steps | NFE | w | class accuracy | FID | FID real | s / sample |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        baseline = "" if r["fid_real_baseline"] is None else f"{r['fid_real_baseline']:.2f}"
        lines.append(
            f"| {r['model']} | `{r['sampler']}` | {r['steps']} | {r['nfe']} | {r['guidance_scale']:g} | "
            f"{r['class_accuracy']:.3f} | {r['fid']:.2f} | {baseline} | {r['seconds_per_sample']:.4f} |"
        )
    return "\n".join(lines)


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model_path", required=True, help="a class-conditional digit model with args.json beside it")
    parser.add_argument("--cfg_model_path", default="", help="a digit model trained with --class_dropout_prob 0.1")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="SAMPLER:NFE,...;... (heun: the odd NFE at or below)")
    parser.add_argument("--guidance_scales", default="1,2,4", help="classifier-free guidance scales w")
    parser.add_argument("--cfg_sampler", default="dpm++2m,dpm++2m-sde", help="samplers (comma-separated) for guidance")
    parser.add_argument("--cfg_steps", type=int, default=20)
    parser.add_argument("--num_samples", type=int, default=1000, help="samples per run (FID wants many more than 128)")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--features", default="digits", help="digits, or MODULE:FUNCTION returning a feature function")
    return parser


if __name__ == "__main__":
    run_main(main)
