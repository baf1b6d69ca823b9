"""
The GPU check: one prepared command for the few minutes a GPU is lent (``make gpu-check``,
``benchmarks/gpu_check.sh OUT_DIR``). On a CUDA machine, in well under 8 minutes on one
H100-class GPU, it

1. runs the CUDA-marked tests (``pytest -m cuda``: fp16 autocast + GradScaler, bf16, SDPA's
   flash / memory-efficient kernels against the plain formula, ``--compile``, channels-last,
   pinned-memory loading, the sync-free training step, NCCL when two GPUs are visible);
2. trains the 64x64 ImageNet-style config (``--image_size 64 --num_channels 128
   --num_res_blocks 3 --learn_sigma True``, batch 64) in fp32, fp16 autocast, bf16 autocast and
   bf16 + ``torch.compile``: from the same start, 20 steps, then the loss of the trained weights
   on a fixed batch (in float32) against fp32's; then timed steps for images/s, peak memory, and
   model FLOP utilisation (FLOPs of one step from ``torch.utils.flop_counter`` / its time / the
   GPU's peak dense bf16 rate, :data:`PEAK_BF16_TFLOPS`); plus the peak memory of batch 32
   with gradient checkpointing in bf16;
3. times one sampling step and 50-step loops at batch 64 with the samplers of
   :data:`SAMPLE_LOOPS` (ancestral, DPM-Solver++(2M) and its SDE form, from
   :mod:`improved_diffusion.samplers`), in float32 and bf16 autocast;
4. writes ``gpu_check.json`` and ``gpu_check.md`` atomically (a header with machine, versions and the TF32
   setting, then tables) into the output folder.

It exits 1 if a test fails, a variant fails, or a mixed-precision loss is not finite. Without
a GPU it says so in one line and exits 0; ``--allow_cpu --quick`` runs the same code on the
CPU with a tiny model (how the tests check this script).

Targets (recorded, never asserted): bf16 + SDPA + compile at least 2.5x fp32's images/s and at
least 40 % MFU; batch 32 with ``--use_checkpoint True`` under 16 GB.
"""

import argparse
import copy
import datetime
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from improved_diffusion import logger, samplers
from improved_diffusion.errors import UserError, run_main
from improved_diffusion.fileio import atomic_write
from improved_diffusion.precision import MixedPrecision, ModelCall, native_bf16, set_cuda_math
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from improved_diffusion.train_setup import compile_model
from improved_diffusion.train_util import TrainLoop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Peak dense (no sparsity) bfloat16 tensor-core TFLOPS by device name, first match wins.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)

CONFIG = dict(image_size=64, num_channels=128, num_res_blocks=3, learn_sigma=True)
QUICK_CONFIG = dict(image_size=16, num_channels=32, num_res_blocks=1, learn_sigma=True, channel_mult="1,2")
# name: (TrainLoop precision keywords, torch.compile)
VARIANTS = {
    "fp32": ({}, False),
    "fp16": (dict(use_fp16=True), False),
    "bf16": (dict(use_bf16=True), False),
    "bf16_compile": (dict(use_bf16=True), True),
}
MIXED = ("fp16", "bf16", "bf16_compile")
SAMPLE_LOOPS = (samplers.ANCESTRAL, samplers.DPM_SOLVER_2M, samplers.DPM_SOLVER_2M_SDE)
CHECKPOINT_TARGET_GB = 16.0


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """The table's peak dense bf16 TFLOPS for a device name (e.g. ``"NVIDIA H100 80GB HBM3"``), else None."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# ---------------------------------------------------------------------------------------------
# header and tests


def header(device: torch.device, args: argparse.Namespace) -> Dict[str, Any]:
    """Machine, versions and the arithmetic settings the numbers were taken with."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    return dict(
        device=name,
        gpus_visible=torch.cuda.device_count() if cuda else 0,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if cuda else None,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        tf32_cudnn=torch.backends.cudnn.allow_tf32,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        bf16_native=native_bf16(device),
        peak_bf16_tflops=args.peak_tflops or (peak_bf16_tflops(name) if cuda else None),
        config=dict(QUICK_CONFIG if args.quick else CONFIG),
        batch_size=args.batch_size,
    )


