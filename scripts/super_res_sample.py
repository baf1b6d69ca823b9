"""
Upsample low-resolution samples with a super-resolution model: reads ``--base_samples`` (an
``.npz`` as written by ``image_sample.py``) and writes ``samples_{N}x{L}x{L}x3.npz`` at
``--large_size`` in the log folder, plus a PNG grid of the first samples.

Sample ``i`` upsamples base sample ``i mod len(base_samples)`` (the original cycles too).
"""

import argparse
import io
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from improved_diffusion import dist_util, logger
from improved_diffusion.errors import UserError, run_main
from improved_diffusion.fileio import read_bytes
from improved_diffusion.sample_util import (
    SUPER_RES_SCRIPT,
    add_grid_alias,
    bf16_autocast,
    build_model_and_diffusion,
    check_sampler_flags,
    guided,
    model_session,
    sample_images,
    save_samples,
    save_sampling_args,
    validate_sampling_args,
)
from improved_diffusion.script_util import (
    NUM_CLASSES,
    parse_args_with_saved,
    script_parser,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

SCRIPT = "super_res_sample"
MODEL_KEYS = tuple(sr_model_and_diffusion_defaults())


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, taken = parse_args_with_saved(create_argparser(), MODEL_KEYS, argv)

    # Every flag and the base samples are checked, and the model and diffusion built (which
    # checks the model/diffusion flags), before a log folder is created or a process group joined.
    validate_sampling_args(args)
    if not args.base_samples:
        raise UserError("--base_samples is required: an .npz of low-resolution samples from image_sample.py")
    base_images, base_labels = load_base_samples(
        args.base_samples, args.small_size, args.class_cond, args.image_channels, args.num_classes
    )
    model, diffusion = build_model_and_diffusion(args, MODEL_KEYS, sr_create_model_and_diffusion)
    nfe = check_sampler_flags(args, diffusion, model)

    with model_session(args, taken, argv, model, MODEL_KEYS):
        logger.log(f"loaded {len(base_images)} base samples from {args.base_samples}")
        if args.num_samples > len(base_images):
            logger.log(f"note: --num_samples {args.num_samples} > {len(base_images)} base samples: they are cycled")

        def kwargs_fn(indices: np.ndarray, generators: List[torch.Generator]) -> Dict[str, torch.Tensor]:
            base = indices % len(base_images)
            low_res = torch.from_numpy(base_images[base]).float() / 127.5 - 1.0  # (B, h, w, C)
            model_kwargs = {"low_res": low_res.permute(0, 3, 1, 2)}  # (B, 3, h, w)
            if base_labels is not None:
                model_kwargs["y"] = torch.from_numpy(base_labels[base])
            return model_kwargs

        logger.log("creating samples...")
        images, kwargs = sample_images(
            guided(bf16_autocast(model, args.use_bf16), model, args.guidance_scale),
            diffusion,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            image_shape=(args.image_channels, args.large_size, args.large_size),
            seed=args.seed,
            sampler=args.sampler,
            eta=args.eta,
            clip_denoised=args.clip_denoised,
            kwargs_fn=kwargs_fn,
            script=SUPER_RES_SCRIPT,
        )
        if dist_util.is_main_process():
            save_samples(images, kwargs.get("y"), num_grid=args.num_grid)
            save_sampling_args(args, nfe)
        dist_util.barrier()
        logger.log("sampling complete")


def load_base_samples(
    path: str, small_size: int, class_cond: bool, image_channels: int = 3, num_classes: int = NUM_CLASSES
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """
    Read and check the low-resolution samples.

    :return: (N, small_size, small_size, C) uint8 images and, with ``class_cond``, (N,) int64
        labels (else None).
    :raises UserError: naming the file, for an unreadable archive, a missing ``arr_0`` (or
        ``arr_1`` with ``class_cond``), a wrong dtype or a wrong shape.
    """
    data = read_bytes(path)
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
        arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:  # numpy raises several types for a non-npz or corrupt file
        raise UserError(f"--base_samples {path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from exc
    if "arr_0" not in arrays:
        raise UserError(f"--base_samples {path}: no arr_0 (the uint8 NHWC images); keys: {sorted(arrays)}")
    images = arrays["arr_0"]
    if images.dtype != np.uint8:
        raise UserError(f"--base_samples {path}: arr_0 has dtype {images.dtype}, expected uint8")
    expected = ("N", small_size, small_size, image_channels)
    if images.ndim != 4 or images.shape[1:] != expected[1:] or len(images) == 0:
        raise UserError(
            f"--base_samples {path}: arr_0 has shape {images.shape}, expected (N, {small_size}, {small_size}, "
            f"{image_channels}) with N >= 1 (NHWC at --small_size {small_size}, --image_channels {image_channels})"
        )
    if not class_cond:
        return images, None
    if "arr_1" not in arrays:
        raise UserError(f"--base_samples {path}: no arr_1 (class labels), needed with --class_cond True")
    labels = arrays["arr_1"]
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"--base_samples {path}: arr_1 has {labels.dtype} shape {labels.shape}, expected ({len(images)},) integers"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"--base_samples {path}: arr_1 labels must lie in [0, {num_classes}) (--num_classes)")
    return images, labels.astype(np.int64)


def create_argparser() -> argparse.ArgumentParser:
    parser = script_parser(SCRIPT, __doc__)
    add_grid_alias(parser)
    return parser


if __name__ == "__main__":
    run_main(main)
