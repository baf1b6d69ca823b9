"""
Tests of the training loop (in-process, on the CPU, with a tiny stand-in network so that each
step costs milliseconds): losses, microbatching, checkpoints, exact resume, crashes while
saving, full disks, non-finite losses, signals, bf16, and two ranks under mpiexec.
"""

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.overrides import TorchFunctionMode

from improved_diffusion import checkpoints, fileio, logger, script_util, train_util
from improved_diffusion.errors import UserError
from improved_diffusion.image_datasets import load_data
from improved_diffusion.precision import MixedPrecision, cpu_has_fast_bf16, make_adamw, set_cuda_math
from improved_diffusion.resample import LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler
from improved_diffusion.script_util import create_gaussian_diffusion
from improved_diffusion.train_setup import compile_model
from improved_diffusion.train_util import TrainLoop, parse_resume_step_from_filename

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXACT = dict(rtol=0, atol=0)
CLOSE = dict(rtol=1e-5, atol=1e-6)  # float32 reductions in another order


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyModel(nn.Module):
    """A two-conv stand-in for the UNet with the same call signature (and dropout)."""

    def __init__(self, out_channels=3, num_classes=None, dropout=0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.time = nn.Linear(1, 8)
        self.label_emb = nn.Embedding(num_classes, 8) if num_classes else None
        self.drop = nn.Dropout(dropout)
        self.conv_out = nn.Conv2d(8, out_channels, 3, padding=1)

    def forward(self, x, timesteps, y=None):
        h = self.conv_in(x) + self.time(timesteps.float()[:, None] / 1000.0)[:, :, None, None]
        if self.label_emb is not None:
            h = h + self.label_emb(y)[:, :, None, None]
        return self.conv_out(self.drop(F.silu(h)))


def _diffusion(**kw):
    args = dict(steps=20, noise_schedule="cosine", rescale_timesteps=True, rescale_learned_sigmas=True)
    args.update(kw)
    return create_gaussian_diffusion(**args)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / f"c{i % 2}_{i}.png")
    return str(root)


@pytest.fixture
def log_dir(tmp_path):
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=["log", "csv"]):
        yield str(tmp_path / "log")


def _loop(log_dir, images=None, model=None, diffusion=None, data=None, **kw):
    diffusion = diffusion or _diffusion()
    model = model or TinyModel()
    if data is None:
        data = load_data(data_dir=images, batch_size=4, image_size=8, random_flip=True, rank=0, world_size=1)
    args = dict(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=4,
        microbatch=-1,
        lr=1e-3,
        ema_rate="0.9,0.99",
        log_interval=2,
        save_interval=0,
        resume_checkpoint="",
        log_dir=log_dir,
        max_steps=3,
    )
    args.update(kw)
    return TrainLoop(**args)


def _files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".pt"))


def _names(step, rates=("0.9", "0.99")):
    return sorted(
        [f"model{step:06d}.pt", f"opt{step:06d}.pt", f"state{step:06d}.pt"] + [f"ema_{r}_{step:06d}.pt" for r in rates]
    )


# ---------------------------------------------------------------------------------------------
# losses, logging, checkpoint names


@pytest.mark.parametrize(
    "name, diffusion_kw, out_channels, sampler, microbatch",
    [
        ("simple", {}, 3, "uniform", -1),
        ("hybrid", dict(learn_sigma=True), 6, "uniform", -1),
        ("vlb", dict(learn_sigma=True, use_kl=True), 6, "loss-second-moment", -1),
        ("microbatch", {}, 3, "uniform", 3),
    ],
)
def test_steps_log_and_save(log_dir, images, name, diffusion_kw, out_channels, sampler, microbatch):
    diffusion = _diffusion(**diffusion_kw)
    loop = _loop(
        log_dir,
        images,
        model=TinyModel(out_channels),
        diffusion=diffusion,
        microbatch=microbatch,
        schedule_sampler=create_named_schedule_sampler(sampler, diffusion),
        save_interval=2,
    )
    before = [p.detach().clone() for p in loop.params]
    loop.run_loop()
    assert loop.step == 3
    assert _files(log_dir) == sorted(_names(2) + _names(3))
    assert not any(torch.equal(a, b) for a, b in zip(before, loop.params))
    logged = loop.last_logged
    keys = {"loss", "grad_norm", "param_norm", "step", "samples", "lr"}
    if not diffusion_kw.get("use_kl"):  # L_vlb logs only "loss"
        keys |= {"mse", "vb"} if diffusion_kw.get("learn_sigma") else {"mse"}
    assert keys <= set(logged) and "lg_loss_scale" not in logged
    assert any(k.startswith("loss_q") for k in logged)
    assert logged["step"] == 2 and logged["samples"] == 8
    assert all(np.isfinite(v) for v in logged.values())
    state = fileio.safe_torch_load(os.path.join(log_dir, "model000003.pt"))
    assert list(state) == list(loop.model.state_dict())


