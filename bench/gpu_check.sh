#!/usr/bin/env bash
# The GPU check (see bench/gpu_check.py): kernel tests on CUDA, AMP steps of every stage, compile,
# CUDA-graph sampling, NCCL DDP and `python -m bench --quick`, with one report. Under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
pip install -q -r requirements-test.txt -r bench/requirements.txt 2>/dev/null || pip install -q -r requirements-test.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python bench/gpu_check.py "$@"
