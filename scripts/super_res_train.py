"""
Train a super-resolution diffusion model on a folder of images.

Each batch holds images at --large_size; the model is conditioned on ``low_res``, the batch
shrunk to --small_size by area averaging. Flags: the original's super-resolution and TRAIN
groups plus the new ones of image_train.py (``--help`` lists them). Checkpoints, args.json,
resuming and signals work as in image_train.py.
"""

import argparse
from typing import Iterator, Optional, Sequence

from improved_diffusion.errors import run_main
from improved_diffusion.image_datasets import load_superres_data
from improved_diffusion.script_util import script_parser, sr_create_model_and_diffusion, sr_model_and_diffusion_defaults
from improved_diffusion.train_setup import train_main

SCRIPT = "super_res_train"


def main(argv: Optional[Sequence[str]] = None) -> None:
    train_main(SCRIPT, __doc__, argv, sr_create_model_and_diffusion, sr_model_and_diffusion_defaults(), make_data)


def make_data(args: argparse.Namespace) -> Iterator:
    """Endless batches of ``--large_size`` images with ``low_res`` at ``--small_size``."""
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


def create_argparser() -> argparse.ArgumentParser:
    return script_parser(SCRIPT, __doc__)


if __name__ == "__main__":
    run_main(main)
