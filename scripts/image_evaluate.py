"""
Score samples against reference images: Inception Score, FID, sFID, precision, recall and KID
in one table, also written as JSON beside the samples.

    python scripts/image_evaluate.py REF SAMPLES --inception_weights weights-inception-2015-12-05-6726825d.pth
    python scripts/image_evaluate.py data/mnist demo_out/samples/samples_100x20x20x1.npz --features digits

REF and SAMPLES are each an ``.npz`` of uint8 NHWC images in ``arr_0`` (what ``image_sample.py``
writes; labels in ``arr_1``), a folder of images, or a statistics file written by an earlier run
with ``--save_ref_stats``. ``--features inception`` (default) uses the FID Inception-v3 network,
whose weights file must be given (nothing is downloaded); ``--features digits`` uses a small digit
classifier trained on the bundled MNIST subset (cached after the first run) and adds the class
accuracy of class-conditional samples.
"""

import argparse
import math
import os
import sys
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from improved_diffusion import eval_features
from improved_diffusion.errors import UserError, run_main
from improved_diffusion.fileio import atomic_save_json
from improved_diffusion.flags import FEATURES
from improved_diffusion.script_util import check_choice, script_parser

NETWORK_INPUT = {"inception": "299x299", "digits": "28x28 grey"}
ROWS = (  # (JSON key, label, key of its spread)
    ("inception_score", "Inception Score", "inception_score_std"),
    ("fid", "FID", None),
    ("sfid", "sFID", None),
    ("precision", "precision", None),
    ("recall", "recall", None),
    ("kid", "KID", "kid_std"),
    ("class_accuracy", "class accuracy", None),
)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = create_argparser().parse_args(argv)
    validate_args(args)
    ref, samples = eval_features.read_side(args.ref), eval_features.read_side(args.samples)
    for side, what in ((ref, "REF"), (samples, "SAMPLES")):
        eval_features.check_count(side, what)
        if isinstance(side, eval_features.FeatureSet) and side.network != args.features:
            raise UserError(f"{what} {side.path} holds {side.network} features; pass --features {side.network}")
    out_path = args.out or default_json_path(args.samples, args.features)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    network, extra = build_network(args, device)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _print_warning
        ref_features = features_of(ref, network, args, device, "reference")
        if args.save_ref_stats:
            eval_features.save_feature_set(ref_features, args.save_ref_stats)
            print(f"reference statistics: {args.save_ref_stats}")
        sample_features = features_of(samples, network, args, device, "samples")
        eval_features.compare_sizes(ref_features, sample_features, NETWORK_INPUT[args.features])
        scores = eval_features.compute_scores(
            ref_features,
            sample_features,
            nearest_k=args.nearest_k,
            kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size,
            seed=args.seed,
            device=str(device),
            class_accuracy=args.features == "digits",
        )
    print(format_table(scores, args.features))
    report = dict(
        scores,
        features=args.features,
        reference=args.ref,
        samples=args.samples,
        num_reference=len(ref_features.pool),
        num_samples=len(sample_features.pool),
        **extra,
    )
    atomic_save_json({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in report.items()}, out_path)
    print(f"scores: {out_path}")


def validate_args(args: argparse.Namespace) -> None:
    """Every flag is checked before any file is read."""
    check_choice("features", args.features, FEATURES)
    for flag in ("batch_size", "nearest_k", "kid_subsets", "kid_subset_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.nearest_k >= eval_features.MIN_IMAGES:
        raise UserError(f"--nearest_k must be below {eval_features.MIN_IMAGES}, got {args.nearest_k}")
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UserError(f"--device {args.device!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device here")


def build_network(args: argparse.Namespace, device: torch.device) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The feature network (eval mode, on ``device``) and what the JSON records about it."""
    if args.features == "inception":
        from improved_diffusion.inception import inception_weights_path, load_inception

        path = inception_weights_path(args.inception_weights)
        print(f"Inception weights: {path}")
        return load_inception(path, device), {"inception_weights": path}
    from improved_diffusion.digit_features import load_digit_classifier

    network, accuracy = load_digit_classifier(args.digit_classifier, log=print, device=device)
    return network, {"digit_classifier_held_out_accuracy": accuracy}


def features_of(
    side: Any, network: torch.nn.Module, args: argparse.Namespace, device: torch.device, what: str
) -> eval_features.FeatureSet:
    """A statistics file's features as they are; images through the network."""
    if isinstance(side, eval_features.FeatureSet):
        return side
    return eval_features.extract_features(
        network, args.features, side, args.batch_size, device, progress=args.progress, desc=what
    )


def default_json_path(samples: str, features: str) -> str:
    """``samples_100x28x28x3.npz`` -> ``samples_100x28x28x3_eval_digits.json`` (a folder: beside it)."""
    stem = samples.rstrip("/" + os.sep)
    stem = os.path.splitext(stem)[0] if os.path.isfile(stem) else stem
    return f"{stem}_eval_{features}.json"


def format_table(scores: Dict[str, float], features: str) -> str:
    """The scores as an aligned two-column table (``value ± spread`` where there is one)."""
    lines = [f"{'metric (' + features + ' features)':<28} value"]
    for key, label, spread in ROWS:
        if key in scores:
            value = f"{scores[key]:.4f}" + (f" ± {scores[spread]:.4f}" if spread else "")
            lines.append(f"{label:<28} {value}")
    return "\n".join(lines)


def _print_warning(message: Warning, category: type, filename: str, lineno: int, file: Any = None, line: Any = None):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def create_argparser() -> argparse.ArgumentParser:
    return script_parser(
        "image_evaluate",
        __doc__,
        positionals=(
            ("ref", "reference: .npz (arr_0 uint8 NHWC), image folder, or stats file"),
            ("samples", "samples: .npz (arr_0 uint8 NHWC, labels in arr_1), image folder, or stats file"),
        ),
    )


if __name__ == "__main__":
    run_main(main)
