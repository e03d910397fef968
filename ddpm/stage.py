"""Pixel-space DDPM as a stage: the U-Net trained with the DDPM objective on images, previews drawn
with DDIM, and the loader that turns a checkpoint into a `DiffusionSampler`.

The latent stage (`ldm/`) reuses `diffusion_stage` and `load_unet`: only what x0 is (pixels or VAE
latents) and how samples become images differ.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from core.checkpoint import load_weights, require_keys
from core.config import from_dict, to_dict
from core.contract import MAIN, Outputs, StageSpec, Trainable, TrainingStage, sections_of
from core.errors import MissingFileError
from core.runtime import Runtime
from data import DatasetInfo, grey_as_rgb, label_counts, load_dataset
from data.augment import random_hflip
from ddpm.conditioning import batch_condition, preview_condition
from ddpm.config import (NO_HELD_OUT_SET, PRESETS, UNET_FROM_DATA, UNET_OPTIONS, DDPMConfig, SamplingConfig,
                         check_conditioning, check_unet_fits, check_within_timesteps, resolve_unet)
from ddpm.generate import DiffusionSampler, image_seed, sample_images
from ddpm.objective import diffusion_loss
from ddpm.published import check_published_schedule, load_published_unet, read_published_unet
from ddpm.source import source_loader
from ddpm.unet import UNet, UNetConfig

NAME = "ddpm"


def diffusion_stage(name: str, config: Any, info: DatasetInfo, net: UNet, dataset: torch.utils.data.Dataset,
                    device: torch.device, *, data_info: dict[str, Any], x0: Callable[[Any, torch.Generator], Tensor],
                    decode: Callable[[Tensor], Tensor] | None = None, augment=None,
                    payload=None) -> TrainingStage:
    """The training stage of a diffusion model with U-Net `net` on `dataset`.

    `config` has `diffusion` and `train` sections; `info` describes the images (classes, parameter
    ranges) and `data_info` is what checkpoints record of them; `x0(batch, generator)` is the clean
    sample a batch trains on (the images, or a draw of their VAE latents); `decode` turns samples into
    images for previews (None: they are images).
    """
    diffusion, train = config.diffusion, config.train
    schedule = diffusion.make_schedule().to(device)

    def loss(models, batch, generator, step):
        cond = batch_condition(net.config.cond, info, batch)
        losses = diffusion_loss(models[MAIN], schedule, x0(batch, generator), generator,
                                prediction=diffusion.prediction, cond=cond, cond_drop_prob=diffusion.cond_drop_prob)
        return losses.mean(), {}

    preview_sampling = SamplingConfig(sampler="ddim", steps=train.preview_steps)

    def preview(models) -> Tensor:
        n = train.preview_images
        model = DiffusionSampler(models[MAIN], schedule, diffusion.prediction, info, decode)
        return sample_images(model, preview_sampling, [image_seed(train.seed, k) for k in range(n)],
                             cond=preview_condition(net.config, n, device))

    return TrainingStage(name=name, trainables={MAIN: Trainable(net, lr=train.lr, weight_decay=train.weight_decay,
                                                                ema=True)},
                         loss=loss, dataset=dataset, config=to_dict(config), data_info=data_info,
                         augment=augment, outputs=Outputs(preview=preview, payload=payload))


def check_diffusion_options(config: Any) -> None:
    """Options of a diffusion run that must agree with each other (pixel and latent stages alike)."""
    check_within_timesteps("--preview-steps", config.train.preview_steps, config.diffusion.num_timesteps)
    check_conditioning(config.unet.cond, config.data.dataset, *label_counts(config.data.dataset))


def check(config: DDPMConfig, resume_from: dict | None, device: torch.device, run_dir: Path | None = None) -> None:
    """Before any data is loaded: the diffusion options, and the U-Net at the image size. The data decides
    the channel count later, which changes only the U-Net's first and last convolutions."""
    check_diffusion_options(config)
    size = config.data.resolution
    check_unet_fits(config.unet, size, 3, f"{size}x{size} images (--resolution {size})", device)
    if config.ddpm.pretrained and resume_from is None:  # a resumed run starts from its checkpoint
        if not Path(config.ddpm.pretrained).expanduser().exists():
            raise MissingFileError(f"--pretrained {config.ddpm.pretrained} does not exist; pass the path of the "
                                   f"published weights file or folder.")
        published_names(config)
        check_published_schedule(config.ddpm.pretrained, config.diffusion)


