"""
Tests of ``benchmarks/gpu_check.py`` / ``gpu_check.sh`` where no GPU is lent: the no-GPU answer
(one line, exit 0), the whole check on the CPU with a tiny model (``--allow_cpu --quick``), the
peak-rate table and what counts as a failure. No timing is asserted.
"""

import importlib.util
import json
import os
import subprocess

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_shell_script_without_a_gpu_says_so_in_one_line(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=os.path.join(REPO, ".venv", "bin", "python"))
    proc = subprocess.run(
        [os.path.join(REPO, "benchmarks", "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [proc.stdout.strip()] and "no CUDA device visible" in proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_without_a_gpu_main_exits_0(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.count("\n") == 1


def test_quick_run_on_the_cpu_writes_json_and_table(gpu_check, tmp_path):
    out = tmp_path / "out"
    argv = ["--allow_cpu", "--quick", "--skip_tests", "--variants", "bf16", "--steps", "2", "--timed_steps", "1"]
    argv += ["--sample_steps", "2", "--out", str(out)]
    assert gpu_check.main(argv) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    header = report["header"]
    assert {"device", "torch", "tf32_matmul", "tf32_cudnn", "cudnn_benchmark", "peak_bf16_tflops"} <= set(header)
    assert header["tf32_matmul"] is False and header["tf32_cudnn"] is False
    assert list(report["train"]) == ["fp32", "bf16"] and report["failures"] == []
    for entry in report["train"].values():
        assert {"images_per_s", "loss", "train_loss", "speedup_vs_fp32", "loss_rel_diff_vs_fp32"} <= set(entry)
    assert report["train"]["fp32"]["flops_per_step"] > 0
    assert set(report["sample"]) == {"fp32", "bf16"}
    for sampler in ("ancestral", "dpm++2m", "dpm++2m-sde"):
        assert report["sample"]["fp32"][f"{sampler}_2_steps_s"] > 0, sampler
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.md"]  # no temporaries left
    table = (out / "gpu_check.md").read_text()
    assert "TF32 matmul=False, TF32 cuDNN=False" in table and "| bf16 |" in table and "| sampling, batch 4 |" in table


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_peak_bf16_rates(gpu_check, name, tflops):
    assert gpu_check.peak_bf16_tflops(name) == tflops


def test_failures_are_failed_tests_variants_and_nonfinite_mixed_losses(gpu_check):
    report = {
        "tests": {"ok": False, "summary": "1 failed, 9 passed"},
        "train": {
            "fp32": {"loss": float("nan"), "train_loss": 1.0},  # fp32 is the reference, not judged here
            "fp16": {"loss": 1.0, "train_loss": float("inf")},
            "bf16": {"loss": 1.0, "train_loss": 1.0},
            "bf16_compile": {"error": "BackendCompilerFailed: boom"},
        },
    }
    assert gpu_check.failures(report) == [
        "pytest -m cuda: 1 failed, 9 passed",
        "fp16: loss is not finite (1.0, training inf)",
        "bf16_compile: BackendCompilerFailed: boom",
    ]
