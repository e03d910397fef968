"""Latent diffusion as a stage (Rombach et al. 2022): the pixel stage's U-Net, schedule, objective and
samplers, trained on the scaled latents of a frozen KL autoencoder and decoded to images.

The autoencoder is read from a `vae` checkpoint when a run starts, and a copy of its sampling
weights goes into every checkpoint of the run, with the latent scale factor the run measured on its
own latent cache (latent diffusion's `scale_by_std`), so one file is enough to resume or to sample,
even once the VAE checkpoint is moved or deleted. A resume refuses a different autoencoder at
--vae-ckpt, whose latents would not be the ones the run trains on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.checkpoint import load_checkpoint, not_a_checkpoint_file, peek_checkpoint, require_keys, state_fingerprint
from core.config import TrainConfig, from_dict
from core.contract import Prerequisite, StageSpec, TrainingStage, sections_of
from core.errors import MissingFileError, UserError
from core.runtime import Runtime
from data import DatasetInfo, grey_as_rgb, load_dataset
from data.augment import random_view
from ddpm.config import NO_HELD_OUT_SET, UNET_FROM_DATA, UNET_OPTIONS, check_unet_fits, resolve_unet
from ddpm.generate import DiffusionSampler
from ddpm.source import source_loader
from ddpm.stage import check_diffusion_options, diffusion_stage, load_unet
from ddpm.unet import UNet
from ldm.config import DEFAULT_VAE_CKPT, DEFAULT_VAE_PRESET, DEFAULT_VAE_RUN, PRESETS, LDMConfig
from ldm.latents import latent_dataset, scaled_x0
from vae.autoencoder import AutoencoderConfig, AutoencoderKL
from vae.config import PRESETS as VAE_PRESETS, VAEConfig
from vae.stage import SPEC as VAE, latent_scale_factor, load_autoencoder

NAME = "ldm"


def vae_record(payload: dict[str, Any], source: str | Path, fingerprint: str, scale: float) -> dict[str, Any]:
    """What an LDM checkpoint keeps of its autoencoder, in the layout `load_autoencoder` reads: a VAE
    checkpoint's config and sampling weights (both weight entries share one set of tensors), with
    `scale_factor` the scale this latent model trains and samples with, and `autoencoder_scale_factor`
    the one the VAE run measured on its own data, kept for comparison."""
    weights = payload["ema"]["model"]
    measured_by_vae = float(payload.get("autoencoder_scale_factor", payload["scale_factor"]))
    return {"stage": "vae", "config": payload["config"], "data_info": payload.get("data_info"),
            "models": {"model": weights}, "ema": {"model": weights}, "scale_factor": float(scale),
            "autoencoder_scale_factor": measured_by_vae, "fingerprint": fingerprint, "source": str(source)}


def _read_vae(path: str) -> dict[str, Any]:
    payload = load_checkpoint(path, option="--vae-ckpt")
    if payload.get("stage") != "vae":
        raise UserError(f"--vae-ckpt {path} is a checkpoint of stage '{payload.get('stage')}', not an autoencoder; "
                        f"pass the checkpoint.pt of a `train.py --stage vae` run.")
    return payload


def latent_size(autoencoder: AutoencoderConfig, resolution: int) -> int:
    """The side of the latents of `resolution`-pixel images, or one sentence on why there are none."""
    f = autoencoder.downsampling_factor
    if resolution % f:
        raise UserError(f"--resolution {resolution} is not divisible by the autoencoder's downsampling factor {f}; "
                        f"pick a multiple of {f}.")
    return resolution // f


def latent_description(autoencoder: AutoencoderConfig, size: int) -> str:
    return f"The autoencoder's latents ({autoencoder.latent_channels}x{size}x{size})"


def fit_unet_to_latents(config: LDMConfig, info: DatasetInfo, autoencoder: AutoencoderKL) -> LDMConfig:
    """The U-Net config for this autoencoder's latents of this data, or one sentence on why they do not fit."""
    ae = autoencoder.config
    if ae.in_channels != info.channels:  # (grey data for an RGB autoencoder was made RGB by `build`)
        raise UserError(f"The autoencoder encodes {ae.in_channels}-channel images but {info.name} has {info.channels} "
                        f"channels; use an autoencoder trained on this kind of image.")
    size = latent_size(ae, info.resolution)
    try:
        unet = resolve_unet(config.unet, info, size, ae.latent_channels)
    except ValueError as err:
        raise UserError(f"{latent_description(ae, size)} do not fit the U-Net: {err}") from None
    return dataclasses.replace(config, unet=unet)


