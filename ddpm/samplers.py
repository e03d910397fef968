"""Samplers: plain functions that turn x_T into x_0 by walking a subsequence of timesteps.

Every sampler has the same signature, `sampler(model, x, schedule, timesteps, *, clip_x0, callback, noise,
...)`, where `model(x_t, t)` returns an eps prediction (classifier-free guidance, the eps/x0/v conversion and
the conditioning all live inside that callable, see `ddpm.generate.eps_model`; a latent model runs these same
samplers on latents and decodes afterwards, in `DiffusionSampler.to_images`). `timesteps` is an ascending
int64 tensor of timesteps in [0, T) (`make_timesteps`; 0 first for the uniform and quadratic spacings, T - 1
last for the trailing one); the loop walks it from the last entry to the first, and its final jump goes from
t = timesteps[0] to the clean image, where abar = 1. So a sampler always returns x_0, never x_1.

Each step is the model call plus one `kernels.sampler_step` (a fused kernel on GPUs): the x0
prediction, its clipping and the update in one pass. A `GuidedModel` (classifier-free guidance) hands
the step its conditional and reference eps instead of their combination, so that the guidance is
fused into the same pass; any other callable works as it is.

Near pure noise a v or x0 network's eps is nearly x_t itself: at abar = 2.4e-9 (the cosine schedule's
t = T - 1) eps = sqrt(1 - abar) x_t + sqrt(abar) v holds v in its last 5e-5, and rebuilding x0 =
sqrt(1 / abar) x_t - sqrt(1 / abar - 1) eps multiplies the float32 rounding of eps by 20,000 (x0 off
by 7e-3). So where abar < `EXACT_EPS_MAX_ABAR`, the samplers ask a `GuidedModel` for eps in float64
(`ddpm.generate.eps_model` converts the network's output in float64 there), and that step runs in
float64; every other step is float32 (or the network's dtype) as before.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ddpm.schedule import Schedule, check_timesteps
from kernels.sampler_step import Step, Update, sampler_step

Model = Callable[[Tensor, Tensor], Tensor]
# callback(i, t, x_t, x0_pred), once per entry of `timesteps` in sampling order: i counts 0, 1, ...,
# t is the original timestep, x_t the sample entering the step and x0_pred the step's x0 prediction.
Callback = Callable[[int, int, Tensor, Tensor], None]
Noise = Callable[[], Tensor]


class GuidedEps(NamedTuple):
    """A classifier-free guided eps in its two halves (Ho & Salimans 2022, eq. 6): eps = ref + scale (cond - ref)."""
    cond: Tensor
    ref: Tensor
    scale: float

    def combined(self) -> Tensor:
        return self.ref + self.scale * (self.cond - self.ref)


@runtime_checkable
class GuidedModel(Protocol):
    """A `Model` that can also give its prediction before the guidance combination (`ddpm.guidance`), which
    the samplers then fuse into their update; `guided_eps` may return a plain eps where no combination is needed."""

    def __call__(self, x: Tensor, t: Tensor) -> Tensor: ...

    def guided_eps(self, x: Tensor, t: Tensor, float64: bool = False) -> Tensor | GuidedEps:
        """eps (or its halves) at (x, t); with float64, in float64, converted from the network's output there."""


