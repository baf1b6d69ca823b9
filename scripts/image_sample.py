"""
Generate a large batch of image samples from a model and save them as a large numpy array
(``samples_{N}x{H}x{W}x3.npz`` in the log folder), plus a PNG grid of the first samples.

This can be used to produce samples for FID evaluation. The model/diffusion flags default to
the ``args.json`` saved beside ``--model_path`` at training; flags given here override them.

Seeds: sample ``i``'s start noise (and its random class label) come from a generator seeded
by ``(--seed, i)``, so DDIM with ``--eta 0`` gives the same image ``i`` for any
``--batch_size`` and number of processes; ancestral sampling repeats exactly for the same
seed, batch size and number of processes (see ``improved_diffusion.sample_util``).
"""

import argparse
from typing import Optional, Sequence

from improved_diffusion import dist_util, logger
from improved_diffusion.errors import run_main
from improved_diffusion.sample_util import (
    add_grid_alias,
    bf16_autocast,
    build_model_and_diffusion,
    check_sampler_flags,
    class_label_kwargs,
    guided,
    model_session,
    parse_class_labels,
    sample_images,
    save_samples,
    save_sampling_args,
    validate_sampling_args,
)
from improved_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_args_with_saved,
    script_parser,
)

SCRIPT = "image_sample"
MODEL_KEYS = tuple(model_and_diffusion_defaults())


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, taken = parse_args_with_saved(create_argparser(), MODEL_KEYS, argv)

    # Every flag is checked, and the model and diffusion built (which checks the model/diffusion
    # flags), before a log folder is created or a process group is joined.
    validate_sampling_args(args)
    class_labels = parse_class_labels(args.class_labels, args.class_cond, args.num_classes)
    model, diffusion = build_model_and_diffusion(args, MODEL_KEYS, create_model_and_diffusion)
    nfe = check_sampler_flags(args, diffusion, model)

    with model_session(args, taken, argv, model, MODEL_KEYS):
        logger.log("sampling...")
        images, kwargs = sample_images(
            guided(bf16_autocast(model, args.use_bf16), model, args.guidance_scale),
            diffusion,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            image_shape=(args.image_channels, args.image_size, args.image_size),
            seed=args.seed,
            sampler=args.sampler,
            eta=args.eta,
            clip_denoised=args.clip_denoised,
            kwargs_fn=class_label_kwargs(class_labels, args.num_classes) if args.class_cond else None,
        )
        if dist_util.is_main_process():
            save_samples(images, kwargs.get("y"), num_grid=args.num_grid, rows_by_label=class_labels is not None)
            save_sampling_args(args, nfe)
        dist_util.barrier()
        logger.log("sampling complete")


def create_argparser() -> argparse.ArgumentParser:
    parser = script_parser(SCRIPT, __doc__)
    add_grid_alias(parser)
    return parser


if __name__ == "__main__":
    run_main(main)
