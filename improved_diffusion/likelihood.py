"""
Bits per dimension of a data set under a model [IDDPM §2.1, §3.4]: the variational bound
L_vlb = L_0 + L_1 + ... + L_T (prior term, one KL term per timestep, discretised decoder)
from :meth:`GaussianDiffusion.calc_bpd_loop`, summed over images split across ranks, with
running means logged and the per-timestep terms written as the original's ``.npz`` files.
"""

import os
from typing import Any, Dict, Iterator, Tuple

import numpy as np
import torch

from . import dist_util, logger
from .fileio import atomic_save_json, atomic_save_npz

TERMS = ("vb", "mse", "xstart_mse")


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


def save_results(sums: Dict[str, Any], folder: str, **settings: Any) -> None:
    """
    Write the per-timestep means (``{vb,mse,xstart_mse}_terms.npz``) and ``nll_summary.json``
    (bits/dim, count, and ``settings``, e.g. the model path and flags) to ``folder`` (rank 0).
    """
    n = sums["count"]
    for name in TERMS:
        path = os.path.join(folder, f"{name}_terms.npz")
        logger.log(f"saving {name} terms to {path}")
        atomic_save_npz(path, sums[name] / n)
    summary = dict(
        total_bpd=sums["total_bpd"] / n,
        prior_bpd=sums["prior_bpd"] / n,
        vb_bpd=float(sums["vb"].sum()) / n,
        count=n,
        num_timesteps=len(sums["vb"]),
        **settings,
    )
    path = os.path.join(folder, "nll_summary.json")
    atomic_save_json(summary, path)
    logger.log(f"summary: total_bpd={summary['total_bpd']:.6f} prior_bpd={summary['prior_bpd']:.6f} over {n} images")
