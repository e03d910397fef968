#!/usr/bin/env bash
# The GPU check (see bench/gpu_check.py): kernel tests on CUDA, AMP steps of every stage, compile,
# CUDA-graph sampling, NCCL DDP and `python -m bench --quick`, with one report. Under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
# Install only what is missing: a lent GPU machine may have no network, where pip would spend minutes
# retrying. The peers of the benchmark are optional (their columns stay empty without them).
python -c "import torch, torchvision, numpy, PIL, tqdm, scipy, pytest" 2>/dev/null || pip install -q -r requirements-test.txt
python -c "import diffusers, pytorch_fid, lpips" 2>/dev/null ||
  pip install -q --retries 0 --timeout 10 -r bench/requirements.txt 2>/dev/null ||
  echo "bench peers (diffusers, pytorch-fid, lpips) not all installed: their columns stay empty"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python bench/gpu_check.py "$@"
