#!/usr/bin/env bash
# The prepared GPU check (make gpu-check): pytest -m cuda, then training and sampling numbers
# of the 64x64 config, written as gpu_check.json + gpu_check.md into OUT_DIR. The work is done
# by benchmarks/gpu_check.py (see its docstring); without a GPU it says so and exits 0.
#
#   benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py flags...]     OUT_DIR default: $OUT, else gpu_check_out
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${1:-${OUT:-gpu_check_out}}"
[ $# -gt 0 ] && shift
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
exec "$python" benchmarks/gpu_check.py --out "$out_dir" "$@"
