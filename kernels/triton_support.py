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


def _interpreter_scalars_index() -> None:
    """Let a kernel's integer argument bound a `range` loop in Triton's CPU interpreter under NumPy 2.4+.

    The interpreter holds a scalar argument as a one-element 1-D array, and before Triton 3.7 converted it for
    `range` with `int(array)`, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"): every kernel looping to a runtime bound (the group norm's) then failed in the interpreter,
    though not when compiled for a GPU. Here the conversion takes the array's one element, as Triton 3.7 and
    later do. It touches the interpreter only, and only where its layout is the one this was written for."""
    try:
        from triton.runtime import interpreter
        patch_tensor = interpreter._patch_lang_tensor
    except (ImportError, AttributeError):
        return
    if getattr(patch_tensor, "scalars_index", False):
        return

    def patch_with_scalar_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_with_scalar_index.scalars_index = True
    interpreter._patch_lang_tensor = patch_with_scalar_index


if InterpretedFunction is not None:
    _interpreter_scalars_index()


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
