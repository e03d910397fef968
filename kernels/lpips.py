"""LPIPS's term of one tap in one pass: unit-normalise two feature maps over channels, weigh their
squared difference per channel, sum over channels and average over positions; and its gradient.

For features fx, fy of shape (B, C, H, W) and the tap's head weights w (C,) (Zhang et al. 2018, eq. 1
in the form the released code uses):

    tap_distance(fx, fy, w)_b = mean_positions sum_c w_c (u_c - v_c)^2,   u = fx / (|fx| + NORM_EPS), v likewise,

with |.| the Euclidean norm over channels at each position. The PyTorch ops compute the two norms,
divide, subtract, square, average and weigh, each its own kernel over a full feature map. Counting
full passes over one feature map (R read, W written):

                                     PyTorch ops                  fused
    forward                          7R 4W (10 kernels)           2R (1 kernel, and a sum over (B, blocks))
    backward, both inputs            about 20R 12W (~20 kernels)  2R 2W (1 kernel)

The fused forward reads each feature vector once and keeps it in registers: every statistic it needs
(the two norms, then the weighted difference) is a sum over the channels of one position. The backward
reads fx and fy once more and writes both gradients,

    dL/dfx = g / (H W) (q - fx / |fx| sum_c q_c u_c) / (|fx| + NORM_EPS),   q = 2 w (u - v),

and -q with v, fy in place of u, fx for dL/dfy (fx / |fx| read as 0 where |fx| = 0, as vector_norm's
backward does). The unfused backward also keeps, per tap, the normalised features and their difference
alive from the forward; the fused op keeps nothing but its two inputs (the trunk's in-place ReLUs keep
x's features anyway).

Numerics: features in float32, bfloat16 or float16, contiguous or channels_last (the trunk's, read in
place; other layouts are copied first) are read as float32 and every sum is accumulated in float32;
the distance is float32 and the gradients come out in the features' dtypes. Float64 runs the
reference. Tested tolerances against the PyTorch reference, relative to the largest magnitude of each
compared tensor: 1e-5 in float32 for the distance and both gradients; in bfloat16, 1e-5 for the
distance and 1e-2 for the gradients, against the float32 reference on the same values.

The PyTorch reference (`tap_distance_reference`) is what CPUs run, and what the Triton op must equal;
`tap_distance` chooses between them with `kernels.runs_triton`. The op has no gradient for the head
weights (LPIPS's heads are frozen): a head that requires one runs the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

import kernels
from kernels.triton_support import flat_positions, jit, register_op, strides, tl, traceable, triton

# Added to the feature norm before dividing, as LPIPS does, so all-zero feature vectors stay zero.
NORM_EPS = 1e-10


def normalise_channels(f: Tensor, dim: int = 1) -> Tensor:
    """f / (|f| + NORM_EPS), |f| the Euclidean norm over channels (dim `dim`) at each position."""
    # NORM_EPS keeps all-zero feature vectors (every ReLU of a pixel off) at zero, not 0/0; vector_norm's
    # backward is zero there, where sqrt(sum f^2) would send back a NaN that only the ReLU's mask happens
    # to discard. In float16 1e-10 rounds to 0, so there the smallest normal float16 (6e-5) stands in for it.
    return f / (torch.linalg.vector_norm(f, dim=dim, keepdim=True) + max(NORM_EPS, torch.finfo(f.dtype).tiny))


def tap_distance(fx: Tensor, fy: Tensor, weight: Tensor) -> Tensor:
    """(B,) float32: mean over positions of sum_c weight_c (u_c - v_c)^2 with u, v = fx, fy unit-normalised over
    channels (`normalise_channels`); fx and fy are (B, C, H, W), weight is (C,). Runs our Triton kernels when
    `kernels.runs_triton(fx)`, PyTorch otherwise."""
    assert fx.ndim == 4 and fx.shape == fy.shape and weight.shape == fx.shape[1:2], (fx.shape, fy.shape, weight.shape)
    fused = (kernels.runs_triton(fx) and torch.float64 not in (fx.dtype, fy.dtype)
             and fx.shape[1] <= MAX_CHANNELS and not (weight.requires_grad and torch.is_grad_enabled()))
    if not fused:
        return tap_distance_reference(fx, fy, weight)
    return torch.ops.synthdiff.lpips_tap_distance(fx, fy, weight)


def tap_distance_reference(fx: Tensor, fy: Tensor, weight: Tensor) -> Tensor:
    """`tap_distance` in PyTorch ops: the ones LPIPS called before the fusion, so no slower."""
    if fx.is_contiguous(memory_format=torch.channels_last) and not fx.is_contiguous():
        # The trunk's channels_last features, as the (B, H, W, C) tensors they are in memory. On the (B, C, H,
        # W) view the broadcast gradients of the mean and the norm come back contiguous, so the features'
        # gradient would too, and every op of the trunk's backward would then mix layouts (its ReLUs' took
        # 4x as long).
        fx, fy, channels, positions = fx.permute(0, 2, 3, 1), fy.permute(0, 2, 3, 1), -1, (1, 2)
    else:
        channels, positions = 1, (2, 3)
    u, v = normalise_channels(fx, channels), normalise_channels(fy, channels)
    # The 1x1 head and the spatial mean are both linear, so averaging the squared difference over pixels
    # first and then weighting channels gives the same number with less work.
    return ((u - v).square().mean(dim=positions) @ weight).float()


# ---------------------------------------------------------------------------------------------
# Triton kernels
#
# Both kernels run on a grid (position blocks, B): program (k, b) handles BLOCK_P positions of image b,
# all C channels at once (BLOCK_C = C rounded up to a power of 2), so each feature vector is read once
# and every sum over channels is a register reduction. Positions are flattened, h * W + w: with the
# stride of w, that addresses contiguous and channels_last tensors alike. The forward leaves one
# partial sum per program, added up afterwards in a fixed order (no atomics: reproducible).

TILE = 4096  # values per tensor per program: 16 per thread at 8 warps, with room for the few live tiles
MAX_CHANNELS = TILE  # one position's channels must fit one tile; LPIPS's trunks have at most 512



@jit
def _load_normalised(f_ptr, batch, p, c, mask, stride_b, stride_c, stride_p, eps):
    """(f, |f|, f / (|f| + eps)) on a [BLOCK_P, BLOCK_C] tile, float32, zero outside `mask`."""
    f = tl.load(f_ptr + batch.to(tl.int64) * stride_b + p[:, None] * stride_p + c[None, :] * stride_c, mask=mask,
                other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(f * f, axis=1))
    return f, norm, f / (norm + eps)[:, None]


@jit
def _forward_kernel(fx_ptr, fy_ptr, w_ptr, partial_ptr, C, HW, eps,
                    stride_xb, stride_xc, stride_xp, stride_yb, stride_yc, stride_yp,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """partial[b, k] = sum over the program's positions of sum_c w_c (u_c - v_c)^2."""
    block, batch = tl.program_id(0), tl.program_id(1)
    p = block * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    mask = (p < HW)[:, None] & (c < C)[None, :]
    _fx, _nx, u = _load_normalised(fx_ptr, batch, p, c, mask, stride_xb, stride_xc, stride_xp, eps)
    _fy, _ny, v = _load_normalised(fy_ptr, batch, p, c, mask, stride_yb, stride_yc, stride_yp, eps)
    w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    d = u - v
    tl.store(partial_ptr + batch * tl.num_programs(0) + block, tl.sum(w[None, :] * d * d))


