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

from improved_diffusion.errors import run_main
from improved_diffusion.image_datasets import load_superres_data
from improved_diffusion.script_util import (
    FlagParser,
    add_dict_to_argparser,
    args_to_dict,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from improved_diffusion.train_setup import run_training, training_defaults


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = create_argparser().parse_args(argv)

    def build():
        return sr_create_model_and_diffusion(**args_to_dict(args, sr_model_and_diffusion_defaults().keys()))

    def make_data():
        return load_superres_data(
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            large_size=args.large_size,
            small_size=args.small_size,
            class_cond=args.class_cond,
            random_flip=args.random_flip,
            num_workers=args.num_workers,
            seed=args.seed,
        )

    stop_signal = run_training(args, build, make_data)
    if stop_signal:
        sys.exit(128 + stop_signal)  # the checkpoint is saved; report the signal as a shell would


def create_argparser() -> argparse.ArgumentParser:
    defaults = training_defaults()
    defaults.update(sr_model_and_diffusion_defaults())
    parser = FlagParser(description=__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