def build(config: LDMConfig, runtime: Runtime, resume_from: dict | None, run_dir: Path | None = None
          ) -> tuple[LDMConfig, TrainingStage]:
    data, device = config.data, runtime.device
    # A resumed run keeps the autoencoder it started with, whatever became of the VAE run since.
    vae_payload = resume_from["vae"] if resume_from is not None else _read_vae(config.latent.vae_ckpt)
    source = vae_payload.get("source", config.latent.vae_ckpt)
    autoencoder, recorded_scale, fingerprint = load_autoencoder(vae_payload, device, source)

    dataset = load_dataset(data.dataset, data.resolution, cache_dir=data.cache_dir, num_samples=data.num_samples or None)
    dataset = grey_as_rgb(dataset, autoencoder.config.in_channels, "the autoencoder", runtime.is_main)
    info = dataset.info
    config = fit_unet_to_latents(config, info, autoencoder)
    latents = latent_dataset(autoencoder, fingerprint, dataset, hflip=data.hflip, cache_dir=data.cache_dir,
                             batch=config.latent.encode_batch, runtime=runtime)
    # Latent diffusion's scale_by_std, on the latents this run trains on. A resumed run keeps the scale it
    # started with (runs from before the measurement moved here trained with the autoencoder run's own).
    scale = recorded_scale if resume_from is not None else latent_scale_factor(latents.moments)
    record = vae_record(vae_payload, source, fingerprint, scale)
    if runtime.is_main:
        # A resumed run reads the copy in its checkpoint, wherever (or whether) the VAE run's file still is.
        origin = f"the copy in this run's checkpoint (first read from {source})" if resume_from is not None else source
        print(f"Latents: {len(latents)} x {config.unet.in_channels}x{config.unet.image_size}x{config.unet.image_size}, "
              f"scale factor {scale:.4f} (the autoencoder run measured {record['autoencoder_scale_factor']:.4f} on "
              f"its data), autoencoder {fingerprint} from {origin}.", flush=True)
        trained_on = vae_payload.get("data_info") or {}
        if (trained_on.get("name"), trained_on.get("resolution")) != (info.name, info.resolution):
            print(f"Note: the autoencoder was trained on {trained_on.get('name')} at {trained_on.get('resolution')} px, "
                  f"this run uses {info.name} at {info.resolution} px.", flush=True)
    torch.manual_seed(config.train.seed)  # the initial weights
    net = UNet(config.unet)
    stage = diffusion_stage(NAME, config, info, net, latents, device, data_info=dataset.description(),
                            x0=scaled_x0(scale),
                            decode=lambda z: autoencoder.decode(z / scale),
                            augment=random_view if data.hflip else None,
                            payload=lambda models: {"vae": record})
    return config, stage


def load_sampler(payload: dict[str, Any], device: torch.device, weights: str, path: Path) -> DiffusionSampler:
    """A latent model from its checkpoint alone: its U-Net, and the autoencoder it carries."""
    require_keys(payload, ("config", "vae"), path)
    config = from_dict(LDMConfig, payload["config"], source=path)
    net = load_unet(payload, config.unet, device, weights, path)
    autoencoder, scale, _ = load_autoencoder(payload["vae"], device, path)

    @torch.no_grad()
    def decode(z: Tensor) -> Tensor:
        return autoencoder.decode(z.float() / scale)

    return DiffusionSampler(net, config.diffusion.make_schedule().to(device), config.diffusion.prediction,
                            DatasetInfo.from_dict(payload["data_info"]), decode)


