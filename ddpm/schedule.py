"""The forward process of a discrete-time diffusion model: noise schedules and the tables built on them.

Notation follows DDPM (Ho et al. 2020): beta_t is the noise added at step t, alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s (`alphas_cumprod`), and t runs over 0 .. T-1, so t = 0 is the first noising
step (the paper's t = 1). Every table is computed once in float64 and named as improved-diffusion
(Nichol & Dhariwal 2021) names it; `extract` reads a table at a batch of timesteps.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from core.errors import FieldError, UserError

SCHEDULES = ("linear", "cosine", "scaled_linear")
PREDICTIONS = ("eps", "x0", "v")


# The published beta range of each schedule whose formula has one.
BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def make_betas(schedule: str, num_timesteps: int, beta_range: tuple[float, float] | None = None) -> np.ndarray:
    """The betas of a named schedule, float64, shape (num_timesteps,).

    "linear":        DDPM's (Ho et al. 2020, Sec. 4): linspace(beta_1, beta_T, T), published range 1e-4..0.02 at
                     T = 1000. For other T that range is multiplied by 1000 / T, as improved-diffusion does, so that
                     sum(betas) and hence the noise at the end of the chain stay about the same; this needs T > 20.
    "cosine":        improved DDPM's (Nichol & Dhariwal 2021, eq. 17): abar(t) = f(t) / f(0) with
                     f(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008, and beta_t = 1 - abar(t+1) / abar(t)
                     clipped at 0.999 so the last step stays finite. It has no beta range.
    "scaled_linear": latent diffusion's (Rombach et al. 2022; called "linear" in their code):
                     linspace(sqrt(beta_1), sqrt(beta_T), T) ** 2, range 0.00085..0.012 (Stable Diffusion); the
                     paper's unconditional models use 0.0015..0.0195.
    `beta_range` replaces the published (beta_1, beta_T), used as given (no 1000 / T scaling).

    Its refusals name its arguments as fields (core.errors.FieldError); they are `ddpm.config.DiffusionConfig`'s
    fields too, so train.py reads them as the options that set them.
    """
    if num_timesteps < 1:
        raise FieldError("{num_timesteps} must be at least 1, got {value}.", value=num_timesteps)
    if schedule not in SCHEDULES:
        raise FieldError("{schedule} must be one of {choices}, got {value!r}.", choices=", ".join(SCHEDULES),
                         value=schedule)
    if beta_range is not None:
        if schedule == "cosine":
            raise FieldError("The cosine schedule has no beta range; drop {beta_range} or use {schedule} linear or "
                             "scaled_linear.")
        lo, hi = beta_range
        if not 0 < lo <= hi < 1:
            raise FieldError("{beta_range} must satisfy 0 < start <= end < 1, got {lo} {hi}.", lo=lo, hi=hi)
    if schedule == "linear":
        if beta_range is not None:
            return np.linspace(beta_range[0], beta_range[1], num_timesteps, dtype=np.float64)
        scale = 1000 / num_timesteps
        if BETA_RANGES["linear"][1] * scale >= 1:
            raise FieldError("{schedule} linear needs {num_timesteps} above {fewest:g} (its betas are scaled by 1000/T "
                             "and would reach 1), got {value}; use more timesteps or {schedule} cosine.",
                             fewest=BETA_RANGES["linear"][1] * 1000, value=num_timesteps)
        return np.linspace(scale * BETA_RANGES["linear"][0], scale * BETA_RANGES["linear"][1], num_timesteps,
                           dtype=np.float64)
    if schedule == "cosine":
        s = 0.008

        def f(t: float) -> float:
            return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(num_timesteps)]
        return np.array(betas, dtype=np.float64)
    lo, hi = beta_range or BETA_RANGES["scaled_linear"]
    return np.linspace(lo ** 0.5, hi ** 0.5, num_timesteps, dtype=np.float64) ** 2


def extract(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """table[t] shaped (B, 1, ..., 1) to broadcast over x's non-batch dimensions, in x's dtype but never narrower
    than float32: in bf16, sqrt(abar) at t = 0 (0.99995) would read 1 and the product with x would round to
    8 bits, so a bf16 x (float32 noise) is noised and converted in float32, as the float64 tables allow."""
    assert t.dim() == 1 and t.shape[0] == x.shape[0], f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}"
    return table[t].to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, *([1] * (x.dim() - 1)))


def check_timesteps(timesteps: Tensor | Sequence[int], num_timesteps: int) -> list[int]:
    """Validate a sampling subsequence (strictly increasing, all in [0, T)) and return it as ints."""
    ts = [int(t) for t in (timesteps.tolist() if isinstance(timesteps, Tensor) else timesteps)]
    if not ts or ts[0] < 0 or ts[-1] >= num_timesteps or any(b <= a for a, b in zip(ts, ts[1:])):
        raise UserError(f"timesteps must be strictly increasing and lie in [0, {num_timesteps}); "
                        f"build them with make_timesteps.")
    return ts


class Schedule(torch.nn.Module):
    """The fixed forward process q(x_t | x_0) of DDPM and every quantity derived from it.

    The tables are float64, computed once, and registered as non-persistent buffers: `schedule.to(device)`
    moves them and they never enter a state dict (they are a pure function of the betas). Methods take
    `t` as an int64 tensor of shape (B,) on x's device and broadcast the per-t coefficient over x.

    Every method takes its arguments in one order, improved-diffusion's: the sample it starts from
    (x_t, or x0 for the forward process), then t, then the other tensors, e.g. `x0_from_eps(x_t, t, eps)`,
    `q_posterior(x_t, t, x0)`, `v_from_eps(x0, t, eps)`, `training_target(x0, t, noise, prediction)`;
    `training_losses` alone takes the model first, as the samplers do.
    """

    def __init__(self, betas: np.ndarray | Tensor):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or len(betas) == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise UserError("betas must be a non-empty 1-D array with every value in (0, 1).")
        self.num_timesteps = len(betas)

        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t I)   (DDPM eq. 6-7).
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        # beta_tilde_0 = 0, so its log is -inf; improved-diffusion clips it to beta_tilde_1 (a one-step chain has none).
        clip_from = posterior_variance[1:2] if self.num_timesteps > 1 else posterior_variance[:1]
        tables = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.cat([clip_from, posterior_variance[1:]]).log(),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
        }
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)

    @classmethod
    def from_name(cls, schedule: str, num_timesteps: int, beta_range: tuple[float, float] | None = None) -> Schedule:
        """A schedule from one of SCHEDULES; see `make_betas`."""
        return cls(make_betas(schedule, num_timesteps, beta_range))

    def respaced(self, timesteps: Tensor | Sequence[int]) -> Schedule:
        """The shorter chain that visits only `timesteps` (improved-diffusion's respacing, Nichol & Dhariwal 2021).

        beta'_i = 1 - abar[t_i] / abar[t_{i-1}] (abar before t_0 = 0 is 1), so the new chain's alphas_cumprod
        are abar[timesteps] and its posterior tables are those of the jumps t_i -> t_{i-1}. Index the result
        with the position i in `timesteps`, not with t.
        """
        ts = check_timesteps(timesteps, self.num_timesteps)
        abar = self.alphas_cumprod[ts]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return Schedule(1 - abar / abar_prev)

    # Forward process.

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, a draw from q(x_t | x_0) (DDPM eq. 4)."""
        assert noise.shape == x0.shape, f"noise {tuple(noise.shape)} must match x0 {tuple(x0.shape)}"
        return (extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior(self, x_t: Tensor, t: Tensor, x0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7).

        The mean has x's shape; the variance and log-variance are (B, 1, ..., 1) and broadcast.
        """
        assert x0.shape == x_t.shape, f"x0 {tuple(x0.shape)} and x_t {tuple(x_t.shape)} must match"
        mean = extract(self.posterior_mean_coef1, t, x_t) * x0 + extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, extract(self.posterior_variance, t, x_t), extract(self.posterior_log_variance_clipped, t, x_t)

    # Conversions between what a network can predict: eps, x0, or v (Salimans & Ho 2022, Sec. 4 and App. D).
    # All follow from x_t = sqrt(abar) x0 + sqrt(1 - abar) eps and v = sqrt(abar) eps - sqrt(1 - abar) x0.

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (DDPM eq. 15)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t / sqrt(abar) - x0) / sqrt(1 / abar - 1), the inverse of `x0_from_eps`."""
        return ((extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def v_from_eps(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x0, the velocity target of Salimans & Ho 2022."""
        return extract(self.sqrt_alphas_cumprod, t, x0) * eps - extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
        return extract(self.sqrt_alphas_cumprod, t, x_t) * x_t - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v

    def eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
        return extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + extract(self.sqrt_alphas_cumprod, t, x_t) * v

    def to_eps(self, x_t: Tensor, t: Tensor, output: Tensor, prediction: str) -> Tensor:
        """Read a network output of kind `prediction` ("eps", "x0" or "v") as an eps prediction."""
        _check_prediction(prediction)
        assert output.shape == x_t.shape, f"output {tuple(output.shape)} must match x_t {tuple(x_t.shape)}"
        if prediction == "eps":
            return output
        if prediction == "x0":
            return self.eps_from_x0(x_t, t, output)
        return self.eps_from_v(x_t, t, output)

    # Training.

    def training_target(self, x0: Tensor, t: Tensor, noise: Tensor, prediction: str) -> Tensor:
        """What a network of kind `prediction` should output for x_t = q_sample(x0, t, noise)."""
        _check_prediction(prediction)
        assert noise.shape == x0.shape, f"noise {tuple(noise.shape)} must match x0 {tuple(x0.shape)}"
        if prediction == "eps":
            return noise
        if prediction == "x0":
            return x0
        return self.v_from_eps(x0, t, noise)

    def training_losses(self, model_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, t: Tensor, noise: Tensor,
                        prediction: str = "eps") -> Tensor:
        """Per-sample mean squared error between model_fn(x_t, t) and its target, shape (B,) (DDPM eq. 14, L_simple).

        With prediction="eps" this is DDPM's simplified objective; "x0" and "v" regress the other targets
        with the same unweighted MSE.
        """
        x_t = self.q_sample(x0, t, noise)
        output = model_fn(x_t, t)
        assert output.shape == x0.shape, f"model output {tuple(output.shape)} must match x0 {tuple(x0.shape)}"
        target = self.training_target(x0, t, noise, prediction)
        return (output - target).square().flatten(1).mean(dim=1)


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise UserError(f"Unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}.")
