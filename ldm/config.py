"""The latent-diffusion run config and its presets (Rombach et al. 2022).

A latent model is a DDPM U-Net trained on the scaled latents of a frozen KL autoencoder: the data,
U-Net, diffusion and training sections are those of pixel diffusion, plus which autoencoder to use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.config import DataConfig, StageConfig, TrainConfig, option
from core.errors import FieldError
from ddpm.config import DiffusionConfig
from ddpm.unet import UNetConfig

DEFAULT_VAE_PRESET = "vae-demo"  # the `vae` preset of the autoencoder trained first when --vae-ckpt is the default
DEFAULT_VAE_RUN = Path("runs") / DEFAULT_VAE_PRESET
DEFAULT_VAE_CKPT = str(DEFAULT_VAE_RUN / "checkpoint.pt")


@dataclass(frozen=True)
class LatentConfig:
    vae_ckpt: str = option(DEFAULT_VAE_CKPT, "the trained autoencoder, a `train.py --stage vae` checkpoint; its weights "
                                             "are copied into this run's checkpoints, and the latent scale is measured "
                                             "on this run's latents (the default run is trained first if it has no "
                                             "checkpoint yet)")
    encode_batch: int = option(64, "images per encoder pass when the latent cache is built")

    def __post_init__(self) -> None:
        # Each check names the fields it is about: code reads them as fields, train.py as options (FieldError).
        if not self.vae_ckpt:
            raise FieldError("{vae_ckpt} must name a checkpoint of a `--stage vae` run.")
        if self.encode_batch < 1:
            raise FieldError("{encode_batch} must be at least 1, got {value}.", value=self.encode_batch)


@dataclass(frozen=True)
class LDMConfig(StageConfig):
    latent: LatentConfig = field(default_factory=LatentConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


def ldm_demo() -> LDMConfig:
    """64x64 plumes conditioned on (wind, temperature), on the 16x16x3 latents of `vae-demo`: a 1.2M-parameter
    U-Net, minutes on 2 CPU cores (docs/presets.md has the time and result).

    Latent diffusion's scaled-linear schedule; v-prediction for the reason the pixel demo gives (a
    briefly trained eps model's small mean errors are amplified by 1/sqrt(abar) at high noise).
    """
    return LDMConfig(
        data=DataConfig(dataset="plumes", resolution=64, hflip=False),
        latent=LatentConfig(vae_ckpt=DEFAULT_VAE_CKPT),
        unet=UNetConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
                        num_heads=1, dropout=0.0, scale_shift_norm=True, cond="params"),
        diffusion=DiffusionConfig(schedule="scaled_linear", num_timesteps=1000, prediction="v", cond_drop_prob=0.1),
        train=TrainConfig(steps=4500, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999, sample_every=1500,
                          ckpt_every=500, log_every=50, preview_images=36, preview_steps=50),
    )


def ldm_celebahq256() -> LDMConfig:
    """LDM-4 on CelebA-HQ 256 (configs/latent-diffusion/celebahq-ldm-vq-4.yaml and the paper's table of
    unconditional models): U-Net of 224 channels, multipliers 1 2 3 4, 2 blocks per level, attention at
    latent sizes 32 16 8 with heads of 32 channels; T = 1000 scaled-linear betas 0.0015..0.0195; eps
    prediction; AdamW at 2e-6 x batch 48 = 9.6e-5, constant; EMA 0.9999; 410k steps.

    The published model's first stage is a VQ-regularised f4 autoencoder; ours is KL, so train one with
    `--stage vae --preset kl-f4` on the same images and pass it as --vae-ckpt.
    """
    return LDMConfig(
        data=DataConfig(dataset="", resolution=256, hflip=False),
        latent=LatentConfig(vae_ckpt=str(Path("runs") / "kl-f4" / "checkpoint.pt")),
        unet=UNetConfig(base_channels=224, channel_mult=(1, 2, 3, 4), num_res_blocks=2, attention_resolutions=(32, 16, 8),
                        head_channels=32, dropout=0.0, scale_shift_norm=False, cond="none"),
        diffusion=DiffusionConfig(schedule="scaled_linear", num_timesteps=1000, beta_range=(0.0015, 0.0195),
                                  prediction="eps"),
        train=TrainConfig(steps=410_000, batch_size=48, lr=9.6e-5, warmup_steps=0, weight_decay=0.01, grad_clip=0.0,
                          ema_decay=0.9999, sample_every=10_000, ckpt_every=5000, log_every=100, preview_images=16,
                          preview_steps=200),
    )


PRESETS = {"ldm-demo": ldm_demo, "ldm-celebahq256": ldm_celebahq256}
# The `vae` preset whose latents each latent preset is laid out for.
VAE_PRESET_OF = {"ldm-demo": "vae-demo", "ldm-celebahq256": "kl-f4"}