def published_names(config: DDPMConfig) -> dict[str, Tensor]:
    """The tensors of --pretrained, checked by their names only: the data decides the channels and classes,
    hence some shapes, later. (Memory-mapped: almost nothing of the file is read.)"""
    unet = dataclasses.replace(config.unet, image_size=config.data.resolution, in_channels=3,
                               num_classes=int(config.unet.cond == "class"))
    return read_published_unet(config.ddpm.pretrained, unet, mmap=True, names_only=True)


def build(config: DDPMConfig, runtime: Runtime, resume_from: dict | None, run_dir: Path | None = None
          ) -> tuple[DDPMConfig, TrainingStage]:
    """Load the data, fit the U-Net to it, and assemble the stage."""
    data = config.data
    dataset = load_dataset(data.dataset, data.resolution, cache_dir=data.cache_dir, num_samples=data.num_samples or None)
    if resume_from is not None:  # the channels it started with (RGB where it started from published weights)
        dataset = grey_as_rgb(dataset, config.unet.in_channels, "this run's U-Net", runtime.is_main)
    elif config.ddpm.pretrained:
        channels = published_names(config)["conv_in.weight"].shape[1]
        dataset = grey_as_rgb(dataset, channels, "the published U-Net", runtime.is_main)
    info = dataset.info
    config = dataclasses.replace(config, unet=resolve_unet(config.unet, info, info.resolution, info.channels))
    torch.manual_seed(config.train.seed)  # the initial weights
    net = UNet(config.unet)
    if config.ddpm.pretrained and resume_from is None:
        load_published_unet(net, config.ddpm.pretrained)
        if runtime.is_main:
            print(f"Starting from the published weights {config.ddpm.pretrained}.", flush=True)
    stage = diffusion_stage(NAME, config, info, net, dataset, runtime.device, data_info=dataset.description(),
                            x0=lambda batch, generator: batch.image, augment=random_hflip if data.hflip else None)
    return config, stage


def load_unet(payload: dict[str, Any], unet: UNetConfig, device: torch.device, weights: str, path: Path) -> UNet:
    """The U-Net of a diffusion checkpoint with its "ema" or raw "model" weights, frozen, in eval mode."""
    require_keys(payload, ("models", "ema", "data_info"), path)
    net = load_weights(UNet(unet), payload["ema" if weights == "ema" else "models"].get("model"), path,
                       f"U-Net ({weights})")
    return net.to(device).eval().requires_grad_(False)


def load_sampler(payload: dict[str, Any], device: torch.device, weights: str, path: Path) -> DiffusionSampler:
    """Rebuild a trained pixel-diffusion model from its checkpoint alone ("ema" or raw "model" weights)."""
    require_keys(payload, ("config",), path)
    config = from_dict(DDPMConfig, payload["config"], source=path)
    net = load_unet(payload, config.unet, device, weights, path)
    return DiffusionSampler(net, config.diffusion.make_schedule().to(device), config.diffusion.prediction,
                            DatasetInfo.from_dict(payload["data_info"]))


SPEC = StageSpec(
    name=NAME,
    summary="pixel-space denoising diffusion (DDPM U-Net on images)",
    config_class=DDPMConfig,
    presets=PRESETS,
    sections=sections_of(DDPMConfig, data=dict(skip=NO_HELD_OUT_SET), unet=dict(skip=UNET_FROM_DATA, help=UNET_OPTIONS)),
    build=build,
    load_source=source_loader(load_sampler),
    check=check,
)