def test_quartile_logging_is_weighted_per_sample(log_dir, images):
    loop = _loop(log_dir, images)
    t = torch.tensor([0, 5, 19, 19])
    w = torch.tensor([1.0, 2.0, 0.5, 1.5])
    loop._accumulate_losses(t, w, {"loss": torch.tensor([1.0, 1.0, 4.0, 2.0])})
    loop._merge_step_stats(torch.tensor(3.0), torch.tensor(True))
    loop.log_step()
    got = loop.last_logged
    assert got["loss"] == pytest.approx((1 + 2 + 2 + 3) / 4)
    assert got["loss_q0"] == pytest.approx(1.0) and got["loss_q1"] == pytest.approx(2.0)
    assert got["loss_q3"] == pytest.approx(2.5) and "loss_q2" not in got
    assert got["grad_norm"] == pytest.approx(3.0)


def _fixed_noise(diffusion, monkeypatch):
    """Make the q_sample noise a function of the image, so batch splits see the same noise."""
    original = diffusion.training_losses

    def losses(model, x_start, t, model_kwargs=None, noise=None):
        return original(model, x_start, t, model_kwargs=model_kwargs, noise=torch.sin(37.0 * x_start + 1.0))

    monkeypatch.setattr(diffusion, "training_losses", losses)


def test_microbatches_give_the_full_batch_gradient(log_dir, images, monkeypatch):
    results = []
    for microbatch in (-1, 1, 3):
        torch.manual_seed(0)
        np.random.seed(0)
        diffusion = _diffusion(learn_sigma=True)
        _fixed_noise(diffusion, monkeypatch)
        loop = _loop(log_dir, images, model=TinyModel(6), diffusion=diffusion, microbatch=microbatch, max_steps=2)
        loop.run_loop()
        results.append([p.detach().clone() for p in loop.params])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(b, a, **CLOSE)


def test_ema_and_lr_anneal(log_dir, images):
    loop = _loop(log_dir, images, ema_rate="0.5", lr_anneal_steps=4, max_steps=0)
    params = [p.detach().clone() for p in loop.params]
    loop.run_step(*next(loop.data))
    expected = [0.5 * a + 0.5 * p.detach() for a, p in zip(params, loop.params)]
    for got, want in zip(loop.ema_params[0], expected):
        torch.testing.assert_close(got, want, **EXACT)
    loop.run_loop()  # stops by itself at lr_anneal_steps
    assert loop.step == 4 and "model000004.pt" in _files(log_dir)
    assert loop.opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 3 / 4))


# ---------------------------------------------------------------------------------------------
# resume


def _state(loop):
    return [p.detach().clone() for p in loop.params], [[e.clone() for e in ema] for ema in loop.ema_params]


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        torch.testing.assert_close(x, y, **EXACT)
    for ema_a, ema_b in zip(a[1], b[1]):
        for x, y in zip(ema_a, ema_b):
            torch.testing.assert_close(x, y, **EXACT)


def _resumable_loop(log_dir, images, max_steps, resume=""):
    """Dropout, random flips, shuffling and a warmed-up loss-aware sampler: all RNG users."""
    torch.manual_seed(1)
    np.random.seed(1)
    diffusion = _diffusion(steps=4, learn_sigma=True)
    sampler = LossSecondMomentResampler(diffusion, history_per_term=1)
    return _loop(
        log_dir,
        images,
        model=TinyModel(6, dropout=0.3),
        diffusion=diffusion,
        schedule_sampler=sampler,
        max_steps=max_steps,
        save_interval=2,
        resume_checkpoint=resume,
        microbatch=2,
    )