@jit
def _input_gradient(f, norm, u, q, scale, eps):
    """scale (q - f / |f| sum_c q_c u_c) / (|f| + eps): the gradient at f of a loss whose gradient at u is q."""
    projection = tl.sum(q * u, axis=1)
    direction = f / tl.where(norm > 0, norm, 1.0)[:, None]  # f / |f|, and 0 where f is all zeros
    return scale * (q - direction * projection[:, None]) / (norm + eps)[:, None]


@jit
def _backward_kernel(grad_ptr, fx_ptr, fy_ptr, w_ptr, dfx_ptr, dfy_ptr, C, HW, eps,
                     stride_xb, stride_xc, stride_xp, stride_yb, stride_yc, stride_yp,
                     stride_dxb, stride_dxc, stride_dxp, stride_dyb, stride_dyc, stride_dyp,
                     FX_GRAD: tl.constexpr, FY_GRAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dfx, dfy on the program's positions, for the gradient grad (B,) of the distance."""
    block, batch = tl.program_id(0), tl.program_id(1)
    p = block * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    mask = (p < HW)[:, None] & (c < C)[None, :]
    fx, nx, u = _load_normalised(fx_ptr, batch, p, c, mask, stride_xb, stride_xc, stride_xp, eps)
    fy, ny, v = _load_normalised(fy_ptr, batch, p, c, mask, stride_yb, stride_yc, stride_yp, eps)
    w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    scale = tl.load(grad_ptr + batch).to(tl.float32) / HW  # the mean over positions
    q = 2.0 * w[None, :] * (u - v)  # the gradient at u; -q at v
    if FX_GRAD:
        dfx = _input_gradient(fx, nx, u, q, scale, eps)
        tl.store(dfx_ptr + batch.to(tl.int64) * stride_dxb + p[:, None] * stride_dxp + c[None, :] * stride_dxc,
                 dfx.to(dfx_ptr.dtype.element_ty), mask=mask)
    if FY_GRAD:
        dfy = _input_gradient(fy, ny, v, -q, scale, eps)
        tl.store(dfy_ptr + batch.to(tl.int64) * stride_dyb + p[:, None] * stride_dyp + c[None, :] * stride_dyc,
                 dfy.to(dfy_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers, registered as torch.library ops so torch.compile traces through them


def _launch_shape(C: int, HW: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, position blocks), as plain ints under symbolic tracing (as `group_norm._launch_shape`)."""
    C, HW = int(C), int(HW)
    block_c = triton.next_power_of_2(C)
    block_p = min(max(1, TILE // block_c), triton.next_power_of_2(HW))
    return block_p, block_c, triton.cdiv(HW, block_p)


def _distance(fx: Tensor, fy: Tensor, weight: Tensor) -> Tensor:
    fx, fy = flat_positions(fx), flat_positions(fy)
    weight = weight.contiguous()  # the kernels index it as w_ptr + c
    B, C, H, W = fx.shape
    block_p, block_c, blocks = _launch_shape(C, H * W)
    partial = torch.empty((B, blocks), device=fx.device, dtype=torch.float32)
    traceable(_forward_kernel)[(blocks, B)](
        fx, fy, weight, partial, C, H * W, NORM_EPS, *strides(fx), *strides(fy),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=8)
    return partial.sum(1) / (H * W)


def _distance_fake(fx, fy, weight):
    return fx.new_empty(fx.shape[0], dtype=torch.float32)


def _backward(grad: Tensor, fx: Tensor, fy: Tensor, weight: Tensor, fx_grad: bool, fy_grad: bool
              ) -> tuple[Tensor, Tensor]:
    """(dfx, dfy), each an empty tensor unless asked for."""
    fx, fy = flat_positions(fx), flat_positions(fy)
    weight = weight.contiguous()  # the kernels index it as w_ptr + c
    B, C, H, W = fx.shape
    block_p, block_c, blocks = _launch_shape(C, H * W)
    dfx, dfy = _backward_fake(grad, fx, fy, weight, fx_grad, fy_grad)
    traceable(_backward_kernel)[(blocks, B)](
        grad.contiguous(), fx, fy, weight, dfx if fx_grad else fx, dfy if fy_grad else fy, C, H * W, NORM_EPS,
        *strides(fx), *strides(fy), *strides(dfx if fx_grad else fx), *strides(dfy if fy_grad else fy),
        FX_GRAD=fx_grad, FY_GRAD=fy_grad, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=8)
    return dfx, dfy


def _backward_fake(grad, fx, fy, weight, fx_grad, fy_grad):
    """Uninitialised (dfx, dfy) laid out as fx and fy: shared by the op and its fake, so both give the same strides."""
    return tuple(torch.empty_like(flat_positions(f)) if wanted else f.new_empty(0)
                 for f, wanted in ((fx, fx_grad), (fy, fy_grad)))


def _setup_context(ctx, inputs, output) -> None:
    fx, fy, weight = inputs
    ctx.save_for_backward(fx, fy, weight)  # the features themselves: nothing derived from them


def _autograd_backward(ctx, grad):
    fx, fy, weight = ctx.saved_tensors
    fx_grad, fy_grad = ctx.needs_input_grad[:2]
    dfx, dfy = torch.ops.synthdiff.lpips_tap_distance_backward(grad, fx, fy, weight, fx_grad, fy_grad)
    return dfx if fx_grad else None, dfy if fy_grad else None, None


def register() -> None:
    """Make the ops torch.ops.synthdiff.lpips_tap_distance(_backward) (once, by `kernels.use`)."""
    register_op("lpips_tap_distance_backward", _backward, _backward_fake)
    register_op("lpips_tap_distance", _distance, _distance_fake).register_autograd(_autograd_backward,
                                                                                    setup_context=_setup_context)