def make_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> Tensor:
    """`steps` distinct timesteps in [0, T), ascending from 0, as an int64 tensor (Song et al. 2021, DDIM Sec. 5).

    "uniform":   t_i = floor(i T / S), i.e. 0, T/S, 2T/S, ... (DDIM's "linear" and diffusers' "leading" where S
                 divides T; otherwise those step by T // S and end lower, and DDIM's code can visit more than S
                 timesteps): the first step is at T - T/S, not T - 1, which matters when abar there is not near
                 0 (see "trailing").
    "trailing":  t_i = round((i + 1) T / S) - 1, i.e. T/S - 1, ..., T - 1 (Lin et al. 2024, "Common diffusion
                 noise schedules and sample steps are flawed", Sec. 3.3): sampling starts from the last
                 timestep, where x_T ~ N(0, I) is what the model was trained on. Under the cosine schedule
                 abar at T - T/S is 0.024 for S = 10, so uniform spacing hands the model pure noise where it
                 expects 16% of the image's amplitude; a deterministic sampler (DDIM, PNDM) never
                 corrects that first error, and few-step samples come out hazy. Exact halves round to even
                 ((i + 1) T / S is computed exactly); diffusers' np.arange(T, 0, -T / S) accumulates float error
                 and can round them either way, one timestep apart (S = 48: 187 here, 186 there, for 186.5).
    "quadratic": t_i = floor(linspace(0, sqrt(0.8 T), S)_i ** 2), DDIM's spacing that crowds steps near
                 t = 0. For large S the first squares round to the same integer; each repeat is moved up
                 by one so that every step is distinct (DDIM's code would visit such a timestep twice).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    if steps > num_timesteps:
        raise ValueError(f"steps must be <= T = {num_timesteps} (there are only T timesteps), got {steps}.")
    if spacing == "uniform":
        ts = [i * num_timesteps // steps for i in range(steps)]
    elif spacing == "trailing":
        ts = [round((i + 1) * num_timesteps / steps) - 1 for i in range(steps)]
    elif spacing == "quadratic":
        ts = []
        for q in np.linspace(0, math.sqrt(0.8 * num_timesteps), steps) ** 2:
            ts.append(max(int(q), ts[-1] + 1) if ts else int(q))
    else:
        raise ValueError(f"Unknown spacing {spacing!r}; choose 'uniform', 'trailing' or 'quadratic'.")
    return torch.tensor(ts, dtype=torch.int64)


def per_sample_noise(seeds: Sequence[int], shape: tuple, device: torch.device | str,
                     dtype: torch.dtype = torch.float32) -> tuple[Tensor, Noise]:
    """x_T and a noise function for a batch of shape (len(seeds), ...) where sample k depends only on seeds[k].

    Each sample has its own CPU torch.Generator, so sample k of a batch equals the sample generated alone
    with the same seed, on any device and at any batch size. x_T is the first draw of each generator.
    """
    if len(shape) < 2 or shape[0] != len(seeds):
        raise ValueError(f"shape must be (len(seeds), ...) = ({len(seeds)}, ...), got {tuple(shape)}.")
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    # To a GPU from pinned memory the copy is queued like a kernel; from pageable memory it would make every
    # stochastic step wait for the GPU to finish the one before.
    to_gpu = torch.device(device).type == "cuda"

    def noise() -> Tensor:
        draws = torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in generators])
        return draws.pin_memory().to(device, non_blocking=True) if to_gpu else draws.to(device)

    return noise(), noise


def _start(x: Tensor, schedule: Schedule, timesteps: Tensor | Sequence[int]) -> list[int]:
    """Check the arguments every sampler shares and return the timesteps as ints."""
    assert x.dim() >= 2, f"x must be batched, (B, ...), got {tuple(x.shape)}"
    if schedule.betas.device != x.device:
        raise ValueError(f"schedule is on {schedule.betas.device} but x is on {x.device}; call schedule.to(x.device).")
    return check_timesteps(timesteps, schedule.num_timesteps)


# Below this abar, a `GuidedModel`'s eps is asked for in float64 (see the module docstring); at 1e-4 the
# float32 error of x0 rebuilt from eps is about 100 x 6e-8.
EXACT_EPS_MAX_ABAR = 1e-4


def _predict(model: Model, x: Tensor, t: Tensor, abar_start: float) -> Tensor | GuidedEps:
    """The model's eps at (x, t), asked for by a step that starts at noise level `abar_start` (t's own level, or
    for PNDM's evaluations inside a step the level where the step starts); a `GuidedModel` keeps its halves
    apart, for `_step` to combine, and gives them in float64 where `abar_start` < `EXACT_EPS_MAX_ABAR`."""
    if isinstance(model, GuidedModel):
        eps = (model.guided_eps(x, t, float64=True) if abar_start < EXACT_EPS_MAX_ABAR
               else model.guided_eps(x, t))
    else:
        eps = model(x, t)
    shape = eps.cond.shape if isinstance(eps, GuidedEps) else eps.shape
    assert shape == x.shape, f"model output {tuple(shape)} must match x {tuple(x.shape)}"
    return eps


def _step(x: Tensor, eps: Tensor | GuidedEps, update: Update, *, history: Sequence[Tensor] = (), clip_x0: bool = False,
          noise: Tensor | None = None, return_x0: bool = True, return_eps: bool = False) -> Step:
    """`kernels.sampler_step` on a plain or guided eps: x0 = recip x - recipm1 eps' (DDPM eq. 15), clamped to
    [-1, 1] under clip_x0 with eps' recomputed from it, so that the update moves towards the clipped x0."""
    guided = isinstance(eps, GuidedEps)
    return sampler_step(x, eps.cond if guided else eps, update, eps_ref=eps.ref if guided else None,
                        guidance_scale=eps.scale if guided else 1.0, history=history, clip_x0=clip_x0, noise=noise,
                        return_x0=return_x0, return_eps=return_eps)


