"""The whole benchmark: which rows exist, how hard a quick or thorough run measures, and the report.

`run` measures the chosen rows on one device and returns them; `report` turns them into the markdown
that `python -m bench` prints and writes to bench/results/DEVICE.md.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

import kernels
from bench.common import setup
from bench.device import candidate_settings, device_name, file_stem
from bench.kernel_rows import kernel_rows
from bench.rows import Plan, autoencoder, ddim_guided, fid_features, lpips, resnet18, unet_train
from bench.table import Row, format_table

RESULTS = Path(__file__).resolve().parent / "results"

# Row groups by the name --rows takes, in table order; a quick run measures fewer variants of some.
ROWS: dict[str, Callable[[Plan], Row | list[Row]]] = {
    "unet-train-demo": functools.partial(unet_train, preset="ddpm-demo"),
    "unet-train-cifar10": functools.partial(unet_train, preset="ddpm-cifar10"),
    # On a CPU, the demo shape: 50 guided steps of the 35.7M network at batch 4 take minutes per timed call.
    "ddim-guided": lambda plan: ddim_guided(plan, "ddpm-cifar10" if plan.cuda else "ddpm-demo"),
    "autoencoder": autoencoder,
    "lpips": lpips,
    "fid": fid_features,
    "resnet18": resnet18,
    "kernels": kernel_rows,
}


def make_plan(device: torch.device, quick: bool) -> Plan:
    cuda = device.type == "cuda"
    repeats = (5 if quick else 20) if cuda else (3 if quick else 7)
    # Untimed rounds on top of the memory pass (itself a warm-up): compiled candidates need two calls to settle.
    warmup = 2 if cuda else 0 if quick else 1
    return Plan(device, quick, tuple(candidate_settings(device, quick)), repeats, warmup)


def run(plan: Plan, names: list[str], progress: Callable[[str], None] = print) -> list[Row]:
    """Measure the row groups `names`; a group that fails becomes one row saying why, so the table survives."""
    rows: list[Row] = []
    for name in names:
        start = time.perf_counter()
        try:
            result = ROWS[name](plan)
        except Exception as err:  # noqa: BLE001 -- one broken row must not lose the others' numbers
            traceback.print_exc()
            result = Row(name, "-", None, None, "-", "-", notes=f"failed: {type(err).__name__}: {err}"[:200])
        rows += result if isinstance(result, list) else [result]
        progress(f"{name}: {time.perf_counter() - start:.0f} s")
    return rows


def header(device: torch.device, command: str, quick: bool) -> list[str]:
    versions = [f"torch {torch.__version__}"]
    for peer in ("diffusers", "pytorch-fid", "lpips"):
        try:
            versions.append(f"{peer} {importlib.metadata.version(peer)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{peer} not installed")
    return [f"# python -m bench: {device_name(device)}", "",
            f"- device: {device_name(device)} ({device})",
            f"- versions: {', '.join(versions)}",
            f"- threads: {torch.get_num_threads()}",
            f"- kernels: {kernels.active()} (--kernels auto: our Triton kernels on CUDA, PyTorch's ops elsewhere)",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- command: {command}",
            f"- mode: {'quick (small batches, few repeats)' if quick else 'thorough'}"]


def legend(plan: Plan) -> list[str]:
    memory = ("CUDA: torch.cuda.max_memory_allocated over one call, after a reset (weights, optimizer state and "
              "activations)" if plan.cuda else
              "CPU: growth of the resident set during one call over its size just before it, sampled every ms "
              "(activations, workspaces and first-step optimizer state; weights that already exist not counted)")
    tf32 = " CUDA fp32 numbers run matmuls and convolutions in TF32, ours and the peers' alike." if plan.cuda else ""
    warmups = plan.warmup + 1
    return ["img/s: images per second, the median of "
            f"{plan.repeats} timed calls after {warmups} untimed warm-up call{'s' * (warmups > 1)}; ours and the peer "
            "are timed in turn "
            "(A B A B ...) in one process, so drift of the machine biases neither. Ratios above 1: ours is faster.",
            "ours fastest: the fastest of " + ", ".join(s.label for s in plan.candidates) + " on this device "
            "(bf16 only where it is native). A peer runs as shipped: fp32 eager, its default, so one number serves "
            "both ratios (fastest / peer default, fp32 / peer fp32)." + tf32,
            "Training rows: ours steps with our training loop's optimizer (PyTorch's fused AdamW or SGD), the peer "
            "with PyTorch's AdamW or SGD at its defaults, as a user of the peer would.",
            f"peak MiB, {memory}.",
            "Weights are random (nothing is downloaded); throughput does not depend on them. The diffusers U-Net and "
            "autoencoder are given ours: the same function wherever their GroupNorm groups agree, from 128 channels "
            "on (tests/test_bench.py)."]


def report(rows: list[Row], plan: Plan, command: str) -> str:
    lines = header(plan.device, command, plan.quick) + ["", format_table(rows), ""]
    return "\n".join(lines + [f"- {line}" for line in legend(plan)]) + "\n"


def default_output(device: torch.device) -> Path:
    return RESULTS / f"{file_stem(device_name(device))}.md"


def device_and_plan(name: str, quick: bool) -> Plan:
    device, _ = setup(name)
    kernels.use("auto", device)  # as train.py and sample.py run by default: our Triton kernels on CUDA
    return make_plan(device, quick)
