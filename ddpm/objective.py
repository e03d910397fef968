"""The DDPM training objective, once, for every stage that trains or inverts a denoiser on its data:
pixel diffusion, latent diffusion (on VAE latents), and inversion (on learned embeddings).

One call draws a timestep and a noise per sample (and, for a conditional model, which samples are
trained with the null condition, for classifier-free guidance), noises x0 with q(x_t | x0) and
regresses the chosen target (DDPM eq. 14 for eps; x0 or v with the same unweighted MSE).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ddpm.schedule import Schedule

# net(x_t, t, cond, null_mask=..., cond_emb=...) -> output of x_t's shape: a UNet, or its DDP/compiled wrapper
Denoiser = Callable[..., Tensor]


def diffusion_loss(net: Denoiser, schedule: Schedule, x0: Tensor, generator: torch.Generator, *, prediction: str,
                   cond: Tensor | None = None, cond_emb: Tensor | None = None, cond_drop_prob: float = 0.0) -> Tensor:
    """Per-sample loss (B,) of `net` on clean data `x0` (B, C, H, W), every random draw from `generator`.

    `cond` (labels or normalised parameters) or `cond_emb` (conditioning vectors) conditions the
    model; with either, each sample is swapped to the null condition with probability
    `cond_drop_prob` (Ho & Salimans 2022, Algorithm 1). With neither, the model is unconditional.
    """
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    if cond is None and cond_emb is None:
        model_fn = (lambda x_t, tt: net(x_t, tt))
    else:
        null_mask = torch.rand(b, generator=generator, device=x0.device) < cond_drop_prob
        model_fn = (lambda x_t, tt: net(x_t, tt, cond, null_mask=null_mask, cond_emb=cond_emb))
    return schedule.training_losses(model_fn, x0, t, noise, prediction)
