"""
Train a super-resolution diffusion model on a folder of images.

Each batch holds images at --large_size; the model is conditioned on ``low_res``, the batch
shrunk to --small_size by area averaging. Flags: the original's super-resolution and TRAIN
groups plus the new training flags of image_train.py (--log_dir, --use_bf16, --max_steps,
--random_flip, --seed, --num_workers, --channels_last, --compile). Checkpoints, args.json,
resuming and signals work as in image_train.py.
"""

import argparse
import sys
from typing import Optional, Sequence

from improved_diffusion import dist_util, logger
from improved_diffusion.errors import run_main
from improved_diffusion.image_datasets import list_image_files, load_superres_data
from improved_diffusion.resample import create_named_schedule_sampler
from improved_diffusion.script_util import (
    FlagParser,
    add_dict_to_argparser,
    args_to_dict,
    save_args_json,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from improved_diffusion.train_setup import (
    compile_model,
    seed_everything,
    train_loop_kwargs,
    training_defaults,
    validate_training_args,
)
from improved_diffusion.train_util import TrainLoop


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = create_argparser().parse_args(argv)

    # Every flag and the data folder are checked before a folder is created or a process group
    # is joined; the model is built here too, which checks the model/diffusion flags.
    validate_training_args(args)
    list_image_files(args.data_dir)
    seed_everything(args.seed)  # the same initial weights on every rank
    model, diffusion = sr_create_model_and_diffusion(**args_to_dict(args, sr_model_and_diffusion_defaults().keys()))
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    dist_util.setup_dist()
    with dist_util.abort_on_error():
        logger.configure(dir=args.log_dir or None)
        seed_everything(args.seed, dist_util.get_rank())  # each rank draws its own noise and timesteps
        model.to(dist_util.dev())
        compile_model(model, args.compile)

        logger.log("creating data loader...")
        data = load_superres_data(
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            large_size=args.large_size,
            small_size=args.small_size,
            class_cond=args.class_cond,
            random_flip=args.random_flip,
            num_workers=args.num_workers,
            seed=args.seed,
        )

        # Resuming happens here, so a checkpoint contradicting the flags leaves args.json alone.
        loop = TrainLoop(
            model=model, diffusion=diffusion, data=data, schedule_sampler=schedule_sampler, **train_loop_kwargs(args)
        )
        if dist_util.is_main_process():
            save_args_json(args, logger.get_dir())
        logger.log("training...")
        loop.run_loop()
    if loop.stop_signal:
        sys.exit(128 + loop.stop_signal)


def create_argparser() -> argparse.ArgumentParser:
    defaults = training_defaults()
    defaults.update(sr_model_and_diffusion_defaults())
    parser = FlagParser(description=__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
