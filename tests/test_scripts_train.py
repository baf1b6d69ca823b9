"""
End-to-end tests of scripts/image_train.py and scripts/super_res_train.py with tiny UNets.

Most runs call the script's ``main(argv)`` in this process (importing torch again per run
would cost more than the training); one run goes through ``python scripts/image_train.py`` to
check the command itself, args.json and the SIGTERM path.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from script_loader import load_script, run_script

from improved_diffusion import fileio, train_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXACT = dict(rtol=0, atol=0)

TINY = [
    "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "8",
    "--num_heads", "1", "--diffusion_steps", "20", "--noise_schedule", "cosine", "--batch_size", "2",
    "--log_interval", "1", "--save_interval", "2",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_train():
    return load_script("image_train")


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(root / f"k{i % 2}_{i}.png")
    return str(root)


_run = run_script


def _train(module, images, log_dir, *extra, image_size="16"):
    argv = ["--data_dir", images, "--image_size", image_size, "--log_dir", log_dir, *TINY, *extra]
    return _run(module, argv)


@pytest.mark.parametrize(
    "extra",
    [
        ["--learn_sigma", "True", "--microbatch", "1", "--class_cond", "True", "--random_flip", "True"],
        ["--learn_sigma", "True", "--use_kl", "True", "--schedule_sampler", "loss-second-moment", "--use_bf16", "True"],
    ],
    ids=["hybrid-microbatch-classes", "vlb-second-moment-bf16"],
)
def test_image_train_runs(isolated, image_train, images, tmp_path, extra):
    log_dir = str(tmp_path / "log")
    assert _train(image_train, images, log_dir, "--max_steps", "3", *extra)[0] == 0
    names = sorted(os.listdir(log_dir))
    for step in ("000002", "000003"):
        assert {f"model{step}.pt", f"ema_0.9999_{step}.pt", f"opt{step}.pt", f"state{step}.pt"} <= set(names)
    saved = json.load(open(os.path.join(log_dir, "args.json")))
    assert saved["learn_sigma"] is True and saved["max_steps"] == 3 and saved["data_dir"] == images
    state = fileio.safe_torch_load(os.path.join(log_dir, "model000003.pt"))
    assert state["out.2.weight"].shape[0] == 6


def test_script_resume_is_exact(isolated, image_train, images, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    # --deterministic: the convolution paths by the size rule, so both runs compute alike.
    flags = ["--dropout", "0.1", "--random_flip", "True", "--learn_sigma", "True", "--deterministic", "True"]
    assert _train(image_train, images, straight, "--max_steps", "4", *flags)[0] == 0
    assert _train(image_train, images, split, "--max_steps", "3", *flags)[0] == 0
    assert _train(image_train, images, split, "--max_steps", "4", "--resume_checkpoint", "auto", *flags)[0] == 0
    for name in ("model000004.pt", "ema_0.9999_000004.pt"):
        a = fileio.safe_torch_load(os.path.join(straight, name))
        b = fileio.safe_torch_load(os.path.join(split, name))
        for key in a:
            torch.testing.assert_close(b[key], a[key], **EXACT)


@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_math_is_set_and_logged(isolated, image_train, images, tmp_path, monkeypatch, deterministic):
    """fp32 is float32 (no TF32) unless asked; --deterministic adds deterministic kernels and cuBLAS's workspace."""
    seen = {}
    real_run_loop = train_util.TrainLoop.run_loop

    def run_loop(self):
        seen.update(algorithms=torch.are_deterministic_algorithms_enabled(), benchmark=torch.backends.cudnn.benchmark)
        seen.update(tf32=(torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        seen.update(workspace=os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        real_run_loop(self)

    monkeypatch.setattr(train_util.TrainLoop, "run_loop", run_loop)
    log_dir = str(tmp_path / "log")
    assert _train(image_train, images, log_dir, "--max_steps", "1", "--deterministic", str(deterministic))[0] == 0
    assert seen == dict(
        algorithms=deterministic,
        benchmark=not deterministic,
        tf32=(False, False),
        workspace=":4096:8" if deterministic else None,
    )
    with open(os.path.join(log_dir, "log.txt")) as f:
        line = f"cuda math: tf32=False, deterministic={deterministic}, cudnn.benchmark={not deterministic}"
        assert line in f.read()


def test_super_res_train_runs(isolated, images, tmp_path):
    module = load_script("super_res_train")
    log_dir = str(tmp_path / "log")
    argv = ["--data_dir", images, "--large_size", "16", "--small_size", "8", "--log_dir", log_dir, *TINY]
    assert _run(module, argv + ["--max_steps", "2"])[0] == 0
    state = fileio.safe_torch_load(os.path.join(log_dir, "model000002.pt"))
    assert state["input_blocks.0.0.weight"].shape[1] == 6  # x and the upsampled low_res


def test_low_res_is_area_downsampled(images):
    from improved_diffusion.image_datasets import load_superres_data

    data = load_superres_data(data_dir=images, batch_size=2, large_size=16, small_size=8, rank=0, world_size=1)
    large, kwargs = next(data)
    expected = large.reshape(2, 3, 8, 2, 8, 2).mean(dim=(3, 5))
    torch.testing.assert_close(kwargs["low_res"], expected, rtol=1e-6, atol=1e-6)
    assert data.state_dict()["position"] == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--schedule_sampler", "foo"],
            r"error: --schedule_sampler 'foo': expected one of 'uniform', 'loss-second-moment'",
        ),
        (["--data_dir", "/nonexistent/x"], r"error: --data_dir /nonexistent/x: no such folder"),
        (["--data_dir", ""], r"error: --data_dir is empty"),
        (["--use_fp16", "True", "--use_bf16", "True"], r"error: --use_fp16 and --use_bf16 exclude each other"),
        (["--ema_rate", "0.9,abc"], r"error: --ema_rate '0.9,abc'"),
        (["--microbatch", "0"], r"error: --microbatch 0"),
        (["--resume_checkpoint", "latest"], r"error: --resume_checkpoint 'latest'"),
        (["--noise_schedule", "quadratic"], r"error: .*quadratic"),
        (["--num_channels", "16"], r"error: --num_channels"),
        (
            ["--class_cond", "True", "--num_classes", "1"],
            r"error: --data_dir .* has 2 classes \(file-name prefixes\), more than --num_classes 1: pass --num_c",
        ),
        (["--class_dropout_prob", "0.1"], r"error: --class_dropout_prob 0.1 drops class labels: it needs a class-co"),
    ],
)
def test_bad_flags_exit_2_with_one_line(isolated, image_train, images, tmp_path, capsys, argv, message):
    full = ["--data_dir", images, "--log_dir", str(tmp_path / "log"), *argv]
    code, err = _run(image_train, full, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.match(message, err), err
    assert not (tmp_path / "log").exists()  # checked before any work


@pytest.mark.slow
def test_command_line_run_sigterm_and_resume(isolated, image_train, images, tmp_path):
    """
    The real command, with decoding workers: SIGTERM to the whole process group (as a job
    scheduler sends it) saves a complete checkpoint, and the run exits 128+15 without hanging.
    """
    log_dir = str(tmp_path / "log")
    argv = ["--data_dir", images, "--image_size", "16", "--log_dir", log_dir, *TINY, "--save_interval", "1"]
    argv += ["--num_workers", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENAI_LOG_FORMAT="stdout,log")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "scripts", "image_train.py"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(log_dir, "state000001.pt")):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopping on signal 15" in out
    states = sorted(f for f in os.listdir(log_dir) if f.startswith("state"))
    last = int(states[-1][5:11])
    for name in (f"model{last:06d}.pt", f"ema_0.9999_{last:06d}.pt", f"opt{last:06d}.pt"):
        fileio.safe_torch_load(os.path.join(log_dir, name))
    assert json.load(open(os.path.join(log_dir, "args.json")))["save_interval"] == 1
    # ... and an automatic resume continues from it.
    code, _ = _run(image_train, argv + ["--resume_checkpoint", "auto", "--max_steps", str(last + 1)])
    assert code == 0 and os.path.exists(os.path.join(log_dir, f"state{last + 1:06d}.pt"))
