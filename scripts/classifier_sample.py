"""
Generate samples guided by a noised classifier [ADM §4, Alg. 1 and 2] and save them as a numpy
array (``samples_{N}x{H}x{W}x3.npz`` in the log folder: images and their labels) plus a PNG grid.

The model/diffusion flags default to the ``args.json`` beside ``--model_path``, the classifier
flags to the one beside ``--classifier_path`` (both written at training); flags given here
override them, and ``--preset NAME`` sets those of a released checkpoint pair. The labels
(``--class_labels 0,1,2``, cycled; random by default) go to the classifier, and to the model
when it is class-conditional, so an unconditional model can be guided as well. Each step adds
``--classifier_scale`` times the gradient of the classifier's log-probability of the label:
to the mean in ancestral sampling, to the score with the other ``--sampler`` choices (``ddim``,
``dpm++2m``, ``dpm++2m-sde``, ``heun``). ``--guidance_scale`` other than 1 adds classifier-free guidance for a
model trained with ``--class_dropout_prob > 0``. Seeds as in image_sample.py.
"""

import argparse
import sys
from typing import Any, Dict, Optional, Sequence

from improved_diffusion import dist_util, logger
from improved_diffusion.errors import UserError, run_main
from improved_diffusion.presets import apply_preset_argv
from improved_diffusion.sample_util import (
    add_grid_alias,
    bf16_autocast,
    build_model_and_diffusion,
    check_sampler_flags,
    class_label_kwargs,
    classifier_cond_fn,
    guided,
    labels_for_classifier_only,
    load_checkpoint,
    log_saved_flags,
    model_session,
    parse_class_labels,
    sample_images,
    save_samples,
    validate_sampling_args,
)
from improved_diffusion.script_util import (
    args_to_dict,
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    load_args_json,
    model_and_diffusion_defaults,
    parse_args_with_saved,
    script_parser,
    speed_from_args,
)

SCRIPT = "classifier_sample"
MODEL_KEYS = tuple(model_and_diffusion_defaults())
CLASSIFIER_KEYS = tuple(k for k in classifier_defaults() if k != "image_size")
# What the classifier's training must share with the model for its gradient to mean anything.
SHARED_WITH_CLASSIFIER = ("image_size", "diffusion_steps", "noise_schedule", "rescale_timesteps")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = create_argparser()
    argv = apply_preset_argv(sys.argv[1:] if argv is None else argv, list(vars(parser.parse_args([]))))
    args, taken = parse_args_with_saved(parser, MODEL_KEYS, argv)
    args, taken_by_classifier = parse_args_with_saved(parser, CLASSIFIER_KEYS, argv, path_flag="classifier_path")

    # Every flag is checked, and both networks built, before a log folder or process group exists.
    validate_sampling_args(args)
    validate_guidance_args(args, load_args_json(args.classifier_path) or {})
    # Labels the classifier knows (its logits); a class-conditional model takes them too.
    num_classes = min(args.num_classes, args.classifier_num_classes) if args.class_cond else args.classifier_num_classes
    class_labels = parse_class_labels(args.class_labels, class_cond=True, num_classes=num_classes)
    model, diffusion = build_model_and_diffusion(args, MODEL_KEYS, create_model_and_diffusion)
    check_sampler_flags(args, diffusion, model)
    classifier = create_classifier(**args_to_dict(args, classifier_defaults()), speed=speed_from_args(args))

    with model_session(args, taken, argv, model, MODEL_KEYS):
        log_saved_flags(taken_by_classifier, args.classifier_path, argv)
        logger.log(f"loading {args.classifier_path}...")
        load_checkpoint(classifier, args, CLASSIFIER_KEYS, path_flag="classifier_path")
        # Scale 0 is unguided sampling: skip the classifier's backward pass altogether.
        cond_fn = None
        if args.classifier_scale != 0:
            cond_fn = classifier_cond_fn(bf16_autocast(classifier, args.use_bf16), args.classifier_scale)
        logger.log(f"sampling with classifier scale {args.classifier_scale}...")
        images, kwargs = sample_images(
            labels_for_classifier_only(
                guided(bf16_autocast(model, args.use_bf16), model, args.guidance_scale), args.class_cond
            ),
            diffusion,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            image_shape=(args.image_channels, args.image_size, args.image_size),
            seed=args.seed,
            sampler=args.sampler,
            eta=args.eta,
            clip_denoised=args.clip_denoised,
            kwargs_fn=class_label_kwargs(class_labels, num_classes),
            cond_fn=cond_fn,
        )
        if dist_util.is_main_process():
            save_samples(images, kwargs["y"], num_grid=args.num_grid, rows_by_label=class_labels is not None)
        dist_util.barrier()
        logger.log("sampling complete")


def validate_guidance_args(args: argparse.Namespace, classifier_args: Dict[str, Any]) -> None:
    """
    A one-line UserError for a missing ``--classifier_path``, a classifier of other image channels
    than the model's, or one trained (by its ``args.json``) at another image size or on another
    diffusion than the model samples.
    """
    if not args.classifier_path:
        raise UserError(
            "--classifier_path is required: the noised classifier (.pt) to guide with, "
            "e.g. --classifier_path logs/model150000.pt (unguided sampling: image_sample.py)"
        )
    if args.image_channels != args.classifier_image_channels:
        raise UserError(
            f"--image_channels {args.image_channels}: the classifier classifies images of "
            f"--classifier_image_channels {args.classifier_image_channels}; guidance needs the model's channels"
        )
    for name in SHARED_WITH_CLASSIFIER:
        if name in classifier_args and classifier_args[name] != getattr(args, name):
            raise UserError(
                f"--{name} {getattr(args, name)}: the classifier {args.classifier_path} was trained with "
                f"--{name} {classifier_args[name]} (its args.json); guidance needs the model's value"
            )


def create_argparser() -> argparse.ArgumentParser:
    parser = script_parser(SCRIPT, __doc__)
    add_grid_alias(parser)
    return parser


if __name__ == "__main__":
    run_main(main)