def run_cuda_tests(timeout_s: float) -> Dict[str, Any]:
    """``pytest -m cuda tests`` in a subprocess: its exit status and last lines."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(returncode=124, summary=f"timed out after {timeout_s:.0f} s", ok=False)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    # pytest's 5 ("no tests collected") is a failure here too.
    return dict(
        returncode=proc.returncode, summary=lines[-1] if lines else "", tail=lines[-30:], ok=proc.returncode == 0
    )


# ---------------------------------------------------------------------------------------------
# training


def _build(config: Dict[str, Any], **overrides: Any):
    flags = model_and_diffusion_defaults()
    flags.update(config, **overrides)
    torch.manual_seed(0)
    return create_model_and_diffusion(**flags)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _loop(model: torch.nn.Module, diffusion: Any, batch_size: int, log_dir: str, **precision: Any) -> TrainLoop:
    """A TrainLoop that never logs, saves or checks for signals by itself (the check drives it)."""
    quiet = dict(microbatch=-1, lr=1e-4, ema_rate="0.9999", log_interval=10**9, save_interval=0, resume_checkpoint="")
    return TrainLoop(
        model=model,
        diffusion=diffusion,
        data=iter(()),
        batch_size=batch_size,
        log_dir=log_dir,
        handle_signals=False,
        **quiet,
        **precision,
    )


def warm_up_loss_scale(loop: TrainLoop, batch: torch.Tensor, max_steps: int = 64) -> int:
    """Run steps until one is taken (fp16 starts at a 2^20 loss scale and skips steps); the number run."""
    for steps in range(max_steps):
        if loop.nonfinite_in_a_row == 0:
            return steps
        loop.run_step(batch, {})
    return max_steps


def _timed(run: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Seconds per call of ``run``, over ``repeats`` calls between two device syncs."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _eval_loss(model: torch.nn.Module, diffusion: Any, fixed: Dict[str, torch.Tensor]) -> float:
    """The float32 loss of ``model`` on a fixed batch, timesteps and noise."""
    with torch.no_grad():
        terms = diffusion.training_losses(ModelCall(model), fixed["x"], fixed["t"], noise=fixed["noise"])
    return float(terms["loss"].mean())


def train_variant(
    name: str, start: torch.nn.Module, diffusion: Any, data: Dict[str, torch.Tensor], args: argparse.Namespace
) -> Dict[str, Any]:
    """20 steps from ``start`` (fixed seeds), the loss on the fixed batch, then timed steps."""
    device = data["x"].device
    precision, compile_it = VARIANTS[name]
    _fresh_memory(device)
    model = copy.deepcopy(start)
    torch.manual_seed(1)
    np.random.seed(1)
    with tempfile.TemporaryDirectory() as log_dir, logger.scoped_configure(dir=log_dir, format_strs=["log"]):
        compile_model(model, compile_it)
        loop = _loop(model, diffusion, args.batch_size, log_dir, **precision)
        start_s = time.perf_counter()
        for _ in range(args.steps):
            loop.run_step(data["batch"], {})
        loop.log_step()
        first_steps_s = time.perf_counter() - start_s
        train_loss = loop.last_logged.get("loss", float("nan"))
        skipped = loop.nonfinite_in_a_row
        warm_up = warm_up_loss_scale(loop, data["batch"])
        step_s = _timed(lambda: loop.run_step(data["batch"], {}), device, args.timed_steps)
        eval_model = data["eval_model"]
        eval_model.load_state_dict(loop.model.state_dict())
        result = dict(
            train_loss=train_loss,
            loss=_eval_loss(eval_model, diffusion, data),
            nonfinite_in_a_row_after_loss_steps=skipped,
            warm_up_steps=warm_up,
            first_steps_s=round(first_steps_s, 3),
            step_s=round(step_s, 5),
            images_per_s=round(args.batch_size / step_s, 2),
            peak_memory_gb=_peak_gb(device),
            lg_loss_scale=loop.precision.lg_loss_scale,
        )
        if name == "fp32":
            with FlopCounterMode(display=False) as counter:
                loop.run_step(data["batch"], {})
            result["flops_per_step"] = counter.get_total_flops()
    return result


def checkpointed_memory(config: Dict[str, Any], device: torch.device, args: argparse.Namespace) -> Dict[str, Any]:
    """Peak memory of bf16 training at half the batch with gradient checkpointing."""
    _fresh_memory(device)
    model, diffusion = _build(config, use_checkpoint=True)
    batch = torch.rand(max(1, args.batch_size // 2), 3, config["image_size"], config["image_size"], device=device)
    with tempfile.TemporaryDirectory() as log_dir, logger.scoped_configure(dir=log_dir, format_strs=["log"]):
        loop = _loop(model, diffusion, batch.shape[0], log_dir, use_bf16=True)
        step_s = _timed(lambda: loop.run_step(batch * 2 - 1, {}), device, 3)
    peak = _peak_gb(device)
    return dict(batch_size=batch.shape[0], peak_memory_gb=peak, step_s=round(step_s, 4), target_gb=CHECKPOINT_TARGET_GB)


def bench_training(device: torch.device, args: argparse.Namespace, report: Dict[str, Any]) -> None:
    config = QUICK_CONFIG if args.quick else CONFIG
    start, diffusion = _build(config)
    start.to(device)
    size = config["image_size"]
    g = torch.Generator().manual_seed(0)
    data = dict(
        batch=(torch.rand(args.batch_size, 3, size, size, generator=g) * 2 - 1).to(device),
        x=(torch.rand(args.batch_size, 3, size, size, generator=g) * 2 - 1).to(device),
        t=torch.randint(0, diffusion.num_timesteps, (args.batch_size,), generator=g).to(device),
        noise=torch.randn(args.batch_size, 3, size, size, generator=g).to(device),
        eval_model=copy.deepcopy(start).eval(),
    )
    train = report.setdefault("train", {})
    for name in args.variants:
        if "bf16" in name and device.type == "cuda" and not report["header"]["bf16_native"]:
            train[name] = dict(skipped="bfloat16 is emulated on this GPU")
            continue
        try:
            train[name] = train_variant(name, start, diffusion, data, args)
        except Exception as exc:  # record and go on: the other numbers are still worth having
            train[name] = dict(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}")
        _log_progress(name, train[name])
    if not args.quick or device.type == "cuda":
        report["checkpointed_bf16_half_batch"] = checkpointed_memory(config, device, args)
    _derive(report)


def _derive(report: Dict[str, Any]) -> None:
    """Ratios to fp32, loss differences and MFU from the raw numbers."""
    train = report["train"]
    base = train.get("fp32", {})
    flops, peak = base.get("flops_per_step"), report["header"]["peak_bf16_tflops"]
    for entry in train.values():
        if "step_s" not in entry:
            continue
        if "images_per_s" in base:
            entry["speedup_vs_fp32"] = round(entry["images_per_s"] / base["images_per_s"], 3)
        if "loss" in base:
            entry["loss_rel_diff_vs_fp32"] = abs(entry["loss"] - base["loss"]) / abs(base["loss"])
        if flops and peak:
            entry["mfu"] = round(flops / entry["step_s"] / (peak * 1e12), 4)
    best = train.get("bf16_compile", {})
    report["targets"] = dict(
        bf16_compile_speedup_at_least_2_5=best.get("speedup_vs_fp32", 0) >= 2.5 if "speedup_vs_fp32" in best else None,
        bf16_compile_mfu_at_least_0_4=best.get("mfu", 0) >= 0.4 if "mfu" in best else None,
        checkpointed_half_batch_under_16_gb=_under(report.get("checkpointed_bf16_half_batch", {})),
    )


def _under(entry: Dict[str, Any]) -> Optional[bool]:
    peak = entry.get("peak_memory_gb")
    return None if peak is None else peak < entry["target_gb"]


# ---------------------------------------------------------------------------------------------
# sampling


def bench_sampling(device: torch.device, args: argparse.Namespace, report: Dict[str, Any]) -> None:
    config = QUICK_CONFIG if args.quick else CONFIG
    model, diffusion = _build(config, timestep_respacing=str(args.sample_steps))
    model.to(device).eval()
    size = config["image_size"]
    shape = (args.batch_size, 3, size, size)
    x = torch.randn(*shape, device=device)
    t = torch.full((args.batch_size,), diffusion.num_timesteps - 1, device=device, dtype=torch.long)
    sample = report.setdefault("sample", {})
    for precision_name in ("fp32", "bf16"):
        call = ModelCall(model, MixedPrecision(device, use_bf16=precision_name == "bf16"))
        entry: Dict[str, Any] = {}
        with torch.no_grad():
            for _ in range(2):
                diffusion.p_sample(call, x, t)
            entry["step_s"] = round(_timed(lambda: diffusion.p_sample(call, x, t), device, 5), 5)
            for sampler in SAMPLE_LOOPS:

                def loop(sampler: str = sampler) -> None:
                    samplers.sample_loop(diffusion, call, shape, sampler=sampler, noise=x, device=device)

                entry[f"{sampler}_{args.sample_steps}_steps_s"] = round(_timed(loop, device, 1), 4)
        sample[precision_name] = entry
        _log_progress(f"sample {precision_name}", entry)
    report["sample_loops"] = list(SAMPLE_LOOPS)


# ---------------------------------------------------------------------------------------------
# report


def failures(report: Dict[str, Any]) -> List[str]:
    """What makes the check fail: failed tests, failed variants, non-finite mixed-precision losses."""
    found = []
    tests = report.get("tests")
    if tests is not None and not tests["ok"]:
        found.append(f"pytest -m cuda: {tests['summary']}")
    for name, entry in report.get("train", {}).items():
        if "error" in entry:
            found.append(f"{name}: {entry['error']}")
        elif name in MIXED and "loss" in entry:
            if not (math.isfinite(entry["loss"]) and math.isfinite(entry["train_loss"])):
                found.append(f"{name}: loss is not finite ({entry['loss']}, training {entry['train_loss']})")
    return found


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(report: Dict[str, Any]) -> str:
    """The report as markdown: header lines, then a training and a sampling table."""
    h = report["header"]
    lines = [f"GPU check, {h['date']}: {h['device']} ({h['gpus_visible']} visible), torch {h['torch']}"]
    lines += [
        f"CUDA {h['cuda']}, cuDNN {h['cudnn']}; TF32 matmul={h['tf32_matmul']}, TF32 cuDNN={h['tf32_cudnn']}, "
        f"cuDNN benchmark={h['cudnn_benchmark']}; peak bf16 {_cell(h['peak_bf16_tflops'])} TFLOPS; "
        f"config {h['config']}, batch {h['batch_size']}",
        "",
    ]
    if report.get("tests"):
        lines += [f"`pytest -m cuda`: {report['tests']['summary']}", ""]
    columns = ["images_per_s", "speedup_vs_fp32", "mfu", "peak_memory_gb", "loss", "loss_rel_diff_vs_fp32"]
    columns += ["warm_up_steps", "first_steps_s"]
    lines += ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, entry in report.get("train", {}).items():
        if "step_s" not in entry:
            lines.append(f"| {name} | {entry.get('error') or entry.get('skipped')} |" + " |" * (len(columns) - 1))
            continue
        lines.append(f"| {name} | " + " | ".join(_cell(entry.get(c)) for c in columns) + " |")
    memory = report.get("checkpointed_bf16_half_batch")
    if memory:
        lines += ["", f"bf16, batch {memory['batch_size']}, gradient checkpointing: peak "]
        lines[-1] += f"{_cell(memory['peak_memory_gb'])} GB (target < {memory['target_gb']:.0f} GB)"
    sample = report.get("sample", {})
    if sample:
        keys = sorted({k for entry in sample.values() for k in entry})
        lines += ["", "| sampling, batch %d | " % h["batch_size"] + " | ".join(keys) + " |"]
        lines += ["|---" * (len(keys) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(_cell(e.get(k)) for k in keys) + " |" for n, e in sample.items()]
    lines += ["", f"targets: {report.get('targets', {})}; the whole check took {_cell(report.get('wall_s'))} s"]
    if report.get("failures"):
        lines += ["", "FAILURES: " + "; ".join(report["failures"])]
    return "\n".join(lines) + "\n"


def _log_progress(name: str, entry: Dict[str, Any]) -> None:
    print(f"gpu_check: {name}: {json.dumps(entry, default=str)}", flush=True)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few steps (smoke test)")
    parser.add_argument("--allow_cpu", action="store_true", help="run on the CPU when no GPU is visible")
    parser.add_argument("--skip_tests", action="store_true", help="do not run pytest -m cuda")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    parser.add_argument("--batch_size", type=int, default=None, help="default 64 (--quick: 4)")
    parser.add_argument("--steps", type=int, default=None, help="steps before the loss comparison (default 20)")
    parser.add_argument("--timed_steps", type=int, default=None, help="timed steps per variant (default 30)")
    parser.add_argument("--sample_steps", type=int, default=50, help="steps of the timed sampling loop")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in float32 matmuls and convolutions")
    parser.add_argument("--peak_tflops", type=float, default=None, help="peak bf16 TFLOPS, if not in the table")
    parser.add_argument("--tests_timeout_s", type=float, default=240.0)
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"--variants {','.join(args.variants)}: unknown {unknown}; known: {','.join(VARIANTS)}")
    if "fp32" not in args.variants:
        args.variants.insert(0, "fp32")  # every comparison is against it
    quick = args.quick
    args.batch_size = args.batch_size or (4 if quick else 64)
    args.steps = args.steps or (3 if quick else 20)
    args.timed_steps = args.timed_steps or (2 if quick else 30)
    if quick:
        args.sample_steps = min(args.sample_steps, 5)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the check; the exit status (0: all passed, or no GPU; 1: a failure)."""
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(f"gpu_check: no CUDA device visible (torch {torch.__version__}); nothing to check", flush=True)
        return 0
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    set_cuda_math(deterministic=False, tf32=args.tf32)
    report: Dict[str, Any] = {"header": header(device, args)}
    started = time.perf_counter()
    if not args.skip_tests:
        report["tests"] = run_cuda_tests(args.tests_timeout_s)
        _log_progress("pytest -m cuda", {k: v for k, v in report["tests"].items() if k != "tail"})
    bench_training(device, args, report)
    bench_sampling(device, args, report)
    report["failures"] = failures(report)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    os.makedirs(args.out, exist_ok=True)
    for name, text in (
        ("gpu_check.json", json.dumps(report, indent=1, default=str)),
        ("gpu_check.md", markdown(report)),
    ):
        atomic_write(os.path.join(args.out, name), lambda f, text=text: f.write(text.encode("utf-8")))
    print(markdown(report), flush=True)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    run_main(lambda: sys.exit(main()))
