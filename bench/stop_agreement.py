"""`python -m bench.stop_agreement`: what agreeing on a stop signal costs each training step under torchrun.

Two CPU processes joined by gloo take the same dummy steps three ways: with no agreement, with a blocking
MAX all-reduce of the signal after every step (what the loop did before `core.distributed.StopAgreement`),
and with `StopAgreement`, which reads each all-reduce one step later. Each step either computes on the CPU
(matmuls on one thread, as a CPU run does) or sleeps, as a process driving a GPU waits on its device; it is in
that wait that the background all-reduce hides. Prints one markdown table of milliseconds per step.

    python bench/stop_agreement.py [--steps 1000] [--step-ms 2]      # or python -m bench.stop_agreement
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.runtime import Runtime  # noqa: E402
from core import distributed  # noqa: E402

WAYS = ("none", "blocking", "StopAgreement")
STEPS = ("CPU compute", "waiting (GPU-bound)")


def _dummy_step(kind: str, seconds: float, x: torch.Tensor) -> None:
    if kind == "waiting (GPU-bound)":
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        x @ x


def _measure(rank: int, init: str, steps: int, seconds: float, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    x, times = torch.randn(64, 64), {}
    for kind in STEPS:
        for way in WAYS:
            agreement = distributed.StopAgreement(Runtime(torch.device("cpu"), rank, 2))
            dist.barrier()
            started = time.perf_counter()
            for step in range(steps):
                _dummy_step(kind, seconds, x)
                if way == "blocking":
                    distributed._largest(0)
                elif way == "StopAgreement":
                    agreement.after_step([], last=step == steps - 1)
            times[kind, way] = (time.perf_counter() - started) / steps * 1e3
    if rank == 0:
        torch.save(times, out)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stop_agreement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="steps per measurement (default: 1000)")
    parser.add_argument("--step-ms", type=float, default=2.0, help="length of a dummy step in ms (default: 2)")
    args = parser.parse_args(argv)
    if args.steps < 1 or not 0 < args.step_ms < float("inf"):
        parser.error("--steps must be at least 1 and --step-ms a number of milliseconds above 0")
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "times.pt")
        mp.spawn(_measure, args=(f"file://{Path(folder) / 'init'}", args.steps, args.step_ms / 1e3, out), nprocs=2)
        times = torch.load(out, weights_only=True)
    print(f"| {args.step_ms:g} ms step, 2 gloo processes | " + " | ".join(f"{w} ms/step" for w in WAYS)
          + " | cost of blocking | cost of StopAgreement |")
    print("|---" * (len(WAYS) + 3) + "|")
    for kind in STEPS:
        row = [times[kind, way] for way in WAYS]
        print(f"| {kind} | " + " | ".join(f"{t:.3f}" for t in row) + f" | {row[1] - row[0]:+.3f} | {row[2] - row[0]:+.3f} |")


if __name__ == "__main__":
    main()