def test_resume_is_exact(tmp_path, images):
    straight = _resumable_loop(str(tmp_path / "a"), images, max_steps=6)
    straight.run_loop()
    first = _resumable_loop(str(tmp_path / "b"), images, max_steps=3)
    first.run_loop()
    second = _resumable_loop(str(tmp_path / "b"), images, max_steps=6, resume="auto")
    assert second.step == 3
    second.run_loop()
    _assert_same(_state(second), _state(straight))
    for a, b in zip(second.opt.state.values(), straight.opt.state.values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], **EXACT)
    np.testing.assert_array_equal(second.schedule_sampler._loss_history, straight.schedule_sampler._loss_history)
    assert second.data.state_dict() == straight.data.state_dict()


def test_resume_from_an_explicit_path(tmp_path, images):
    first = _resumable_loop(str(tmp_path / "a"), images, max_steps=2)
    first.run_loop()
    path = os.path.join(str(tmp_path / "a"), "model000002.pt")
    second = _resumable_loop(str(tmp_path / "b"), images, max_steps=4, resume=path)
    assert second.step == 2
    _assert_same(_state(second), _state(first))


def test_old_names_and_missing_files(tmp_path, images):
    assert parse_resume_step_from_filename("/x/model012345.pt") == 12345
    assert parse_resume_step_from_filename("ema_0.9999_000100.pt") == 0
    assert parse_resume_step_from_filename("/logs/modelfinal.pt") == 0
    with pytest.raises(UserError, match=r"--resume_checkpoint .*nope\.pt: no such file"):
        _resumable_loop(str(tmp_path), images, 1, resume=str(tmp_path / "nope.pt"))


