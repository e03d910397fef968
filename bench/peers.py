"""The networks a user would pick instead of ours, built at our configurations: diffusers' `UNet2DModel`,
`AutoencoderKL` and `DDIMScheduler`, torchvision's ResNet-18 (pytorch-fid's Inception is built by
bench/bench_fid.py).

Peers are optional benchmark extras (bench/requirements.txt), never project dependencies: each is
imported inside the function that needs it, and `missing(module)` says, for a row, that it is absent.
Every diffusers mapping is checked by parameter count against our network before it is timed, so a
ratio always compares networks of the same size and layout. `UNet2DModel` and `AutoencoderKL` are also
given our networks' weights through `ddpm.published` and `vae.published`, which import diffusers'
files: where the two agree on GroupNorm's groups (128 channels and more, as in DDPM's CIFAR-10 model
and kl-f8) they then compute our functions, which tests/test_bench.py checks.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from ddpm.schedule import Schedule
from ddpm.published import to_diffusers, unet2d_config
from ddpm.unet import UNetConfig, num_groups
from vae.autoencoder import AutoencoderConfig
from vae.published import DIFFUSERS, to_published


def missing(module: str) -> str:
    """"" when `module` can be imported, else what a row prints in place of the peer's name."""
    if importlib.util.find_spec(module) is not None:
        return ""
    return f"{module} not installed (pip install -r bench/requirements.txt)"


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def check_same_size(ours: nn.Module, peer: nn.Module, what: str) -> None:
    """Refuse a peer mapping that is not the same network: the ratio would compare different models."""
    a, b = parameter_count(ours), parameter_count(peer)
    if a != b:
        raise AssertionError(f"{what}: diffusers has {b:,} parameters and ours {a:,}; the mapping is wrong.")


def autoencoder_kl_kwargs(config: AutoencoderConfig) -> dict:
    """`diffusers.AutoencoderKL` arguments for the same autoencoder as `AutoencoderKL(config)` (kl-f8: Stable
    Diffusion's, 83,653,863 parameters). Its up_block_types run in the decoder's order, lowest resolution first."""
    widths = tuple(config.base_channels * m for m in config.channel_mult)
    attention = [config.attention_at(level) for level in range(len(widths))]
    return dict(
        in_channels=config.in_channels, out_channels=config.in_channels, block_out_channels=widths,
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention),
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attention)),
        layers_per_block=config.num_res_blocks, latent_channels=config.latent_channels,
        norm_num_groups=num_groups(min(widths)), sample_size=config.resolution,
    )


def diffusers_unet(config: UNetConfig, ours: nn.Module) -> nn.Module:
    """UNet2DModel at `config` with `ours`'s weights, checked against it by parameter count."""
    from diffusers import UNet2DModel
    peer = UNet2DModel(**unet2d_config(config))
    check_same_size(ours, peer, "UNet2DModel")
    peer.load_state_dict(to_diffusers(ours.state_dict(), config))
    return peer


def diffusers_autoencoder(config: AutoencoderConfig, ours: nn.Module) -> nn.Module:
    """diffusers' AutoencoderKL at `config` with `ours`'s weights, checked against it by parameter count."""
    from diffusers import AutoencoderKL
    peer = AutoencoderKL(**autoencoder_kl_kwargs(config))
    check_same_size(ours, peer, "AutoencoderKL")
    peer.load_state_dict(to_published(ours.state_dict(), config, DIFFUSERS))
    return peer


def diffusers_ddim(schedule: Schedule, prediction: str):
    """diffusers' DDIMScheduler on our schedule's betas, stepping as our DDIM does: uniform ("leading")
    timesteps, a final jump to abar = 1, x0 clipped to [-1, 1] (and eps re-derived from the clipped x0 when
    `step` is given use_clipped_model_output=True)."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.cpu().numpy(),
                         clip_sample=True, set_alpha_to_one=True, timestep_spacing="leading",
                         prediction_type={"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[prediction])


def torchvision_resnet18_cifar(num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool), built by hand as a user would."""
    from torchvision.models import resnet18
    net = resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net
