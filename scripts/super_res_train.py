"""
Train a super-resolution diffusion model on a folder of images.

Each batch holds images at --large_size; the model is conditioned on ``low_res``, the batch
shrunk to --small_size by area averaging. Flags: the original's super-resolution and TRAIN
groups plus the new ones of image_train.py (``--help`` lists them). Checkpoints, args.json,
resuming and signals work as in image_train.py.
"""

import argparse
from typing import Optional, Sequence

from improved_diffusion.errors import run_main
from improved_diffusion.script_util import script_parser
from improved_diffusion.train_setup import train_main

SCRIPT = "super_res_train"


def main(argv: Optional[Sequence[str]] = None) -> None:
    train_main(SCRIPT, __doc__, argv)


def create_argparser() -> argparse.ArgumentParser:
    return script_parser(SCRIPT, __doc__)


if __name__ == "__main__":
    run_main(main)