def test_auto_resume_without_checkpoint_starts_fresh(tmp_path, images):
    assert _resumable_loop(str(tmp_path / "empty"), images, 1, resume="auto").step == 0


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no cleanup of already written files."""


@pytest.mark.parametrize("die_at_write", [1, 3, 4])
def test_crash_while_saving_leaves_complete_checkpoints(tmp_path, images, monkeypatch, die_at_write):
    folder = str(tmp_path / "run")
    loop = _resumable_loop(folder, images, max_steps=4)
    writes = []

    def save(obj, path):
        writes.append(path)
        if "000004" in path and len([w for w in writes if "000004" in w]) == die_at_write:
            with open(os.path.join(folder, ".tmp-" + os.path.basename(path) + ".x"), "wb") as f:
                f.write(b"partial")
            raise _Killed()
        fileio.atomic_torch_save(obj, path)

    monkeypatch.setattr(checkpoints, "atomic_torch_save", save)
    with pytest.raises(_Killed):
        loop.run_loop()
    assert "state000004.pt" not in _files(folder) and "state000002.pt" in _files(folder)
    monkeypatch.undo()
    resumed = _resumable_loop(folder, images, max_steps=4, resume="auto")
    assert resumed.step == 2


def test_corrupt_newest_checkpoint_is_skipped(tmp_path, images):
    folder = str(tmp_path / "run")
    _resumable_loop(folder, images, max_steps=4).run_loop()
    with open(os.path.join(folder, "opt000004.pt"), "r+b") as f:
        f.truncate(50)
    assert _resumable_loop(folder, images, max_steps=4, resume="auto").step == 2


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, images, monkeypatch):
    folder = str(tmp_path / "run")
    loop = _resumable_loop(folder, images, max_steps=4)
    real_save = torch.save

    def save(obj, f, *a, **kw):
        if loop.step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UserError, match=r"No space left on device; training stopped at step 4, earlier checkpoints"):
        loop.run_loop()
    monkeypatch.undo()
    assert _files(folder) == _names(2)
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp-")]
    assert _resumable_loop(folder, images, max_steps=4, resume="auto").step == 2


# ---------------------------------------------------------------------------------------------
# non-finite losses, signals, precision


class _NaNModel(TinyModel):
    def __init__(self):
        super().__init__()
        self.poison = False

    def forward(self, x, timesteps, y=None):
        out = super().forward(x, timesteps, y)
        return out * float("nan") if self.poison else out


def test_nonfinite_losses_are_skipped_then_stop(log_dir, images):
    model = _NaNModel()
    loop = _loop(log_dir, images, model=model, max_steps=0, save_interval=1)
    loop.run_step(*next(loop.data))
    good = _state(loop)
    model.poison = True
    loop.run_step(*next(loop.data))  # skipped: nothing changes
    _assert_same(_state(loop), good)
    with pytest.raises(
        UserError, match=r"training stopped: loss was NaN/Inf for 5 steps in a row at step 6; lower --lr"
    ):
        loop.run_loop()
    _assert_same(_state(loop), good)
    for name in _files(log_dir):
        for value in fileio.safe_torch_load(os.path.join(log_dir, name)).values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all(), name


def test_nonfinite_run_between_log_rows_stops_at_the_next_row(log_dir, images):
    """The run is counted on the device and checked where the loop syncs anyway (log, save)."""
    model = _NaNModel()
    loop = _loop(log_dir, images, model=model, max_steps=0, log_interval=4, max_nonfinite_steps=2)
    loop.run_step(*next(loop.data))
    good = _state(loop)
    model.poison = True
    loop.run_step(*next(loop.data))
    loop.run_step(*next(loop.data))  # the limit is reached at step 3, which does not log
    assert loop.step == 3 and loop.nonfinite_in_a_row == 2
    with pytest.raises(UserError, match=r"NaN/Inf for 2 steps in a row at step 3; lower --lr"):
        loop.run_step(*next(loop.data))  # step 4 logs: the check
    _assert_same(_state(loop), good)


def test_skipped_steps_are_logged_with_the_row(log_dir, images):
    model = _NaNModel()
    loop = _loop(log_dir, images, model=model, max_steps=0, log_interval=3)
    loop.run_step(*next(loop.data))
    model.poison = True
    loop.run_step(*next(loop.data))
    model.poison = False
    loop.run_step(*next(loop.data))
    loop.log_step()
    with open(os.path.join(log_dir, "log.txt")) as f:
        assert "1 step(s) skipped since the last log row: NaN/Inf loss or gradient" in f.read()
    assert loop.nonfinite_in_a_row == 0 and np.isfinite(loop.last_logged["loss"])


def test_sigterm_saves_then_stops(log_dir, images):
    class Signalling:
        def __init__(self, data):
            self.data, self.count = data, 0

        def __next__(self):
            self.count += 1
            if self.count == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return next(self.data)

    data = Signalling(load_data(data_dir=images, batch_size=4, image_size=8, rank=0, world_size=1))
    loop = _loop(log_dir, data=data, max_steps=0)
    previous = signal.getsignal(signal.SIGTERM)
    loop.run_loop()
    assert loop.stop_signal == signal.SIGTERM and loop.step == 2
    assert _files(log_dir) == _names(2)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_bf16_step_is_close_to_fp32(log_dir, images):
    losses = []
    for use_bf16 in (False, True):
        torch.manual_seed(0)
        np.random.seed(0)
        loop = _loop(log_dir, images, use_bf16=use_bf16, log_interval=1, max_steps=1)
        loop.run_loop()
        losses.append(loop.last_logged["loss"])
        assert all(p.dtype == torch.float32 for p in loop.params)
    assert losses[1] == pytest.approx(losses[0], rel=0.05)


def test_precision_choices():
    messages = []
    cpu_fp16 = MixedPrecision(torch.device("cpu"), use_fp16=True, log=messages.append)
    assert cpu_fp16.dtype == torch.bfloat16 and cpu_fp16.scaler is None
    slow_bf16 = ["warning: this CPU has no bfloat16 instructions (AVX-512 BF16 / AMX): bf16 will be slower than fp32"]
    expected = ["warning: --use_fp16 on cpu: using bfloat16 autocast instead"]
    assert messages == expected + ([] if cpu_has_fast_bf16() else slow_bf16)
    with pytest.raises(UserError, match="--use_fp16 and --use_bf16 exclude each other"):
        MixedPrecision(torch.device("cpu"), use_fp16=True, use_bf16=True)
    plain = MixedPrecision(torch.device("cpu"))
    assert plain.lg_loss_scale is None and plain.state_dict() == {}
    p = nn.Parameter(torch.ones(2))
    # A plain optimizer needs the decision on the host; a fused one skips on the device.
    for opt in (torch.optim.SGD([p], lr=1.0), make_adamw([p], lr=1.0, weight_decay=0.1)):
        p.grad = torch.tensor([1.0, float("inf")])
        took = plain.step(opt, torch.tensor(float("inf")))
        assert took.dtype == torch.bool and not took
        torch.testing.assert_close(p.detach(), torch.ones(2), **EXACT)
        assert not hasattr(opt, "found_inf")
    assert opt.defaults["fused"] and float(opt.state[p]["step"]) == 0.0
    p.grad = torch.tensor([1.0, 1.0])
    assert plain.step(opt, torch.tensor(1.0)) and float(opt.state[p]["step"]) == 1.0


class HostReads(TorchFunctionMode):
    """
    Records every call that reads a tensor's value on the host: on a GPU each is a host-device
    sync (``item``, ``bool``, ``tolist``, boolean-mask indexing, ``nonzero``, ``bincount``, a copy
    to the CPU). On the CPU they cost nothing, so this is how a CPU test sees them.
    """

    NAMES = {"item", "__bool__", "tolist", "numpy", "__int__", "__float__", "__index__", "cpu"}
    NAMES |= {"nonzero", "argwhere", "bincount", "unique", "masked_select", "_local_scalar_dense"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        masks = [a for a in args[1:] for a in (a if isinstance(a, tuple) else (a,)) if isinstance(a, torch.Tensor)]
        if name in self.NAMES or (name in ("__getitem__", "__setitem__") and any(m.dtype == torch.bool for m in masks)):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["fp32", "bf16", "microbatch", "skipped step", "loss scaling", "unet"])
def test_a_training_step_reads_nothing_back_from_the_device(log_dir, images, case):
    """The step between log rows: forward, losses, backward, AdamW, EMA, statistics, stop check."""
    model = _NaNModel()
    kw = dict(use_bf16=case == "bf16", microbatch=2 if case == "microbatch" else -1)
    if case == "unet":  # the real network and a hybrid loss with learned sigmas
        loop = _unet_loop(log_dir, (torch.rand(4, 3, 8, 8) * 2 - 1), log_interval=100, max_steps=0)
    else:
        loop = _loop(log_dir, images, model=model, log_interval=100, max_steps=0, **kw)
    if case == "loss scaling":  # float16's GradScaler path (on the CPU for the test)
        loop.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=1000)
    loop.run_step(*next(loop.data))  # first step: optimizer state is created
    model.poison = case == "skipped step"
    batch = next(loop.data)
    with HostReads() as spy:
        loop.run_step(*batch)
        assert not loop.stop.agreed(loop.device, due=loop.step % loop.log_interval == 0)
    assert spy.reads == []
    assert loop.nonfinite_in_a_row == (1 if case == "skipped step" else 0)


@pytest.mark.cuda
def test_fp16_scaler_on_cuda():
    mp = MixedPrecision(torch.device("cuda"), use_fp16=True, fp16_scale_growth=0.5)
    assert mp.lg_loss_scale == 20.0
    p = nn.Parameter(torch.ones(2, device="cuda"))
    opt = torch.optim.SGD([p], lr=1.0)
    mp.backward((p * float("inf")).sum())
    mp.unscale_(opt)
    assert not mp.step(opt, torch.tensor(float("inf")))
    assert mp.lg_loss_scale == 19.0


def _unet_loop(log_dir, batch, **kw):
    """A TrainLoop on a small real UNet (attention, GroupNorm, learned sigmas) and one fixed batch."""
    torch.manual_seed(0)
    np.random.seed(0)
    flags = dict(script_util.model_and_diffusion_defaults(), learn_sigma=True, noise_schedule="cosine")
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4")
    model, diffusion = script_util.create_model_and_diffusion(**dict(flags, diffusion_steps=50))
    return _loop(log_dir, model=model, diffusion=diffusion, data=iter(lambda: (batch, {}), None), **kw)


def _cuda_batch(n=4):
    return (torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1).pin_memory()


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["fp32", "fp16", "bf16", "microbatch"])
def test_cuda_training_step_has_no_host_sync(log_dir, case):
    """Between log rows a step never waits for the GPU (torch's sync debug mode raises if it does)."""
    batch = _cuda_batch()
    kw = dict(use_fp16=case == "fp16", use_bf16=case == "bf16", microbatch=3 if case == "microbatch" else -1)
    loop = _unet_loop(log_dir, batch, log_interval=1000, max_steps=0, **kw)
    for _ in range(2):  # optimizer state, cuBLAS / cuDNN handles, caching allocators
        loop.run_step(batch, {})
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loop.run_step(batch, {})
        loop.stop.agreed(loop.device, due=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loop.log_step()
    assert np.isfinite(loop.last_logged["loss"])


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["use_fp16", "use_bf16", "channels_last"])
def test_cuda_mixed_precision_and_channels_last_train_close_to_fp32(log_dir, precision):
    """fp16 autocast with GradScaler (until steps are taken), bf16 autocast, channels-last: 30 steps."""
    batch = _cuda_batch()
    set_cuda_math(tf32=False)
    losses = {}
    for name in ("fp32", precision):
        loop = _unet_loop(log_dir, batch, log_interval=30, max_steps=30, **({name: True} if name != "fp32" else {}))
        loop.run_loop()
        assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in loop.params)
        losses[name] = loop.last_logged["loss"]
        if name == "use_fp16":
            assert loop.nonfinite_in_a_row == 0 and loop.last_logged["lg_loss_scale"] <= 20
    assert np.isfinite(losses[precision]) and losses[precision] == pytest.approx(losses["fp32"], rel=0.05)


