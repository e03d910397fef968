"""The pixel-diffusion run config, its presets, and the diffusion and sampling options the latent stage shares.

A `DDPMConfig` is everything needed to rebuild a run: data, network, diffusion process, training
recipe. It is stored in every checkpoint, so `sample.py --ckpt` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from core.config import DataConfig, StageConfig, TrainConfig, check_choice, in_option_words, option, require
from core.errors import FieldError, UserError
from core.runtime import check_training_fits, parameter_count, training_bytes
from data import DatasetInfo
from ddpm.samplers import MIN_TIMESTEPS, SAMPLERS, make_timesteps
from ddpm.schedule import PREDICTIONS, SCHEDULES, Schedule
from ddpm.unet import CONDITIONING_KINDS, UNet, UNetConfig

# T beyond this only costs (the schedule is tabulated per timestep); papers use 1000 to 4000.
MAX_TIMESTEPS = 100_000


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = option("linear", "beta schedule: linear (DDPM), cosine (improved DDPM) or scaled_linear "
                           "(latent diffusion; linear in sqrt(beta))", choices=SCHEDULES)
    num_timesteps: int = option(1000, "T, the number of forward-process steps")
    beta_range: tuple[float, ...] = option((), "beta_1 beta_T of a linear or scaled_linear schedule (empty: the published "
                                               "range, 1e-4 0.02 for linear and 0.00085 0.012 for scaled_linear)")
    prediction: str = option("eps", "what the network predicts: eps (DDPM), x0 or v (Salimans & Ho 2022)",
                             choices=PREDICTIONS)
    cond_drop_prob: float = option(0.1, "chance of training a sample with the null condition, for classifier-free guidance")

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta_range", tuple(self.beta_range))
        # Each check names the fields it is about ({placeholders}): code that builds this config (and a checkpoint)
        # reads them as fields, train.py as the options that set them (core.errors.FieldError). The schedule's own
        # checks (ddpm.schedule.make_betas: a linear schedule needs T > 20, ...) name its arguments, which are these
        # fields, the same way.
        if self.schedule not in SCHEDULES:
            raise FieldError("{schedule} must be one of {choices}, got {value!r}.", choices=", ".join(SCHEDULES),
                             value=self.schedule)
        if self.prediction not in PREDICTIONS:
            raise FieldError("{prediction} must be one of {choices}, got {value!r}.", choices=", ".join(PREDICTIONS),
                             value=self.prediction)
        if not 1 <= self.num_timesteps <= MAX_TIMESTEPS:
            raise FieldError("{num_timesteps} must be from 1 to {most:,} (DDPM: 1000, improved DDPM: 4000), got "
                             "{value}.", most=MAX_TIMESTEPS, value=self.num_timesteps)
        if len(self.beta_range) not in (0, 2):
            raise FieldError("{beta_range} takes two numbers (beta_1 beta_T), or none for the published range, got "
                             "{value}.", value=" ".join(map(str, self.beta_range)))
        if not 0 <= self.cond_drop_prob <= 1:
            raise FieldError("{cond_drop_prob} must be in [0, 1], got {value}.", value=self.cond_drop_prob)
        self.make_schedule()  # refuse an impossible schedule before any work

    def make_schedule(self) -> Schedule:
        return Schedule.from_name(self.schedule, self.num_timesteps, self.beta_range or None)

    def idle_options(self, config: Any) -> dict[str, str]:
        """Condition dropout needs a condition (see `core.config.StageConfig.idle_options`)."""
        if config.unet.cond != "none":
            return {}
        return {"cond_drop_prob": "--cond-drop-prob drops the condition for classifier-free guidance, and this model "
                                  "has none (--cond none); pass --cond class or --cond params, or drop --cond-drop-prob."}


def check_within_timesteps(option: str, steps: int, num_timesteps: int) -> None:
    """Refuse a count of timesteps (of previews, of an evaluation) that the model's T cannot give."""
    require(steps <= num_timesteps, f"{option} {steps} exceeds the model's T = {num_timesteps} timesteps; use at most "
                                    f"{num_timesteps}.")


SPACINGS = ("uniform", "trailing", "quadratic")  # ddpm.samplers.make_timesteps says what each is


