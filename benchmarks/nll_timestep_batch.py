"""
Benchmark: ``calc_bpd_loop`` with ``timestep_batch=K`` (K timesteps per model call) against
the plain loop (one model call per timestep), measured side by side in one run on a tiny
model. Prints one JSON line: both times, their ratio (plain / batched; > 1 means batching is
faster), the device, the thread count, and the largest difference in total bits/dim.

    .venv/bin/python benchmarks/nll_timestep_batch.py --threads 1 --timestep_batch 8
"""

import argparse
import json
import time
from typing import Dict, Tuple

import torch

from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults


def _time_bpd(model, diffusion, x_start: torch.Tensor, timestep_batch: int) -> Tuple[float, Dict[str, torch.Tensor]]:
    torch.manual_seed(0)  # the same q_sample noise for both variants
    start = time.perf_counter()
    with torch.no_grad():
        metrics = diffusion.calc_bpd_loop(model, x_start, clip_denoised=True, timestep_batch=timestep_batch)
    if x_start.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timestep_batch", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--num_channels", type=int, default=32)
    parser.add_argument("--diffusion_steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    flags = model_and_diffusion_defaults()
    flags.update(
        image_size=args.image_size,
        num_channels=args.num_channels,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions=str(args.image_size // 2),
        diffusion_steps=args.diffusion_steps,
        noise_schedule="cosine",
        learn_sigma=True,
    )
    model, diffusion = create_model_and_diffusion(**flags)
    model.to(device)
    model.eval()  # evaluation: no dropout
    x_start = (
        torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1)) * 2
        - 1
    ).to(device)

    # Warm up both paths, then alternate them so drift in machine load hits both alike.
    _time_bpd(model, diffusion, x_start, 1)
    _time_bpd(model, diffusion, x_start, args.timestep_batch)
    plain, batched = [], []
    for _ in range(args.repeats):
        seconds, plain_metrics = _time_bpd(model, diffusion, x_start, 1)
        plain.append(seconds)
        seconds, batched_metrics = _time_bpd(model, diffusion, x_start, args.timestep_batch)
        batched.append(seconds)
    diff = (plain_metrics["total_bpd"] - batched_metrics["total_bpd"]).abs().max().item()
    result = dict(
        benchmark="nll_timestep_batch",
        device=str(device),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        batch_size=args.batch_size,
        image_size=args.image_size,
        num_timesteps=diffusion.num_timesteps,
        timestep_batch=args.timestep_batch,
        plain_s=min(plain),
        batched_s=min(batched),
        ratio=min(plain) / min(batched),
        max_abs_diff_total_bpd=diff,
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
