"""Pixel-space DDPM as a training stage: the U-Net, the simple loss, and preview grids."""

from __future__ import annotations

import os

import torch

from data import DatasetInfo
from ddpm.config import DDPMConfig, SamplingConfig
from ddpm.generate import image_seed, sample_images
from ddpm.schedule import Schedule
from ddpm.unet import UNet
from training.checkpoint import load_checkpoint
from training.config import from_dict, to_dict
from training.loop import Batch, Stage

STAGE = "ddpm"


def condition_of(net: UNet, info: DatasetInfo, labels: torch.Tensor, params: torch.Tensor) -> torch.Tensor | None:
    """What feeds the U-Net's conditioning slot for a batch: labels, normalised parameters, or nothing."""
    kind = net.config.cond
    if kind == "class":
        return labels
    if kind == "params":
        return info.normalize_params(params)
    return None


def preview_condition(net: UNet, n: int, device: torch.device) -> torch.Tensor | None:
    """Conditions for a preview grid: classes in turn, or parameters swept evenly across [-1, 1]."""
    cfg = net.config
    if cfg.cond == "class":
        return torch.arange(n, device=device) % cfg.num_classes
    if cfg.cond == "params":
        sweep = torch.linspace(-1, 1, n, device=device)
        return torch.stack([sweep.roll(3 * k) for k in range(cfg.num_params)], dim=1)
    return None


def make_stage(config: DDPMConfig, info: DatasetInfo, device: torch.device) -> Stage:
    """Build the DDPM stage for `config` (already resolved against the dataset by `resolve_unet`)."""
    diffusion, data = config.diffusion, config.data
    torch.manual_seed(config.train.seed)  # the initial weights
    net = UNet(config.unet)
    schedule = diffusion.make_schedule().to(device)

    def loss(model: torch.nn.Module, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        x0, labels, params = batch
        b = x0.shape[0]
        if data.hflip:
            flip = torch.rand(b, generator=gen, device=x0.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        t = torch.randint(0, schedule.num_timesteps, (b,), generator=gen, device=x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        cond = condition_of(net, info, labels, params)
        null_mask = None
        if cond is not None:
            null_mask = torch.rand(b, generator=gen, device=x0.device) < diffusion.cond_drop_prob
        losses = schedule.training_losses(lambda x_t, tt: model(x_t, tt, cond, null_mask=null_mask),
                                          x0, t, noise, diffusion.prediction)
        return losses.mean()

    preview_sampling = SamplingConfig(sampler="ddim", steps=config.train.preview_steps)

    def preview(ema: torch.nn.Module) -> torch.Tensor:
        n = config.train.preview_images
        cond = preview_condition(ema, n, device)
        return sample_images(ema, schedule, diffusion.prediction, preview_sampling, [image_seed(config.train.seed, k) for k in range(n)], cond=cond)

    return Stage(name=STAGE, model=net, loss=loss, preview=preview, config=to_dict(config), data_info=info.to_dict())


def load_trained(path: str | os.PathLike, device: torch.device, weights: str = "ema") -> tuple[UNet, Schedule, DDPMConfig, DatasetInfo]:
    """Rebuild a trained pixel-diffusion model from its checkpoint alone ("ema" or raw "model" weights)."""
    payload = load_checkpoint(path, STAGE, map_location="cpu")
    config = from_dict(DDPMConfig, payload["config"])
    net = UNet(config.unet)
    net.load_state_dict(payload[weights])
    net.to(device).eval().requires_grad_(False)
    schedule = config.diffusion.make_schedule().to(device)
    return net, schedule, config, DatasetInfo.from_dict(payload["data_info"])