@dataclass(frozen=True)
class SamplingConfig:
    sampler: str = option("ddim", "ddpm (ancestral), ddim, pndm (F-PNDM) or spndm (S-PNDM)", choices=tuple(SAMPLERS))
    steps: int = option(50, "number of denoising steps (a subsequence of the T training steps)")
    spacing: str = option("uniform", "timestep spacing: uniform from 0 (floor(i T / S); DDIM's linear where S divides "
                                     "T), trailing (uniform, ending at "
                                     "the last timestep: better few-step samples under the cosine schedule), "
                                     "quadratic (DDIM's for CIFAR-10)", choices=SPACINGS)
    eta: float = option(0.0, "DDIM stochasticity: 0 deterministic, 1 DDPM-like")
    variance: str = option("small", "DDPM ancestral variance: small (posterior beta~) or large (beta)",
                           choices=("small", "large"))
    clip_x0: bool = option(True, "clamp each step's x0 prediction to [-1, 1] (pixel models; latent models are never "
                                 "clipped, their decoded images are clamped)")
    guidance_scale: float = option(1.0, "classifier-free guidance scale, 1 + w in Ho & Salimans 2022 (1: conditional only, "
                                        "0: unconditional, above 1: stronger)")

    def __post_init__(self) -> None:
        # Each check names the fields it is about ({placeholders}): code reads them as fields, sample.py and the
        # tools that draw as it does as the options that set them (core.errors.FieldError).
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("spacing", self.spacing, SPACINGS)
        if self.steps < 1:
            raise FieldError("{steps} must be at least 1, got {value}.", value=self.steps)
        if not 0 <= self.eta <= 1:
            raise FieldError("{eta} must be in [0, 1], got {value}.", value=self.eta)
        if not math.isfinite(self.guidance_scale):
            raise FieldError("{guidance_scale} must be a finite number, got {value}.", value=self.guidance_scale)
        minimum = MIN_TIMESTEPS.get(self.sampler, 1)
        if self.steps < minimum:
            raise FieldError("{sampler} {name} needs at least {minimum} steps, got {value}.", name=self.sampler,
                             minimum=minimum, value=self.steps)

    def check_against(self, schedule: Schedule) -> None:
        """Refuse more steps than the model has timesteps (a `FieldError`: a command words it with
        `core.config.in_options`); warn of a first step so low that the samples stay noise."""
        T = schedule.num_timesteps
        if self.steps > T:
            raise FieldError("{steps} must be at most the model's T = {T}, got {value}.", T=T, value=self.steps)
        first = int(make_timesteps(T, self.steps, self.spacing).max())
        if first < T // 2:  # e.g. one step of uniform spacing: t = 0, where x_T is taken for a clean image
            warnings.warn(f"--steps {self.steps} with --spacing {self.spacing} starts at t = {first} of T = {T}, so the "
                          f"first step takes pure noise for an image that little noised and the samples stay noise; "
                          f"use --spacing trailing (which starts at t = {T - 1}), or more steps.", stacklevel=2)


@dataclass(frozen=True)
class DDPMOptions:
    pretrained: str = option("", "start from published weights: a diffusers UNet2DModel folder or its weights file "
                                 "(Ho et al.'s google/ddpm-cifar10-32, with --preset ddpm-cifar10), its config.json "
                                 "checked against the U-Net's options; with --steps 0 the run just imports them")


@dataclass(frozen=True)
class DDPMConfig(StageConfig):
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ddpm: DDPMOptions = field(default_factory=DDPMOptions)


# DataConfig fields a diffusion stage never reads: it evaluates no held-out images.
NO_HELD_OUT_SET = frozenset({"test_dataset", "test_samples"})
# Network fields a user sets; the rest (image size, channels, class and parameter counts) follow
# from the data and --cond.
UNET_OPTIONS = {
    "base_channels": "channels at the first resolution",
    "channel_mult": "channel multiplier per resolution level, e.g. 1 2 2 2 (DDPM CIFAR-10)",
    "num_res_blocks": "residual blocks per level",
    "attention_resolutions": "feature-map sizes with self-attention, e.g. 16",
    "num_heads": "attention heads",
    "head_channels": "width of each attention head, instead of a fixed head count (0: use --num-heads)",
    "dropout": "dropout in residual blocks",
    "scale_shift_norm": "condition res blocks by scale and shift (improved DDPM) instead of adding (DDPM)",
    "cond": "what conditions the model: none | class (dataset labels) | params (dataset's numeric parameters)",
}
UNET_FROM_DATA = frozenset(f.name for f in dataclasses.fields(UNetConfig)) - set(UNET_OPTIONS)


