"""
Speed benchmarks: every speed option against the plain float32 path, measured side
by side in one run (interleaved repetitions, median), reported as ratios.

Benchmarks, one JSON line each (device, threads, torch version, machine, date included):

- ``train``: images/s of one training step through ``TrainLoop.run_step`` (forward,
  ``training_losses``, backward, AdamW, EMA) for the ``small`` config and the README's
  ``cifar10`` config;
- ``sample_step``: seconds of one ``p_sample`` step at batch 16 (4000-step diffusion);
- ``sample_loop``: seconds of a 50-step respaced ``p_sample_loop`` at batch 16;
- ``nll``: ``calc_bpd_loop`` on 4 images with 100 steps, one timestep per model call against
  ``timestep_batch`` (see also ``benchmarks/nll_timestep_batch.py``);
- ``bf16``: training loss under bfloat16 autocast against float32 (same weights, noise, t);
- ``ops``: raw matmul and 3x3 convolution, float32 NCHW against channels-last and bfloat16.

Variants (each is the plain path plus one option, except ``default`` and ``best``):
``plain`` = every speed switch off, float32, contiguous NCHW, for-loop AdamW;
one variant per ``improved_diffusion.nn.SpeedSettings`` field (e.g. ``sdpa``);
``channels_last``; ``fused_adamw``; ``compile`` (with ``--compile``); ``bf16`` (on GPUs and on
CPUs with native bfloat16, or with ``--bf16``); ``fp16`` (GPU); ``default`` = the library's
defaults; ``default_torch_ops`` = the defaults with torch ops instead of the compiled C kernels
(Winograd's tile transforms, channels-last GroupNorm; ``--native_kernels False``); ``best`` =
defaults plus every float32 option (plus compile with ``--compile``); ``bf16_sdpa_compile``
(GPU with ``--compile``).
A ratio > 1 means faster than ``plain``.

    .venv/bin/python benchmarks/run.py --threads 2               # everything (many minutes on a CPU)
    .venv/bin/python benchmarks/run.py --quick                   # smoke test: tiny sizes, seconds
    .venv/bin/python benchmarks/run.py --only train --compile    # one benchmark, with torch.compile
"""

import argparse
import copy
import dataclasses
import datetime
import inspect
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from improved_diffusion import dist_util, logger, winograd
from improved_diffusion.errors import UserError, run_main
from improved_diffusion.nn import SpeedSettings
from improved_diffusion.precision import MixedPrecision, ModelCall, native_bf16, set_cuda_math
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from improved_diffusion.train_setup import compile_model
from improved_diffusion.train_util import TrainLoop

BENCHMARKS = ("train", "sample_step", "sample_loop", "nll", "bf16", "ops")

