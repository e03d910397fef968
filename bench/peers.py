"""The networks a user would pick instead of ours, built at our configurations: diffusers' `UNet2DModel`,
`AutoencoderKL` and `DDIMScheduler`, torchvision's ResNet-18 (pytorch-fid's Inception is built by
bench/bench_fid.py).

Peers are optional benchmark extras (bench/requirements.txt), never project dependencies: each is
imported inside the function that needs it, and `missing(module)` says, for a row, that it is absent.
Every diffusers mapping is checked by parameter count against our network before it is timed, so a
ratio always compares networks of the same size and layout. `UNet2DModel` and `AutoencoderKL` are also
given our networks' weights (`unet2d_state`; the autoencoder's through `vae.published`, which also
imports diffusers' files): where the two agree on GroupNorm's groups (128 channels and more, as in
DDPM's CIFAR-10 model and kl-f8) they then compute our functions, which tests/test_bench.py checks.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from core.errors import UserError
from ddpm.schedule import Schedule
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


def unet2d_kwargs(config: UNetConfig) -> dict:
    """`diffusers.UNet2DModel` arguments for the same U-Net as `UNet(config)` (same parameter count).

    Two differences remain that cost no parameters: diffusers uses one GroupNorm group count for every
    width, where ours takes min(32, C // 4) per width (`ddpm.unet.num_groups`; equal from 128 channels
    on, so exact for DDPM's CIFAR-10 model), and one attention head width, where ours may fix the head
    count instead. A class-conditional model gets num_classes + 1 embeddings: the extra one is the null
    class that classifier-free guidance needs, the counterpart of our `null_embedding`.
    """
    if config.cond == "params":
        raise UserError("UNet2DModel has no parameter-vector conditioning; map a cond='none' or 'class' config.")
    if not config.resample_with_conv:
        raise UserError("UNet2DModel has no average-pool downsampling; map a resample_with_conv=True config.")
    widths = tuple(config.base_channels * m for m in config.channel_mult)
    sizes = [config.image_size // 2**level for level in range(len(widths))]
    attention = [size in config.attention_resolutions for size in sizes]
    attention_widths = [w for w, a in zip(widths, attention) if a] + [widths[-1]]  # the middle block has attention
    if config.head_channels:
        head_dim = config.head_channels
    elif config.num_heads == 1:
        head_dim = None  # diffusers: one head as wide as the block
    else:
        head_dim = attention_widths[0] // config.num_heads
    kwargs = dict(
        sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.in_channels,
        block_out_channels=widths, layers_per_block=config.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        downsample_type="conv", upsample_type="conv", dropout=config.dropout,
        # DDPM's sinusoids (sin first, frequencies 10000^(-i / (half - 1))) and its stride-2 convolution
        # padded on the bottom and right only (TF's "SAME"), as ours.
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
        attention_head_dim=head_dim, norm_num_groups=num_groups(min(widths)), norm_eps=1e-6,
        # diffusers drops the middle attention's GroupNorm under scale_shift unless given its groups; ours has one.
        attn_norm_num_groups=num_groups(min(widths)),
        resnet_time_scale_shift="scale_shift" if config.scale_shift_norm else "default",
    )
    if config.cond == "class":
        kwargs.update(class_embed_type=None, num_class_embeds=config.num_classes + 1)
    return kwargs


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


def _diffusers_layer_names(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One tensor of a residual or attention block under diffusers' layer names: our 1x1 shortcut is its
    conv_shortcut, the time projection time_emb_proj, an attention's norm group_norm, its fused q|k|v 1x1
    convolution three linear layers to_q, to_k, to_v, and its output projection the linear to_out.0."""
    name = (name.replace(".emb_proj.", ".time_emb_proj.").replace(".skip.", ".conv_shortcut.")
            .replace(".norm.", ".group_norm.").replace(".proj_out.", ".to_out.0."))
    if ".qkv." in name:
        return {name.replace("qkv", part): chunk.flatten(1) if chunk.ndim == 4 else chunk
                for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3))}
    return {name: value.flatten(1) if ".to_out.0.weight" in name else value}


def _renamed(state: dict[str, torch.Tensor], rename) -> dict[str, torch.Tensor]:
    """`state` with each name passed through `rename` (None: dropped), then through `_diffusers_layer_names`."""
    out = {}
    for name, value in state.items():
        new = rename(name)
        if new is not None:
            out.update(_diffusers_layer_names(new, value))
    return out


def unet2d_state(ours: nn.Module) -> dict[str, torch.Tensor]:
    """Our U-Net's state dict under UNet2DModel's names (see `_diffusers_layer_names` for the layers), with
    the class table joined with the null embedding as its last row (class index num_classes)."""
    prefixes = {"time_mlp.0.": "time_embedding.linear_1.", "time_mlp.2.": "time_embedding.linear_2.",
                "norm_out.": "conv_norm_out.", "mid.0.res.": "mid_block.resnets.0.",
                "mid.0.attn.": "mid_block.attentions.0.", "mid.1.res.": "mid_block.resnets.1."}
    resamplers = {"downsamples": ("down_blocks", "downsamplers"), "upsamples": ("up_blocks", "upsamplers")}

    def rename(name: str) -> str | None:
        if name.startswith(("cond_encoder.", "null_embedding")):
            return None  # the class table, below
        for old, new in prefixes.items():
            if name.startswith(old):
                return new + name[len(old):]
        part = name.split(".")
        if part[0] in ("down_blocks", "up_blocks") and part[3] in ("res", "attn"):  # LEVEL.I.res|attn.LAYER
            return ".".join([part[0], part[1], "resnets" if part[3] == "res" else "attentions", part[2], *part[4:]])
        if part[0] in resamplers:  # downsamples.LEVEL.conv -> down_blocks.LEVEL.downsamplers.0.conv
            return ".".join([resamplers[part[0]][0], part[1], resamplers[part[0]][1], "0", *part[2:]])
        return name

    state = _renamed(ours.state_dict(), rename)
    if ours.config.cond == "class":
        state["class_embedding.weight"] = torch.cat([ours.cond_encoder.weight, ours.null_embedding[None]]).detach()
    return state


def diffusers_unet(config: UNetConfig, ours: nn.Module) -> nn.Module:
    """UNet2DModel at `config` with `ours`'s weights, checked against it by parameter count."""
    from diffusers import UNet2DModel
    peer = UNet2DModel(**unet2d_kwargs(config))
    check_same_size(ours, peer, "UNet2DModel")
    peer.load_state_dict(unet2d_state(ours))
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
