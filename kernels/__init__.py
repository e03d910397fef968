"""Our fused kernels, and the switch that chooses between them and the PyTorch ops they replace.

Each kernel lives in its own module beside the PyTorch reference it must equal:

- `kernels.group_norm`: GroupNorm fused with the time-embedding modulation, SiLU and dropout,
  `dropout(silu((GN(x + add) * weight + bias) * (1 + scale) + shift))`, forward and backward; the
  dropout mask is Philox of a seed and each value's index, drawn again in the backward, never stored.
- `kernels.sampler_step`: one DDIM / PNDM / DDPM update with the classifier-free guidance combination
  and optional x0 clipping.
- `kernels.lpips`: LPIPS's per-position channel normalisation and weighted squared difference.
- `kernels.dropout`: not a Triton kernel but the CPU's counterpart: dropout whose mask is cut from
  64-bit random words, 7x cheaper to draw on the CPU than PyTorch's (on CUDA the Triton backend
  folds the U-Net's dropout into `group_norm`'s kernels; `--kernels torch` and compiled code keep
  PyTorch's).
- `kernels.attention`: not a kernel either but a choice: PyTorch's fused SDPA, or on the CPU in bf16
  two matmuls and a softmax in cache-sized chunks where that is measured faster (moderate lengths).

The module docstring of each says what the fusion saves and why.

Which implementation runs is one process-wide setting, chosen once by the entry points
(`--kernels auto|triton|torch`) through `use`:

- "torch": the PyTorch reference ops, everywhere (the fallback, and what CPUs run).
- "triton": our Triton kernels, for tensors on a CUDA device; on the CPU only with Triton's
  interpreter (`TRITON_INTERPRET=1`, slow: it is how the tests check the kernels without a GPU).
- "auto": Triton on CUDA when Triton is importable, PyTorch otherwise.

The public functions (`group_norm_act`, ...) read the setting on every call, so a network built
once runs either way; `torch.compile` guards on it, and traces through the Triton kernels because
they are registered with `torch.library` (`torch.ops.synthdiff.*`). They are registered when
"triton" is first chosen, not when their modules are imported: `torch.library.triton_op` imports
PyTorch's compiler, 2 s of every start-up on a 2-core CPU, which a process on the PyTorch ops
would pay for nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch

from core.errors import UserError
from core.runtime import KERNEL_BACKENDS as BACKENDS

_active = "torch"


@functools.cache
def triton_importable() -> bool:
    """Whether `import triton` works (CPU-only builds of PyTorch often come without it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(name: str, device: torch.device | str) -> str:
    """The backend `--kernels NAME` means on `device`: "triton" or "torch"; a choice that cannot run is an error."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise UserError(f"Unknown --kernels {name!r}; choose one of {', '.join(BACKENDS)}.")
    if name == "torch":
        return "torch"
    runnable = triton_importable() and (device.type == "cuda" or interpreting())
    if name == "auto":
        return "triton" if runnable and device.type == "cuda" else "torch"
    if not triton_importable():
        raise UserError("--kernels triton needs the triton package, which this PyTorch install lacks; "
                        "use --kernels auto or torch, or pip install triton.")
    if not runnable:
        raise UserError(f"--kernels triton runs our kernels on CUDA GPUs, and this run is on {device.type}; "
                        f"use --kernels auto or torch (or set TRITON_INTERPRET=1 to run them, slowly, in "
                        f"Triton's CPU interpreter).")
    return "triton"


def use(name: str, device: torch.device | str) -> str:
    """Switch every fused op to the backend `--kernels NAME` means on `device`; returns "triton" or "torch"."""
    global _active
    _active = resolve(name, device)
    if _active == "triton":
        _register_triton_ops()
    return _active


@functools.cache
def _register_triton_ops() -> None:
    """The Triton kernels as torch.library ops, once per process, before anything can launch them (every
    launch goes through `runs_triton`, which needs `use("triton")` first)."""
    from kernels import group_norm, lpips, sampler_step
    for module in (group_norm, lpips, sampler_step):
        module.register()


def active() -> str:
    """The backend in force: "triton" or "torch"."""
    return _active


@contextlib.contextmanager
def using(name: str, device: torch.device | str | None = None) -> Iterator[str]:
    """`use(name, device)` for the body only (tests and benchmarks compare both backends in one process);
    `device` defaults to where new tensors are made (`torch.set_default_device`: CUDA in the GPU check)."""
    previous = _active
    try:
        yield use(name, torch.get_default_device() if device is None else device)
    finally:
        _set(previous)


def _set(backend: str) -> None:
    global _active
    _active = backend


def runs_triton(tensor: torch.Tensor) -> bool:
    """Whether a fused op given `tensor` should launch its Triton kernel: the backend is "triton" and the
    tensor lives where Triton can run (a CUDA device, or anywhere under the interpreter)."""
    return _active == "triton" and (tensor.device.type == "cuda" or interpreting())
