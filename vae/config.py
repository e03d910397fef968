"""The autoencoder run config and its presets: the first stage of latent diffusion (Rombach et al. 2022).

`vae-demo` is small enough to train on 2 CPU cores in minutes; `kl-f4` and `kl-f8` are the
latent-diffusion first-stage configurations (`kl-f8` is the Stable Diffusion autoencoder) with the
recipe of their published configs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from core.config import DataConfig, StageConfig, TrainConfig, check_choice, option
from core.errors import FieldError
from vae.autoencoder import AutoencoderConfig
from vae.perceptual import PERCEPTUAL_KINDS, TAPS


# The output log-variance s may start at most this far from 0: rec / exp(s) then weighs the reconstruction between
# 2e-9 and 5e8 times the other terms (rec itself is 1e-4 to 1, so s's optimum, log rec, lies within -10..0), and
# exp(s) leaves float32 past |s| = 88, making the loss infinite or its gradient vanish.
LOGVAR_INIT_LIMIT = 20.0


@dataclass(frozen=True)
class VAELossConfig:
    """L1 + perceptual + a small KL weight, with an optional PatchGAN (latent-diffusion's LPIPSWithDiscriminator).

    The reconstruction term is a Laplace-style negative log-likelihood with one output log-variance s:
    with rec = mean|x - x^| + perceptual_weight * d(x, x^), the loss is

        rec / exp(s) + s  +  kl_weight * KL / (C H W)  [+ d_weight * L_G once the discriminator starts].

    Weights are per pixel: latent diffusion sums the same terms over the C H W pixels and divides by the
    batch; we divide that by the pixel count, so its kl_weight 1e-6 means the same here, the adaptive GAN
    weight (from the gradient of the NLL, as theirs, and clamped where theirs is: at 1e4 / (C H W) in our
    units) gives the generator term the same share of the loss, and s gets the same Adam steps (Adam does
    not see the constant factor).

    s is a parameter of latent diffusion's loss (initialised at logvar_init = 0), but the optimizer of
    their AutoencoderKL is given only the encoder, decoder and quant convs, so s never moves and their
    first stages train on rec itself (s = 0). Stability's generative-models made that explicit: a
    `learn_logvar` flag, off by default. So learn_logvar is off in every preset, as published; turn it
    on to learn s with the autoencoder's learning rate and Adam betas, as a trainable of its own (saved
    and resumed with the run; no weight decay, no average).
    """
    perceptual: str = option("auto", "perceptual network: lpips (VGG-16 and LPIPS v0.1 weights from files), random "
                                     "(seeded random VGG-16, uniform heads) or auto (lpips if both files are in the "
                                     "torch hub cache, else random)", choices=PERCEPTUAL_KINDS)
    perceptual_taps: int = option(5, f"VGG-16 layers the perceptual distance uses, from the first ({', '.join(TAPS)}); "
                                      "fewer is faster")
    perceptual_weight: float = option(1.0, "weight of the perceptual distance")
    vgg_weights: str = option("", "torchvision's VGG-16 weights file (vgg16-397923af.pth; empty: the torch hub cache)")
    lpips_weights: str = option("", "the LPIPS v0.1 VGG head file (lpips/weights/v0.1/vgg.pth; empty: the torch hub "
                                    "cache, as lpips_v0.1_vgg.pth)")
    kl_weight: float = option(1e-6, "weight of the KL term (latent diffusion: 1e-6)")
    disc_start: int = option(-1, "step from which the PatchGAN discriminator trains and its loss counts (-1: no "
                                 "discriminator; latent diffusion: 50001)")
    disc_weight: float = option(0.5, "scale of the adaptive GAN weight (Esser et al. 2021)")
    disc_layers: int = option(3, "PatchGAN depth (strided conv layers)")
    disc_lr: float = option(0.0, "discriminator learning rate (0: the autoencoder's --lr)")
    learn_logvar: bool = option(False, "learn the output log-variance s of the reconstruction NLL rec / exp(s) + s "
                                       "(latent diffusion declares s but never optimises it: off)")
    logvar_init: float = option(0.0, "the output log-variance s at the start (kept there unless --learn-logvar; "
                                     "latent diffusion: 0)")

    def __post_init__(self) -> None:
        # Each check names the fields it is about ({placeholders}): code that builds this config (and a checkpoint)
        # reads them as fields, train.py as the options that set them (core.errors.FieldError).
        check_choice("perceptual", self.perceptual, PERCEPTUAL_KINDS)
        if not 1 <= self.perceptual_taps <= len(TAPS):
            raise FieldError("{perceptual_taps} must be in 1..{most}, got {value}.", most=len(TAPS),
                             value=self.perceptual_taps)
        for name in ("perceptual_weight", "kl_weight", "disc_weight", "disc_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise FieldError("{" + name + "} must be 0 or positive, got {value}.", value=value)
        if self.disc_start < -1:
            raise FieldError("{disc_start} must be -1 (off) or a step, got {value}.", value=self.disc_start)
        if self.disc_layers < 1:
            raise FieldError("{disc_layers} must be at least 1, got {value}.", value=self.disc_layers)
        if not (math.isfinite(self.logvar_init) and abs(self.logvar_init) <= LOGVAR_INIT_LIMIT):
            raise FieldError("{logvar_init} must be a finite number from -{limit:g} to {limit:g} (the reconstruction "
                             "term is weighed by exp(-s), which beyond that swamps or erases it against the KL and GAN "
                             "terms; latent diffusion: 0), got {value:g}.", limit=LOGVAR_INIT_LIMIT,
                             value=self.logvar_init)

    def idle_options(self, config: Any) -> dict[str, str]:
        """The discriminator's options, when there is none (see `core.config.StageConfig.idle_options`)."""
        if self.disc_start >= 0:
            return {}
        return {name: f"--{name.replace('_', '-')} has no effect without a discriminator, and --disc-start -1 trains "
                      f"none; pass --disc-start STEP (latent diffusion: 50001) to train one from that step, or drop "
                      f"--{name.replace('_', '-')}." for name in ("disc_weight", "disc_layers", "disc_lr")}