# The configurations (32x32, learned sigmas, cosine schedule, 4000 steps).
_COMMON = dict(image_size=32, learn_sigma=True, noise_schedule="cosine", diffusion_steps=4000)
CONFIGS = {
    "small": (dict(_COMMON, num_channels=64, num_res_blocks=2, attention_resolutions="16,8"), 16),
    "cifar10": (dict(_COMMON, num_channels=128, num_res_blocks=3, dropout=0.3), 8),
}
# --quick: the same code paths on a model that runs in milliseconds.
QUICK_CONFIG = (
    dict(
        image_size=8,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="4",
        learn_sigma=True,
        noise_schedule="cosine",
        diffusion_steps=20,
    ),
    2,
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """
    One way of running the same computation.

    :param switches: ``nn.SpeedSettings`` values of the model (missing ones keep the library default).
    :param channels_last: channels-last activations and weights; None = the library default.
    :param fused_adamw: ``AdamW(fused=True)`` instead of the training loop's optimizer.
    :param compile: ``torch.compile`` the network.
    :param amp: autocast dtype, ``"bf16"`` or ``"fp16"``; None = float32.
    """

    name: str
    switches: Dict[str, bool]
    channels_last: Optional[bool] = False
    fused_adamw: bool = False
    compile: bool = False
    amp: Optional[str] = None


def _switch_names() -> List[str]:
    """The on/off speed settings (winograd True: the fixed size rule; its "auto" is the winograd_auto variant;
    native_kernels only matters with winograd on: the default_torch_ops variant)."""
    return [
        f.name
        for f in dataclasses.fields(SpeedSettings)
        if (isinstance(f.default, bool) or f.name == "winograd") and f.name != "native_kernels"
    ]


def _speed(variant: Variant) -> SpeedSettings:
    """The model's speed settings in ``variant``."""
    return SpeedSettings(**variant.switches)


def make_variants(args: argparse.Namespace, device: torch.device) -> Dict[str, Variant]:
    """The variants this run compares, ``plain`` first; ``--variants`` picks a subset."""
    off = {name: False for name in _switch_names()}
    variants = [Variant("plain", off)]
    variants += [Variant(name, dict(off, **{name: True})) for name in _switch_names()]
    variants.append(Variant("winograd_auto", dict(off, winograd="auto")))
    if "channels_last" not in off:
        variants.append(Variant("channels_last", off, channels_last=True))
    variants.append(Variant("fused_adamw", off, fused_adamw=True))
    if args.compile:
        variants.append(Variant("compile", off, compile=True))
    if native_bf16(device) or args.bf16:
        variants.append(Variant("bf16", off, amp="bf16"))
    if device.type == "cuda":
        variants.append(Variant("fp16", off, amp="fp16"))
    variants.append(Variant("default", {}, channels_last=None))
    variants.append(Variant("default_torch_ops", dict(native_kernels=False), channels_last=None))
    variants.append(Variant("best", {}, channels_last=True, fused_adamw=True, compile=args.compile))
    if device.type == "cuda" and args.compile:
        variants.append(Variant("bf16_sdpa_compile", dict(off, sdpa=True), amp="bf16", compile=True))
    chosen = {v.name: v for v in variants}
    if args.variants:
        wanted = ["plain"] + [n for n in args.variants.split(",") if n and n != "plain"]
        unknown = [n for n in wanted if n not in chosen]
        if unknown:
            raise UserError(f"--variants {args.variants}: unknown {unknown}; known here: {','.join(chosen)}")
        chosen = {n: chosen[n] for n in wanted}
    return chosen


# ---------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    tasks: Dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> Dict[str, Dict[str, float]]:
    """
    Run every task ``warmup`` times, then ``repeats`` rounds of one call each, interleaved so
    that drifting machine load hits every task alike.

    :return: per task ``first_s`` (the first call: includes compilation), ``median_s`` (wall),
        ``cpu_s`` (median process CPU time; less sensitive to other processes when the run has
        one thread), ``min_s`` and ``max_s``.
    """
    first: Dict[str, float] = {}
    for name, task in tasks.items():
        start = time.perf_counter()
        for _ in range(max(warmup, 1)):
            task()
            _sync(device)
            first.setdefault(name, time.perf_counter() - start)
    wall: Dict[str, List[float]] = {name: [] for name in tasks}
    cpu: Dict[str, List[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, task in tasks.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            task()
            _sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: dict(
            first_s=first[name],
            median_s=statistics.median(wall[name]),
            cpu_s=statistics.median(cpu[name]),
            min_s=min(wall[name]),
            max_s=max(wall[name]),
        )
        for name in tasks
    }


def _with_ratios(stats: Dict[str, Dict[str, float]], images: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """Add ``ratio`` (plain's median / this median: > 1 is faster) and ``images_per_s``."""
    base = stats["plain"]
    for entry in stats.values():
        entry["ratio"] = base["median_s"] / entry["median_s"]
        entry["cpu_ratio"] = base["cpu_s"] / entry["cpu_s"] if entry["cpu_s"] > 0 else float("nan")
        if images is not None:
            entry["images_per_s"] = images / entry["median_s"]
    return {name: {k: round(v, 5) for k, v in entry.items()} for name, entry in stats.items()}


def _header(benchmark: str, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    return dict(
        benchmark=benchmark,
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        load_avg=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        quick=args.quick,
        repeats=args.repeats,
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        tf32_cudnn=torch.backends.cudnn.allow_tf32,
    )


def _cpu_name() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores, {capability})"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {capability})"


def _emit(record: Dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


# ---------------------------------------------------------------------------------------------
# Building models for a variant


def _build(flags: Dict[str, Any], **overrides: Any):
    all_flags = model_and_diffusion_defaults()
    all_flags.update(flags, **overrides)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**all_flags)
    # A fresh UNet's zero-initialised output layers make its output exactly 0 whatever the
    # precision; small random values there give representative numbers (bf16 loss difference).
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(0.0, 0.02)
    return model, diffusion


def _channels_last(variant: Variant) -> bool:
    """Whether the benchmark itself converts to channels-last (None leaves it to the library)."""
    return bool(variant.channels_last)


def _compile(model: torch.nn.Module, enabled: bool) -> None:
    """What ``image_train.py --compile True`` does: ``torch.compile`` in place, eager fallback."""
    compile_model(model, enabled)


class _Inference(ModelCall):
    """A model call with the variant's speed settings, layout and autocast; float32 output."""

    def __init__(self, model: torch.nn.Module, variant: Variant, device: torch.device):
        self.variant = variant
        model.set_speed(_speed(variant))
        if _channels_last(variant):
            model = model.to(memory_format=torch.channels_last)
        _compile(model, variant.compile)
        precision = MixedPrecision(device, use_fp16=variant.amp == "fp16", use_bf16=variant.amp == "bf16")
        super().__init__(model, precision, channels_last=_channels_last(variant))


def _inference_models(model: torch.nn.Module, variants: Dict[str, Variant], device: torch.device):
    """One wrapped copy of ``model`` per variant, skipping those that differ only in the optimizer."""
    model = model.to(device).eval()  # sampling and NLL: no dropout
    wanted = {n: v for n, v in variants.items() if n in ("plain", "best") or not v.fused_adamw}
    return {name: _Inference(copy.deepcopy(model), v, device) for name, v in wanted.items()}


def _train_loop(model: torch.nn.Module, diffusion: Any, variant: Variant, batch_size: int, log_dir: str) -> TrainLoop:
    options = inspect.signature(TrainLoop).parameters
    model.set_speed(_speed(variant))
    kwargs: Dict[str, Any] = dict(
        model=model,
        diffusion=diffusion,
        data=iter(()),
        batch_size=batch_size,
        microbatch=-1,
        lr=1e-4,
        ema_rate="0.9999",
        log_interval=10**9,
        save_interval=0,
        resume_checkpoint="",
        log_dir=log_dir,
        use_fp16=variant.amp == "fp16",
        use_bf16=variant.amp == "bf16",
    )
    if "handle_signals" in options:
        kwargs["handle_signals"] = False
    if variant.channels_last is not None:
        kwargs["channels_last"] = variant.channels_last
    for name in ("compile", "fused_adamw"):
        if name in options and getattr(variant, name):
            kwargs[name] = True
    if "compile" not in options:
        _compile(model, variant.compile)
    loop = TrainLoop(**kwargs)
    if not variant.name.startswith("default") and "fused_adamw" not in options:
        # The library's AdamW is fused; plain and its one-option variants keep the original's for-loop one.
        fused = dict(fused=True) if variant.fused_adamw else dict(foreach=False)
        loop.opt = torch.optim.AdamW(loop.params, lr=loop.lr, weight_decay=loop.weight_decay, **fused)
    return loop


# ---------------------------------------------------------------------------------------------
# Benchmarks


def bench_train(args, device, variants, configs) -> None:
    """Training throughput through ``TrainLoop.run_step``, one JSON line per config."""
    for config_name, (flags, batch_size) in configs.items():
        model, diffusion = _build(flags)
        batch = torch.rand(batch_size, 3, flags["image_size"], flags["image_size"]) * 2 - 1
        tasks = {}
        with tempfile.TemporaryDirectory() as log_dir, logger.scoped_configure(dir=log_dir, format_strs=["log"]):
            for name, variant in variants.items():
                loop = _train_loop(copy.deepcopy(model), diffusion, variant, batch_size, log_dir)
                loop.model.train()  # dropout on, as in run_loop
                for _ in range(64 if variant.amp == "fp16" else 0):  # fp16 starts at a 2^20 loss scale:
                    loop.run_step(batch, {})  # time taken steps, not skipped ones
                    if loop.nonfinite_in_a_row == 0:
                        break
                tasks[name] = lambda loop=loop: loop.run_step(batch, {})
            stats = measure(tasks, device, args.repeats, args.warmup)
        record = _header("train", args, device)
        record.update(config=config_name, flags=flags, batch_size=batch_size, unit="images/s")
        record["results"] = _with_ratios(stats, images=batch_size)
        _emit(record)


def bench_sample_step(args, device, variants, configs) -> None:
    """Seconds of one ``p_sample`` step (mid-chain timestep) at batch 16."""
    flags, batch_size = configs["small"]
    batch_size = args.sample_batch or batch_size
    model, diffusion = _build(flags)
    models = _inference_models(model, variants, device)
    shape = (batch_size, 3, flags["image_size"], flags["image_size"])
    x = torch.randn(*shape, device=device)
    t = torch.full((batch_size,), diffusion.num_timesteps // 2, device=device, dtype=torch.long)

    def step(m):
        with torch.no_grad():
            diffusion.p_sample(m, x, t)

    tasks = {n: lambda m=m: step(m) for n, m in models.items()}
    stats = measure(tasks, device, args.repeats, args.warmup)
    record = _header("sample_step", args, device)
    record.update(config="small", batch_size=batch_size, num_timesteps=diffusion.num_timesteps, unit="s/step")
    record["results"] = _with_ratios(stats)
    _emit(record)


def bench_sample_loop(args, device, variants, configs) -> None:
    """Seconds of a whole respaced ``p_sample_loop`` (50 steps in the full run) at batch 16."""
    flags, batch_size = configs["small"]
    batch_size = args.sample_batch or batch_size
    steps = 5 if args.quick else 50
    model, diffusion = _build(flags, timestep_respacing=str(steps))
    models = _inference_models(model, variants, device)
    shape = (batch_size, 3, flags["image_size"], flags["image_size"])
    noise = torch.randn(*shape, device=device)

    def loop(m):
        torch.manual_seed(0)
        diffusion.p_sample_loop(m, shape, noise=noise, device=device)

    tasks = {n: lambda m=m: loop(m) for n, m in models.items()}
    stats = measure(tasks, device, args.repeats, args.warmup)
    record = _header("sample_loop", args, device)
    record.update(config="small", batch_size=batch_size, num_timesteps=diffusion.num_timesteps, unit="s/loop")
    record["results"] = _with_ratios(stats)
    _emit(record)


def bench_nll(args, device, variants, configs) -> None:
    """``calc_bpd_loop`` on 4 images, 100 respaced steps: one timestep per call vs ``timestep_batch``."""
    flags, _ = configs["small"]
    images, steps = (2, 10) if args.quick else (4, 100)
    model, diffusion = _build(flags, timestep_respacing=str(steps))
    plain = _inference_models(model, {"plain": variants["plain"]}, device)["plain"]
    x_start = torch.rand(images, 3, flags["image_size"], flags["image_size"], device=device) * 2 - 1
    outputs: Dict[str, Dict[str, torch.Tensor]] = {}

    def bpd(name: str, k: int) -> None:
        torch.manual_seed(0)  # the same noise for every variant
        with torch.no_grad():
            outputs[name] = diffusion.calc_bpd_loop(plain, x_start, timestep_batch=k)

    tasks = {"plain": lambda: bpd("plain", 1)}
    for k in args.timestep_batch:
        tasks[f"timestep_batch_{k}"] = lambda k=k: bpd(f"timestep_batch_{k}", k)
    stats = measure(tasks, device, args.repeats, args.warmup)
    record = _header("nll", args, device)
    record.update(config="small", images=images, num_timesteps=diffusion.num_timesteps, unit="s/loop")
    record["results"] = _with_ratios(stats)
    for name, out in outputs.items():
        diff = (out["total_bpd"] - outputs["plain"]["total_bpd"]).abs().max().item()
        record["results"][name]["max_abs_diff_total_bpd"] = diff
    _emit(record)


def bench_bf16(args, device, variants, configs) -> None:
    """Loss difference of bfloat16 autocast against float32, and the time of one forward+loss."""
    flags, batch_size = configs["small"]
    batch_size = min(batch_size, 2 if not native_bf16(device) else batch_size)  # slow without native bf16
    model, diffusion = _build(flags)
    off = variants["plain"].switches
    pair = {"plain": Variant("plain", off), "bf16": Variant("bf16", off, amp="bf16")}
    models = _inference_models(model, pair, device)
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(batch_size, 3, flags["image_size"], flags["image_size"], generator=gen) * 2 - 1).to(device)
    noise = torch.randn(x.shape, generator=gen).to(device)
    t = torch.randint(0, diffusion.num_timesteps, (batch_size,), generator=gen).to(device)
    losses: Dict[str, torch.Tensor] = {}

    def loss(name: str) -> None:
        with torch.no_grad():
            losses[name] = diffusion.training_losses(models[name], x, t, noise=noise)["loss"]

    tasks = {n: lambda n=n: loss(n) for n in models}
    stats = measure(tasks, device, max(1, args.repeats // 2), 1)
    record = _header("bf16", args, device)
    record.update(config="small", batch_size=batch_size, native_bf16=native_bf16(device), unit="s/forward+loss")
    record["results"] = _with_ratios(stats, images=batch_size)
    record["loss_fp32"] = losses["plain"].tolist()
    record["loss_bf16"] = losses["bf16"].tolist()
    diff = (losses["bf16"] - losses["plain"]).abs()
    record["max_abs_diff_loss"] = diff.max().item()
    record["max_rel_diff_loss"] = (diff / losses["plain"].abs().clamp_min(1e-12)).max().item()
    _emit(record)


def bench_ops(args, device, variants, configs) -> None:
    """
    Raw kernels: matmul and 3x3 convolution in float32, channels-last and bfloat16; on CPUs
    also the Winograd F(4x4, 3x3) convolution, forward and forward + backward.
    """
    size, (n, c, hw) = (128, (2, 32, 8)) if args.quick else (512, (8, 64, 16))
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    x, w = torch.randn(n, c, hw, hw, device=device), torch.randn(c, c, 3, 3, device=device)
    x_cl, w_cl = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    a16, b16, x16, w16 = (v.bfloat16() for v in (a, b, x, w))
    tasks = {
        "plain": lambda: (a @ b, F.conv2d(x, w, padding=1)),
        "matmul_fp32": lambda: a @ b,
        "matmul_bf16": lambda: a16 @ b16,
        "conv_fp32": lambda: F.conv2d(x, w, padding=1),
        "conv_fp32_channels_last": lambda: F.conv2d(x_cl, w_cl, padding=1),
        "conv_bf16": lambda: F.conv2d(x16, w16, padding=1),
    }
    if device.type == "cpu":
        x_g, w_g = x.clone().requires_grad_(), w.clone().requires_grad_()
        grad = torch.randn(n, c, hw, hw, device=device)

        def train(conv: Callable[..., torch.Tensor]) -> Callable[[], Any]:
            return lambda: torch.autograd.grad(conv(x_g, w_g), (x_g, w_g), grad)

        tasks.update(
            conv_fp32_winograd=lambda: winograd.conv3x3(x, w),
            conv_fp32_train=train(lambda xx, ww: F.conv2d(xx, ww, padding=1)),
            conv_fp32_winograd_train=train(winograd.conv3x3),
        )
    stats = measure(tasks, device, args.repeats, args.warmup)
    record = _header("ops", args, device)
    record.update(matmul=size, conv=[n, c, hw, hw], native_bf16=native_bf16(device), unit="s/call")
    record["results"] = _with_ratios(stats)
    record["bf16_matmul_speedup"] = round(stats["matmul_fp32"]["median_s"] / stats["matmul_bf16"]["median_s"], 4)
    record["bf16_conv_speedup"] = round(stats["conv_fp32"]["median_s"] / stats["conv_bf16"]["median_s"], 4)
    record["channels_last_conv_speedup"] = round(
        stats["conv_fp32"]["median_s"] / stats["conv_fp32_channels_last"]["median_s"], 4
    )
    if "conv_fp32_winograd" in stats:
        for key, fast, direct in (
            ("winograd_conv_speedup", "conv_fp32_winograd", "conv_fp32"),
            ("winograd_conv_train_speedup", "conv_fp32_winograd_train", "conv_fp32_train"),
        ):
            record[key] = round(stats[direct]["median_s"] / stats[fast]["median_s"], 4)
    _emit(record)


RUNNERS = dict(
    train=bench_train,
    sample_step=bench_sample_step,
    sample_loop=bench_sample_loop,
    nll=bench_nll,
    bf16=bench_bf16,
    ops=bench_ops,
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke test")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for every benchmark (default 2, 1 with --quick)",
    )
    parser.add_argument("--only", default="", help=f"comma list of benchmarks, from {','.join(BENCHMARKS)}")
    parser.add_argument("--configs", default="small,cifar10", help="training configs: small,cifar10")
    parser.add_argument("--variants", default="", help="comma list of variants (plain is always included)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants (slow to compile)")
    parser.add_argument("--bf16", action="store_true", help="add bf16 variants even without native bf16")
    parser.add_argument("--timestep_batch", default="10", help="comma list of K for the nll benchmark")
    parser.add_argument("--sample_batch", type=int, default=0, help="batch of the sampling benchmarks (0 = 16)")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    if args.threads < 1 or args.repeats is not None and args.repeats < 1:
        raise UserError(f"--threads {args.threads} / --repeats {args.repeats}: must be positive")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    args.timestep_batch = [int(k) for k in args.timestep_batch.split(",") if k]
    if args.quick and not args.sample_batch:
        args.sample_batch = 2
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_cuda_math()  # float32 is float32: no TF32 (recorded in every header)
    device = dist_util.dev()
    only = [b for b in args.only.split(",") if b] or list(BENCHMARKS)
    unknown = [b for b in only if b not in RUNNERS]
    if unknown:
        raise UserError(f"--only {args.only}: unknown {unknown}; known: {','.join(BENCHMARKS)}")
    if args.quick:
        train_configs, small = {"quick": QUICK_CONFIG}, QUICK_CONFIG
    else:
        names = [c for c in args.configs.split(",") if c]
        if not names or any(c not in CONFIGS for c in names):
            raise UserError(f"--configs {args.configs}: expected a comma list from {','.join(CONFIGS)}")
        train_configs, small = {c: CONFIGS[c] for c in names}, CONFIGS["small"]
    variants = make_variants(args, device)
    for name in only:
        RUNNERS[name](args, device, variants, train_configs if name == "train" else {"small": small})


if __name__ == "__main__":
    run_main(main)
