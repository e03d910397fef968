"""One sampler update in one kernel: classifier-free guidance, the multistep combination, the x0
prediction, its clipping, and the step to the next noise level.

Every sampler in `ddpm.samplers` (DDPM's ancestral step, DDIM's eq. 12, PNDM's transfer) turns the
network's eps at (x_t, t) into the next sample with the same elementwise recipe; only the per-step
numbers differ. `sampler_step` computes, for every element,

    eps     = eps_ref + s (eps_cond - eps_ref)            classifier-free guidance (Ho & Salimans 2022, eq. 6)
    eps'    = w_0 eps + w_1 h_1 + w_2 h_2 + w_3 h_3       PNDM's Runge-Kutta or multistep combination
    x0      = recip x_t - recipm1 eps'                   the x0 prediction (DDPM eq. 15)
    x0      = clamp(x0, -1, 1), eps' = (recip x_t - x0) / recipm1     with clip_x0
    x_prev  = c_x x_t + c_x0 x0 + c_eps eps' + sigma z

with the numbers in an `Update` (Python floats: a sampler takes one timestep for the whole batch),
and returns x_prev, x0 (for callbacks) and the guided eps (PNDM keeps a history of it). In PyTorch,
each arithmetic step is its own kernel that reads and writes a full sample. Counting full passes
over a sample (R read, W written) for a guided DDIM step, the most common case:

                                      PyTorch ops              fused
    guidance                          5R 3W  (3 kernels)       -
    x0 = recip x - recipm1 eps        4R 3W  (3 kernels)       -
    x_prev = c_x0 x0 + c_eps eps      4R 3W  (3 kernels)       -
    total                             13R 9W (9 kernels)       3R 1W, or 3R 2W with x0 kept for a callback

plus the few tiny kernels that read the coefficients out of the schedule tables. Clipping adds 5R 4W
unfused, noise 3R 2W, a PNDM history of three 11R 8W; fused, each history entry or noise adds one
read and clipping nothing. The step is memory-bound, so time follows traffic. Beside a large network
the saving is small; a small network, or latents, pay mostly for these passes and launches.

Numerics: float32, float16 and bfloat16 tensors (in any mix) are read as float32, computed in
float32 and written in the dtype of x (x_prev, x0) and of eps (the guided eps). Float64 tensors, which
GPUs compute slowly and only the analytic tests use, always run the PyTorch reference. Tested
tolerances against the reference, relative to the largest magnitude of each compared tensor: 1e-5 in
float32; in bfloat16, 1e-2 against the float32 reference on the same values.

The PyTorch reference (`sampler_step_reference`) is what CPUs run and what the Triton op must equal;
`sampler_step` chooses between them with `kernels.runs_triton`. No gradient: samplers run without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

import kernels
from kernels.triton_support import jit, register_op, tl, traceable, triton

MAX_HISTORY = 3  # F-PNDM's fourth-order methods combine the newest eps with three earlier ones


@dataclass(frozen=True)
class Update:
    """The numbers of one sampler update, shared by the whole batch:

        eps'   = weights[0] eps + weights[1] history[0] + ...    the eps the update moves along
        x0     = recip x_t - recipm1 eps'                        DDPM eq. 15
        x_prev = c_x x_t + c_x0 x0 + c_eps eps' + sigma z
    """
    recip: float                          # sqrt(1 / abar_t)
    recipm1: float                        # sqrt(1 / abar_t - 1)
    c_x: float = 0.0                      # coefficient of x_t in x_prev
    c_x0: float = 0.0                     # of the (clipped) x0 prediction
    c_eps: float = 0.0                    # of eps' (recomputed from the clipped x0 under clip_x0)
    sigma: float = 0.0                    # of the fresh noise z
    weights: tuple[float, ...] = (1.0,)   # the new eps's, then one per history entry


class Step(NamedTuple):
    """What `sampler_step` returns; x0 and eps are None where not asked for (the kernel does not write them)."""
    x_prev: Tensor
    x0: Tensor | None
    eps: Tensor | None  # the model's eps after guidance, before the multistep combination and clipping


def sampler_step(x: Tensor, eps: Tensor, update: Update, *, eps_ref: Tensor | None = None, guidance_scale: float = 1.0,
                 history: Sequence[Tensor] = (), clip_x0: bool = False, noise: Tensor | None = None,
                 return_x0: bool = True, return_eps: bool = True) -> Step:
    """One sampler update (see the module docstring). `eps` is the model's prediction, or its conditional
    half when `eps_ref` (the reference half) is given; `history` holds up to three earlier eps, with
    weights update.weights[1:]; `noise` is z, needed when update.sigma is not 0. All tensors have x's shape.
    x0 and the guided eps are returned where asked for. Runs our Triton kernel when `kernels.runs_triton(x)`,
    PyTorch otherwise."""
    _check(x, eps, update, eps_ref, history, noise)
    tensors = [t for t in (x, eps, eps_ref, noise, *history) if t is not None]
    if not kernels.runs_triton(x) or any(t.dtype == torch.float64 for t in tensors):
        return sampler_step_reference(x, eps, update, eps_ref=eps_ref, guidance_scale=guidance_scale, history=history,
                                      clip_x0=clip_x0, noise=noise, return_x0=return_x0, return_eps=return_eps)
    guided = eps_ref is not None
    coefficients = [update.recip, update.recipm1, update.c_x, update.c_x0, update.c_eps, update.sigma, guidance_scale,
                    *update.weights]
    x_prev, x0, guided_eps = torch.ops.synthdiff.sampler_step(x, eps, eps_ref, list(history), noise, coefficients,
                                                              clip_x0, return_x0, return_eps and guided)
    if not return_eps:
        return Step(x_prev, x0 if return_x0 else None, None)
    return Step(x_prev, x0 if return_x0 else None, guided_eps if guided else eps)


def sampler_step_reference(x: Tensor, eps: Tensor, update: Update, *, eps_ref: Tensor | None = None,
                           guidance_scale: float = 1.0, history: Sequence[Tensor] = (), clip_x0: bool = False,
                           noise: Tensor | None = None, return_x0: bool = True, return_eps: bool = True) -> Step:
    """`sampler_step` in PyTorch ops: the ones the samplers called before the fusion (terms with a zero
    coefficient skipped, products folded into `add`'s alpha), so no slower.

    x_prev and x0 are in x's dtype, as the kernel writes them, whatever the other tensors' dtypes. Where eps (or
    its reference half, or a history entry) is float64 and x is not, the step runs in float64 (an exact eps near
    pure noise: `ddpm.samplers.EXACT_EPS_MAX_ABAR`)."""
    _check(x, eps, update, eps_ref, history, noise)
    if x.dtype != torch.float64 and any(t is not None and t.dtype == torch.float64 for t in (eps, eps_ref, *history)):
        x_prev, x0, eps = sampler_step_reference(x.double(), eps, update, eps_ref=eps_ref, guidance_scale=guidance_scale,
                                                 history=history, clip_x0=clip_x0, noise=noise, return_x0=return_x0,
                                                 return_eps=return_eps)
        return Step(x_prev.to(x.dtype), None if x0 is None else x0.to(x.dtype), eps)
    if eps_ref is not None:
        eps = eps_ref + guidance_scale * (eps - eps_ref)
    combined = eps
    if update.weights != (1.0,):
        combined = _weighted_sum([(update.weights[0], eps), *zip(update.weights[1:], history)])
    x_scaled = update.recip * x
    x0 = x_scaled.sub(combined, alpha=update.recipm1)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        combined = (x_scaled - x0) / update.recipm1
    x_prev = _weighted_sum([(update.c_x, x), (update.c_x0, x0), (update.c_eps, combined), (update.sigma, noise)])
    # In x's dtype, as the kernel writes them: a float32 eps would otherwise promote a half-precision x's step.
    return Step(x_prev.to(x.dtype), x0.to(x.dtype) if return_x0 else None, eps if return_eps else None)


def _weighted_sum(terms: list[tuple[float, Tensor | None]]) -> Tensor:
    """sum of coefficient * tensor over the terms whose coefficient is not 0 (all but the first in `add`)."""
    terms = [(c, t) for c, t in terms if c != 0]
    assert terms, "an update needs at least one nonzero coefficient"
    (c, t), rest = terms[0], terms[1:]
    total = c * t
    for c, t in rest:
        total = total.add(t, alpha=c)
    return total


def _check(x: Tensor, eps: Tensor, update: Update, eps_ref: Tensor | None, history: Sequence[Tensor],
           noise: Tensor | None) -> None:
    for t in (eps, eps_ref, noise, *history):
        assert t is None or t.shape == x.shape, f"{tuple(t.shape)} must match x {tuple(x.shape)}"
    assert len(history) <= MAX_HISTORY and len(update.weights) == 1 + len(history), (update.weights, len(history))
    assert update.sigma == 0 or noise is not None, "an update with sigma > 0 needs noise"


# ---------------------------------------------------------------------------------------------
# Triton kernel: one program per BLOCK elements of the flattened tensors, which all share x's layout


BLOCK = 1024  # elements per program: 8 per thread at 4 warps



@jit
def _sampler_step_kernel(x_ptr, eps_ptr, ref_ptr, h1_ptr, h2_ptr, h3_ptr, noise_ptr, x_prev_ptr, x0_ptr,
                         guided_ptr, n, recip, recipm1, c_x, c_x0, c_eps, sigma, scale, w0, w1, w2, w3,
                         GUIDED: tl.constexpr, HISTORY: tl.constexpr, CLIP: tl.constexpr, NOISE: tl.constexpr,
                         STORE_X0: tl.constexpr, STORE_GUIDED: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        ref = tl.load(ref_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        eps = ref + scale * (eps - ref)
        if STORE_GUIDED:
            tl.store(guided_ptr + offsets, eps.to(guided_ptr.dtype.element_ty), mask=mask)
    combined = w0 * eps
    if HISTORY >= 1:
        combined += w1 * tl.load(h1_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HISTORY >= 2:
        combined += w2 * tl.load(h2_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HISTORY >= 3:
        combined += w3 * tl.load(h3_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x_scaled = recip * x
    x0 = x_scaled - recipm1 * combined
    if CLIP:
        # NaN stays NaN, as torch.clamp keeps it (the default lets a GPU's min/max turn it into a bound, and the
        # eps recomputed from that bound would hide a diverged model in a finite sample).
        x0 = tl.clamp(x0, -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL)
        combined = (x_scaled - x0) / recipm1
    x_prev = c_x * x + c_x0 * x0 + c_eps * combined
    if NOISE:
        x_prev += sigma * tl.load(noise_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_prev_ptr + offsets, x_prev.to(x_prev_ptr.dtype.element_ty), mask=mask)
    if STORE_X0:
        tl.store(x0_ptr + offsets, x0.to(x0_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher, registered as a torch.library op so torch.compile traces through it


def _dense(x: Tensor) -> Tensor:
    """x itself if its elements fill its storage without gaps (then any elementwise order works), else a copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def _like(t: Tensor | None, x: Tensor) -> Tensor:
    """t laid out as x (same strides), so one flat index addresses the same element of both; x itself when absent."""
    if t is None:
        return x
    return t if t.stride() == x.stride() else torch.empty_like(x, dtype=t.dtype).copy_(t)


def _outputs(x: Tensor, eps: Tensor, store_x0: bool, store_guided: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised (x_prev, x0, guided eps), empty where not stored: shared by the op and its fake."""
    x = _dense(x)
    x0 = torch.empty_like(x) if store_x0 else x.new_empty(0)
    guided = torch.empty_like(x, dtype=eps.dtype) if store_guided else eps.new_empty(0)
    return torch.empty_like(x), x0, guided


def _launch(x: Tensor, eps: Tensor, eps_ref: Tensor | None, history: list[Tensor], noise: Tensor | None,
            coefficients: list[float], clip_x0: bool, store_x0: bool, store_guided: bool
            ) -> tuple[Tensor, Tensor, Tensor]:
    """The op: (x_prev, x0, guided eps), the last two empty unless stored."""
    recip, recipm1, c_x, c_x0, c_eps, sigma, scale, *weights = coefficients
    x = _dense(x)
    x_prev, x0, guided = _outputs(x, eps, store_x0, store_guided)
    h = [_like(t, x) for t in history] + [x] * (MAX_HISTORY - len(history))
    w = weights + [0.0] * (MAX_HISTORY + 1 - len(weights))
    n = x.numel()
    traceable(_sampler_step_kernel)[(triton.cdiv(n, BLOCK),)](
        x, _like(eps, x), _like(eps_ref, x), *h, _like(noise, x), x_prev, x0 if store_x0 else x_prev,
        guided if store_guided else x_prev, n, recip, recipm1, c_x, c_x0, c_eps, sigma, scale, *w,
        GUIDED=eps_ref is not None, HISTORY=len(history), CLIP=clip_x0, NOISE=noise is not None,
        STORE_X0=store_x0, STORE_GUIDED=store_guided, BLOCK=BLOCK, num_warps=4)
    return x_prev, x0, guided


def _launch_fake(x, eps, eps_ref, history, noise, coefficients, clip_x0, store_x0, store_guided):
    return _outputs(x, eps, store_x0, store_guided)


def register() -> None:
    """Make the op torch.ops.synthdiff.sampler_step (once, by `kernels.use`)."""
    register_op("sampler_step", _launch, _launch_fake)
