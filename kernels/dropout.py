"""Dropout whose random mask is cheap to draw on the CPU.

DDPM's CIFAR-10 U-Net drops 10% of each residual block's activation before its second convolution
(Ho et al. 2020), so a training step draws one random decision per value of 22 activations. On the
CPU PyTorch's dropout draws them with `bernoulli_`, one float from the Mersenne Twister per value,
serially: about 6 ns a value on a 2-core AMD EPYC, 12 ms for one 16x128x32x32 activation, while
multiplying that activation by its mask takes 0.3 ms. In the `ddpm-cifar10` training step in bf16
it was 6% of the time, the largest cost after the convolutions.

`Dropout` here draws 64 random bits at a time (`random_` on int64 words) and cuts each word into four
16-bit numbers, one per value: a value is kept when its number is at or above a threshold, so it is
dropped with probability p' = round(p * 65536) / 65536 (|p' - p| <= 2^-17; 0.1 becomes 0.100006),
and kept values are scaled by 1 / (1 - p') so the expected output is exactly the input. Four values
per draw, and no float conversion: about 0.9 ns a value, 7x less than `bernoulli_`; in the bf16
training step the draws now take 2% of the time instead of 6% (docs/speed.md). What is kept for the
backward pass is the same as PyTorch's: the boolean mask.

On CUDA PyTorch's dropout is already one kernel (Philox in registers, no mask draw of its own) and is
used as it is under `--kernels torch` (the Triton backend folds the U-Net's dropout into the GroupNorm
kernels, `kernels.group_norm`); so it is under `torch.compile`, where Inductor draws the mask inside the kernel it
fuses around the dropout, and wherever nothing (or everything) is dropped. The draws come from the
default CPU generator, so a seeded run is reproducible and a resumed one (whose checkpoint holds that
generator's state) continues the same masks; they are a different stream from `bernoulli_`'s, so a
run does not repeat the masks of PyTorch's dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = 1 << 16  # the values one 16-bit number takes


def drop_threshold(p: float) -> int:
    """The 16-bit threshold for dropout probability p: numbers below it (of -32768 .. 32767) are dropped."""
    return -(LEVELS // 2) + round(p * LEVELS)


def effective_probability(p: float) -> float:
    """p', the probability `dropout` drops a value with: p rounded to a multiple of 2^-16."""
    return round(p * LEVELS) / LEVELS


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """A boolean mask of `shape`, each entry False with probability `effective_probability(p)`, independently."""
    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-2**63, 2**63 - 1)  # the full 64 bits: random_() alone leaves the top bit 0
    numbers = words.view(torch.int16)[:count].view(shape)
    return numbers >= drop_threshold(p)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """F.dropout(x, p, training), with the mask drawn by `keep_mask` on the CPU (module docstring)."""
    dropped = effective_probability(p)
    # PyTorch's own: where it is fused already (CUDA; compiled, Inductor draws the mask inside its kernel),
    # where nothing or everything is dropped, and for a p outside [0, 1], which it refuses.
    if not training or x.device.type != "cpu" or torch.compiler.is_compiling() or not 0.0 < dropped < 1.0:
        return F.dropout(x, p, training)
    # x * keep: autograd keeps the boolean mask for the backward pass; the scale is a constant.
    return x * keep_mask(x.shape, p, x.device) * (1.0 / (1.0 - dropped))


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout`: the same module (no parameters, same state dict), a cheaper CPU mask."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
