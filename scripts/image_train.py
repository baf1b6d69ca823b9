"""
Train a diffusion model on a folder of images.

Flags: the original's MODEL/DIFFUSION and TRAIN groups, plus --log_dir, --use_bf16,
--max_steps, --random_flip, --seed, --num_workers, --channels_last and --compile. Every flag is
saved as args.json in the log folder, which sampling scripts read back. Checkpoints
(model/ema/opt/state NNNNNN.pt, NNNNNN = steps done) go to the log folder;
``--resume_checkpoint auto`` continues from the newest complete one there. SIGTERM or Ctrl-C
saves a checkpoint at the next step, then stops. Run alone, under mpiexec -n N, or torchrun.
"""

import argparse
import sys
from typing import Optional, Sequence

from improved_diffusion.errors import run_main
from improved_diffusion.image_datasets import load_data
from improved_diffusion.script_util import (
    FlagParser,
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from improved_diffusion.train_setup import run_training, training_defaults


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = create_argparser().parse_args(argv)

    def build():
        return create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))

    def make_data():
        return load_data(
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            image_size=args.image_size,
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
    defaults.update(model_and_diffusion_defaults())
    parser = FlagParser(description=__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
