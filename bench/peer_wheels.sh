#!/usr/bin/env bash
# Download the benchmark's peers (bench/requirements.txt) and the one package diffusers needs beyond a
# usual PyTorch image (importlib_metadata) as pure-Python wheels into .whl/, for a GPU machine that
# cannot reach a registry: bench/gpu_check.sh installs them from there. Run it where pip works.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl -r bench/requirements.txt importlib_metadata
ls .whl
