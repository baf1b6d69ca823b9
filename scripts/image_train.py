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

from improved_diffusion import dist_util, logger
from improved_diffusion.errors import run_main
from improved_diffusion.image_datasets import list_image_files, load_data
from improved_diffusion.resample import create_named_schedule_sampler
from improved_diffusion.script_util import (
    FlagParser,
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    save_args_json,
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
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    dist_util.setup_dist()
    with dist_util.abort_on_error():
        logger.configure(dir=args.log_dir or None)
        seed_everything(args.seed, dist_util.get_rank())  # each rank draws its own noise and timesteps
        model.to(dist_util.dev())
        compile_model(model, args.compile)

        logger.log("creating data loader...")
        data = load_data(
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            image_size=args.image_size,
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
    defaults.update(model_and_diffusion_defaults())
    parser = FlagParser(description=__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
