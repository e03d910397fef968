"""What every benchmark script shares: the device set-up and its one-line description, timing (one
function at a time, or several alternating), and peak memory."""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
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


def alternating_seconds(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                        warmup: int = 1, inner: int = 1) -> dict[str, float]:
    """Median wall seconds per call of each of `fns`, timed in turn A B C A B C ... (`repeats` rounds, after
    `warmup` untimed rounds), so a machine that speeds up or slows down during the run biases none of them.

    Each timed sample is `inner` calls in a row, drained on the device at both ends: short calls (a
    kernel launch) need several per sample for the clock to resolve them.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(times) for name, times in samples.items()}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory of one call of `fn`.

    CUDA: `torch.cuda.max_memory_allocated` over the call, after resetting it (everything allocated
    at that moment counts: weights, optimizer state, activations). CPU: the growth of the resident set
    over its size just before the call, sampled from /proc/self/statm every millisecond by a
    background thread, after returning freed heap to the OS (`malloc_trim`), so what is counted is
    what the call itself allocates (activations, workspaces, optimizer state created on a first step),
    not weights that already exist. None where /proc is missing (not Linux).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    if not os.path.exists("/proc/self/statm"):
        fn()
        return None
    gc.collect()
    _malloc_trim()
    sampler = _ResidentSetSampler()
    with sampler:
        result = fn()  # held until the last sample: what the call returns is memory it allocated
    del result
    return sampler.peak - sampler.start


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so a call's RSS growth is not hidden by memory freed before it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _ResidentSetSampler:
    """Context manager: the largest resident set size seen while its body runs (`peak`), and at entry (`start`)."""

    def __init__(self, interval: float = 1e-3):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _resident_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "_ResidentSetSampler":
        self.start = self.peak = _resident_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.peak = max(self.peak, _resident_bytes())
        self._stop.set()
        self._thread.join()
