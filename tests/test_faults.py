"""
Fault injection and bad input: untrusted and broken files, crashes, non-finite
numbers, bad data folders, bad flags and a failing rank.

Each test feeds one fault to the real code path a user would hit (a script's ``main``, the
training loop, the data loader, the checkpoint loader) and checks that it either works
correctly or stops with a one-line :class:`UserError` naming the file or flag and the
problem, and that nothing is lost (earlier checkpoints intact, no half-written files, no NaN
in saved weights). The SIGKILL test runs one long-lived helper process
(``tests/fault_scripts/kill_runner.py``) that forks a fresh training process per kill, so the
dozen kills cost one interpreter start-up.
"""

import argparse
import ast
import errno
import io
import json
import os
import pickle
import re
import runpy
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from script_loader import load_script

from improved_diffusion import dist_util, errors, fileio, logger, train_util
from improved_diffusion.errors import UserError
from improved_diffusion.image_datasets import load_data
from improved_diffusion.script_util import create_gaussian_diffusion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
FAULT_SCRIPTS = os.path.join(REPO, "tests", "fault_scripts")
EXACT = dict(rtol=0, atol=0)
PIXEL_ATOL = 1.0 / 127.5 + 1e-6  # one grey level after mapping to [-1, 1]


def _run_script(name, argv, capsys):
    """Run ``scripts/<name>``'s main in-process as ``python <name> argv`` would: (exit code, stderr)."""
    main = load_script(name).main
    capsys.readouterr()
    # the script configures its own logger; scoped_configure restores (and closes) it after
    with tempfile.TemporaryDirectory() as scratch, logger.scoped_configure(dir=scratch, format_strs=[]):
        with pytest.raises(SystemExit) as exc:
            errors.run_main(lambda: main([str(a) for a in argv]))
    _, err = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else code), err


def _one_line(err):
    """The single non-empty stderr line (fails if there are several)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err[-2000:]}"
    return lines[0]


def _subprocess_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=REPO)
    env.pop("OPENAI_LOGDIR", None)
    env.update(extra)
    return env


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# shared tiny pieces


class TinyNet(nn.Module):
    """A two-conv stand-in for the UNet with its call signature (milliseconds per step)."""

    def __init__(self, out_channels=3):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.time = nn.Linear(1, 8)
        self.conv_out = nn.Conv2d(8, out_channels, 3, padding=1)
        self.poison = None  # None, "nan" or "inf": corrupt the output
        self.poison_grad = False  # make the gradient NaN while the loss stays finite

    def forward(self, x, timesteps, y=None):
        h = self.conv_in(x) + self.time(timesteps.float()[:, None] / 1000.0)[:, :, None, None]
        out = self.conv_out(F.silu(h))
        if self.poison:
            out = out * float(self.poison)
        if self.poison_grad:
            out = _NaNGrad.apply(out)
        return out


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _diffusion(steps=10):
    return create_gaussian_diffusion(steps=steps, noise_schedule="cosine", rescale_timesteps=True)


def _batches(n=4, size=8, seed=0):
    """An endless iterator of fixed random batches in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return iter(lambda: (batch.clone(), {}), None)


def _loop(log_dir, model=None, data=None, **kw):
    args = dict(
        model=model or TinyNet(),
        diffusion=_diffusion(),
        data=data or _batches(),
        batch_size=4,
        microbatch=-1,
        lr=1e-3,
        ema_rate="0.9",
        log_interval=1,
        save_interval=1,
        resume_checkpoint="",
        log_dir=log_dir,
        max_steps=2,
    )
    args.update(kw)
    return train_util.TrainLoop(**args)


def _pt_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".pt"))


def _tmp_files(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith(fileio.TMP_PREFIX))


def _assert_finite_files(folder):
    """Every tensor in every checkpoint file of ``folder`` is finite (checks nested dicts)."""

    def walk(value, name):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                assert torch.isfinite(value).all(), name
        elif isinstance(value, dict):
            for v in value.values():
                walk(v, name)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, name)

    names = [n for n in _pt_files(folder) if not n.startswith("state")]
    assert names
    for name in names:
        walk(fileio.safe_torch_load(os.path.join(folder, name)), name)


# ---------------------------------------------------------------------------------------------
# 1. Untrusted files: nothing of a pickled payload may run


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: the canary of arbitrary code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _evil_checkpoint(path, marker, template=None):
    """A torch.save file that looks like a state_dict but runs code when fully unpickled."""
    state = dict(template or {"weight": torch.zeros(2)})
    state["__evil__"] = _Payload(str(marker))
    torch.save(state, str(path))
    return str(path)


def test_payload_really_runs_when_unpickled(tmp_path):
    """The canary works: plain unpickling executes it (so its absence below means something)."""
    marker = tmp_path / "ran"
    path = _evil_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("loader", ["safe_torch_load", "dist_util.load_state_dict"])
def test_pickled_checkpoint_is_refused(tmp_path, loader):
    marker = tmp_path / "ran"
    path = _evil_checkpoint(tmp_path / "evil.pt", marker)
    load = fileio.safe_torch_load if loader == "safe_torch_load" else dist_util.load_state_dict
    with pytest.raises(UserError, match=rf"refusing to load {re.escape(path)}: it holds pickled Python objects"):
        load(path)
    assert not marker.exists()


@pytest.mark.parametrize("which", ["model", "ema", "opt", "state"])
def test_pickled_file_in_a_resumed_run_never_executes(tmp_path, which):
    """Every file a resume reads is loaded weights-only: explicit path -> refused, auto -> skipped."""
    folder = str(tmp_path / "run")
    _loop(folder, max_steps=2).run_loop()
    marker = tmp_path / "ran"
    name = {"model": "model", "ema": "ema_0.9_", "opt": "opt", "state": "state"}[which] + "000002.pt"
    target = os.path.join(folder, name)
    template = fileio.safe_torch_load(target)
    _evil_checkpoint(target, marker, template if isinstance(template, dict) else None)
    with pytest.raises(UserError, match=rf"refusing to load {re.escape(target)}"):
        _loop(folder, resume_checkpoint=os.path.join(folder, "model000002.pt"), max_steps=3)
    resumed = _loop(folder, resume_checkpoint="auto", max_steps=3)
    assert resumed.step == 1  # the poisoned checkpoint 2 is skipped, 1 is complete
    assert not marker.exists()


def test_sampling_refuses_a_pickled_model(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = _evil_checkpoint(tmp_path / "evil.pt", marker)
    code, err = _run_script(
        "image_sample.py",
        [
            "--model_path",
            path,
            "--log_dir",
            tmp_path / "out",
            "--image_size",
            8,
            "--num_channels",
            32,
            "--channel_mult",
            "1",
            "--attention_resolutions",
            "",
            "--noise_schedule",
            "cosine",
            "--diffusion_steps",
            4,
            "--num_samples",
            1,
        ],
        capsys,
    )
    assert code == 2 and "refusing to load" in _one_line(err) and path in err
    assert not marker.exists()


def _calls(tree, attr):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            if f"{owner}.{name}" == attr or (attr.startswith(".") and name == attr[1:]):
                yield node


def _kw(node, name):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _project_sources():
    roots = [os.path.join(REPO, d) for d in ("improved_diffusion", "scripts", "datasets")]
    for root in roots:
        for folder, _, files in os.walk(root):
            for f in sorted(files):
                if f.endswith(".py"):
                    yield os.path.join(folder, f)


def test_every_load_in_the_code_is_weights_only_and_pickle_free():
    """
    Static check over the library and scripts: ``torch.load`` always with
    ``weights_only=True``, ``np.load`` never with ``allow_pickle=True``, no ``pickle.load(s)``.
    """
    problems = []
    for path in _project_sources():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        rel = os.path.relpath(path, REPO)
        for node in _calls(tree, "torch.load"):
            value = _kw(node, "weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                # fileio sets kwargs["weights_only"] = True just before its one call
                if not (rel.endswith("fileio.py") and node.keywords and node.keywords[-1].arg is None):
                    problems.append(f"{rel}:{node.lineno} torch.load without weights_only=True")
        for node in _calls(tree, "np.load"):
            value = _kw(node, "allow_pickle")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                problems.append(f"{rel}:{node.lineno} np.load with allow_pickle")
        for attr in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
            problems += [f"{rel}:{n.lineno} {attr}" for n in _calls(tree, attr)]
    assert not problems, "\n".join(problems)


CIFAR_SCRIPT = os.path.join(REPO, "datasets", "cifar10.py")


@pytest.mark.skipif(not os.path.exists(CIFAR_SCRIPT), reason="datasets/cifar10.py missing")
def test_cifar_batches_are_unpickled_with_an_allowlist(tmp_path):
    """The one pickle format we must read (CIFAR-10 batches) goes through an allowlist."""
    safe_unpickle = runpy.run_path(CIFAR_SCRIPT, run_name="not_main")["safe_unpickle"]
    good = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [0, 1]}
    np.testing.assert_array_equal(safe_unpickle(pickle.dumps(good), "batch")[b"data"], good[b"data"])
    marker = tmp_path / "ran"
    payloads = {
        "exec in a dict": pickle.dumps({b"data": _Payload(str(marker))}),
        "exec in an object array": pickle.dumps(np.array([_Payload(str(marker))], dtype=object)),
        "os.system": b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
    }
    for name, data in payloads.items():
        with pytest.raises(UserError, match=r"could not unpickle data_batch_1: refusing to load"):
            safe_unpickle(data, "data_batch_1")
        assert not marker.exists(), name


# .npz base samples for super-resolution: loaded without pickle, checked key by key


def _load_base_samples():
    return load_script("super_res_sample.py").load_base_samples


def _npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return str(path)


GOOD_BASE = np.zeros((3, 8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "arrays, class_cond, match",
    [
        (dict(images=GOOD_BASE), False, r"no arr_0"),
        (dict(arr_0=GOOD_BASE.astype(np.float32)), False, r"arr_0 has dtype float32, expected uint8"),
        (dict(arr_0=GOOD_BASE[0]), False, r"arr_0 has shape \(8, 8, 3\), expected \(N, 8, 8, 3\)"),
        (dict(arr_0=np.zeros((3, 16, 16, 3), np.uint8)), False, r"arr_0 has shape \(3, 16, 16, 3\)"),
        (dict(arr_0=np.zeros((3, 3, 8, 8), np.uint8)), False, r"arr_0 has shape \(3, 3, 8, 8\)"),
        (dict(arr_0=GOOD_BASE[:0]), False, r"arr_0 has shape \(0, 8, 8, 3\).* N >= 1"),
        (dict(arr_0=GOOD_BASE), True, r"no arr_1"),
        (dict(arr_0=GOOD_BASE, arr_1=np.zeros(2, np.int64)), True, r"arr_1 has int64 shape \(2,\)"),
        (dict(arr_0=GOOD_BASE, arr_1=np.zeros(3, np.float32)), True, r"arr_1 has float32"),
        (dict(arr_0=GOOD_BASE, arr_1=np.array([0, 1, 5000])), True, r"arr_1 labels must lie in \[0, 1000\)"),
    ],
)
def test_bad_base_samples_give_one_line(tmp_path, arrays, class_cond, match):
    path = _npz(tmp_path / "base.npz", **arrays)
    with pytest.raises(UserError, match=rf"--base_samples {re.escape(path)}: {match}") as exc:
        _load_base_samples()(path, 8, class_cond)
    assert "\n" not in str(exc.value)


def test_base_samples_load_without_pickle(tmp_path):
    load = _load_base_samples()
    good = _npz(tmp_path / "good.npz", arr_0=GOOD_BASE + 7, arr_1=np.array([1, 2, 3], np.int32))
    images, labels = load(good, 8, True)
    np.testing.assert_array_equal(images, GOOD_BASE + 7)
    assert labels.dtype == np.int64 and labels.tolist() == [1, 2, 3]
    marker = tmp_path / "ran"
    evil = _npz(tmp_path / "evil.npz", arr_0=np.array([_Payload(str(marker))], dtype=object))
    for path, match in [
        (evil, r"not a readable \.npz archive.*pickle"),
        (_write(tmp_path / "text.npz", b"not a zip"), r"not a readable \.npz archive"),
        (_write(tmp_path / "empty.npz", b""), r"not a readable \.npz archive"),
        (str(tmp_path / "missing.npz"), r"file not found"),
    ]:
        with pytest.raises(UserError, match=rf"{re.escape(path)}.*{match}" if "missing" not in path else match):
            load(path, 8, False)
    assert not marker.exists()


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# ---------------------------------------------------------------------------------------------
# 2. Broken checkpoint files


def _broken_files(tmp_path):
    """name -> path of a checkpoint broken in one way (made from a real state_dict)."""
    buf = io.BytesIO()
    torch.save(TinyNet().state_dict(), buf)
    data = buf.getvalue()
    return {
        "zero-byte": _write(tmp_path / "zero.pt", b""),
        "truncated-half": _write(tmp_path / "half.pt", data[: len(data) // 2]),
        "truncated-64B": _write(tmp_path / "head.pt", data[:64]),
        "garbage": _write(tmp_path / "garbage.pt", os.urandom(4096)),
        "text": _write(tmp_path / "text.pt", b"version https://git-lfs.github.com/spec/v1\n"),
        "missing": str(tmp_path / "missing.pt"),
        "directory": str(tmp_path),
    }


BROKEN_KINDS = ["zero-byte", "truncated-half", "truncated-64B", "garbage", "text", "missing", "directory"]


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_broken_checkpoint_error_names_the_file(tmp_path, kind):
    path = _broken_files(tmp_path)[kind]
    for load in (fileio.safe_torch_load, dist_util.load_state_dict):
        with pytest.raises(UserError) as exc:
            load(path)
        message = str(exc.value)
        assert path in message and "\n" not in message, message


@pytest.mark.parametrize("kind", ["zero-byte", "truncated-half", "missing"])
def test_sampling_from_a_broken_checkpoint_is_one_line(tmp_path, capsys, kind):
    path = _broken_files(tmp_path)[kind]
    code, err = _run_script(
        "image_sample.py",
        [
            "--model_path",
            path,
            "--log_dir",
            tmp_path / "out",
            "--image_size",
            8,
            "--num_channels",
            32,
            "--channel_mult",
            "1",
            "--attention_resolutions",
            "",
            "--noise_schedule",
            "cosine",
            "--diffusion_steps",
            4,
            "--num_samples",
            1,
        ],
        capsys,
    )
    assert code == 2 and path in _one_line(err)


BREAKS = {
    "model truncated": ("model000003.pt", "truncate"),
    "model zero-byte": ("model000003.pt", "empty"),
    "ema truncated": ("ema_0.9_000003.pt", "truncate"),
    "ema missing": ("ema_0.9_000003.pt", "delete"),
    "opt garbage": ("opt000003.pt", "garbage"),
    "opt missing": ("opt000003.pt", "delete"),
    "state missing (killed before the last write)": ("state000003.pt", "delete"),
    "state truncated": ("state000003.pt", "truncate"),
}


def _break(path, how):
    if how == "delete":
        os.remove(path)
    elif how == "empty":
        open(path, "wb").close()
    elif how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        _write(path, os.urandom(500))


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A log folder with complete checkpoints after steps 1, 2 and 3."""
    folder = str(tmp_path_factory.mktemp("three") / "run")
    with logger.scoped_configure(dir=folder, format_strs=["log"]):
        _loop(folder, max_steps=3).run_loop()
    return folder


@pytest.mark.parametrize("case", list(BREAKS))
def test_auto_resume_skips_incomplete_checkpoints(tmp_path, three_checkpoints, case):
    folder = str(tmp_path / "run")
    shutil.copytree(three_checkpoints, folder)
    name, how = BREAKS[case]
    _break(os.path.join(folder, name), how)
    # a leftover temporary file of an interrupted write must not confuse the search either
    _write(os.path.join(folder, fileio.TMP_PREFIX + "model000004.pt.abc"), b"partial")
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=["log"]):
        loop = _loop(folder, resume_checkpoint="auto", max_steps=4)
        assert loop.step == 2
        expected = fileio.safe_torch_load(os.path.join(folder, "model000002.pt"))
        for key, value in loop.model.state_dict().items():
            torch.testing.assert_close(value, expected[key], **EXACT)
    with open(tmp_path / "log" / "log.txt") as f:
        log = f.read()
    assert re.search(r"skipping (incomplete )?checkpoint 3", log), log
    assert "resuming from" in log and "model000002.pt" in log


def test_auto_resume_with_only_broken_checkpoints_starts_fresh(tmp_path, three_checkpoints):
    folder = str(tmp_path / "run")
    shutil.copytree(three_checkpoints, folder)
    for step in (1, 2, 3):
        _break(os.path.join(folder, f"state{step:06d}.pt"), "truncate")
    assert _loop(folder, resume_checkpoint="auto", max_steps=4).step == 0


@pytest.mark.parametrize("kind", ["zero-byte", "truncated-half"])
def test_explicit_resume_from_a_broken_file_names_it(tmp_path, kind):
    path = _broken_files(tmp_path)[kind]
    folder = os.path.join(str(tmp_path), "run")
    os.makedirs(folder)
    target = os.path.join(folder, "model000005.pt")
    shutil.copy(path, target)
    with pytest.raises(UserError, match=re.escape(target)):
        _loop(folder, resume_checkpoint=target)


# ---------------------------------------------------------------------------------------------
# 3. Crashes: a full disk while saving


class _DiskFull:
    """Replaces fileio.atomic_write: writes of matching files run out of space half-way."""

    def __init__(self, real, pattern):
        self.real, self.pattern, self.hits = real, pattern, 0

    def __call__(self, path, write):
        if self.pattern not in os.path.basename(path):
            return self.real(path, write)
        self.hits += 1

        def half_then_enospc(f):
            buf = io.BytesIO()
            write(buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        return self.real(path, half_then_enospc)


@pytest.mark.parametrize("pattern", ["model000002", "ema_0.9_000002", "opt000002", "state000002"])
def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, pattern):
    folder = str(tmp_path / "run")
    loop = _loop(folder, max_steps=3)
    disk = _DiskFull(fileio.atomic_write, pattern)
    monkeypatch.setattr(fileio, "atomic_write", disk)
    with pytest.raises(UserError) as exc:
        loop.run_loop()
    monkeypatch.undo()
    message = str(exc.value)
    assert disk.hits == 1 and "\n" not in message
    assert "No space left on device" in message and "training stopped at step 2" in message
    assert f"{pattern}.pt" in message  # names the file it could not write
    assert _pt_files(folder) == ["ema_0.9_000001.pt", "model000001.pt", "opt000001.pt", "state000001.pt"]
    assert not _tmp_files(folder)
    resumed = _loop(folder, resume_checkpoint="auto", max_steps=3)
    assert resumed.step == 1


# ---------------------------------------------------------------------------------------------
# 4. Numbers: NaN / Inf never reach the saved weights


def _weights(loop):
    return [p.detach().clone() for p in loop.params], [e.clone() for e in loop.ema_params[0]]


def _assert_weights_equal(a, b):
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        torch.testing.assert_close(x, y, **EXACT)


@pytest.mark.parametrize("fault", ["nan output", "inf output", "nan gradient", "nan pixel", "inf pixel"])
def test_one_nonfinite_step_is_skipped_in_float32(tmp_path, fault):
    folder = str(tmp_path / "run")
    model = TinyNet()
    good = next(_batches())[0]
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan") if fault == "nan pixel" else float("inf")
    batches = iter([(good, {}), (bad if "pixel" in fault else good, {}), (good, {})])
    loop = _loop(folder, model=model, data=batches, max_steps=3)
    loop.run_step(*next(loop.data))
    after_one = _weights(loop)
    model.poison = {"nan output": "nan", "inf output": "inf"}.get(fault)
    model.poison_grad = fault == "nan gradient"
    loop.run_step(*next(loop.data))
    _assert_weights_equal(_weights(loop), after_one)
    assert loop.nonfinite_in_a_row == 1
    model.poison, model.poison_grad = None, False
    loop.run_loop()
    assert loop.step == 3 and loop.nonfinite_in_a_row == 0
    _assert_finite_files(folder)


def test_nonfinite_steps_in_a_row_stop_float32_training(tmp_path):
    folder = str(tmp_path / "run")
    model = TinyNet()
    loop = _loop(folder, model=model, max_steps=0, max_nonfinite_steps=3)
    loop.run_step(*next(loop.data))
    good = _weights(loop)
    model.poison = "nan"
    with pytest.raises(UserError, match=r"loss was NaN/Inf for 3 steps in a row") as exc:
        loop.run_loop()
    assert "\n" not in str(exc.value) and loop.step == 3
    _assert_weights_equal(_weights(loop), good)
    _assert_finite_files(folder)


def _cpu_loss_scaling(loop):
    """Give the loop a float16-style dynamic loss scaler (GradScaler works on the CPU too)."""
    loop.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=1000)
    return loop


def test_nan_with_loss_scaling_skips_and_halves_the_scale(tmp_path):
    """With float16 loss scaling a NaN only lowers the scale; training goes on past the fp32 limit."""
    folder = str(tmp_path / "run")
    model = TinyNet()
    loop = _cpu_loss_scaling(_loop(folder, model=model, max_steps=0, max_nonfinite_steps=2))
    loop.run_step(*next(loop.data))
    good = _weights(loop)
    assert loop.precision.lg_loss_scale == 20.0
    model.poison_grad = True
    for _ in range(6):  # more than max_nonfinite_steps: loss scaling keeps going
        loop.run_step(*next(loop.data))
    assert loop.precision.lg_loss_scale == 14.0
    _assert_weights_equal(_weights(loop), good)
    model.poison_grad = False
    loop.max_steps = loop.step + 1
    loop.run_loop()
    assert loop.nonfinite_in_a_row == 0
    _assert_finite_files(folder)
    state = fileio.safe_torch_load(os.path.join(folder, f"state{loop.step:06d}.pt"))
    assert state["precision"]["scaler"]["scale"] == 2.0**14


def test_loss_scaling_gives_up_when_the_loss_itself_is_nan(tmp_path, monkeypatch):
    monkeypatch.setattr(train_util, "FP16_MAX_SKIPS_IN_A_ROW", 6)  # 40 in real runs; same branch
    folder = str(tmp_path / "run")
    model = TinyNet()
    loop = _cpu_loss_scaling(_loop(folder, model=model, max_steps=0, save_interval=8, log_interval=8))
    loop.run_step(*next(loop.data))
    loop.save()
    model.poison = "nan"
    with pytest.raises(UserError, match=r"NaN/Inf for 6 steps in a row"):
        loop.run_loop()
    _assert_finite_files(folder)


# ---------------------------------------------------------------------------------------------
# 5. Data folders


def _png_bytes(arr, mode=None, **save_kw):
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG", **save_kw)
    return buf.getvalue()


def _bomb_png(width, height):
    """A valid-looking PNG header declaring ``width x height`` RGB pixels, with a tiny body."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bomb_gif(width, height):
    """A GIF whose screen and one frame declare ``width x height`` pixels, with a tiny body."""
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b";"


def _image_folder(tmp_path, files):
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    for name, data in files.items():
        _write(root / name, data)
    return str(root)


def _first_batch(data_dir, image_size=8, **kw):
    args = dict(data_dir=data_dir, batch_size=1, image_size=image_size, deterministic=True, rank=0, world_size=1)
    args.update(kw)
    return next(load_data(**args))


RGB = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)

BAD_FILES = {  # name, content, expected message ({path} = the file's path)
    "empty file": ("a.png", b"", r"could not read image {path}: the file is empty \(0 bytes\)"),
    "text named .jpg": ("a.jpg", b"hello, I am not a JPEG", r"could not read image {path}: "),
    "html named .png": ("a.png", b"<html><body>404</body></html>", r"could not read image {path}: "),
    "truncated png": ("a.png", _png_bytes(RGB)[:60], r"could not read image {path}: "),
    "truncated gif": ("a.gif", b"GIF89a\x0c\x00", r"could not read image {path}: "),
    "bomb png": ("a.png", _bomb_png(100_000, 100_000), r"refusing image {path}: more pixels than .*MAX_IMAGE_PIXELS"),
    "bomb gif": ("a.gif", _bomb_gif(65535, 65535), r"refusing image {path}: more pixels than .*MAX_IMAGE_PIXELS"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_image_file_is_named(tmp_path, case):
    name, data, match = BAD_FILES[case]
    folder = _image_folder(tmp_path, {"0ok.png": _png_bytes(RGB), name: data})
    path = os.path.join(folder, name)
    loader = load_data(data_dir=folder, batch_size=2, image_size=8, deterministic=True, rank=0, world_size=1)
    with pytest.raises(UserError, match=match.replace("{path}", re.escape(path))) as exc:
        next(loader)
    assert "\n" not in str(exc.value)


def test_image_just_over_the_pixel_limit_is_refused(tmp_path, monkeypatch):
    """Between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns; the loader refuses it anyway."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    folder = _image_folder(tmp_path, {"a.png": _png_bytes(RGB)})  # 144 pixels
    with pytest.raises(UserError, match=r"refusing image .*a\.png"):
        _first_batch(folder)


def _expected(rgb, size=8):
    """The documented preprocessing applied to an RGB uint8 array (reference for the modes)."""
    from improved_diffusion.image_datasets import center_crop_arr

    arr = center_crop_arr(Image.fromarray(rgb), size).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(np.transpose(arr, [2, 0, 1]))[None]


GRAY = np.random.default_rng(1).integers(0, 256, (12, 12), dtype=np.uint8)


def _mode_cases():
    palette_img = Image.fromarray(RGB).quantize(16)
    pal_rgb = np.asarray(palette_img.convert("RGB"))
    buf = io.BytesIO()
    palette_img.save(buf, format="PNG")
    pal_t = palette_img.copy()
    pal_t.info["transparency"] = 0
    buf_t = io.BytesIO()
    pal_t.save(buf_t, format="PNG", transparency=0)
    rgba = np.dstack([RGB, np.full((12, 12), 7, np.uint8)])
    gray16 = (GRAY.astype(np.uint16) * 257).astype(np.uint16)
    buf16 = io.BytesIO()
    Image.fromarray(gray16).save(buf16, format="PNG")
    bits = (GRAY > 127).astype(np.uint8) * 255
    buf1 = io.BytesIO()
    Image.fromarray(bits).convert("1").save(buf1, format="PNG")
    cmyk = io.BytesIO()
    Image.fromarray(RGB).convert("CMYK").save(cmyk, format="JPEG", quality=100)
    gray3 = np.repeat(GRAY[:, :, None], 3, axis=2)
    return {
        "grayscale L": (_png_bytes(GRAY), gray3, 0),
        "gray + alpha LA": (_png_bytes(np.dstack([GRAY, GRAY]), "LA"), gray3, 0),
        "palette P": (buf.getvalue(), pal_rgb, 0),
        "palette with transparency": (buf_t.getvalue(), pal_rgb, 0),
        "RGBA (alpha dropped)": (_png_bytes(rgba), RGB, 0),
        "16-bit grayscale (scaled, not clipped)": (buf16.getvalue(), gray3, 0),
        "1-bit": (buf1.getvalue(), np.repeat(bits[:, :, None], 3, axis=2), 0),
        "CMYK jpeg": (cmyk.getvalue(), None, 0),
    }


MODE_CASES = _mode_cases()


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_image_modes_become_correct_rgb(tmp_path, case):
    data, rgb, _ = MODE_CASES[case]
    folder = _image_folder(tmp_path, {"a.png" if "jpeg" not in case else "a.jpg": data})
    images, _ = _first_batch(folder)
    assert images.shape == (1, 3, 8, 8) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    if rgb is not None:
        torch.testing.assert_close(images, _expected(rgb), rtol=0, atol=PIXEL_ATOL)
    else:  # lossy CMYK round trip: close to the RGB original
        assert (images - _expected(RGB)).abs().mean() < 0.1


@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 5, 3), (5, 3, 3), (7, 40, 3)])
def test_images_smaller_than_the_target_are_upscaled(tmp_path, shape):
    arr = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    folder = _image_folder(tmp_path, {"a.png": _png_bytes(arr)})
    images, _ = _first_batch(folder, image_size=16)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    torch.testing.assert_close(images, _expected(arr, 16), **EXACT)


def test_class_cond_without_underscore_names_the_file(tmp_path):
    folder = _image_folder(tmp_path, {"cat_1.png": _png_bytes(RGB), "dog2.png": _png_bytes(RGB)})
    with pytest.raises(UserError, match=rf"--class_cond .*{re.escape(os.path.join(folder, 'dog2.png'))} has no '_'"):
        _first_batch(folder, class_cond=True)


def test_more_ranks_than_images(tmp_path):
    folder = _image_folder(tmp_path, {"a.png": _png_bytes(RGB), "b.png": _png_bytes(RGB)})
    with pytest.raises(UserError, match=r"has 2 image\(s\), fewer than the 3 processes"):
        _first_batch(folder, rank=2, world_size=3)
    images, _ = _first_batch(folder, rank=1, world_size=2, batch_size=3)  # 1 image per rank still works
    assert images.shape == (3, 3, 8, 8)


@pytest.mark.parametrize(
    "files, match",
    [
        ({}, r"no image files \(jpg, jpeg, png, gif\) found"),
        ({"notes.txt": b"x", "a.png.bak": b"y", "png": b"z"}, r"no image files"),
    ],
)
def test_folders_without_images(tmp_path, files, match):
    folder = _image_folder(tmp_path, files)
    with pytest.raises(UserError, match=rf"--data_dir {re.escape(folder)}: {match}"):
        _first_batch(folder)


def test_bad_image_in_worker_process_is_named(tmp_path):
    folder = _image_folder(tmp_path, {"a.png": _png_bytes(RGB), "b.png": b""})
    args = dict(batch_size=2, image_size=8, deterministic=True, num_workers=1, rank=0, world_size=1)
    loader = load_data(data_dir=folder, **args)
    with pytest.raises(UserError, match=rf"{re.escape(os.path.join(folder, 'b.png'))}: the file is empty"):
        next(loader)


def test_nll_on_a_folder_with_a_bad_image_is_one_line(script_inputs, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _write(data / "a.png", _png_bytes(RGB[:8, :8]))
    bad = _write(data / "b.jpg", b"<html>not an image</html>")
    argv = [
        "--model_path",
        script_inputs["ckpt"],
        "--data_dir",
        data,
        "--num_samples",
        2,
        "--batch_size",
        2,
        "--log_dir",
        tmp_path / "log",
    ]
    code, err = _run_script("image_nll.py", argv, capsys)
    assert code == 2 and f"could not read image {bad}" in _one_line(err)


def test_super_res_sampling_refuses_pickled_base_samples(script_inputs, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = _npz(tmp_path / "evil.npz", arr_0=np.array([_Payload(str(marker))], dtype=object))
    argv = [
        "--model_path",
        script_inputs["sr_ckpt"],
        "--base_samples",
        evil,
        "--num_samples",
        1,
        "--log_dir",
        tmp_path / "log",
    ]
    code, err = _run_script("super_res_sample.py", argv, capsys)
    assert code == 2 and f"--base_samples {evil}: not a readable .npz archive" in _one_line(err)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 6. Flags: a wrong type or an unknown choice fails before any work starts

TINY_FLAGS = dict(
    num_channels=32,
    channel_mult="1",
    num_res_blocks=1,
    attention_resolutions="",
    diffusion_steps=4,
    noise_schedule="cosine",
    learn_sigma=True,
)


def _tiny_checkpoint(folder, sr=False):
    """A tiny model000000.pt with its args.json (what training leaves behind)."""
    from improved_diffusion import script_util as su

    if sr:
        flags = dict(su.sr_model_and_diffusion_defaults(), **TINY_FLAGS, large_size=8, small_size=4)
        model, _ = su.sr_create_model_and_diffusion(**flags)
    else:
        flags = dict(su.model_and_diffusion_defaults(), **TINY_FLAGS, image_size=8)
        model, _ = su.create_model_and_diffusion(**flags)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model000000.pt")
    torch.save(model.state_dict(), path)
    su.save_args_json(argparse.Namespace(**flags), folder)
    return path


@pytest.fixture(scope="module")
def script_inputs(tmp_path_factory):
    """Valid inputs for every script, so that only the flag under test is wrong."""
    root = tmp_path_factory.mktemp("inputs")
    data = root / "data"
    data.mkdir()
    for i in range(2):
        _write(data / f"c{i}_{i}.png", _png_bytes(np.roll(RGB, i, axis=0)[:8, :8]))
    base = _npz(root / "base.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    return dict(
        data=str(data),
        base=base,
        ckpt=_tiny_checkpoint(str(root / "ckpt")),
        sr_ckpt=_tiny_checkpoint(str(root / "sr_ckpt"), sr=True),
    )


def _train_argv(inputs, sr=False):
    size = ["--large_size", 8, "--small_size", 4] if sr else ["--image_size", 8]
    flags = [x for k, v in TINY_FLAGS.items() for x in (f"--{k}", v)]
    return ["--data_dir", inputs["data"], "--batch_size", 2, "--max_steps", 1, *size, *flags]


def _base_argv(script, inputs):
    """A working command line for ``script`` (the log folder is added by the caller)."""
    return {
        "image_sample.py": lambda: ["--model_path", inputs["ckpt"], "--num_samples", 1, "--batch_size", 1],
        "super_res_sample.py": lambda: [
            "--model_path",
            inputs["sr_ckpt"],
            "--base_samples",
            inputs["base"],
            "--num_samples",
            1,
            "--batch_size",
            1,
        ],
        "image_nll.py": lambda: ["--model_path", inputs["ckpt"], "--data_dir", inputs["data"], "--num_samples", 1],
        "image_train.py": lambda: _train_argv(inputs),
        "super_res_train.py": lambda: _train_argv(inputs, sr=True),
    }[script]()


INT, FLOAT, BOOL = r"invalid int value: '{v}'", r"invalid float value: '{v}'", r"boolean value expected.*'{v}'"
MODEL_BAD = [
    ("num_channels", "abc", INT),
    ("num_res_blocks", "1.5", INT),
    ("diffusion_steps", "ten", INT),
    ("dropout", "x", FLOAT),
    ("learn_sigma", "maybe", BOOL),
    ("class_cond", "2", BOOL),
    ("use_scale_shift_norm", "", BOOL),
    ("noise_schedule", "quadratic", r"'linear', 'cosine'"),
    ("timestep_respacing", "ddimx", r"'ddimx'"),
    ("timestep_respacing", "10,abc", r"'10,abc'"),
    ("attention_resolutions", "16;8", r"'16;8'"),
    ("channel_mult", "1,x", r"'1,x'"),
]
SAMPLE_BAD = [
    ("num_samples", "many", INT),
    ("use_ddim", "yes please", BOOL),
    ("eta", "x", FLOAT),
    ("clip_denoised", "sure", BOOL),
    ("seed", "0.5", INT),
]
TRAIN_BAD = [
    ("schedule_sampler", "importance", r"'uniform', 'loss-second-moment'"),
    ("lr", "fast", FLOAT),
    ("batch_size", "two", INT),
    ("microbatch", "half", INT),
    ("use_fp16", "perhaps", BOOL),
    ("ema_rate", "0.9,x", r"'0.9,x'"),
    ("save_interval", "1e3", INT),
]
SCRIPT_BAD = {
    "image_sample.py": MODEL_BAD + SAMPLE_BAD,
    "super_res_sample.py": MODEL_BAD + SAMPLE_BAD + [("large_size", "big", INT)],
    "image_nll.py": MODEL_BAD + [("num_samples", "all", INT), ("timestep_batch", "x", INT)],
    "image_train.py": MODEL_BAD + TRAIN_BAD,
    "super_res_train.py": MODEL_BAD + TRAIN_BAD + [("small_size", "4.0", INT)],
}
FLAG_CASES = [
    pytest.param(script, flag, value, match, id=f"{script[:-3]}--{flag}={value}")
    for script, cases in SCRIPT_BAD.items()
    for flag, value, match in cases
]


def _run_with_bad_flag(script, flag, value, inputs, tmp_path, capsys):
    log_dir = tmp_path / "log"
    argv = _base_argv(script, inputs) + [f"--{flag}", value, "--log_dir", log_dir]
    code, err = _run_script(script, argv, capsys)
    return code, err, log_dir


@pytest.mark.parametrize("script, flag, value, match", FLAG_CASES)
def test_bad_flag_fails_before_any_work(script_inputs, tmp_path, capsys, script, flag, value, match):
    code, err, log_dir = _run_with_bad_flag(script, flag, value, script_inputs, tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines, err
    assert f"--{flag}" in lines[-1] and re.search(match.replace("{v}", re.escape(value)), lines[-1]), err
    assert not log_dir.exists(), f"{script} created its log folder before rejecting --{flag}"


ONE_LINE_CASES = [
    pytest.param(script, flag, value, id=f"{script[:-3]}--{flag}")
    for script in SCRIPT_BAD
    for flag, value in (("num_channels", "abc"), ("noise_schedule", "quadratic"))
]


@pytest.mark.parametrize("script, flag, value", ONE_LINE_CASES)
def test_bad_flag_message_is_one_line(script_inputs, tmp_path, capsys, script, flag, value):
    _, err, _ = _run_with_bad_flag(script, flag, value, script_inputs, tmp_path, capsys)
    assert f"--{flag}" in _one_line(err)


CONTRADICTIONS = [
    ("num_channels", 64),
    ("num_res_blocks", 2),
    ("learn_sigma", False),
    ("class_cond", True),
    ("use_scale_shift_norm", False),
    ("channel_mult", "1,2"),
]


@pytest.mark.parametrize("script", ["image_sample.py", "image_nll.py", "super_res_sample.py"])
@pytest.mark.parametrize("flag, value", CONTRADICTIONS)
def test_flag_contradicting_the_checkpoint_is_named(script_inputs, tmp_path, capsys, script, flag, value):
    argv = _base_argv(script, script_inputs) + [f"--{flag}", value, "--log_dir", tmp_path / "log"]
    code, err = _run_script(script, argv, capsys)
    line = _one_line(err)
    assert code == 2 and f"--{flag}" in line, line
    if not (script == "super_res_sample.py" and flag == "class_cond"):  # there the base samples object first
        assert "model000000.pt" in line, line
    assert not [f for f in os.listdir(tmp_path / "log") if f.endswith(".npz")] if (tmp_path / "log").exists() else True


# ---------------------------------------------------------------------------------------------
# 3b. Crashes: SIGKILL at random moments and inside saves, SIGTERM / Ctrl-C

CHECKPOINT_PREFIXES = ["model", "ema_0.9_", "opt", "state"]  # state is written last
TRAIN_TINY = [
    "--image_size",
    8,
    "--channel_mult",
    "1",
    "--num_channels",
    32,
    "--num_res_blocks",
    1,
    "--attention_resolutions",
    "",
    "--diffusion_steps",
    10,
    "--noise_schedule",
    "cosine",
    "--batch_size",
    2,
    "--lr",
    1e-3,
    "--ema_rate",
    "0.9",
    "--log_interval",
    1,
    "--save_interval",
    1,
    "--resume_checkpoint",
    "auto",
    "--max_steps",
    100000,
]
KILL_SEED = 10


def _kill_plan(seed=KILL_SEED):
    """
    Ten SIGKILLs: five at seeded random delays after start (start-up, resume, steps, saves),
    three inside a file write of a save (temporary file written, not renamed) and two between
    the files of one checkpoint; then SIGTERM and SIGINT mid-training; then a clean finish.
    """
    rng = np.random.default_rng(seed)
    delays = [dict(kill="delay", seconds=round(float(s), 2)) for s in rng.uniform(0.3, 3.0, 5)]
    in_write = [dict(kill="fsync", n=int(n)) for n in rng.integers(2, 12, 3)]
    between = [dict(kill="replace", n=int(n)) for n in rng.integers(2, 12, 2)]
    kills = [
        delays[0],
        in_write[0],
        delays[1],
        between[0],
        delays[2],
        in_write[1],
        delays[3],
        between[1],
        in_write[2],
        delays[4],
    ]
    no_periodic_save = ["--save_interval", 100000]  # the signal alone must cause the save
    signals = [
        dict(kill="signal", signal=int(s), after_rows=2, argv=no_periodic_save) for s in (signal.SIGTERM, signal.SIGINT)
    ]
    return kills + signals + [dict(kill=None, extra_steps=2)]


def _complete_steps(files):
    steps = [int(n[5:-3]) for n in files if n.startswith("model") and n.endswith(".pt") and n[5:-3].isdigit()]
    return sorted(s for s in steps if all(f"{p}{s:06d}.pt" in files for p in CHECKPOINT_PREFIXES))


def _resumable_step(files):
    """
    The step auto-resume must pick: the newest complete checkpoint; in a folder without any
    state file (the original's layout, or a first save killed just before its state file),
    the newest with model, EMA and optimizer files.
    """
    complete = _complete_steps(files)
    if complete or any(n.startswith("state") for n in files):
        return max(complete, default=0)
    steps = [int(n[5:-3]) for n in files if n.startswith("model") and n.endswith(".pt") and n[5:-3].isdigit()]
    return max((s for s in steps if all(f"{p}{s:06d}.pt" in files for p in CHECKPOINT_PREFIXES[:3])), default=0)


def _resumed_step(log_text):
    """The step a run resumed from according to its log (0 = started fresh)."""
    match = re.search(r"resuming from \S*model(\d+)\.pt \(step (\d+)\)", log_text)
    if match:
        assert int(match.group(1)) == int(match.group(2))
        return int(match.group(2))
    if "starting from scratch" in log_text:
        return 0
    return None  # killed before it decided


def run_kill_sequence(script, tmp_path, data_dir, plan=None):
    """Run the kill plan against ``script``; return (results, log folder)."""
    log_dir = str(tmp_path / "run")
    out = str(tmp_path / "kills.json")
    plan = dict(
        script=script,
        argv=["--data_dir", data_dir, "--log_dir", log_dir, *TRAIN_TINY],
        log_dir=log_dir,
        out=out,
        runs=plan or _kill_plan(),
        state_prefixes=CHECKPOINT_PREFIXES,
        timeout=90,
    )
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan, default=str))
    proc = subprocess.run(
        [sys.executable, os.path.join(FAULT_SCRIPTS, "kill_runner.py"), str(plan_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f), log_dir


def check_kill_sequence(results, log_dir):
    """Every crash leaves a folder that auto-resume continues from its newest complete checkpoint."""
    previous_files = {}
    for i, res in enumerate(results):
        with open(res["log"]) as f:
            text = f.read()
        kind = res["run"]["kill"]
        where = f"run {i} ({res['run']})"
        # it resumed from the newest complete checkpoint the previous crash left
        expected = _resumable_step(previous_files)
        resumed = _resumed_step(text)
        if resumed is None:  # killed during start-up: the next run checks the same folder
            assert kind == "delay" and res["status"] == -signal.SIGKILL, f"{where}\n{text[-2000:]}"
        else:
            assert resumed == expected, f"{where}: expected resume at {expected}\n{text[-2000:]}"
        if kind in ("delay", "fsync", "replace"):
            assert res["status"] in (-signal.SIGKILL, 0), f"{where}: status {res['status']}\n{text[-2000:]}"
        if kind in ("fsync", "replace"):
            assert res["status"] == -signal.SIGKILL, f"{where} was not killed inside a save\n{text[-2000:]}"
        if kind == "signal":
            assert res["status"] in (0, 128 + res["run"]["signal"]), f"{where}: status {res['status']}\n{text[-2000:]}"
            assert f"stopping on signal {res['run']['signal']}" in text, text[-2000:]
            newest = max(_complete_steps(res["files"]), default=0)
            assert newest > expected, f"{where}: no checkpoint saved on the signal"
        if kind is None:
            assert res["status"] == 0, f"{where}\n{text[-3000:]}"
            assert max(_complete_steps(res["files"])) == expected + 2
        # a real (non-temporary) file name always holds a complete, loadable file
        for name, size in res["files"].items():
            if name.endswith(".pt") and not name.startswith(fileio.TMP_PREFIX):
                assert size > 0, f"{where}: {name} is empty"
        previous_files = res["files"]
    # No real file name holds a truncated file: model/EMA/optimizer files of one kind all have
    # the same size, every (small) state file loads, and the newest checkpoint loads and is finite.
    names = [n for n in _pt_files(log_dir) if not n.startswith(fileio.TMP_PREFIX)]
    for prefix in CHECKPOINT_PREFIXES[:3]:
        sizes = {os.path.getsize(os.path.join(log_dir, n)) for n in names if re.fullmatch(rf"{prefix}\d+\.pt", n)}
        assert len(sizes) == 1 or (prefix == "opt" and len(sizes) == 2), (prefix, sizes)
    for name in names:
        if name.startswith("state"):
            fileio.safe_torch_load(os.path.join(log_dir, name))
    newest = max(_complete_steps(set(names)))
    for prefix in CHECKPOINT_PREFIXES[:3]:
        for value in fileio.safe_torch_load(os.path.join(log_dir, f"{prefix}{newest:06d}.pt")).values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all()


@pytest.fixture(scope="module")
def train_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_images")
    for i in range(4):
        _write(root / f"img_{i}.png", _png_bytes(np.roll(RGB, 3 * i, axis=1)))
    return str(root)


@pytest.mark.slow
def test_sigkill_at_random_moments_and_inside_saves_always_resumes(tmp_path, train_images):
    results, log_dir = run_kill_sequence(os.path.join(SCRIPTS, "image_train.py"), tmp_path, train_images)
    check_kill_sequence(results, log_dir)
    kinds = [r["run"]["kill"] for r in results]
    assert sum(k in ("delay", "fsync", "replace") for k in kinds) >= 10


# ---------------------------------------------------------------------------------------------
# 7. Two ranks: one failing rank ends the whole job promptly, the error shown once

MPI_PROMPT_S = 60  # "promptly": far below the 30-minute collective timeout


def _mpiexec():
    found = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if found is None:
        pytest.skip("mpiexec not found")
    return found


def run_two_ranks(script, tmp_path, files, fault=None):
    """
    ``mpiexec -n 2`` a tiny training run on a folder of ``files``; with ``fault = (mode, rank,
    step)`` through ``fault_scripts/rank_fault.py``. A hang (a rank left waiting in a
    collective) ends in the subprocess timeout, far below the 30-minute collective timeout.
    """
    data = _image_folder(tmp_path, files)
    argv = ["--data_dir", data, "--log_dir", tmp_path / "run", *TRAIN_TINY[:-2], "--max_steps", 50]
    command = [sys.executable]
    if fault is not None:
        command += [os.path.join(FAULT_SCRIPTS, "rank_fault.py"), *map(str, fault)]
    return subprocess.run(
        [_mpiexec(), "-n", "2", *command, script, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=MPI_PROMPT_S + 60,
        env=_subprocess_env(IDDPM_DIST_TIMEOUT="120"),
    )


GOOD_PNG = _png_bytes(RGB)
TWO_RANK_FAULTS = {
    # rank 1's shard holds an unreadable image (sorted files alternate between the ranks)
    "UserError on rank 1 (bad image)": (
        {"a.png": GOOD_PNG, "b.png": b"\x89PNG\r\n\x1a\n truncated", "c.png": GOOD_PNG, "d.png": GOOD_PNG},
        None,
        "could not read image {data}/b.png",
    ),
    "RuntimeError on rank 1 at step 2": (
        {"a.png": GOOD_PNG, "b.png": GOOD_PNG},
        ("raise", 1, 2),
        "RuntimeError: injected fault on rank 1 at step 2",
    ),
    "SIGKILL of rank 1 at step 2": ({"a.png": GOOD_PNG, "b.png": GOOD_PNG}, ("sigkill", 1, 2), None),
    "every rank fails: 1 image for 2 ranks": ({"a.png": GOOD_PNG}, None, "fewer than the 2 processes"),
}


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("case", list(TWO_RANK_FAULTS))
def test_one_failing_rank_ends_the_job(tmp_path, case):
    files, fault, message = TWO_RANK_FAULTS[case]
    proc = run_two_ranks(os.path.join(SCRIPTS, "image_train.py"), tmp_path, files, fault)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    if message is not None:
        count = output.count(message.replace("{data}", str(tmp_path / "data")))
        assert count == 1, f"the error was shown {count} times:\n{output[-3000:]}"


# ---------------------------------------------------------------------------------------------
# 8. The training script end to end (in-process): untrusted, contradicting and broken inputs


def _train(tmp_path, capsys, data_dir, *extra, script="image_train.py", log_dir=None):
    log_dir = str(log_dir or tmp_path / "run")
    argv = ["--data_dir", data_dir, "--log_dir", log_dir, *TRAIN_TINY[:-2], "--max_steps", 2, *extra]
    code, err = _run_script(script, argv, capsys)
    return code, err, log_dir


@pytest.fixture(scope="module")
def _trained_template(tmp_path_factory, train_images):
    log_dir = str(tmp_path_factory.mktemp("trained") / "run")
    main = load_script("image_train.py").main
    argv = ["--data_dir", train_images, "--log_dir", log_dir, *TRAIN_TINY[:-2], "--max_steps", 2]
    with tempfile.TemporaryDirectory() as scratch, logger.scoped_configure(dir=scratch, format_strs=[]):
        main([str(a) for a in argv])
    assert _complete_steps(set(os.listdir(log_dir))) == [1, 2]
    return log_dir


@pytest.fixture
def trained_run(tmp_path, _trained_template):
    """A copy of a finished two-step image_train run (args.json, logs, checkpoints 1 and 2)."""
    log_dir = str(tmp_path / "trained")
    shutil.copytree(_trained_template, log_dir)
    return log_dir


@pytest.mark.parametrize("flag, value", [("num_channels", 64), ("learn_sigma", True), ("num_res_blocks", 2)])
def test_resume_with_contradicting_flags_is_named(tmp_path, capsys, train_images, trained_run, flag, value):
    code, err, _ = _train(tmp_path, capsys, train_images, f"--{flag}", value, "--max_steps", 3, log_dir=trained_run)
    line = _one_line(err)
    assert code == 2 and f"--{flag}" in line and "model000002.pt" in line, line


def test_resume_with_contradicting_flags_keeps_args_json(tmp_path, capsys, train_images, trained_run):
    path = os.path.join(trained_run, "args.json")
    with open(path) as f:
        before = f.read()
    code, _, _ = _train(tmp_path, capsys, train_images, "--num_channels", 64, "--max_steps", 3, log_dir=trained_run)
    with open(path) as f:
        assert code == 2 and f.read() == before


def test_training_refuses_a_pickled_resume_checkpoint(tmp_path, capsys, train_images, trained_run):
    marker = tmp_path / "ran"
    target = os.path.join(trained_run, "model000002.pt")
    _evil_checkpoint(target, marker, fileio.safe_torch_load(target))
    code, err, _ = _train(
        tmp_path, capsys, train_images, "--resume_checkpoint", target, "--max_steps", 3, log_dir=trained_run
    )
    assert code == 2 and f"refusing to load {target}" in _one_line(err)
    code, err, _ = _train(tmp_path, capsys, train_images, "--max_steps", 3, log_dir=trained_run)  # auto
    assert code == 0, err
    assert not marker.exists()
    with open(os.path.join(trained_run, "log.txt")) as f:
        log = f.read()
    assert "skipping checkpoint 2" in log and "resuming from" in log and "model000001.pt (step 1)" in log


def test_training_stops_cleanly_on_a_full_disk(tmp_path, capsys, monkeypatch, train_images, trained_run):
    before = {n: os.path.getsize(os.path.join(trained_run, n)) for n in _pt_files(trained_run)}
    monkeypatch.setattr(fileio, "atomic_write", _DiskFull(fileio.atomic_write, "000003"))
    code, err, _ = _train(tmp_path, capsys, train_images, "--max_steps", 4, log_dir=trained_run)
    monkeypatch.undo()
    line = _one_line(err)
    assert code == 2 and "No space left on device" in line and "earlier checkpoints are intact" in line, line
    assert {n: os.path.getsize(os.path.join(trained_run, n)) for n in _pt_files(trained_run)} == before
    assert not _tmp_files(trained_run)
    _assert_finite_files(trained_run)


@pytest.mark.parametrize(
    "files, extra, match",
    [
        ({"a_1.png": _png_bytes(RGB), "b_2.png": b""}, [], r"could not read image {data}/b_2\.png: the file is empty"),
        ({"a_1.png": _png_bytes(RGB), "b2.png": _png_bytes(RGB)}, ["--class_cond", True], r"{data}/b2\.png has no '_'"),
        ({"a.gif": _bomb_gif(65535, 65535)}, [], r"refusing image {data}/a\.gif"),
        ({}, [], r"--data_dir {data}: no image files"),
    ],
    ids=["empty image", "class_cond without underscore", "decompression bomb", "no images"],
)
def test_training_on_a_bad_folder_is_one_line(tmp_path, capsys, files, extra, match):
    data = _image_folder(tmp_path, files)
    code, err, _ = _train(tmp_path, capsys, data, *extra)
    assert code == 2 and re.search(match.replace("{data}", re.escape(data)), _one_line(err)), err


def test_super_res_training_on_a_bad_image_is_one_line(tmp_path, capsys):
    data = _image_folder(tmp_path, {"a.png": _png_bytes(RGB), "b.png": _png_bytes(RGB)[:70]})
    argv = _train_argv(dict(data=data), sr=True) + ["--log_dir", tmp_path / "run", "--diffusion_steps", 10]
    code, err = _run_script("super_res_train.py", argv, capsys)
    assert code == 2 and f"could not read image {os.path.join(data, 'b.png')}" in _one_line(err)


def test_diverging_training_stops_with_finite_checkpoints(tmp_path, capsys, train_images):
    """A learning rate of 1e30 turns the loss into Inf/NaN after one step: skipped, then stopped."""
    code, err, log_dir = _train(tmp_path, capsys, train_images, "--lr", 1e30, "--max_steps", 20)
    line = _one_line(err)
    assert code == 2 and "loss was NaN/Inf for 5 steps in a row at step 6; lower --lr" in line, line
    assert _complete_steps(set(os.listdir(log_dir))) == [1, 2, 3, 4, 5]
    _assert_finite_files(log_dir)
    first, last = (fileio.safe_torch_load(os.path.join(log_dir, f"model00000{s}.pt")) for s in (1, 5))
    for key in first:  # the four skipped steps left the weights exactly as after step 1
        torch.testing.assert_close(last[key], first[key], **EXACT)


@pytest.mark.parametrize("script", ["image_nll.py", "super_res_sample.py"])
def test_other_scripts_refuse_a_pickled_model(script_inputs, tmp_path, capsys, script):
    marker = tmp_path / "ran"
    key = "sr_ckpt" if script.startswith("super_res") else "ckpt"
    folder = tmp_path / "ckpt"
    shutil.copytree(os.path.dirname(script_inputs[key]), folder)  # keeps args.json beside it
    evil = _evil_checkpoint(folder / "model000000.pt", marker, fileio.safe_torch_load(script_inputs[key]))
    inputs = dict(script_inputs, **{key: evil})
    code, err = _run_script(script, _base_argv(script, inputs) + ["--log_dir", tmp_path / "log"], capsys)
    assert code == 2 and f"refusing to load {evil}" in _one_line(err)
    assert not marker.exists()


def test_full_disk_while_writing_samples(script_inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fileio, "atomic_write", _DiskFull(fileio.atomic_write, "samples_"))
    log_dir = tmp_path / "log"
    argv = _base_argv("image_sample.py", script_inputs) + ["--log_dir", log_dir]
    code, err = _run_script("image_sample.py", argv, capsys)
    line = [x for x in err.replace("\r", "\n").splitlines() if x.strip()][-1]  # after the progress bars
    assert line.startswith("error: could not write") and err.count("error:") == 1, err
    assert code == 2 and "samples_1x8x8x3.npz" in line and "No space left" in line, line
    assert not [f for f in os.listdir(log_dir) if f.endswith(".npz") or f.startswith(fileio.TMP_PREFIX)]


# ---------------------------------------------------------------------------------------------
# 9. Auto-resume must never silently throw a run away


def _resume_outcome(tmp_path, capsys, train_images, log_dir, *extra):
    """(exit code, stderr, step the run resumed from or None, log text) of a 3-step auto resume."""
    code, err, _ = _train(tmp_path, capsys, train_images, "--max_steps", 3, *extra, log_dir=log_dir)
    with open(os.path.join(log_dir, "log.txt")) as f:
        log = f.read().split("Logging to")[-1]  # this run's part
    resumed = _resumed_step(log)
    return code, err, resumed, log


def test_adding_an_ema_rate_on_resume_keeps_the_run(tmp_path, capsys, train_images, trained_run):
    code, err, resumed, log = _resume_outcome(tmp_path, capsys, train_images, trained_run, "--ema_rate", "0.9,0.99")
    # acceptable: resume from step 2 (the new EMA starts from the weights), or a one-line refusal
    assert (code == 0 and resumed == 2) or (code == 2 and "--ema_rate" in _one_line(err)), log[-1500:]


def test_auto_resume_of_an_original_layout_folder(tmp_path, capsys, train_images, trained_run):
    for name in os.listdir(trained_run):
        if name.startswith("state"):
            os.remove(os.path.join(trained_run, name))  # the original writes model, ema and opt only
    code, err, resumed, log = _resume_outcome(tmp_path, capsys, train_images, trained_run)
    assert (code == 0 and resumed == 2) or (code == 2 and "model000002.pt" in _one_line(err)), log[-1500:]


def test_resume_removes_temporaries_of_killed_writes(tmp_path, capsys, train_images, trained_run):
    leftover = os.path.join(trained_run, fileio.TMP_PREFIX + "model000003.pt.k1ll3d")
    _write(leftover, os.urandom(1000))  # what a SIGKILL inside atomic_write leaves behind
    code, err, resumed, _ = _resume_outcome(tmp_path, capsys, train_images, trained_run)
    assert code == 0 and resumed == 2, err
    assert not os.path.exists(leftover)


# ---------------------------------------------------------------------------------------------
# 10. A broken args.json beside the checkpoint (sampling reads its flags from there)

BAD_ARGS_JSON = {
    "truncated": (b'{"num_channels": 32, "learn_si', r"could not read {path}"),
    "empty": (b"", r"could not read {path}"),
    "a list": (b"[1, 2]", r"{path} does not hold a JSON object"),
    "wrong type": (b'{"num_channels": "abc"}', r"--num_channels.*'abc'"),
    "unknown schedule": (b'{"noise_schedule": "quadratic"}', r"--noise_schedule.*'linear', 'cosine'"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS_JSON))
def test_broken_args_json_is_one_line(script_inputs, tmp_path, capsys, case):
    folder = tmp_path / "ckpt"
    shutil.copytree(os.path.dirname(script_inputs["ckpt"]), folder)
    content, match = BAD_ARGS_JSON[case]
    path = _write(folder / "args.json", content)
    inputs = dict(script_inputs, ckpt=str(folder / "model000000.pt"))
    log_dir = tmp_path / "log"
    code, err = _run_script("image_sample.py", _base_argv("image_sample.py", inputs) + ["--log_dir", log_dir], capsys)
    line = _one_line(err)
    assert code == 2 and re.search(match.replace("{path}", re.escape(path)), line), line
    assert not log_dir.exists()


def _terminate_after_rows(command, env, out, csv, rows):
    """Start ``command``, SIGTERM it once ``csv`` has ``rows`` data rows; return (status, output)."""
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + MPI_PROMPT_S
        while time.time() < deadline and proc.poll() is None:
            if csv.exists() and len(csv.read_text().splitlines()) > rows:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=MPI_PROMPT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    out.seek(0)
    return code, out.read()


@pytest.mark.slow
@pytest.mark.mpi
def test_sigterm_to_mpiexec_saves_on_every_rank_then_resumes(tmp_path):
    """Preemption of a two-rank job: mpiexec forwards SIGTERM, both ranks stop at one step and save."""
    data = _image_folder(tmp_path, {"a.png": GOOD_PNG, "b.png": GOOD_PNG})
    log_dir = tmp_path / "run"
    argv = ["--data_dir", data, "--log_dir", log_dir, *TRAIN_TINY, "--save_interval", 100000]
    command = [_mpiexec(), "-n", "2", sys.executable, os.path.join(SCRIPTS, "image_train.py"), *map(str, argv)]
    env = _subprocess_env(IDDPM_DIST_TIMEOUT="120")
    with open(tmp_path / "out.txt", "w+") as out:
        code, text = _terminate_after_rows(command, env, out, log_dir / "progress.csv", rows=2)
    match = re.search(r"stopping on signal 15 at step (\d+)", text)
    assert code in (0, 128 + signal.SIGTERM) and match and text.count("stopping on signal") == 1, text[-3000:]
    step = int(match.group(1))
    assert _complete_steps(set(os.listdir(log_dir))) == [step]
    resumed = subprocess.run(
        command + ["--max_steps", str(step + 1)], capture_output=True, text=True, env=env, timeout=MPI_PROMPT_S + 60
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {step})" in resumed.stdout and _complete_steps(set(os.listdir(log_dir))) == [step, step + 1]