@pytest.mark.cuda
def test_cuda_compile_with_a_short_last_microbatch_compiles_once_per_size(log_dir):
    from torch._dynamo.utils import counters

    batch = _cuda_batch(4)
    eager = _unet_loop(log_dir, batch, microbatch=3, max_steps=3)
    eager.run_loop()
    loop = _unet_loop(log_dir, batch, microbatch=3, max_steps=0)
    compile_model(loop.model, True)
    for _ in range(2):  # microbatches of 3 and 1: one graph each
        loop.run_step(batch, {})
    graphs = dict(counters["stats"])
    loop.run_step(batch, {})
    assert dict(counters["stats"]) == graphs  # no recompilation in later steps
    for a, b in zip(loop.params, eager.params):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.cuda
def test_cuda_deterministic_runs_repeat_bit_for_bit(log_dir, monkeypatch):
    batch = _cuda_batch()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what set_cuda_math sets; removed afterwards
    set_cuda_math(deterministic=True)
    try:
        runs = []
        for _ in range(2):
            loop = _unet_loop(log_dir, batch, max_steps=3, use_bf16=True)
            loop.run_loop()
            runs.append([p.detach().clone() for p in loop.params])
    finally:
        set_cuda_math(deterministic=False)
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, **EXACT)


def test_settings_are_checked(log_dir, images):
    for kw, match in [
        (dict(microbatch=0), r"--microbatch 0"),
        (dict(ema_rate="0.9,x"), r"--ema_rate '0.9,x'"),
        (dict(ema_rate="1.5"), r"--ema_rate '1.5': every rate must lie in \[0, 1\]"),
        (dict(lr=0.0), r"--lr 0.0: must be positive"),
        (dict(max_steps=-1), r"--max_steps -1: must be 0 or more"),
    ]:
        with pytest.raises(UserError, match=match):
            _loop(log_dir, images, **kw)


