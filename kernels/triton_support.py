"""What every kernel module shares: Triton, where it is installed, and the layout helpers of 4-D tensors.

CPU-only PyTorch builds often come without Triton; then `triton` and `tl` are None, `jit` leaves
the kernels as plain functions nobody calls, and only the PyTorch references run.
"""

from __future__ import annotations

from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def jit(fn):
    """triton.jit where Triton is installed; without it the kernel stays a plain function nobody calls."""
    return fn if triton is None else triton.jit(fn)


def flat_positions(x: Tensor) -> Tensor:
    """x itself if positions h * W + w of a (B, C, H, W) tensor sit at one stride (contiguous and
    channels_last do), else a contiguous copy."""
    return x if x.stride(2) == x.shape[3] * x.stride(3) else x.contiguous()


def strides(x: Tensor) -> tuple[int, int, int]:
    """(image, channel, position) strides of a (B, C, H, W) tensor that passes `flat_positions`."""
    return x.stride(0), x.stride(1), x.stride(3)
