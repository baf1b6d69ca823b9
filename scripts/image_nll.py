"""
Approximate the bits/dimension of images under a model: the variational bound
L_vlb = L_0 + L_1 + ... + L_T of [IDDPM §2.1] (the prior term L_T, one KL term per timestep,
and the discretised decoder L_0), in bits per dimension.

Logs running means of total, prior and VB bits/dim and of the MSE terms; at the end writes
``vb_terms.npz``, ``mse_terms.npz``, ``xstart_mse_terms.npz`` (``arr_0``: the per-timestep
mean over the evaluated images, ``arr_0[j]`` for timestep T-1-j, as the original) and
``nll_summary.json`` (total, prior and VB bits/dim, image count) in the log folder.
"""

import argparse
from typing import Optional, Sequence

import torch

from improved_diffusion import dist_util, logger
from improved_diffusion.errors import UserError, run_main
from improved_diffusion.image_datasets import check_class_count, list_image_files, load_data
from improved_diffusion.likelihood import evaluate_bpd, save_results
from improved_diffusion.sample_util import (
    bf16_autocast,
    build_model_and_diffusion,
    derive_seed,
    model_session,
    require_model_path,
)
from improved_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_args_with_saved,
    script_parser,
)

SCRIPT = "image_nll"
MODEL_KEYS = tuple(model_and_diffusion_defaults())


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, taken = parse_args_with_saved(create_argparser(), MODEL_KEYS, argv)

    # Every flag and the data folder are checked, and the model and diffusion built (which checks
    # the model/diffusion flags), before a log folder is created or a process group is joined.
    validate_args(args)
    files = list_image_files(args.data_dir)
    num_images = len(files)
    if args.class_cond:
        check_class_count(args.data_dir, files, args.num_classes)
    model, diffusion = build_model_and_diffusion(args, MODEL_KEYS, create_model_and_diffusion)

    with model_session(args, taken, argv, model, MODEL_KEYS):
        logger.log(f"creating data loader ({num_images} images)...")
        data = load_data(
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            image_size=args.image_size,
            class_cond=args.class_cond,
            deterministic=True,
            image_channels=args.image_channels,
        )
        if args.num_samples > num_images:
            logger.log(f"note: --num_samples {args.num_samples} > {num_images} images in --data_dir: some count twice")

        logger.log("evaluating...")
        # calc_bpd_loop draws its q_sample noise from the global RNG: one stream per rank.
        torch.manual_seed(derive_seed(args.seed, dist_util.get_rank()))
        sums = evaluate_bpd(
            bf16_autocast(model, args.use_bf16),
            diffusion,
            data,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            clip_denoised=args.clip_denoised,
            timestep_batch=args.timestep_batch,
        )
        if dist_util.is_main_process():
            settings = ("model_path", "data_dir", "clip_denoised", "timestep_batch", "seed")
            save_results(sums, logger.get_dir(), **{k: getattr(args, k) for k in settings})
        dist_util.barrier()
        logger.log("evaluation complete")


def validate_args(args: argparse.Namespace) -> None:
    """Check the flags before any work; a bad value raises a UserError naming the flag."""
    require_model_path(args)
    if not args.data_dir:
        raise UserError("--data_dir is required: the folder of images to evaluate")
    for name in ("num_samples", "batch_size", "timestep_batch"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} {getattr(args, name)}: must be a positive integer")


def create_argparser() -> argparse.ArgumentParser:
    return script_parser(SCRIPT, __doc__)


if __name__ == "__main__":
    run_main(main)