# ---------------------------------------------------------------------------------------------
# two ranks


MPI_WORKER = textwrap.dedent(
    """
    import sys, torch, numpy as np
    sys.path.insert(0, {tests!r})
    from test_train_util import _two_rank_setup
    from improved_diffusion import dist_util, logger
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    with logger.scoped_configure(dir={log!r}, format_strs=["log"]):
        loop = _two_rank_setup({log!r}, rank, steps={steps})
        loop.run_loop()
    flat = torch.cat([p.detach().reshape(-1) for p in loop.params])
    everyone = [torch.zeros_like(flat) for _ in range(2)]
    torch.distributed.all_gather(everyone, flat)
    if rank == 0:
        torch.save(torch.stack(everyone), {out!r})
    """
)


class _FixedSampler(UniformSampler):
    """Hands out prescribed timesteps, so one rank can reproduce two ranks' draws."""

    def __init__(self, diffusion, ts):
        super().__init__(diffusion)
        self.ts, self.next = ts, 0

    def sample(self, batch_size, device):
        index = (self.next + torch.arange(batch_size)) % len(self.ts)
        self.next = int(index[-1]) + 1
        return self.ts[index].to(device), torch.ones(batch_size, device=device)


def _two_rank_data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.tensor([3, 17]) if rank == 0 else torch.tensor([9, 0])


