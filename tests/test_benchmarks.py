"""
Smoke tests of ``benchmarks/run.py``: the quick run exits 0 and prints one well-formed JSON line
per benchmark. No timing is asserted (speed lives in benchmarks/README.md).
"""

import json
import os
import re
import subprocess
import sys

import pytest

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
