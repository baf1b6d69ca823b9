"""
What the training scripts share between parsing flags and :class:`train_util.TrainLoop`:
the TRAIN flag group's defaults, their validation (before any work starts), seeding, and the
optional speed switches (``--channels_last``, ``--compile``).
"""

import argparse
import random
from typing import Any, Callable, Dict, Iterator, Tuple

import numpy as np
import torch

from . import dist_util, logger
from .errors import UserError
from .image_datasets import list_image_files
from .resample import SCHEDULE_SAMPLERS, create_named_schedule_sampler
from .script_util import apply_speed_flags, check_choice, save_args_json, speed_defaults
from .train_util import AUTO_RESUME, TrainLoop, check_train_settings, parse_ema_rates


def training_defaults() -> Dict[str, Any]:
    """Defaults of the TRAIN flag group: the original's flags, then the new ones."""
    return dict(
        data_dir="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,  # -1 disables microbatches
        ema_rate="0.9999",  # comma-separated list of EMA values
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",  # a model file, or "auto": the newest complete one in --log_dir
        use_fp16=False,
        fp16_scale_growth=1e-3,
        # new in this implementation
        log_dir="",  # default: $OPENAI_LOGDIR, else ./logs/<date-time>
        use_bf16=False,
        max_steps=0,  # 0 = no limit
        random_flip=False,
        seed=0,
        num_workers=0,  # image-decoding worker processes
        channels_last=False,
        compile=False,
        **speed_defaults(),
    )


def validate_training_args(args: argparse.Namespace) -> None:
    """Check the TRAIN flags; a bad value raises a UserError naming the flag. Cheap: no data read."""
    check_choice("schedule_sampler", args.schedule_sampler, SCHEDULE_SAMPLERS)
    check_train_settings(
        args.batch_size,
        args.microbatch,
        args.lr,
        args.log_interval,
        args.save_interval,
        args.lr_anneal_steps,
        args.max_steps,
    )
    parse_ema_rates(args.ema_rate)
    if args.use_fp16 and args.use_bf16:
        raise UserError("--use_fp16 and --use_bf16 exclude each other: pick one")
    if args.fp16_scale_growth <= 0:
        raise UserError(f"--fp16_scale_growth {args.fp16_scale_growth}: must be positive")
    if args.weight_decay < 0:
        raise UserError(f"--weight_decay {args.weight_decay}: must be 0 or more")
    if args.num_workers < 0:
        raise UserError(f"--num_workers {args.num_workers}: must be 0 or more")
    if args.resume_checkpoint not in ("", AUTO_RESUME) and not args.resume_checkpoint.endswith(".pt"):
        raise UserError(
            f"--resume_checkpoint {args.resume_checkpoint!r}: expected a model file like "
            "logs/model010000.pt, or 'auto' for the newest complete checkpoint in --log_dir"
        )


def train_loop_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The :class:`TrainLoop` keyword arguments that come straight from flags (plus the log folder)."""
    keys = (
        "batch_size microbatch lr ema_rate log_interval save_interval resume_checkpoint use_fp16 "
        "fp16_scale_growth weight_decay lr_anneal_steps use_bf16 max_steps channels_last"
    ).split()
    kwargs = {k: getattr(args, k) for k in keys}
    kwargs["log_dir"] = logger.get_dir()
    return kwargs


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed torch, NumPy and Python's generators with ``seed + rank``."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compile_model(model: torch.nn.Module, enabled: bool) -> None:
    """
    ``torch.compile`` the model in place (its state_dict keys do not change); on any compile
    error the affected code runs eagerly, with a logged warning.
    """
    if not enabled:
        return
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # fall back to eager instead of failing
        model.compile()
        logger.log("--compile: the model runs through torch.compile (eager fallback on errors)")
    except Exception as exc:  # an old torch or a platform without a compiler backend
        logger.log(f"warning: --compile: torch.compile is unavailable ({exc}); running eagerly")


def run_training(
    args: argparse.Namespace,
    build: Callable[[], Tuple[torch.nn.Module, Any]],
    make_data: Callable[[], Iterator],
) -> int:
    """
    The training scripts' shared body: check every flag and the data folder, build the model
    and diffusion with ``build()`` (which checks the model flags) before any folder is created
    or process group joined, then set up ranks and logging, load data with ``make_data()``,
    resume, save ``args.json`` and train.

    :return: the signal number that stopped training (0 when it ended by itself).
    """
    validate_training_args(args)
    list_image_files(args.data_dir)
    seed_everything(args.seed)  # the same initial weights on every rank
    model, diffusion = build()
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    dist_util.setup_dist()
    with dist_util.abort_on_error():
        logger.configure(dir=args.log_dir or None)
        apply_speed_flags(args)
        seed_everything(args.seed, dist_util.get_rank())  # each rank draws its own noise and timesteps
        model.to(dist_util.dev())
        compile_model(model, args.compile)

        logger.log("creating data loader...")
        data = make_data()

        # Resuming happens here, so a checkpoint contradicting the flags leaves args.json alone.
        loop = TrainLoop(
            model=model, diffusion=diffusion, data=data, schedule_sampler=schedule_sampler, **train_loop_kwargs(args)
        )
        if dist_util.is_main_process():
            save_args_json(args, logger.get_dir())
        logger.log("training...")
        loop.run_loop()
    return loop.stop_signal or 0
