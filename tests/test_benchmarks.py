"""
Smoke tests of ``benchmarks/run.py``: the quick run exits 0 and prints one well-formed JSON line
per benchmark; ``benchmarks/sampler_quality.py`` plans every sampler.
No timing is asserted (speed lives in benchmarks/README.md).
"""

import importlib.util
import json
import os
import re
import runpy
import subprocess
import sys
import types

import pytest

from improved_diffusion import samplers
from improved_diffusion.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "run.py")
BENCHMARKS = {"train", "sample_step", "sample_loop", "nll", "bf16", "ops"}
HEADER_KEYS = {"benchmark", "device", "device_name", "threads", "torch", "date", "unit", "results"}
RESULT_KEYS = {"first_s", "median_s", "cpu_s", "ratio"}


def _run(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *flags], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_quick_run_prints_one_json_line_per_benchmark():
    proc = _run("--quick")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["benchmark"] for r in records] == ["train", "sample_step", "sample_loop", "nll", "bf16", "ops"]
    for record in records:
        missing = HEADER_KEYS - set(record)
        assert not missing, f"{record['benchmark']}: missing {missing}"
        assert record["threads"] == 1 and record["quick"] is True
        results = record["results"]
        assert "plain" in results and results["plain"]["ratio"] == 1.0
        for name, entry in results.items():
            assert RESULT_KEYS <= set(entry), f"{record['benchmark']}/{name}: {sorted(entry)}"
    train = records[0]["results"]
    assert {"plain", "default", "channels_last", "fused_adamw", "sdpa"} <= set(train)
    assert all(entry["images_per_s"] > 0 for entry in train.values())
    nll = records[3]["results"]
    assert all(entry["max_abs_diff_total_bpd"] < 1e-4 for entry in nll.values())


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--only", "speed"), r"--only speed: unknown \['speed'\]"),
        (("--configs", "imagenet"), "--configs imagenet: expected a comma list from small,cifar10"),
        (("--variants", "turbo", "--only", "ops"), r"--variants turbo: unknown \['turbo'\]"),
    ],
)
@pytest.mark.slow
def test_bad_flags_are_one_line_errors(flags, message):
    proc = _run(*flags)  # rejected before any model is built
    assert proc.returncode == 2
    assert re.search(message, proc.stderr), proc.stderr
    assert proc.stdout == ""


def test_sampler_quality_names_what_is_missing_in_one_line(tmp_path):
    """Until the evaluator's modules are merged, the quality-per-NFE script says so and stops (exit 2)."""
    script = os.path.join(REPO, "benchmarks", "sampler_quality.py")
    proc = subprocess.run(
        [sys.executable, script, "--model_path", str(tmp_path / "model.pt")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    needed = ("digit_features", "evaluation", "mnist_data")
    if any(importlib.util.find_spec(f"improved_diffusion.{name}") is None for name in needed):
        assert proc.returncode == 2
        (line,) = proc.stderr.strip().splitlines()
        assert re.match(r"error: sampler_quality.py needs the evaluator's improved_diffusion.digit_features", line)
    else:
        assert proc.returncode == 2 and "--model_path" in proc.stderr  # no args.json beside the missing file


def test_sampler_quality_plans_every_sampler_at_its_nfe():
    sampler_quality = types.SimpleNamespace(**runpy.run_path(os.path.join(REPO, "benchmarks", "sampler_quality.py")))
    runs = sampler_quality.parse_runs(sampler_quality.DEFAULT_RUNS)
    assert {name for name, _ in runs} == set(samplers.SAMPLERS)
    assert sampler_quality.parse_runs("dpm++2m-sde:10,20;heun:10,19") == [
        ("dpm++2m-sde", 10),
        ("dpm++2m-sde", 20),
        ("heun", 5),
        ("heun", 10),
    ]
    with pytest.raises(UserError, match=r"^--runs 'euler:10'"):
        sampler_quality.parse_runs("euler:10")