def prerequisite(config: LDMConfig, device: str) -> Prerequisite | None:
    """The default autoencoder run, trained (or finished) on this run's data when it has no final checkpoint."""
    if Path(config.latent.vae_ckpt) != Path(DEFAULT_VAE_CKPT):
        return None  # a VAE the user named must exist; build() says so if it does not
    ckpt = DEFAULT_VAE_RUN / "checkpoint.pt"
    data = config.data
    common = ("--stage", "vae", "--run-dir", str(DEFAULT_VAE_RUN), "--device", device)
    if not ckpt.exists():
        same_data = ("--dataset", data.dataset, "--resolution", str(data.resolution), "--num-samples",
                     str(data.num_samples), "--cache-dir", data.cache_dir, "--num-workers", str(data.num_workers))
        return Prerequisite(VAE, common + ("--preset", DEFAULT_VAE_PRESET) + same_data,
                            f"The default autoencoder ({ckpt}) has no checkpoint yet: training it first "
                            f"(train.py --stage vae --preset {DEFAULT_VAE_PRESET}).")
    payload = load_checkpoint(ckpt, "vae")
    steps = from_dict(TrainConfig, payload["config"]["train"]).steps
    if payload["step"] < steps:
        return Prerequisite(VAE, common + ("--resume",),
                            f"The default autoencoder ({ckpt}) stopped at step {payload['step']} of {steps}: "
                            f"finishing it first.")
    return None


def check_carried_autoencoder(path: str | Path, carried: dict[str, Any]) -> None:
    """A resumed run encodes with the autoencoder its checkpoint carries (`carried`), so the file it was read
    from may since have been moved or deleted; a different autoencoder at that path is refused, since its
    latents are not the ones the run trains on, and the user may think the run now uses it."""
    path = Path(path)
    if not path.is_file():
        return
    payload = _read_vae(str(path))
    require_keys(payload, ("ema",), path, option="--vae-ckpt")
    now, was = state_fingerprint(payload["ema"].get("model") or {}), state_fingerprint(carried["ema"]["model"])
    if now != was:
        raise UserError(f"--vae-ckpt {path} holds another autoencoder (weights {now}) than the one this run trains "
                        f"on ({was}, which its checkpoint carries); restore that file, move it away to resume with "
                        f"the copy the checkpoint carries, or start a new --run-dir.")


def autoencoder_config(config: LDMConfig) -> AutoencoderConfig:
    """The layout of the autoencoder a new run will encode with, before any weights are loaded: the one in
    --vae-ckpt, or the default preset's when the default run is still to be trained (`prerequisite`)."""
    path = Path(config.latent.vae_ckpt)
    if path.is_file():
        payload = peek_checkpoint(path)  # only the config is needed here: the weights are read once, by build
        if payload is None or payload.get("stage") != "vae" or not isinstance(payload.get("config"), dict):
            payload = _read_vae(str(path))  # says in one sentence what is wrong with the file
        require_keys(payload, ("config",), path, option="--vae-ckpt")
        return from_dict(VAEConfig, payload["config"]).autoencoder
    if path == Path(DEFAULT_VAE_CKPT):
        return VAE_PRESETS[DEFAULT_VAE_PRESET]().autoencoder
    raise MissingFileError(f"--vae-ckpt {path} {not_a_checkpoint_file(path, 'a `train.py --stage vae` run')}.")


def check(config: LDMConfig, resume_from: dict | None, device: torch.device, run_dir: Path | None = None) -> None:
    """Before any data is loaded: the diffusion options, the autoencoder, and the U-Net at the size of its
    latents. A resumed run needs no file at --vae-ckpt: its checkpoint carries the autoencoder, and its U-Net
    was fitted to those latents when it started."""
    check_diffusion_options(config)
    if resume_from is not None:
        check_carried_autoencoder(config.latent.vae_ckpt, resume_from["vae"])
        return
    autoencoder = autoencoder_config(config)
    size = latent_size(autoencoder, config.data.resolution)
    check_unet_fits(config.unet, size, autoencoder.latent_channels, latent_description(autoencoder, size), device)


SPEC = StageSpec(
    name=NAME,
    summary="latent diffusion: a DDPM U-Net on the latents of a trained KL autoencoder",
    config_class=LDMConfig,
    presets=PRESETS,
    sections=sections_of(LDMConfig, data=dict(skip=NO_HELD_OUT_SET), unet=dict(skip=UNET_FROM_DATA, help=UNET_OPTIONS)),
    build=build,
    load_source=source_loader(load_sampler),
    prerequisite=prerequisite,
    check=check,
)
