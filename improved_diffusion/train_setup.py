"""
What the training scripts share between parsing flags and the trainers
(:class:`train_util.TrainLoop`, :class:`classifier_train_util.ClassifierTrainLoop`): the whole
``main`` of a training script (:func:`train_main`), the validation of the TRAIN flags (before
any work starts), seeding, and ``--compile``.
"""

import argparse
import random
import sys
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from . import dist_util, logger
from .classifier_train_util import ClassifierTrainLoop, check_classifier_train_settings
from .errors import UserError
from .flags import training_defaults  # noqa: F401  (importable from here, as before)
from .image_datasets import (
    check_class_count,
    check_enough_images,
    check_same_classes,
    list_image_files,
    load_data,
    load_superres_data,
)
from .precision import check_precision_flags, set_cuda_math
from .resample import SCHEDULE_SAMPLERS, create_named_schedule_sampler
from .script_util import (
    args_to_dict,
    check_choice,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    save_args_json,
    script_parser,
    speed_from_args,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from .train_util import AUTO_RESUME, TrainLoop, check_train_settings, parse_ema_rates


def validate_training_args(args: argparse.Namespace) -> None:
    """Check the TRAIN flags; a bad value raises a UserError naming the flag. Cheap: no data read."""
    check_choice("schedule_sampler", args.schedule_sampler, SCHEDULE_SAMPLERS)
    check_train_settings(
        args.batch_size,
        args.microbatch,
        args.lr,
        args.log_interval,
        args.save_interval,
        getattr(args, "lr_anneal_steps", 0),  # classifier_train.py anneals over --iterations instead
        args.max_steps,
    )
    parse_ema_rates(args.ema_rate)
    check_precision_flags(args.use_fp16, args.use_bf16, args.fp16_scale_growth)
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
    return {**_shared_loop_kwargs(args), "lr_anneal_steps": args.lr_anneal_steps}


def _shared_loop_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The keyword arguments of every trainer that come from TRAIN flags, plus the log folder."""
    keys = (
        "batch_size microbatch lr ema_rate log_interval save_interval resume_checkpoint use_fp16 "
        "fp16_scale_growth weight_decay use_bf16 max_steps channels_last"
    ).split()
    return {**{k: getattr(args, k) for k in keys}, "log_dir": logger.get_dir()}


def diffusion_train_loop(
    args: argparse.Namespace, model: torch.nn.Module, diffusion: Any, data: Iterator, schedule_sampler: Any
) -> TrainLoop:
    """The trainer of ``image_train.py`` and ``super_res_train.py``."""
    return TrainLoop(
        model=model, diffusion=diffusion, data=data, schedule_sampler=schedule_sampler, **train_loop_kwargs(args)
    )


def classifier_train_loop(
    args: argparse.Namespace, model: torch.nn.Module, diffusion: Any, data: Iterator, schedule_sampler: Any
) -> ClassifierTrainLoop:
    """The trainer of ``classifier_train.py``, with a validation loader when ``--val_data_dir`` is given."""
    val_data = None
    if args.val_data_dir:
        val_data = load_data(
            data_dir=args.val_data_dir,
            batch_size=args.batch_size,
            image_size=args.image_size,
            class_cond=True,
            random_flip=args.random_flip,
            num_workers=args.num_workers,
            seed=args.seed,
            image_channels=args.classifier_image_channels,
        )
    return ClassifierTrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        val_data=val_data,
        schedule_sampler=schedule_sampler,
        noised=args.noised,
        iterations=args.iterations,
        anneal_lr=args.anneal_lr,
        eval_interval=args.eval_interval,
        **_shared_loop_kwargs(args),
    )


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed torch, NumPy and Python's generators with ``seed + rank``."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compile_model(model: torch.nn.Module, enabled: bool) -> None:
    """
    ``torch.compile`` the model in place (its state_dict keys do not change). A compile error
    surfaces at the first forward pass (no global error suppression hides it); a torch without
    ``compile`` runs eagerly with a logged warning. Shapes are static: a last microbatch of
    another size gets its own graph once (at most two per run), instead of torch's automatic
    switch to one dynamic-shape graph that every later step would then run.
    """
    if not enabled:
        return
    if not hasattr(model, "compile"):
        logger.log("warning: --compile: this torch has no torch.compile; running eagerly")
        return
    model.compile(dynamic=False)
    logger.log("--compile: the model runs through torch.compile")


def run_training(
    args: argparse.Namespace,
    build: Callable[[], Tuple[torch.nn.Module, Any]],
    make_data: Callable[[], Iterator],
    make_loop: Callable[..., Any] = diffusion_train_loop,
) -> int:
    """
    The training scripts' shared body: check every flag and the data folder, build the model
    and diffusion with ``build()`` (which checks the model flags) before any folder is created
    or process group joined, then set up ranks and logging, load data with ``make_data()``,
    resume (the trainer ``make_loop(args, model, diffusion, data, schedule_sampler)``), save
    ``args.json`` and train.

    :return: the signal number that stopped training (0 when it ended by itself).
    """
    validate_training_args(args)
    # Before any process group exists, so that every rank stops alike and rank 0 reports once.
    files = list_image_files(args.data_dir)
    check_enough_images(args.data_dir, len(files), dist_util.detect_launch().world_size)
    if getattr(args, "class_cond", False):  # the diffusion trainers' label table
        check_class_count(args.data_dir, files, args.num_classes)
    if hasattr(args, "classifier_num_classes"):  # the classifier's logits
        check_class_count(args.data_dir, files, args.classifier_num_classes, flag="classifier_num_classes")
        if args.val_data_dir:
            val_files = list_image_files(args.val_data_dir, flag="val_data_dir")
            check_same_classes(args.data_dir, files, args.val_data_dir, val_files)
    seed_everything(args.seed)  # the same initial weights on every rank
    cuda_math = set_cuda_math(args.deterministic)  # before CUDA starts: cuBLAS reads its workspace setting once
    model, diffusion = build()
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    dist_util.setup_dist()
    with dist_util.abort_on_error():
        logger.configure(dir=args.log_dir or None)
        logger.log(model.speed.summary())
        logger.log(cuda_math)
        seed_everything(args.seed, dist_util.get_rank())  # each rank draws its own noise and timesteps
        model.to(dist_util.dev())
        compile_model(model, args.compile)

        logger.log("creating data loader...")
        data = make_data()

        # Resuming happens here, so a checkpoint contradicting the flags leaves args.json alone.
        loop = make_loop(args, model, diffusion, data, schedule_sampler)
        if dist_util.is_main_process():
            save_args_json(args, logger.get_dir())
        logger.log("training...")
        loop.run_loop()
    return loop.stop_signal or 0


def _loader_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The data-loader arguments every training script takes from its TRAIN flags."""
    keys = ("data_dir", "batch_size", "random_flip", "random_crop", "num_workers", "seed")
    return {k: getattr(args, k) for k in keys}


def image_data(args: argparse.Namespace) -> Iterator:
    """``image_train.py``'s data: endless batches of ``--image_size`` images (labels with ``--class_cond``)."""
    return load_data(
        image_size=args.image_size,
        class_cond=args.class_cond,
        image_channels=args.image_channels,
        **_loader_kwargs(args),
    )


def super_res_data(args: argparse.Namespace) -> Iterator:
    """``super_res_train.py``'s data: ``--large_size`` images with ``low_res`` at ``--small_size``."""
    return load_superres_data(
        large_size=args.large_size,
        small_size=args.small_size,
        class_cond=args.class_cond,
        image_channels=args.image_channels,
        **_loader_kwargs(args),
    )


def classifier_data(args: argparse.Namespace) -> Iterator:
    """``classifier_train.py``'s data: labelled ``--image_size`` images (classes from file names)."""
    return load_data(
        image_size=args.image_size,
        class_cond=True,
        image_channels=args.classifier_image_channels,
        **_loader_kwargs(args),
    )


def _build(
    create_fn: Callable[..., Tuple[torch.nn.Module, Any]],
    defaults_fn: Callable[[], Dict[str, Any]],
    extra_keys: Sequence[str] = (),
):
    """``build(args)``: ``create_fn`` on the flags of ``defaults_fn()`` and ``extra_keys``, with the SPEED settings."""

    def build(args: argparse.Namespace) -> Tuple[torch.nn.Module, Any]:
        return create_fn(**args_to_dict(args, [*defaults_fn(), *extra_keys]), speed=speed_from_args(args))

    return build


def _build_classifier(args: argparse.Namespace) -> Tuple[torch.nn.Module, Any]:
    """The classifier and its diffusion; its own flags and the validation folder are checked first."""
    check_classifier_train_settings(args.iterations, args.eval_interval)
    return _build(create_classifier_and_diffusion, classifier_and_diffusion_defaults)(args)


# What each training script trains: (build(args) -> (model, diffusion), its data, its trainer).
TRAINING_SCRIPTS = {
    "image_train": (
        _build(create_model_and_diffusion, model_and_diffusion_defaults, ("snr_gamma",)),
        image_data,
        diffusion_train_loop,
    ),
    "super_res_train": (
        _build(sr_create_model_and_diffusion, sr_model_and_diffusion_defaults, ("snr_gamma",)),
        super_res_data,
        diffusion_train_loop,
    ),
    "classifier_train": (_build_classifier, classifier_data, classifier_train_loop),
}


def train_main(script: str, doc: str, argv: Optional[Sequence[str]] = None) -> None:
    """
    The ``main`` of a training script: parse its flags, build its model (:data:`TRAINING_SCRIPTS`)
    with the SPEED settings, and train on its data (:func:`run_training`). Stopped by a signal,
    it exits with 128 + the signal's number after saving, as a shell reports a killed process.

    :param script: ``"image_train"``, ``"super_res_train"`` or ``"classifier_train"`` (selects
        flag groups, model, data and trainer).
    :param doc: the script's docstring (the description in ``--help``).
    """
    build, make_data, make_loop = TRAINING_SCRIPTS[script]
    args = script_parser(script, doc).parse_args(argv)
    stop_signal = run_training(args, lambda: build(args), lambda: make_data(args), make_loop)
    if stop_signal:
        sys.exit(128 + stop_signal)