def _x0_coefficients(schedule: Schedule, ts: list[int]) -> list[tuple[float, float]]:
    """(sqrt(1 / abar), sqrt(1 / abar - 1)) at each of the timesteps: x0 = first x_t - second eps (DDPM eq. 15)."""
    recip, recipm1 = schedule.sqrt_recip_alphas_cumprod[ts].tolist(), schedule.sqrt_recipm1_alphas_cumprod[ts].tolist()
    return list(zip(recip, recipm1))


def _batch_t(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)


def ddpm_sample(model: Model, x: Tensor, schedule: Schedule, timesteps: Tensor, *, clip_x0: bool = False,
                callback: Callback | None = None, noise: Noise | None = None, variance: str = "small") -> Tensor:
    """Ancestral sampling, DDPM Algorithm 2 (Ho et al. 2020), on any timestep subsequence (Nichol & Dhariwal 2021).

    Each jump t_i -> t_{i-1} is one step of the respaced chain (`Schedule.respaced`) and draws from
    q(x_{t_{i-1}} | x_{t_i}, x0_pred) with variance "small" = beta_tilde (DDPM's sigma^2 = beta_tilde) or
    "large" = beta' (sigma^2 = beta). improved-diffusion replaces the first entry of either variance by
    beta_tilde_1 to keep its log finite; the final jump adds no noise, so that entry is never used here.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"Unknown variance {variance!r}; choose 'small' or 'large'.")
    ts = _start(x, schedule, timesteps)
    noise = noise or (lambda: torch.randn_like(x))
    chain = schedule.respaced(ts)
    abar = schedule.alphas_cumprod.tolist()
    predict_x0 = _x0_coefficients(schedule, ts)
    coef1, coef2 = chain.posterior_mean_coef1.tolist(), chain.posterior_mean_coef2.tolist()
    log_variance = (chain.betas.log() if variance == "large" else chain.posterior_log_variance_clipped).tolist()
    for step, i in enumerate(reversed(range(len(ts)))):
        t = _batch_t(ts[i], x)
        # Predict eps and the x0 it implies, then step to the posterior mean of the respaced chain,
        # mu_tilde(x_t, x0_pred) = coef1 x0_pred + coef2 x_t (DDPM eq. 7), plus sigma z; the jump to the clean
        # image adds no noise (Algorithm 2, line 3 with z = 0).
        sigma = math.exp(0.5 * log_variance[i]) if i > 0 else 0.0
        update = Update(*predict_x0[i], c_x=coef2[i], c_x0=coef1[i], sigma=sigma)
        x_prev, x0, _ = _step(x, _predict(model, x, t, abar[ts[i]]), update, clip_x0=clip_x0,
                              noise=noise() if i > 0 else None,
                              return_x0=callback is not None)
        if callback is not None:
            callback(step, ts[i], x, x0)
        x = x_prev
    return x


def ddim_sample(model: Model, x: Tensor, schedule: Schedule, timesteps: Tensor, *, clip_x0: bool = False,
                callback: Callback | None = None, noise: Noise | None = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021), the generalised generative process of eq. 12 with sigma from eq. 16 scaled by eta.

    eta = 0 is the deterministic DDIM sampler; eta = 1 gives DDPM's ancestral sampler with variance "small".
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}.")
    ts = _start(x, schedule, timesteps)
    noise = noise or (lambda: torch.randn_like(x))
    abar = schedule.alphas_cumprod.tolist()
    predict_x0 = _x0_coefficients(schedule, ts)
    for step, i in enumerate(reversed(range(len(ts)))):
        t = _batch_t(ts[i], x)
        a_t, a_prev = abar[ts[i]], (abar[ts[i - 1]] if i > 0 else 1.0)
        # eq. 16: sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev); zero on the final jump.
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        # Predict eps and the x0 it implies (eq. 12, "predicted x0"), then
        # eq. 12: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z.
        update = Update(*predict_x0[i], c_x0=math.sqrt(a_prev), c_eps=math.sqrt(1 - a_prev - sigma**2), sigma=sigma)
        x_prev, x0, _ = _step(x, _predict(model, x, t, a_t), update, clip_x0=clip_x0,
                              noise=noise() if sigma > 0 else None,
                              return_x0=callback is not None)
        if callback is not None:
            callback(step, ts[i], x, x0)
        x = x_prev
    return x


def _transfer(x: Tensor, eps: Tensor | GuidedEps, a_t: float, a_next: float, x0_coefficients: tuple[float, float], *,
              weights: tuple[float, ...] = (1.0,), history: Sequence[Tensor] = (), clip_x0: bool = False,
              return_x0: bool = False) -> Step:
    """PNDM's transfer part phi(x_t, eps', t, t - delta) (Liu et al. 2022, Sec. 3.2): move x from noise level
    abar = a_t to a_next along eps' = weights[0] eps + weights[1] history[0] + ... Algebraically the deterministic
    DDIM step, written as in the paper in a form without cancellation when a_t and a_next are close. Returns the
    guided eps too; with clip_x0, eps' is recomputed from the clipped x0 predicted with x0_coefficients at a_t."""
    coef_x = math.sqrt(a_next / a_t)
    coef_eps = -(a_next - a_t) / (math.sqrt(a_t) * (math.sqrt((1 - a_next) * a_t) + math.sqrt((1 - a_t) * a_next)))
    update = Update(*x0_coefficients, c_x=coef_x, c_eps=coef_eps, weights=weights)
    return _step(x, eps, update, history=history, clip_x0=clip_x0, return_x0=return_x0, return_eps=True)