@dataclass(frozen=True)
class VAEOptions:
    pretrained: str = option("", "start from published weights: a latent-diffusion / Stable Diffusion KL autoencoder "
                                 "file (.ckpt, .pt or .safetensors, latent-diffusion's key names), or a diffusers "
                                 "AutoencoderKL folder or its weights file; with --steps 0 the run just imports them "
                                 "(and measures the latent scale on your data)")
    scale_samples: int = option(512, "training images whose latents set the scale factor stored with the autoencoder "
                                     "(1 / their standard deviation; a latent model measures its own on its latents)")

    def __post_init__(self) -> None:
        if self.scale_samples < 2:
            raise FieldError("{scale_samples} must be at least 2, got {value}.", value=self.scale_samples)


@dataclass(frozen=True)
class VAEConfig(StageConfig):
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    vae: VAEOptions = field(default_factory=VAEOptions)

    def divergence_advice(self, diverged: str, step: int) -> str:
        """The options that can throw this objective off, by what diverged (see `StageConfig.divergence_advice`):
        the discriminator's own rate, the weight of its term in the autoencoder's loss once it has started, and a
        learned log-variance (whose exp(-s) grows without bound as s falls)."""
        loss = self.loss
        if "disc" in diverged:  # the discriminator's loss, gradient or weights (its trainable is "disc")
            return "a lower --disc-lr" + ("" if loss.disc_lr else " (it trains at --lr now)")
        if "logvar" in diverged or loss.learn_logvar:
            return "a lower --lr, or without --learn-logvar"
        if 0 <= loss.disc_start < step:
            return "a lower --disc-weight or --lr"
        return "a lower --lr"