def _two_rank_setup(log_dir, rank, steps, batch=None, ts=None):
    """Same weights on every rank; rank r trains on its own fixed images and timesteps."""
    torch.manual_seed(0)
    diffusion = _diffusion(learn_sigma=True)
    original = diffusion.training_losses
    diffusion.training_losses = lambda m, x, t, model_kwargs=None, noise=None: original(
        m, x, t, model_kwargs=model_kwargs, noise=torch.sin(37.0 * x + 1.0)
    )
    if batch is None:
        batch, ts = _two_rank_data(rank)
    data = iter(lambda: (batch, {}), None)
    return TrainLoop(
        model=TinyModel(6),
        diffusion=diffusion,
        data=data,
        batch_size=batch.shape[0],
        microbatch=1,
        lr=1e-3,
        ema_rate="0.9",
        log_interval=1,
        save_interval=0,
        resume_checkpoint="",
        schedule_sampler=_FixedSampler(diffusion, ts),
        max_steps=steps,
        log_dir=log_dir,
    )


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mpiexec_two_ranks(script):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    return [[mpiexec, "-n", "2", sys.executable, script]]


def _torchrun_two_nodes(script):
    """Two torchrun agents on this machine, one process each, meeting at a c10d rendezvous: two simulated nodes."""
    port = _free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    node += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"test{port}"]
    node += ["--local_addr", "127.0.0.1", script]
    return [node, node]


def _run_two_ranks(tmp_path, steps, launch=_mpiexec_two_ranks):
    out = str(tmp_path / "params.pt")
    script = tmp_path / "worker.py"
    script.write_text(
        MPI_WORKER.format(tests=os.path.join(REPO, "tests"), log=str(tmp_path / "log"), steps=steps, out=out)
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", IDDPM_DIST_TIMEOUT="120")
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for cmd in launch(str(script))
    ]
    try:
        outputs = [proc.communicate(timeout=150)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(proc.returncode == 0 for proc in procs), "\n".join(o[-3000:] for o in outputs)
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "launch",
    [
        pytest.param(_mpiexec_two_ranks, id="mpiexec", marks=pytest.mark.mpi),
        pytest.param(_torchrun_two_nodes, id="torchrun-two-nodes"),
    ],
)
def test_two_ranks_match_one_rank_with_both_batches(tmp_path, launch):
    params = _run_two_ranks(tmp_path, steps=3, launch=launch)
    torch.testing.assert_close(params[1], params[0], **EXACT)
    parts = [_two_rank_data(r) for r in range(2)]
    batch, ts = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    with logger.scoped_configure(dir=str(tmp_path / "one"), format_strs=["log"]):
        loop = _two_rank_setup(str(tmp_path / "one"), 0, steps=3, batch=batch, ts=ts)
        loop.run_loop()
    torch.testing.assert_close(params[0], torch.cat([p.detach().reshape(-1) for p in loop.params]), **CLOSE)


@pytest.mark.parametrize("total, tty, shown", [(10, True, True), (0, True, False), (10, False, False)])
def test_step_progress_shows_time_left_only_when_steps_are_known_on_a_terminal(monkeypatch, total, tty, shown):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    with train_util.step_progress(total, 3) as bar:
        assert bar.disable is not shown
        assert bar.n == 3 and bar.total == total


def test_the_originals_names_stay_importable_from_train_util():
    """The original's scripts and guided-diffusion's classifier trainer import these from train_util."""
    from improved_diffusion.train_util import (  # noqa: F401
        TrainLoop,
        find_ema_checkpoint,
        find_resume_checkpoint,
        get_blob_logdir,
        log_loss_dict,
        parse_resume_step_from_filename,
    )

    assert parse_resume_step_from_filename("logs/model012345.pt") == 12345
    assert find_resume_checkpoint() is None
    assert find_ema_checkpoint(None, 3, 0.9999) is None
