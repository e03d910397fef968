#!/usr/bin/env bash
# The GPU check (see bench/gpu_check.py): kernel tests on CUDA, AMP steps of every stage, compile,
# CUDA-graph sampling, NCCL DDP and `python -m bench --quick`, with one report. Under 8 minutes.
#
# A lent GPU machine may have no network and its own python3 and PyTorch (not this project's pins):
# nothing is installed from a registry there unless something is missing. The benchmark's peers
# (diffusers, pytorch-fid, lpips) are pure-Python wheels: `bash bench/peer_wheels.sh` downloads them
# into .whl/ on a machine with a registry, and this script installs them from there, offline.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
"$PYTHON" -c "import torch, torchvision, numpy, PIL, tqdm, scipy, pytest" 2>/dev/null ||
  "$PYTHON" -m pip install -q --retries 0 --timeout 10 -r requirements-test.txt
if ! "$PYTHON" -c "import diffusers, pytorch_fid, lpips" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl/*.whl &&
      export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH}
  else
    "$PYTHON" -m pip install -q --retries 0 --timeout 10 -r bench/requirements.txt 2>/dev/null
  fi
  "$PYTHON" -c "import diffusers, pytorch_fid, lpips" 2>/dev/null ||
    echo "bench peers (diffusers, pytorch-fid, lpips) not all installed: their columns stay empty"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PYTHON" bench/gpu_check.py "$@"