# Autoencoder fields the data decides, and help for the rest.
AUTOENCODER_FROM_DATA = frozenset({"in_channels", "resolution"})
AUTOENCODER_OPTIONS = {
    "base_channels": "channels at the first (full) resolution (latent diffusion's ch; kl-f8: 128)",
    "channel_mult": "channel multiplier per level; levels - 1 halvings give the downsampling factor f (kl-f8: 1 2 4 4)",
    "num_res_blocks": "residual blocks per encoder level (the decoder has one more)",
    "attention_resolutions": "feature-map sizes with self-attention besides the middle (kl-f8: none)",
    "latent_channels": "channels of the latent (kl-f4: 3, kl-f8: 4)",
    "dropout": "dropout in the residual blocks",
}


def resolve_autoencoder(config: VAEConfig, channels: int, resolution: int) -> VAEConfig:
    autoencoder = dataclasses.replace(config.autoencoder, in_channels=channels, resolution=resolution)
    return dataclasses.replace(config, autoencoder=autoencoder)


def vae_demo() -> VAEConfig:
    """64x64 plumes into 16x16x3 latents (f = 4) with a 0.68M-parameter autoencoder, trained in minutes on
    2 CPU cores (docs/presets.md has the time and the held-out PSNR it reaches).

    Narrow at full resolution (16 channels), where a CPU spends most of its time, and the perceptual
    term reads only VGG-16's first tap: at 64x64 each deeper tap costs about as much as the whole
    autoencoder, and smooth smoke has little texture for them to judge.
    """
    return VAEConfig(
        data=DataConfig(dataset="plumes", resolution=64, hflip=False, test_samples=256),
        autoencoder=AutoencoderConfig(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                                      attention_resolutions=(), latent_channels=3, resolution=64),
        loss=VAELossConfig(perceptual="auto", perceptual_taps=1, perceptual_weight=1.0, kl_weight=1e-6),
        train=TrainConfig(steps=1000, batch_size=8, lr=1e-3, lr_schedule="cosine", warmup_steps=50, grad_clip=1.0,
                          ema_decay=0.99, sample_every=250, ckpt_every=250, log_every=50, preview_images=16),
    )


def _latent_diffusion_first_stage(autoencoder: AutoencoderConfig, batch_size: int) -> VAEConfig:
    """Latent diffusion's first-stage recipe (models/first_stage_models/kl-f*/config.yaml): Adam with betas
    (0.5, 0.9) at base rate 4.5e-6 scaled by the batch size (one GPU), LPIPS weight 1, KL weight 1e-6, the
    discriminator from step 50001 with weight 0.5, the output log-variance at 0 and not learned (their
    optimizer leaves it out; see VAELossConfig), no gradient clipping, no weight average. The configs
    give no step count; 100k is ours."""
    return VAEConfig(
        data=DataConfig(dataset="", resolution=256, hflip=True),
        autoencoder=autoencoder,
        loss=VAELossConfig(perceptual="lpips", perceptual_taps=5, kl_weight=1e-6, disc_start=50001, disc_weight=0.5,
                           learn_logvar=False, logvar_init=0.0),
        train=TrainConfig(steps=100_000, batch_size=batch_size, lr=4.5e-6 * batch_size, warmup_steps=0, grad_clip=0.0,
                          ema_decay=0.0, sample_every=5000, ckpt_every=5000, log_every=100, preview_images=8),
    )


def kl_f4() -> VAEConfig:
    return _latent_diffusion_first_stage(AutoencoderConfig.kl_f4(), batch_size=10)


def kl_f8() -> VAEConfig:
    return _latent_diffusion_first_stage(AutoencoderConfig.kl_f8(), batch_size=4)


PRESETS = {"vae-demo": vae_demo, "kl-f4": kl_f4, "kl-f8": kl_f8}
# Latent diffusion trains its autoencoder and discriminator with Adam's betas (0.5, 0.9) throughout.
ADAM_BETAS = (0.5, 0.9)
