"""What every benchmark script shares: the device set-up and its one-line description, and timing."""

from __future__ import annotations

import time
from typing import Callable

import torch

from core.runtime import resolve_device


def setup(device_name: str) -> tuple[torch.device, str]:
    """The device to measure on, with TF32 matmuls allowed on CUDA (what training uses), and a
    one-line description for the table's heading."""
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    return device, f"device: {name}, torch {torch.__version__}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Wall seconds per call of `fn`, after `warmup` untimed calls, with the device drained around the timing."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats
