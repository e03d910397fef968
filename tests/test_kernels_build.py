"""Every Triton kernel launch our code makes builds for NVIDIA GPUs, checked on a machine without one.

The kernel tests run the kernels in Triton's CPU interpreter, which never meets what only the compiler checks
(a loop-carried value that changes type, a block that is not a power of two); `kernel_builds.py` compiles
each distinct launch of the U-Net, autoencoder, perceptual distance and samplers, in three precisions, for
six GPU architectures from Turing to consumer Blackwell, down to the cubin, and fails on a build that spills
registers. It also runs torch.compile's analysis of which tensors each kernel writes (compiled code copies
each such tensor before every launch), which must find the kernel's outputs and nothing else, and checks that the launchers
keep block sizes concrete when compile traces them with symbolic sizes. Here each launch
is built for one architecture, in turn, in two processes (about 20 s); `-m slow` builds each for all six.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kernel_builds
from kernel_builds import ARCHITECTURES, OUTPUTS

SCRIPT = Path(kernel_builds.__file__)


def build(tmp_path: Path, *options: str, processes: int = 2) -> dict:
    """The merged reports of `processes` shards of kernel_builds.py, run side by side with an empty cache."""
    pytest.importorskip("triton", reason="the triton package is not installed, so there are no kernels to build")
    pytest.importorskip("triton.backends.nvidia", reason="this triton has no NVIDIA backend to build for")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), OMP_NUM_THREADS="1")
    shards = [subprocess.Popen([sys.executable, str(SCRIPT), *options, "--shard", str(i), str(processes)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for i in range(processes)]
    reports = []
    for shard in shards:
        out, err = shard.communicate(timeout=1200)
        assert shard.returncode == 0, err[-4000:]
        reports.append(json.loads(out.splitlines()[-1]))
    return {"launches": reports[0]["launches"], "never_launched": reports[0]["never_launched"],
            "spills": [s for r in reports for s in r["spills"]], "spills_checked": reports[0]["spills_checked"],
            "wrong_writes": [w for r in reports for w in r["wrong_writes"]],
            "writes_analysed": sorted({k for r in reports for k in r["writes_analysed"]}),
            "builds": sum(r["builds"] for r in reports), "failures": [f for r in reports for f in r["failures"]],
            "architectures": sorted({a for r in reports for a in r["architectures"]}),
            "kernels": sorted({k for r in reports for k in r["kernels"]})}


def check(report: dict, builds_per_launch: int) -> None:
    assert report["failures"] == [], "\n".join(report["failures"])
    assert report["spills"] == [], "\n".join(report["spills"])  # memory-bound kernels must not spill registers
    # torch.compile copies each tensor its analysis finds a kernel writing, before every launch: only outputs.
    assert report["wrong_writes"] == [], "\n".join(report["wrong_writes"])
    assert report["writes_analysed"] == report["kernels"]
    assert report["never_launched"] == []  # a kernel no workload of kernel_builds.py launches goes unchecked
    assert report["architectures"] == list(ARCHITECTURES)
    assert report["kernels"] == sorted(OUTPUTS) and report["launches"] > 100
    assert report["builds"] == builds_per_launch * report["launches"]


def test_every_kernel_launch_builds_for_a_gpu_architecture(tmp_path):
    check(build(tmp_path), builds_per_launch=1)


@pytest.mark.slow
def test_every_kernel_launch_builds_for_every_gpu_architecture(tmp_path):
    check(build(tmp_path, "--every-architecture"), builds_per_launch=len(ARCHITECTURES))


@pytest.mark.parametrize("module", ["group_norm", "lpips"])
def test_launch_shapes_specialise_symbolic_sizes(module):
    """Under torch.compile with dynamic sizes a launcher sees SymInts. Block sizes are a kernel's compile-time
    constants, so they must come out as ints with one guard on the size (a new trace per resolution), not as
    symbolic expressions of next_power_of_2's bit arithmetic with a guard for every comparison (as they once
    did in group_norm)."""
    pytest.importorskip("triton", reason="the triton package is not installed, so there are no launchers")
    import importlib

    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    launch_shape = importlib.import_module(f"kernels.{module}")._launch_shape
    env = ShapeEnv()
    symbol = env.create_symbol(36, ConstantSource("positions"))
    shape = launch_shape(4, env.create_symintnode(symbol, hint=36))
    assert shape == launch_shape(4, 36) and all(type(value) is int for value in shape), shape
    assert [str(guard.expr) for guard in env.guards] == [f"Eq({symbol}, 36)"]