# PNDM's steps mix eps from several points and turn the mix into x0 with a factor 1 / sqrt(abar) of the step's
# start. Where that start is pure noise (trailing spacing under the cosine schedule: abar 2e-9 at T - 1, a factor
# of 20,000), any difference between the points' eps blows up, so the first step there is a plain DDIM step,
# eps from x alone, as PLMS without its Runge-Kutta warm-up takes it. Its eps is kept as the first entry of the
# history, so F-PNDM follows it with two Runge-Kutta steps instead of three, and S-PNDM goes straight to its
# multistep. The linear schedule's abar at T - 1 (4e-5, a factor of 160) is far above this.
MIXED_STEP_MIN_ABAR = 1e-6


def pndm_sample(model: Model, x: Tensor, schedule: Schedule, timesteps: Tensor, *, clip_x0: bool = False,
                callback: Callback | None = None, noise: Noise | None = None) -> Tensor:
    """F-PNDM (Liu et al. 2022, Sec. 3.3): three pseudo Runge-Kutta steps, then the pseudo linear multistep method
    (where the first timestep is pure noise, `MIXED_STEP_MIN_ABAR`, a DDIM step first, and two Runge-Kutta steps).

    Deterministic (`noise` is accepted for the shared signature and unused). The warm start evaluates the
    model at the end of its step, which the final jump to the clean image does not have, so at least 4
    timesteps are needed. Half steps use the integer timestep floor((t_i + t_{i-1}) / 2), because the
    network is trained on integer timesteps. The multistep weights assume equally spaced timesteps.
    """
    ts = _start(x, schedule, timesteps)
    if len(ts) < MIN_TIMESTEPS["pndm"]:
        raise ValueError(f"pndm_sample needs at least 4 timesteps (3 warm-up steps and 1 multistep), got {len(ts)}; "
                         f"use more steps or ddim_sample.")
    abar = schedule.alphas_cumprod.tolist()
    predict_x0 = _x0_coefficients(schedule, ts)
    history: list[Tensor] = []  # eps at the last three timesteps, oldest first
    for step, i in enumerate(reversed(range(len(ts)))):
        t = _batch_t(ts[i], x)
        a_t, a_next = abar[ts[i]], (abar[ts[i - 1]] if i > 0 else 1.0)
        # Every eps of a step is taken in float64 where the step starts near pure noise: the transfer
        # multiplies them by 1 / sqrt(a_t) (see `_predict`).
        e_1 = _predict(model, x, t, a_t)
        if step == 0 and a_t < MIXED_STEP_MIN_ABAR:
            x_next, x0, e_1 = _transfer(x, e_1, a_t, a_next, predict_x0[i], clip_x0=clip_x0,
                                        return_x0=callback is not None)  # from pure noise: a DDIM step
        elif len(history) < 3:
            # Pseudo Runge-Kutta (fourth order): three more evaluations at the half step and the end of the step.
            t_mid = (ts[i] + ts[i - 1]) // 2
            a_mid = abar[t_mid]
            # As in Liu et al.: x^1 and x^2 at the half step, x^3 at its end, each transferred from x.
            x_1, _, e_1 = _transfer(x, e_1, a_t, a_mid, predict_x0[i])
            x_2, _, e_2 = _transfer(x, _predict(model, x_1, _batch_t(t_mid, x), a_t), a_t, a_mid, predict_x0[i])
            x_3, _, e_3 = _transfer(x, _predict(model, x_2, _batch_t(t_mid, x), a_t), a_t, a_next, predict_x0[i])
            e_4 = _predict(model, x_3, _batch_t(ts[i - 1], x), a_t)
            # Transfer x along e' = (e_1 + 2 e_2 + 2 e_3 + e_4) / 6 (the weights of e_4, then of e_1, e_2, e_3).
            x_next, x0, _ = _transfer(x, e_4, a_t, a_next, predict_x0[i], weights=(1 / 6, 1 / 6, 2 / 6, 2 / 6),
                                      history=(e_1, e_2, e_3), clip_x0=clip_x0, return_x0=callback is not None)
        else:
            # Pseudo linear multistep (fourth-order Adams-Bashforth weights on the eps history): transfer x along
            # e' = (55 e_1 - 59 history[-1] + 37 history[-2] - 9 history[-3]) / 24.
            x_next, x0, e_1 = _transfer(x, e_1, a_t, a_next, predict_x0[i],
                                        weights=(55 / 24, -59 / 24, 37 / 24, -9 / 24), history=history[::-1],
                                        clip_x0=clip_x0, return_x0=callback is not None)
        history = (history + [e_1.to(x.dtype)])[-3:]  # (a float64 eps of a step near pure noise: back to x's)
        if callback is not None:
            callback(step, ts[i], x, x0)
        x = x_next
    return x


