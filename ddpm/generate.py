"""From a trained network to images: interpret its output, apply guidance, run a sampler.

Samplers only ever see `model(x_t, t) -> eps`. This module builds that callable from a U-Net, so
the prediction target (eps / x0 / v), classifier-free guidance and mixed precision stay out of the
sampler code, and later stages (latent decoding, learned inversion embeddings) plug in here too.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from ddpm.config import SamplingConfig
from ddpm.guidance import classifier_free_guidance
from ddpm.samplers import SAMPLERS, Model, make_timesteps, per_sample_noise
from ddpm.schedule import Schedule
from ddpm.unet import UNet
from training.seeds import derive_seed


def eps_model(net: UNet, schedule: Schedule, prediction: str, *, cond: torch.Tensor | None = None,
              cond_emb: torch.Tensor | None = None, guidance_scale: float = 1.0,
              amp_dtype: torch.dtype | None = None) -> Model:
    """The sampler-facing eps predictor of `net`, with classifier-free guidance (Ho & Salimans 2022)
    when the network is conditional."""
    device = next(net.parameters()).device
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())

    def predict(x: torch.Tensor, t: torch.Tensor, null_mask: torch.Tensor | None) -> torch.Tensor:
        # Guidance evaluates conditional and unconditional halves in one batch of 2B: repeat the
        # condition to match.
        c = None if cond is None else cond.repeat(x.shape[0] // cond.shape[0], *([1] * (cond.dim() - 1)))
        e = None if cond_emb is None else cond_emb.repeat(x.shape[0] // cond_emb.shape[0], 1)
        with autocast:
            out = net(x, t, c, null_mask=null_mask, cond_emb=e)
        return schedule.to_eps(x, t, out.float(), prediction)

    if net.config.cond == "none":
        return lambda x, t: predict(x, t, None)
    return classifier_free_guidance(predict, guidance_scale)


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a run seeded with `seed`: image k can be redrawn alone."""
    return derive_seed(seed, index)


@torch.no_grad()
def sample_images(net: UNet, schedule: Schedule, prediction: str, sampling: SamplingConfig, seeds: Sequence[int],
                  *, cond: torch.Tensor | None = None, cond_emb: torch.Tensor | None = None,
                  amp_dtype: torch.dtype | None = None,
                  callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Draw one image per seed (image k depends only on seeds[k] and its condition) in [-1, 1]."""
    cfg = net.config
    device = next(net.parameters()).device
    sampler = SAMPLERS.get(sampling.sampler)
    if sampler is None:
        raise ValueError(f"Unknown sampler {sampling.sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    timesteps = make_timesteps(schedule.num_timesteps, sampling.steps, sampling.spacing).to(device)
    x, noise = per_sample_noise(list(seeds), (len(seeds), cfg.in_channels, cfg.image_size, cfg.image_size), device)
    model = eps_model(net, schedule, prediction, cond=cond, cond_emb=cond_emb,
                      guidance_scale=sampling.guidance_scale, amp_dtype=amp_dtype)
    options = {"ddpm": {"variance": sampling.variance}, "ddim": {"eta": sampling.eta}}.get(sampling.sampler, {})
    x0 = sampler(model, x, schedule, timesteps, clip_x0=sampling.clip_x0, callback=callback, noise=noise, **options)
    return x0.clamp(-1, 1)
