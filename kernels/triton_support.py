"""What every kernel module shares: Triton, where it is installed, and the layout helpers of 4-D tensors.

CPU-only PyTorch builds often come without Triton; then `triton` and `tl` are None, `jit` leaves
the kernels as plain functions nobody calls, and only the PyTorch references run.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:
    triton = tl = InterpretedFunction = None


def jit(fn):
    """triton.jit where Triton is installed; without it the kernel stays a plain function nobody calls."""
    return fn if triton is None else triton.jit(fn)


def traceable(kernel):
    """`torch.library.wrap_triton(kernel)`, which lets torch.compile trace a launch inside a `register_op` body.
    A kernel of Triton's CPU interpreter (TRITON_INTERPRET=1) is launched as it is: PyTorch 2.14 does the same
    itself, and 2.11 (a GPU image's) refuses to wrap one."""
    return kernel if InterpretedFunction is not None and isinstance(kernel, InterpretedFunction) else (
        torch.library.wrap_triton(kernel))


def register_op(name: str, body: Callable, fake: Callable):
    """`body` as the operator torch.ops.synthdiff.NAME, with `fake` for shape propagation.

    torch.library.triton_op, unlike custom_op, lets torch.compile see the Triton kernels inside (Inductor
    can schedule them); the fake is registered explicitly because Triton's CPU interpreter cannot run the
    body on fake tensors, as triton_op's default fake would.
    """
    op = torch.library.triton_op(f"synthdiff::{name}", body, mutates_args=())
    op.register_fake(fake)
    return op


def flat_positions(x: Tensor) -> Tensor:
    """x itself if positions h * W + w of a (B, C, H, W) tensor sit at one stride (contiguous and
    channels_last do), else a contiguous copy."""
    return x if x.stride(2) == x.shape[3] * x.stride(3) else x.contiguous()


def strides(x: Tensor) -> tuple[int, int, int]:
    """(image, channel, position) strides of a (B, C, H, W) tensor that passes `flat_positions`."""
    return x.stride(0), x.stride(1), x.stride(3)