def spndm_sample(model: Model, x: Tensor, schedule: Schedule, timesteps: Tensor, *, clip_x0: bool = False,
                 callback: Callback | None = None, noise: Noise | None = None) -> Tensor:
    """S-PNDM (Liu et al. 2022): one pseudo improved Euler step, then the second-order pseudo linear multistep method
    (the first step a DDIM step where its timestep is pure noise: `MIXED_STEP_MIN_ABAR`).

    One model evaluation per step plus one extra in the first step (none where that step is the DDIM step: its
    eps then serves as the multistep's history). Deterministic (`noise` is accepted for
    the shared signature and unused); needs at least 2 timesteps since the warm start evaluates the model
    at the end of its step.
    """
    ts = _start(x, schedule, timesteps)
    if len(ts) < MIN_TIMESTEPS["spndm"]:
        raise ValueError(f"spndm_sample needs at least 2 timesteps (1 warm-up step and 1 multistep), got {len(ts)}; "
                         f"use more steps or ddim_sample.")
    abar = schedule.alphas_cumprod.tolist()
    predict_x0 = _x0_coefficients(schedule, ts)
    previous: Tensor | None = None  # eps at the previous timestep
    for step, i in enumerate(reversed(range(len(ts)))):
        t = _batch_t(ts[i], x)
        a_t, a_next = abar[ts[i]], (abar[ts[i - 1]] if i > 0 else 1.0)
        e_1 = _predict(model, x, t, a_t)  # in float64 where the step starts near pure noise, as in pndm_sample
        if step == 0 and a_t < MIXED_STEP_MIN_ABAR:
            x_next, x0, e_1 = _transfer(x, e_1, a_t, a_next, predict_x0[i], clip_x0=clip_x0,
                                        return_x0=callback is not None)  # from pure noise: a DDIM step
        elif previous is None:
            # Pseudo improved Euler (Heun): transfer x along the average of eps at the start, e_1, and at the
            # transferred end of the step, e_2.
            x_1, _, e_1 = _transfer(x, e_1, a_t, a_next, predict_x0[i])
            e_2 = _predict(model, x_1, _batch_t(ts[i - 1], x), a_t)
            x_next, x0, _ = _transfer(x, e_2, a_t, a_next, predict_x0[i], weights=(1 / 2, 1 / 2), history=(e_1,),
                                      clip_x0=clip_x0, return_x0=callback is not None)
        else:
            # Second-order pseudo linear multistep: transfer x along e' = (3 e_1 - previous) / 2 (Adams-Bashforth).
            x_next, x0, e_1 = _transfer(x, e_1, a_t, a_next, predict_x0[i], weights=(3 / 2, -1 / 2),
                                        history=(previous,), clip_x0=clip_x0, return_x0=callback is not None)
        previous = e_1.to(x.dtype)  # (a float64 eps of a step near pure noise: back to x's)
        if callback is not None:
            callback(step, ts[i], x, x0)
        x = x_next
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "pndm": pndm_sample,
    "spndm": spndm_sample,
}
# The fewest timesteps each sampler takes (its warm start evaluates the model at the end of a step, which the
# final jump to the clean image does not have); the others take any number.
MIN_TIMESTEPS = {"pndm": 4, "spndm": 2}