def check_conditioning(cond: str, name: str, classes: int, has_params: bool) -> None:
    """Refuse conditioning on labels the dataset `name` lacks (`data.label_counts` tells before loading)."""
    check_choice("cond", cond, CONDITIONING_KINDS)
    if cond == "class" and not classes:
        raise UserError(f"--cond class needs a labelled dataset, and {name} has no classes; use class subfolders or --cond none.")
    if cond == "params" and not has_params:
        raise UserError(f"--cond params needs per-image parameters, and {name} has none; add a params.csv or use --cond none.")


def resolve_unet(unet: UNetConfig, info: DatasetInfo, image_size: int, channels: int) -> UNetConfig:
    """`unet` with the fields the data decides: the size and channels of what it denoises (pixels or
    latents) and the number of classes or parameters its conditioning slot takes."""
    check_conditioning(unet.cond, info.name, len(info.class_names), bool(info.param_names))
    unet = dataclasses.replace(unet, image_size=image_size, in_channels=channels,
                               num_classes=len(info.class_names) if unet.cond == "class" else 0,
                               num_params=len(info.param_names) if unet.cond == "params" else 0)
    unet.check_resolved()
    return unet


def check_unet_fits(unet: UNetConfig, size: int, channels: int, what: str, device: torch.device) -> None:
    """Refuse, before any data is loaded, a U-Net that cannot denoise `channels` x `size` x `size` inputs (`what`
    names those in the sentence): sizes its levels cannot halve, attention at sizes that never occur (options no
    network takes at any size, `UNetConfig` refused when it was built). A forward pass on the meta device (shapes
    only: no memory, no arithmetic, milliseconds) then catches whatever else would fail at the first step."""
    # One class or parameter stands in for the data's: their counts change only the conditioning slot's input.
    resolved = dataclasses.replace(unet, image_size=size, in_channels=channels,
                                   num_classes=int(unet.cond == "class"), num_params=int(unet.cond == "params"))
    try:
        resolved.check_resolved()
        with torch.device("meta"):
            net = UNet(resolved)
            net(torch.empty(1, channels, size, size), torch.zeros(1, dtype=torch.long))
    except Exception as err:  # whatever a network of these options raises at this size
        told = " ".join(in_option_words(err, UNetConfig, UNET_FROM_DATA).split())
        raise UserError(f"{what} do not fit the U-Net: {told or type(err).__name__}") from None
    count = parameter_count(net)
    check_training_fits(training_bytes(count, averaged=True), device, f"The U-Net's {count:,} parameters",
                        "give a smaller --base-channels, fewer --channel-mult levels or fewer --num-res-blocks")


def ddpm_demo() -> DDPMConfig:
    """Small enough to train on 2 CPU cores in minutes (docs/presets.md): 32x32 plumes, a 0.9M-parameter U-Net.

    v-prediction rather than eps: a briefly trained eps model gets the noise's mean colour slightly
    wrong, and at high noise x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) multiplies that error by up
    to 1/sqrt(abar) (about 30 at the first DDIM step), which shows as colour casts; v reads x0 off
    without that division.
    """
    return DDPMConfig(
        data=DataConfig(dataset="plumes", resolution=32, hflip=False),
        unet=UNetConfig(image_size=32, base_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1,
                        attention_resolutions=(8,), num_heads=1, dropout=0.0, scale_shift_norm=True),
        diffusion=DiffusionConfig(schedule="cosine", num_timesteps=1000, prediction="v"),
        train=TrainConfig(steps=1800, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.995,
                          sample_every=600, ckpt_every=300, preview_images=36, preview_steps=50),
    )


def ddpm_cifar10() -> DDPMConfig:
    """Ho et al. 2020, CIFAR-10: 35.7M parameters, T = 1000 linear, Adam 2e-4 with 5000 warm-up steps,
    batch 128, EMA 0.9999, gradient clip 1, dropout 0.1, random flips, 800k steps."""
    return DDPMConfig(
        data=DataConfig(dataset="cifar10", resolution=32, hflip=True),
        unet=UNetConfig.ddpm_cifar10(),
        diffusion=DiffusionConfig(schedule="linear", num_timesteps=1000, prediction="eps", cond_drop_prob=0.1),
        train=TrainConfig(steps=800_000, batch_size=128, lr=2e-4, warmup_steps=5000, weight_decay=0.0,
                          grad_clip=1.0, ema_decay=0.9999, sample_every=10_000, ckpt_every=5000,
                          preview_images=64, preview_steps=100),
    )


PRESETS = {"ddpm-demo": ddpm_demo, "ddpm-cifar10": ddpm_cifar10}
