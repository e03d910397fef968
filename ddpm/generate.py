"""From a trained network to images: interpret its output, apply guidance, run a sampler, decode.

Samplers only ever see `model(x_t, t) -> eps`. This module builds that callable from a U-Net, so
the prediction target (eps / x0 / v), classifier-free guidance and mixed precision stay out of the
sampler code. A `DiffusionSampler` is what every generative stage's checkpoint loads into: pixel
models denoise images directly, latent models denoise VAE latents and decode them, and the code
that draws images is the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from core.runtime import autocast, derive_seed
from data import DatasetInfo
from ddpm.config import SamplingConfig
from ddpm.guidance import classifier_free_guidance
from ddpm.samplers import SAMPLERS, Callback, Model, make_timesteps, per_sample_noise
from ddpm.schedule import Schedule
from ddpm.unet import UNet


@dataclass
class DiffusionSampler:
    """A trained diffusion model ready to draw images."""
    net: UNet                                       # frozen, in eval mode, on its device
    schedule: Schedule                              # on the same device
    prediction: str                                 # what the network outputs: eps, x0 or v
    info: DatasetInfo                               # the training images: size, channels, classes, parameters
    decode: Callable[[Tensor], Tensor] | None = None   # latents -> images in [-1, 1]; None: a pixel model

    @property
    def latent(self) -> bool:
        return self.decode is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the sampler draws: images, or latents."""
        cfg = self.net.config
        return cfg.in_channels, cfg.image_size, cfg.image_size

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to_images(self, x: Tensor) -> Tensor:
        """Sampler-space tensors (images or latents) as images in [-1, 1]."""
        return (x if self.decode is None else self.decode(x)).clamp(-1, 1)


def eps_model(net: UNet, schedule: Schedule, prediction: str, *, cond: Tensor | None = None,
              cond_emb: Tensor | None = None, reference: Tensor | None = None, guidance_scale: float = 1.0,
              amp_dtype: torch.dtype | None = None) -> Model:
    """The sampler-facing eps predictor of `net`, with classifier-free guidance (Ho & Salimans 2022)
    when the network is conditional: against the null embedding, or against `reference` (E,), a vector
    in the conditioning space (inversion guides against the mean of its learned embeddings)."""
    device = next(net.parameters()).device

    def predict(x: Tensor, t: Tensor, reference_mask: Tensor | None, float64: bool = False) -> Tensor:
        # Guidance evaluates conditional and reference halves in one batch of 2B: repeat the
        # condition to match.
        c = None if cond is None else cond.repeat(x.shape[0] // cond.shape[0], *([1] * (cond.dim() - 1)))
        e = None if cond_emb is None else cond_emb.repeat(x.shape[0] // cond_emb.shape[0], 1)
        null_mask = reference_mask
        if reference is not None:
            own = e if e is not None else net.embed_condition(c)
            e, c, null_mask = torch.where(reference_mask[:, None], reference.to(own.dtype), own), None, None
        with autocast(device, amp_dtype):
            out = net(x, t, c, null_mask=null_mask, cond_emb=e)
        if float64 and prediction != "eps":  # near pure noise, where float32 would lose a v or x0 output in eps
            return schedule.to_eps(x.double(), t, out.double(), prediction)
        return schedule.to_eps(x, t, out.float(), prediction)

    if net.config.cond == "none":
        assert reference is None, "an unconditional model has no condition to guide against"
        # Scale 1 with the mask ignored: one call per step, and a `GuidedModel`, so eps can come in float64.
        return classifier_free_guidance(lambda x, t, _mask, float64=False: predict(x, t, None, float64), 1.0)
    return classifier_free_guidance(predict, guidance_scale)


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a run seeded with `seed`: image k can be redrawn alone."""
    return derive_seed(seed, index)


@torch.no_grad()
def sample(model: DiffusionSampler, sampling: SamplingConfig, seeds: Sequence[int], *, cond: Tensor | None = None,
           cond_emb: Tensor | None = None, reference: Tensor | None = None, x_T: Tensor | None = None, amp_dtype: torch.dtype | None = None,
           callback: Callback | None = None) -> Tensor:
    """Run the sampler from x_T to x_0 in the model's own space (images or latents), one sample per seed.

    Sample k depends only on seeds[k] (its x_T and any sampler noise) and its condition. `x_T`
    replaces the seeded starting points (e.g. interpolated noise); the seeds still drive the noise of
    stochastic samplers. `reference` replaces the null embedding as what guidance pushes away from.
    Latent models are never clipped: their x0 has no [-1, 1] bound.
    """
    sampling.check_against(model.schedule)
    device = model.device
    timesteps = make_timesteps(model.schedule.num_timesteps, sampling.steps, sampling.spacing).to(device)
    x, noise = per_sample_noise(list(seeds), (len(seeds), *model.shape), device)
    if x_T is not None:
        assert x_T.shape == x.shape, f"x_T {tuple(x_T.shape)} must be {tuple(x.shape)}"
        x = x_T.to(device)
    model.net.check_inputs(x, timesteps[:1].expand(len(x)), None if cond is None else cond.to(device),
                           cond_emb=None if cond_emb is None else cond_emb.to(device))
    eps = eps_model(model.net, model.schedule, model.prediction, cond=cond, cond_emb=cond_emb, reference=reference,
                    guidance_scale=sampling.guidance_scale, amp_dtype=amp_dtype)
    options = {"ddpm": {"variance": sampling.variance}, "ddim": {"eta": sampling.eta}}.get(sampling.sampler, {})
    return SAMPLERS[sampling.sampler](eps, x, model.schedule, timesteps, clip_x0=sampling.clip_x0 and not model.latent,
                                      callback=callback, noise=noise, **options)


@torch.no_grad()
def sample_images(model: DiffusionSampler, sampling: SamplingConfig, seeds: Sequence[int], **kwargs) -> Tensor:
    """`sample`, then decoded (latent models) and clamped: images in [-1, 1], one per seed."""
    return model.to_images(sample(model, sampling, seeds, **kwargs))
