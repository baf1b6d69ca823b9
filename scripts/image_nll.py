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
import os
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from improved_diffusion import dist_util, logger
from improved_diffusion.errors import UserError, run_main
from improved_diffusion.fileio import atomic_save_json, atomic_save_npz
from improved_diffusion.image_datasets import list_image_files, load_data
from improved_diffusion.sample_util import (
    bf16_autocast,
    build_model_and_diffusion,
    derive_seed,
    load_checkpoint,
    log_saved_flags,
    require_model_path,
)
from improved_diffusion.script_util import (
    FlagParser,
    add_dict_to_argparser,
    apply_speed_flags,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_args_with_saved,
    speed_defaults,
)

TERMS = ("vb", "mse", "xstart_mse")
MODEL_KEYS = tuple(model_and_diffusion_defaults())


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, taken = parse_args_with_saved(create_argparser(), MODEL_KEYS, argv)

    # Every flag and the data folder are checked, and the model and diffusion built (which checks
    # the model/diffusion flags), before a log folder is created or a process group is joined.
    validate_args(args)
    num_images = len(list_image_files(args.data_dir))
    model, diffusion = build_model_and_diffusion(args, MODEL_KEYS, create_model_and_diffusion)

    dist_util.setup_dist()
    with dist_util.abort_on_error():
        logger.configure(dir=args.log_dir or None)
        apply_speed_flags(args)
        log_saved_flags(taken, args.model_path, argv)
        logger.log(f"loading {args.model_path}...")
        load_checkpoint(model, args, MODEL_KEYS)

        logger.log(f"creating data loader ({num_images} images)...")
        data = load_data(
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            image_size=args.image_size,
            class_cond=args.class_cond,
            deterministic=True,
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
            save_results(sums, args)
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


def evaluate_bpd(
    model: Any,
    diffusion: Any,
    data: Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
    *,
    num_samples: int,
    batch_size: int,
    clip_denoised: bool = True,
    timestep_batch: int = 1,
) -> Dict[str, Any]:
    """
    Run ``diffusion.calc_bpd_loop`` over ``num_samples`` images split over the ranks, logging
    running means after each round.

    :param data: yields ``(x_start (B, C, H, W) in [-1, 1], model_kwargs)`` for this rank.
    :return: summed over all ranks' images: ``count``, ``total_bpd``, ``prior_bpd`` (floats)
        and ``vb``, ``mse``, ``xstart_mse`` ((T,) float64 arrays).
    """
    device = dist_util.dev()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    num_timesteps = diffusion.num_timesteps
    sums = torch.zeros(3 + len(TERMS) * num_timesteps, dtype=torch.float64, device=device)
    done = 0
    while done < num_samples:
        # This round: up to batch_size images per rank, never past num_samples in total.
        take = max(0, min(batch_size, num_samples - done - rank * batch_size))
        batch, model_kwargs = next(data)
        local = torch.zeros_like(sums)
        if take > 0:
            x_start = batch[:take].to(device)
            model_kwargs = {k: v[:take].to(device) for k, v in model_kwargs.items()}
            with torch.no_grad():
                metrics = diffusion.calc_bpd_loop(
                    model,
                    x_start,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                    timestep_batch=timestep_batch,
                    progress=rank == 0,
                )
            local.copy_(_pack(metrics, take))
        # Sum over ranks (the mean times the number of ranks).
        dist_util.all_reduce_mean_(local)
        sums += local * world
        done += min(world * batch_size, num_samples - done)
        _log_running_means(_unpack(sums.cpu().numpy(), num_timesteps))
    return _unpack(sums.cpu().numpy(), num_timesteps)


def _pack(metrics: Dict[str, torch.Tensor], count: int) -> torch.Tensor:
    """[count, sum total_bpd, sum prior_bpd, per-timestep sums of vb, mse, xstart_mse]."""
    head = torch.stack(
        [
            torch.tensor(float(count)),
            metrics["total_bpd"].double().sum().cpu(),
            metrics["prior_bpd"].double().sum().cpu(),
        ]
    )
    terms = [metrics[name].double().sum(dim=0).cpu() for name in TERMS]  # each (T,)
    return torch.cat([head] + terms)


def _unpack(flat: np.ndarray, num_timesteps: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {"count": int(round(flat[0])), "total_bpd": float(flat[1]), "prior_bpd": float(flat[2])}
    for i, name in enumerate(TERMS):
        out[name] = flat[3 + i * num_timesteps : 3 + (i + 1) * num_timesteps]
    return out


def _log_running_means(sums: Dict[str, Any]) -> None:
    n = sums["count"]
    logger.logkv("samples", n)
    logger.logkv("total_bpd", sums["total_bpd"] / n)
    logger.logkv("prior_bpd", sums["prior_bpd"] / n)
    logger.logkv("vb_bpd", float(sums["vb"].sum()) / n)
    logger.logkv("mse", float(sums["mse"].mean()) / n)
    logger.logkv("xstart_mse", float(sums["xstart_mse"].mean()) / n)
    # Per-term detail by quarter of the timesteps (column j holds t = T-1-j), as training logs.
    num_timesteps = len(sums["vb"])
    quartile = (4 * (num_timesteps - 1 - np.arange(num_timesteps))) // num_timesteps
    for q in range(4):
        if (quartile == q).any():
            logger.logkv(f"vb_bpd_q{q}", float(sums["vb"][quartile == q].sum()) / n)
            logger.logkv(f"mse_q{q}", float(sums["mse"][quartile == q].mean()) / n)
    logger.dumpkvs()
    logger.log(f"done {n} samples: bpd={sums['total_bpd'] / n}")


def save_results(sums: Dict[str, Any], args: argparse.Namespace) -> None:
    """Write the per-timestep means and the summary in the log folder (rank 0)."""
    n = sums["count"]
    for name in TERMS:
        path = os.path.join(logger.get_dir(), f"{name}_terms.npz")
        logger.log(f"saving {name} terms to {path}")
        atomic_save_npz(path, sums[name] / n)
    summary = dict(
        total_bpd=sums["total_bpd"] / n,
        prior_bpd=sums["prior_bpd"] / n,
        vb_bpd=float(sums["vb"].sum()) / n,
        count=n,
        num_timesteps=len(sums["vb"]),
        model_path=args.model_path,
        data_dir=args.data_dir,
        clip_denoised=args.clip_denoised,
        timestep_batch=args.timestep_batch,
        seed=args.seed,
    )
    path = os.path.join(logger.get_dir(), "nll_summary.json")
    atomic_save_json(summary, path)
    logger.log(f"summary: total_bpd={summary['total_bpd']:.6f} prior_bpd={summary['prior_bpd']:.6f} over {n} images")


def create_argparser() -> argparse.ArgumentParser:
    defaults = dict(
        data_dir="",
        clip_denoised=True,
        num_samples=1000,
        batch_size=1,
        model_path="",
        log_dir="",
        seed=0,
        timestep_batch=1,
        use_bf16=False,
        **speed_defaults(),
    )
    defaults.update(model_and_diffusion_defaults())
    parser = FlagParser(description=__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
