"""GroupNorm fused with the time-embedding modulation and SiLU, forward and backward.

Every residual block of the U-Net and the autoencoder normalises its activation and then, before
the next convolution, applies some of

    y = GN(x + add) * weight + bias          GroupNorm (Wu & He 2018); `add` is DDPM's embedding
    y = y * (1 + scale) + shift              improved DDPM's scale-shift norm (Nichol & Dhariwal 2021)
    y = silu(y)

with `add`, `scale`, `shift` one value per (image, channel). In PyTorch each step is its own kernel,
and each reads and writes the whole activation (B, C, H, W), while what the steps compute per
element is a few flops; `group_norm_act` does all of it in two kernels, one that reads the
activation for the group statistics and one that reads it again and writes the result. Counting
full passes over the activation (R read, W written), for scale-shift + SiLU, the heaviest case, with
PyTorch's GroupNorm itself being a statistics kernel and an apply kernel:

    forward                          PyTorch ops        fused
      GroupNorm                      2R 1W              2R 1W
      * (1 + scale), + shift         2R 2W              -
      SiLU                           1R 1W              -
      total                          5R 4W              2R 1W
    backward                         11R 4W             4R 1W

Dropout, where a block drops values right after the SiLU (DDPM's CIFAR-10 U-Net drops 10% before
each block's second convolution), is folded into the same kernels. Unfused it is one more pass each
way (forward 1R 1W and a one-byte mask per value written; backward 1R 1W and the mask read) and it
keeps the mask for the backward; fused it costs no memory traffic: each value is kept by Philox of a
per-call seed and the value's index in NCHW order (`tl.rand`), so the forward writes no mask and the
backward draws the same one again. The seed is drawn by the device's generator, so seeded runs are
reproducible; the masks are not the ones PyTorch's dropout would draw (another stream), and the CPU
keeps `kernels.dropout`'s.

The fused backward reads x and dy twice (per-channel sums, then dx), recomputing the normalised
value, the modulated value and the SiLU gate from x and the saved statistics. DDPM's GN(x + add)
+ SiLU is 4R 3W unfused and a plain GN + SiLU 3R 2W; both become 2R 1W. The unfused sequence also
keeps activations for its backward (the SiLU's input, and with scale the GroupNorm's output); the
fused op keeps only its input x and the (B, G) float32 mean and 1/std. The kernels are
memory-bound, so the time saved is about the traffic saved.

Numerics: statistics are accumulated in float32 whatever the input dtype (float64 inputs, which only
gradient checks and analytic tests use, run the reference), as sums of (v - v0) and
(v - v0)^2 with v0 the group's first value ("shifted data"), so the variance does not cancel
catastrophically when a group's mean is large against its spread. Outputs are in x's dtype;
weight, bias, add, scale and shift may be any float dtype (bf16 under autocast next to a float32
weight) and are read as float32. (Under CUDA autocast PyTorch's own group_norm runs in float32 and
returns float32; the fused op returns bf16 for a bf16 x, the dtype the next convolution casts to
anyway.) Tested tolerances against the reference evaluated in float64 on the same inputs, relative
to the largest magnitude of each compared tensor: 1e-5 in float32, 1e-2 in bfloat16 and 2e-3 in
float16, for the output and every gradient.

The PyTorch reference (`group_norm_act_reference`) is what CPUs run, and what the Triton op must
equal; `group_norm_act` chooses between them with `kernels.runs_triton`. In bf16 it rounds where
PyTorch's ops do, which is more often than the kernels' once (its docstring says where).

Edge cases, in both: a group of one value (one channel per group, 1x1 maps) has variance 0 and
normalises to 0, so y is the (modulated) bias and no gradient reaches x; an empty x (no images, or
H * W = 0, which F.group_norm refuses) gives an empty y and zero parameter gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from kernels.dropout import dropout as cpu_cheap_dropout
from kernels.triton_support import flat_positions, jit, register_op, strides, tl, traceable, triton

SEED_LIMIT = 2 ** 31 - 1  # dropout seeds are drawn in [0, SEED_LIMIT)


def group_norm_act(x: Tensor, norm: nn.GroupNorm, *, add: Tensor | None = None, scale: Tensor | None = None,
                   shift: Tensor | None = None, silu: bool = False, dropout: float = 0.0) -> Tensor:
    """dropout(silu?((GN(x + add) * weight + bias) * (1 + scale) + shift)), GN and its parameters from `norm`.

    x is (B, C, H, W), contiguous or channels_last; add, scale and shift are (B, C) or None (each
    optional on its own). `dropout` is the probability of zeroing each value (the kept ones scaled by
    1 / (1 - p)): pass 0 outside training, as a module's `self.training` would. Runs our Triton kernels
    when `kernels.runs_triton(x)`, PyTorch otherwise (with `kernels.dropout`'s CPU dropout).
    """
    B, C = x.shape[:2]
    assert x.ndim == 4 and C == norm.num_channels, (x.shape, norm)
    for extra in (add, scale, shift):
        assert extra is None or extra.shape == (B, C), (extra.shape, x.shape)
    # p = 1 (or invalid): PyTorch's dropout decides. Float64 runs the reference: the kernels compute in float32.
    if not kernels.runs_triton(x) or x.dtype == torch.float64 or not 0.0 <= dropout < 1.0:
        y = group_norm_act_reference(x, norm, add=add, scale=scale, shift=shift, silu=silu)
        return cpu_cheap_dropout(y, dropout, training=True) if dropout else y
    weight = norm.weight if norm.affine else x.new_ones(C, dtype=torch.float32)
    bias = norm.bias if norm.affine else x.new_zeros(C, dtype=torch.float32)
    # The mask's seed is drawn on the device by its own generator: no host sync, reproducible from a
    # seeded run, and a tensor, so a compiled graph does not specialise on its value.
    seed = torch.randint(0, SEED_LIMIT, (1,), device=x.device, dtype=torch.int64) if dropout else None
    y, _mean, _rstd = torch.ops.synthdiff.group_norm_act(x, weight, bias, add, scale, shift, norm.num_groups,
                                                         norm.eps, silu, dropout, seed)
    return y


def group_norm_act_reference(x: Tensor, norm: nn.GroupNorm, *, add: Tensor | None = None,
                             scale: Tensor | None = None, shift: Tensor | None = None, silu: bool = False) -> Tensor:
    """`group_norm_act` in PyTorch ops, no slower than the ones the networks called before the fusion.

    The modulation is folded into the GroupNorm: one group_norm applies gain = weight * (1 + scale) and
    offset = bias * (1 + scale) + shift, made per (image, channel) in float32 (or wider) as the kernels make
    them, and rounds once. Applied after it in bf16, `y * (1 + scale) + shift` rounded three times more (1 + scale
    alone to 2^-8), for 2x-3x the largest error of rounding once; the fold is also faster on the CPU (1.3x-1.6x
    forward, 1.4x-1.7x forward + backward, contiguous). Still rounded once more each in bf16: x + add before the
    norm and the SiLU after it (fp32 copies of x for them would cost 30%-60% more); the kernels round once.

    torch.group_norm, not F.group_norm: F.group_norm adds batch norm's "more than 1 value per channel" check,
    which refuses groups of one value (1x1 maps, one channel per group: folded at any batch size, unfolded at
    batch 1); torch.group_norm normalises them to 0, as the kernels do.
    """
    if add is not None:
        x = x + add[:, :, None, None]
    if scale is None and shift is None and x.numel():
        y = torch.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    else:
        y = _modulated_group_norm(x, norm, scale, shift)
    return F.silu(y) if silu else y


def _modulated_group_norm(x: Tensor, norm: nn.GroupNorm, scale: Tensor | None, shift: Tensor | None) -> Tensor:
    """GN(x) * gain + offset, per (image, channel): gain = weight * (1 + scale), offset = bias * (1 + scale) + shift."""
    B, C, H, W = x.shape
    # The parameters' dtype: float32 beside a bf16 x under autocast, a mix group_norm takes (as it takes the norm's).
    dtype = torch.promote_types(x.dtype, norm.weight.dtype if norm.affine else torch.float32)
    gain = (norm.weight if norm.affine else x.new_ones(C)).to(dtype).expand(B, C)
    offset = (norm.bias if norm.affine else x.new_zeros(C)).to(dtype).expand(B, C)
    if scale is not None:
        one_plus_scale = 1 + scale.to(dtype)
        gain, offset = gain * one_plus_scale, offset * one_plus_scale
    if shift is not None:
        offset = offset + shift.to(dtype)
    if x.numel() == 0:  # nothing to normalise, and group_norm refuses groups of no values (H * W = 0)
        return (x * gain[:, :, None, None] + offset[:, :, None, None]).to(x.dtype)
    # Image b's group g is group b * G + g of one image of B * C channels, whose channels can each have their own
    # affine parameters.
    y = torch.group_norm(x.reshape(1, B * C, H, W), B * norm.num_groups, gain.reshape(B * C),
                         offset.reshape(B * C), norm.eps)
    return y.view(B, C, H, W)


# ---------------------------------------------------------------------------------------------
# Triton kernels
#
# Every kernel runs on a grid (B * G, n_split): program (b * G + g, k) handles channel group g of
# image b at the spatial positions [k * span, (k + 1) * span), all of the group's channels. Splitting
# the positions keeps the GPU busy when B * G alone is small (one image, 32 groups); the statistics
# kernel leaves per-split partial sums that the next kernel adds up, so the result does not depend
# on the order programs run in (no atomics). Inside a program, a loop over tiles of BLOCK_C channels
# x BLOCK_S positions: a group never has to fit in one block (16 channels at 64x64, a group of 512
# channels, or 4 channels at 256x256 are 65,536 and 262,144 values). Positions are flattened,
# h * W + w: with the stride of w, that addresses contiguous and channels_last tensors alike.

TILE = 2048  # values per tile: 16 per thread at 4 warps, enough loads in flight to be memory-bound
VALUES_PER_PROGRAM = 8192  # values of a group per program: one 64x64x512 image still gives 256 programs
MAX_CHANNEL_BLOCK = 64  # channels per tile at most, so a tile still spans positions



@jit
def _channel_modulation(weight_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, batch, channel, mask, C,
                        HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Per channel, float32: (add, gain, offset) such that u = (x + add - mean) * rstd * gain + offset,
    gain = weight * (1 + scale), offset = bias * (1 + scale) + shift. `add`, `scale`, `shift` are (B, C)."""
    weight = tl.load(weight_ptr + channel, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + channel, mask=mask, other=0.0).to(tl.float32)
    add = tl.zeros_like(weight)
    if HAS_ADD:
        add = tl.load(add_ptr + batch * C + channel, mask=mask, other=0.0).to(tl.float32)
    gain = weight
    offset = bias
    if HAS_SCALE:
        scale = tl.load(scale_ptr + batch * C + channel, mask=mask, other=0.0).to(tl.float32)
        gain = weight * (1.0 + scale)
        offset = bias * (1.0 + scale)
    if HAS_SHIFT:
        offset += tl.load(shift_ptr + batch * C + channel, mask=mask, other=0.0).to(tl.float32)
    return add, gain, offset


@jit
def _group_of(C, group_channels):
    """This program's group: its image and its first channel.

    Kept apart from every pointer: torch.compile's analysis of which tensors a kernel writes follows a
    stored address back through the helpers it calls, and counts every pointer that such a helper takes
    as written; computed next to x's address, the group would make x (and add) look written, and compiled
    code would copy them before each launch."""
    groups = C // group_channels
    return tl.program_id(0) // groups, (tl.program_id(0) % groups) * group_channels


@jit
def _group_start(x_ptr, add_ptr, batch, first_channel, stride_xb, stride_xc, C, HAS_ADD: tl.constexpr):
    """The address of the group's first value, and that value v0 = x + add in float32, the shift of the
    shifted sums."""
    x_group = x_ptr + batch.to(tl.int64) * stride_xb + first_channel * stride_xc
    v0 = tl.load(x_group).to(tl.float32)
    if HAS_ADD:
        v0 += tl.load(add_ptr + batch * C + first_channel).to(tl.float32)
    return x_group, v0


@jit
def _dropout(v, seed_ptr, p, keep_scale, rows, s, HW):
    """v with each value zeroed with probability p and the others scaled by keep_scale = 1 / (1 - p).

    The value at row b * C + c (a vector, one per channel of the tile) and position s is kept when
    tl.rand(seed, row * HW + s) >= p: Philox of its index in NCHW order, so the mask depends on neither
    the memory format nor the launch shape, and the backward draws the same mask again instead of
    keeping one."""
    keep = tl.rand(tl.load(seed_ptr), rows[:, None] * HW + s[None, :]) >= p
    return tl.where(keep, v * keep_scale, 0.0)


@jit
def _forward_stats_kernel(x_ptr, add_ptr, partial_ptr, C, HW, group_channels, span,
                          stride_xb, stride_xc, stride_xs,
                          HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """partial[b * G + g, k] = (sum of v - v0, sum of (v - v0)^2) over the program's part of its group."""
    batch, first_channel = _group_of(C, group_channels)
    x_group, v0 = _group_start(x_ptr, add_ptr, batch, first_channel, stride_xb, stride_xc, C, HAS_ADD)
    sum1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    sum2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for c_start in range(0, group_channels, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        c_mask = c < group_channels
        add = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_ADD:
            add = tl.load(add_ptr + batch * C + first_channel + c, mask=c_mask, other=0.0).to(tl.float32)
        for s_start in range(0, span, BLOCK_S):
            s = tl.program_id(1) * span + s_start + tl.arange(0, BLOCK_S)
            mask = c_mask[:, None] & (s < HW)[None, :]
            x = tl.load(x_group + c[:, None] * stride_xc + s[None, :] * stride_xs, mask=mask, other=0.0)
            d = tl.where(mask, x.to(tl.float32) + add[:, None] - v0, 0.0)
            sum1 += d
            sum2 += d * d
    out = partial_ptr + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * 2
    tl.store(out, tl.sum(sum1))
    tl.store(out + 1, tl.sum(sum2))


@jit
def _forward_apply_kernel(x_ptr, y_ptr, weight_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, partial_ptr,
                          mean_ptr, rstd_ptr, seed_ptr, p, keep_scale, C, HW, group_channels, span, eps,
                          stride_xb, stride_xc, stride_xs, stride_yb, stride_yc, stride_ys,
                          HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                          SILU: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_SPLIT: tl.constexpr):
    """The group's mean and 1/std from the partial sums, then y = dropout?(silu?(xhat * gain + offset)) on
    the program's part of the group; the split-0 program stores mean and 1/std for the backward."""
    group, n_split = tl.program_id(0), tl.num_programs(1)
    batch, first_channel = _group_of(C, group_channels)
    x_group, v0 = _group_start(x_ptr, add_ptr, batch, first_channel, stride_xb, stride_xc, C, HAS_ADD)
    k = tl.arange(0, BLOCK_SPLIT)
    partial = partial_ptr + (group * n_split + k) * 2
    sum1 = tl.sum(tl.load(partial, mask=k < n_split, other=0.0))
    sum2 = tl.sum(tl.load(partial + 1, mask=k < n_split, other=0.0))
    count = group_channels * HW
    shifted_mean = sum1 / count
    var = tl.maximum(sum2 / count - shifted_mean * shifted_mean, 0.0)
    mean = v0 + shifted_mean
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + group, mean, mask=tl.program_id(1) == 0)
    tl.store(rstd_ptr + group, rstd, mask=tl.program_id(1) == 0)

    y_group = y_ptr + batch.to(tl.int64) * stride_yb + first_channel * stride_yc
    for c_start in range(0, group_channels, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        c_mask = c < group_channels
        add, gain, offset = _channel_modulation(weight_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, batch,
                                                first_channel + c, c_mask, C, HAS_ADD, HAS_SCALE, HAS_SHIFT)
        for s_start in range(0, span, BLOCK_S):
            s = tl.program_id(1) * span + s_start + tl.arange(0, BLOCK_S)
            mask = c_mask[:, None] & (s < HW)[None, :]
            x = tl.load(x_group + c[:, None] * stride_xc + s[None, :] * stride_xs, mask=mask, other=0.0)
            xhat = (x.to(tl.float32) + add[:, None] - mean) * rstd
            u = xhat * gain[:, None] + offset[:, None]
            if SILU:
                u = u * tl.sigmoid(u)
            if DROPOUT:
                u = _dropout(u, seed_ptr, p, keep_scale, batch * C + first_channel + c, s, HW)
            tl.store(y_group + c[:, None] * stride_yc + s[None, :] * stride_ys, u.to(y_ptr.dtype.element_ty),
                     mask=mask)


@jit
def _recompute(x_group, dy_group, c, s, mask, add, gain, offset, mean, rstd, stride_xc, stride_xs, stride_dyc,
               stride_dys, seed_ptr, p, keep_scale, first_row, HW, SILU: tl.constexpr, DROPOUT: tl.constexpr):
    """(xhat, du) on a tile, float32 and zero outside `mask`: the normalised value from x and the saved
    statistics, and du = dL/du, the gradient at the modulated value u (before SiLU and dropout)."""
    x = tl.load(x_group + c[:, None] * stride_xc + s[None, :] * stride_xs, mask=mask, other=0.0)
    du = tl.load(dy_group + c[:, None] * stride_dyc + s[None, :] * stride_dys, mask=mask, other=0.0)
    du = du.to(tl.float32)
    if DROPOUT:  # the forward's mask, drawn again from its seed
        du = _dropout(du, seed_ptr, p, keep_scale, first_row + c, s, HW)
    xhat = tl.where(mask, (x.to(tl.float32) + add[:, None] - mean) * rstd, 0.0)
    if SILU:
        u = xhat * gain[:, None] + offset[:, None]
        gate = tl.sigmoid(u)
        du = du * gate * (1.0 + u * (1.0 - gate))  # silu'(u)
    return xhat, du


@jit
def _backward_sums_kernel(x_ptr, dy_ptr, weight_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr,
                          rstd_ptr, partial_ptr, seed_ptr, p, keep_scale, C, HW, group_channels, span,
                          stride_xb, stride_xc, stride_xs, stride_dyb, stride_dyc, stride_dys,
                          HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                          SILU: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """partial[:, b, c, k] = (sum of xhat, sum of du, sum of du * xhat) per channel over the program's
    positions: every parameter gradient and the group means of the GroupNorm backward follow from them."""
    group, split, n_split = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    batch, first_channel = _group_of(C, group_channels)
    x_group, _v0 = _group_start(x_ptr, add_ptr, batch, first_channel, stride_xb, stride_xc, C, HAS_ADD)
    dy_group = dy_ptr + batch.to(tl.int64) * stride_dyb + first_channel * stride_dyc
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    for c_start in range(0, group_channels, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        c_mask = c < group_channels
        add, gain, offset = _channel_modulation(weight_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, batch,
                                                first_channel + c, c_mask, C, HAS_ADD, HAS_SCALE, HAS_SHIFT)
        sum_xhat = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        sum_du = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        sum_du_xhat = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for s_start in range(0, span, BLOCK_S):
            s = split * span + s_start + tl.arange(0, BLOCK_S)
            mask = c_mask[:, None] & (s < HW)[None, :]
            xhat, du = _recompute(x_group, dy_group, c, s, mask, add, gain, offset, mean, rstd, stride_xc, stride_xs,
                                  stride_dyc, stride_dys, seed_ptr, p, keep_scale, batch * C + first_channel, HW,
                                  SILU, DROPOUT)
            sum_xhat += xhat
            sum_du += du
            sum_du_xhat += du * xhat
        out = partial_ptr + (batch * C + first_channel + c) * n_split + split
        plane = tl.num_programs(0) * group_channels * n_split  # B * C * n_split
        tl.store(out, tl.sum(sum_xhat, axis=1), mask=c_mask)
        tl.store(out + plane, tl.sum(sum_du, axis=1), mask=c_mask)
        tl.store(out + 2 * plane, tl.sum(sum_du_xhat, axis=1), mask=c_mask)


@jit
def _backward_apply_kernel(x_ptr, dy_ptr, dx_ptr, weight_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr,
                           rstd_ptr, mean_dxhat_ptr, mean_dxhat_xhat_ptr, seed_ptr, p, keep_scale,
                           C, HW, group_channels, span,
                           stride_xb, stride_xc, stride_xs, stride_dyb, stride_dyc, stride_dys,
                           stride_dxb, stride_dxc, stride_dxs,
                           HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                           SILU: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = du * gain: GroupNorm's
    backward, with the two group means from the sums kernel."""
    group, split = tl.program_id(0), tl.program_id(1)
    batch, first_channel = _group_of(C, group_channels)
    x_group, _v0 = _group_start(x_ptr, add_ptr, batch, first_channel, stride_xb, stride_xc, C, HAS_ADD)
    dy_group = dy_ptr + batch.to(tl.int64) * stride_dyb + first_channel * stride_dyc
    dx_group = dx_ptr + batch.to(tl.int64) * stride_dxb + first_channel * stride_dxc
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    mean_dxhat = tl.load(mean_dxhat_ptr + group)
    mean_dxhat_xhat = tl.load(mean_dxhat_xhat_ptr + group)
    for c_start in range(0, group_channels, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        c_mask = c < group_channels
        add, gain, offset = _channel_modulation(weight_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, batch,
                                                first_channel + c, c_mask, C, HAS_ADD, HAS_SCALE, HAS_SHIFT)
        for s_start in range(0, span, BLOCK_S):
            s = split * span + s_start + tl.arange(0, BLOCK_S)
            mask = c_mask[:, None] & (s < HW)[None, :]
            xhat, du = _recompute(x_group, dy_group, c, s, mask, add, gain, offset, mean, rstd, stride_xc, stride_xs,
                                  stride_dyc, stride_dys, seed_ptr, p, keep_scale, batch * C + first_channel, HW,
                                  SILU, DROPOUT)
            dx = rstd * (du * gain[:, None] - mean_dxhat - xhat * mean_dxhat_xhat)
            tl.store(dx_group + c[:, None] * stride_dxc + s[None, :] * stride_dxs, dx.to(dx_ptr.dtype.element_ty),
                     mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers, registered as torch.library ops so torch.compile traces through them




@jit
def _keep_mask_kernel(seed_ptr, keep_ptr, p, n, BLOCK: tl.constexpr):
    """keep[i] = tl.rand(seed, i) >= p over a flat NCHW index i: the dropout mask, written out (for tests)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(tl.load(seed_ptr), i) >= p
    tl.store(keep_ptr + i, keep.to(tl.int8), mask=i < n)


def dropout_keep_mask(seed: Tensor, p: float, shape: tuple[int, ...]) -> Tensor:
    """The boolean mask the Triton op keeps (True) and drops with for `seed`, as a contiguous tensor of
    `shape` (B, C, H, W) on the seed's device: what the fused forward multiplies by, written out."""
    keep = torch.empty(shape, dtype=torch.int8, device=seed.device)
    block = 1024
    _keep_mask_kernel[(triton.cdiv(keep.numel(), block),)](seed, keep, p, keep.numel(), BLOCK=block)
    return keep.bool()


def _launch_shape(group_channels: int, HW: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_S, span, n_split): tile, positions per program, and programs per group.

    Plain ints even where torch.compile traces with symbolic sizes: block sizes are compile-time constants of
    the kernels, so the trace specialises on the sizes here (one guard each, a new trace per resolution)
    rather than carry next_power_of_2's bit arithmetic as symbolic expressions into the launch."""
    group_channels, HW = int(group_channels), int(HW)
    block_c = min(triton.next_power_of_2(group_channels), MAX_CHANNEL_BLOCK)
    block_s = min(triton.next_power_of_2(HW), TILE // block_c)
    n_split = max(1, min(triton.cdiv(group_channels * HW, VALUES_PER_PROGRAM), triton.cdiv(HW, block_s)))
    span = triton.cdiv(triton.cdiv(HW, n_split), block_s) * block_s  # whole tiles per program
    return block_c, block_s, span, triton.cdiv(HW, span)


def _per_channel(t: Tensor | None, x: Tensor) -> Tensor:
    """A (B, C) argument as the kernels index it (row-major), or any pointer when absent (never read)."""
    return x if t is None else t.contiguous()


def _forward_outputs(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised (y, mean, rstd): shared by the op and its fake, so both give the same strides."""
    B = x.shape[0]
    stats = torch.empty((B, num_groups), device=x.device, dtype=torch.float32)
    return torch.empty_like(flat_positions(x)), stats, torch.empty_like(stats)


def _dropout_args(x: Tensor, p: float, seed: Tensor | None) -> tuple[Tensor, float, float]:
    """(seed pointer, p, 1 / (1 - p)) as the kernels take them; any pointer and p = 0 without dropout."""
    if seed is None:
        return x, 0.0, 1.0
    assert 0.0 < p < 1.0 and seed.numel() == 1 and seed.device == x.device, (p, seed)
    assert x.numel() < 2 ** 31, "dropout indexes values with 32-bit offsets"
    return seed, p, 1.0 / (1.0 - p)


def _forward(x: Tensor, weight: Tensor, bias: Tensor, add: Tensor | None, scale: Tensor | None,
             shift: Tensor | None, num_groups: int, eps: float, silu: bool, p: float,
             seed: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    x = flat_positions(x)
    weight, bias = weight.contiguous(), bias.contiguous()  # the kernels index them as weight_ptr + channel
    B, C, H, W = x.shape
    assert C % num_groups == 0, f"{C} channels do not split into {num_groups} groups"
    group_channels = C // num_groups
    y, mean, rstd = _forward_outputs(x, num_groups)
    if H * W == 0:  # groups of no values: nothing to normalise, no statistics (and no programs to launch)
        return y, mean.zero_(), rstd.zero_()
    block_c, block_s, span, n_split = _launch_shape(group_channels, H * W)
    partial = torch.empty((B * num_groups, n_split, 2), device=x.device, dtype=torch.float32)
    grid = (B * num_groups, n_split)
    add_ = _per_channel(add, x)
    traceable(_forward_stats_kernel)[grid](
        x, add_, partial, C, H * W, group_channels, span, *strides(x),
        HAS_ADD=add is not None, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
    traceable(_forward_apply_kernel)[grid](
        x, y, weight, bias, add_, _per_channel(scale, x), _per_channel(shift, x), partial, mean, rstd,
        *_dropout_args(x, p, seed), C, H * W, group_channels, span, eps, *strides(x), *strides(y),
        HAS_ADD=add is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=silu,
        DROPOUT=seed is not None, BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_SPLIT=triton.next_power_of_2(n_split), num_warps=4)
    return y, mean, rstd


def _forward_fake(x, weight, bias, add, scale, shift, num_groups, eps, silu, p, seed):
    return _forward_outputs(x, num_groups)


def _backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, add: Tensor | None, scale: Tensor | None,
              shift: Tensor | None, mean: Tensor, rstd: Tensor, num_groups: int, silu: bool, p: float,
              seed: Tensor | None, x_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dadd, dscale, dshift); empty tensors for absent inputs, and for dx unless x_grad."""
    x, dy = flat_positions(x), flat_positions(dy)
    weight, bias = weight.contiguous(), bias.contiguous()  # the kernels index them as weight_ptr + channel
    B, C, H, W = x.shape
    if H * W == 0:  # groups of no values: dx is empty, and every other gradient a sum over none of them
        return _backward_fake(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu, p, seed,
                              x_grad, zeros=True)
    G, group_channels = num_groups, C // num_groups
    block_c, block_s, span, n_split = _launch_shape(group_channels, H * W)
    grid = (B * G, n_split)
    flags = dict(HAS_ADD=add is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=silu,
                 DROPOUT=seed is not None, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=8)
    drop = _dropout_args(x, p, seed)
    per_channel = [_per_channel(t, x) for t in (add, scale, shift)]
    partial = torch.empty((3, B, C, n_split), device=x.device, dtype=torch.float32)
    traceable(_backward_sums_kernel)[grid](
        x, dy, weight, bias, *per_channel, mean, rstd, partial, *drop, C, H * W, group_channels, span,
        *strides(x), *strides(dy), **flags)

    # Per (image, channel) sums over positions; u = z * (1 + scale) + shift, z = xhat * weight + bias.
    sum_xhat, sum_du, sum_du_xhat = partial.sum(-1)  # contiguous, as outputs must be (the fake's strides)
    one_plus_scale = 1.0 if scale is None else 1.0 + scale.float()
    gain = weight.float() * one_plus_scale  # du/dxhat per channel
    count = group_channels * H * W
    mean_dxhat = (gain * sum_du).view(B, G, group_channels).sum(-1) / count
    mean_dxhat_xhat = (gain * sum_du_xhat).view(B, G, group_channels).sum(-1) / count

    dx = x.new_empty(0)
    if x_grad:
        dx = torch.empty_like(x)
        traceable(_backward_apply_kernel)[grid](
            x, dy, dx, weight, bias, *per_channel, mean, rstd, mean_dxhat, mean_dxhat_xhat, *drop, C, H * W,
            group_channels, span, *strides(x), *strides(dy), *strides(dx), **flags)
    dweight = (one_plus_scale * sum_du_xhat).sum(0).to(weight.dtype)
    dbias = (one_plus_scale * sum_du).sum(0).to(bias.dtype)
    dadd, dscale, dshift = (x.new_empty(0) for _ in range(3))  # distinct tensors: op outputs may not alias
    if add is not None:  # the sum over positions of dx, from the same sums
        dadd = rstd[..., None] * ((gain * sum_du).view(B, G, group_channels) - H * W * mean_dxhat[..., None]
                                  - mean_dxhat_xhat[..., None] * sum_xhat.view(B, G, group_channels))
        dadd = dadd.view(B, C).to(add.dtype)
    if scale is not None:
        dscale = (weight.float() * sum_du_xhat + bias.float() * sum_du).to(scale.dtype)
    if shift is not None:
        dshift = sum_du.to(shift.dtype, copy=True)  # its own storage, as the fake says (not a view of the sums)
    return dx, dweight, dbias, dadd, dscale, dshift


def _backward_fake(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu, p, seed, x_grad,
                   zeros=False):
    """`_backward`'s outputs uninitialised, or with `zeros` the gradients of an op on groups of no values."""
    new = torch.Tensor.new_zeros if zeros else torch.Tensor.new_empty
    dx = torch.empty_like(flat_positions(x)) if x_grad else x.new_empty(0)
    per_channel = [x.new_empty(0) if t is None else new(t, t.shape) for t in (add, scale, shift)]
    return dx, new(weight, weight.shape), new(bias, bias.shape), *per_channel


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, add, scale, shift, num_groups, _eps, silu, p, seed = inputs
    _y, mean, rstd = output
    # No activation but x itself, and no dropout mask: the backward draws it again from the seed.
    ctx.save_for_backward(x, weight, bias, add, scale, shift, mean, rstd, seed)
    ctx.num_groups, ctx.silu, ctx.p = num_groups, silu, p


def _autograd_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, add, scale, shift, mean, rstd, seed = ctx.saved_tensors
    grads = torch.ops.synthdiff.group_norm_act_backward(dy, x, weight, bias, add, scale, shift, mean, rstd,
                                                        ctx.num_groups, ctx.silu, ctx.p, seed,
                                                        ctx.needs_input_grad[0])
    grads = [g if needed else None for g, needed in zip(grads, ctx.needs_input_grad)]
    return *grads, None, None, None, None, None


def register() -> None:
    """Make the ops torch.ops.synthdiff.group_norm_act(_backward) (once, by `kernels.use`)."""
    register_op("group_norm_act_backward", _backward, _backward_fake)
    register_op("group_norm_act", _forward, _forward_fake).register_autograd(_autograd_backward,
                                                                              setup_context=_setup_context)
