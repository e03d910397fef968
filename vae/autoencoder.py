"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and App. G).

An encoder maps an image x (B, C, H, W) to the moments of a diagonal Gaussian posterior
q(z | x) = N(mean, diag(exp(logvar))) over a latent z (B, L, H/f, W/f), f = 2 ** (levels - 1); a
decoder maps z back to an image. A small KL term pulls q towards N(0, I), so the latent space stays
smooth enough for a diffusion model to work in. The layout is that of latent-diffusion's
`ldm/modules/diffusionmodules/model.py` (itself the DDPM U-Net's down and up paths without skip
connections or time embedding), and the module names follow it, so the published Stable Diffusion
weights map onto this model by renaming alone (see `published.py`). The residual, attention and
resampling blocks are the U-Net's own (`ddpm/unet.py`).

One deliberate difference from the original: each residual branch (ResBlock.conv2,
AttentionBlock.proj_out) starts at zero, as everywhere in this code base, so a new encoder starts
as a stack of plain convolutions; latent-diffusion used PyTorch's default init. Published weights
overwrite every parameter, so loading is unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.errors import FieldError
from ddpm.unet import AttentionBlock, Downsample, ResBlock, Upsample, check_levels, group_norm, num_groups
from kernels.group_norm import group_norm_act

# Latent-diffusion clamps the log-variance so exp() neither overflows nor underflows in float32.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass(frozen=True)
class AutoencoderConfig:
    """Everything needed to rebuild an `AutoencoderKL`; stored in checkpoints as `dataclasses.asdict(config)`."""

    in_channels: int = 3  # image channels (1 or 3); the decoder outputs the same number
    base_channels: int = 128  # LDM's "ch": width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width per level / base; one 2x downsample between levels
    num_res_blocks: int = 2  # residual blocks per encoder level (the decoder has one more per level)
    attention_resolutions: tuple[int, ...] = ()  # feature-map sizes (at `resolution`) with attention besides the middle
    latent_channels: int = 4  # LDM's z_channels, equal to its embed_dim in every published KL model
    dropout: float = 0.0  # inside the residual blocks; 0 in every published KL model
    resolution: int = 256  # image side that attention_resolutions refer to; the network takes any multiple of f

    def __post_init__(self) -> None:
        # JSON/YAML round trips give lists back; the frozen dataclass should still hash and compare equal.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        # Each check names the fields it is about ({placeholders}): code that builds this config reads them as
        # fields, train.py as the options that set them (core.errors.FieldError). What the U-Net checks too is
        # checked by the same code (ddpm.unet.check_levels).
        if self.in_channels < 1:
            raise FieldError("{in_channels} must be at least 1, got {value}.", value=self.in_channels)
        if self.latent_channels < 1:
            raise FieldError("{latent_channels} must be at least 1, got {value}.", value=self.latent_channels)
        check_levels(self, example="1 2 4 4")
        for mult in self.channel_mult:
            channels = self.base_channels * mult
            # GroupNorm needs whole groups: min(32, C // 4) of them (see ddpm.unet.num_groups).
            if channels < 4 or channels % num_groups(channels):
                raise FieldError("{base_channels} times each {channel_mult} must split into min(32, C // 4) equal "
                                 "GroupNorm groups (any multiple of 4 below 128 does, and any multiple of 32 from 128 "
                                 "on), got {base} x {mult} = {channels}.",
                                 base=self.base_channels, mult=mult, channels=channels)
        if self.resolution % self.downsampling_factor:
            raise FieldError("{resolution} {value} must be divisible by the downsampling factor {factor}.",
                             value=self.resolution, factor=self.downsampling_factor)
        if not set(self.attention_resolutions) <= set(self.feature_sizes):
            raise FieldError("{attention_resolutions} {value} must be among the feature-map sizes {sizes}.",
                             value=self.attention_resolutions, sizes=self.feature_sizes)

    @property
    def downsampling_factor(self) -> int:
        """f: image side / latent side."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def feature_sizes(self) -> tuple[int, ...]:
        """Feature-map side at each level for a `resolution`-sized image."""
        return tuple(self.resolution // 2**level for level in range(len(self.channel_mult)))

    def attention_at(self, level: int) -> bool:
        """Whether the residual blocks of `level` (0: full resolution) are followed by self-attention."""
        return self.feature_sizes[level] in self.attention_resolutions

    @classmethod
    def kl_f8(cls) -> AutoencoderConfig:
        """The Stable Diffusion autoencoder (LDM's kl-f8): 256 -> 32x32x4 latents, 83,653,863 parameters."""
        return cls(in_channels=3, base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   attention_resolutions=(), latent_channels=4, dropout=0.0, resolution=256)

    @classmethod
    def kl_f4(cls) -> AutoencoderConfig:
        """LDM's kl-f4: 256 -> 64x64x3 latents."""
        return cls(in_channels=3, base_channels=128, channel_mult=(1, 2, 4), num_res_blocks=2,
                   attention_resolutions=(), latent_channels=3, dropout=0.0, resolution=256)


class DiagonalGaussian:
    """Posterior q(z | x) = N(mean, diag(var)) (Kingma & Welling 2014) from moments (B, 2L, h, w) = [mean | logvar]."""

    def __init__(self, moments: Tensor):
        if moments.ndim != 4 or moments.shape[1] % 2:
            raise ValueError(f"moments must have shape (B, 2L, h, w), [mean | logvar], got {tuple(moments.shape)}.")
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * eps, eps ~ N(0, I): the reparameterisation trick, so gradients reach the moments."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        elif noise.shape != self.mean.shape:
            raise ValueError(f"noise must have the latent's shape {tuple(self.mean.shape)}, got {tuple(noise.shape)}.")
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, (B,): 0.5 * sum over (C, H, W) of mean^2 + var - 1 - logvar.

        In float32 at least (float64 moments stay float64): var - 1 - logvar cancels near the prior, where
        bf16 autocast's moments would put it 5% off. For the same reason var - 1 is expm1(logvar): exp(logvar)
        rounded to float32 and then less 1 left a posterior near the prior (logvar ~ 1e-3) 2% off."""
        dtype = torch.promote_types(self.mean.dtype, torch.float32)
        mean, logvar = self.mean.to(dtype), self.logvar.to(dtype)
        return 0.5 * (mean.pow(2) + torch.expm1(logvar) - logvar).sum(dim=(1, 2, 3))


class Level(nn.Module):
    """One resolution level's residual blocks, each followed by self-attention where the config asks for it.

    As in latent-diffusion, the encoder gives every level but the lowest-resolution one a
    `downsample` attribute, the decoder every level but the full-resolution one an `upsample`, and
    each applies it after the level's blocks.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, dropout: float):
        super().__init__()
        inputs = [in_channels] + [out_channels] * (num_blocks - 1)  # only the first block changes the width
        self.block = nn.ModuleList([ResBlock(c_in, out_channels, dropout=dropout) for c_in in inputs])
        # Latent-diffusion's layout: one attention block per residual block, or an empty list.
        self.attn = nn.ModuleList([AttentionBlock(out_channels) for _ in range(num_blocks)] if attention else [])

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return h


class Middle(nn.Module):
    """Residual block, self-attention, residual block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResBlock(channels, channels, dropout=dropout)
        self.attn_1 = AttentionBlock(channels)
        self.block_2 = ResBlock(channels, channels, dropout=dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """x (B, C, H, W) -> [mean | logvar] (B, 2L, H/f, W/f), before quant_conv."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        h_ch = config.base_channels
        for level, width in enumerate(widths):
            stage = Level(h_ch, width, config.num_res_blocks, config.attention_at(level), config.dropout)
            if level < len(widths) - 1:
                stage.downsample = Downsample(width, with_conv=True)
            self.down.append(stage)
            h_ch = width
        self.mid = Middle(h_ch, config.dropout)
        self.norm_out = group_norm(h_ch)
        self.conv_out = nn.Conv2d(h_ch, 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            h = stage(h)
            if level < len(self.down) - 1:
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(group_norm_act(h, self.norm_out, silu=True))


class Decoder(nn.Module):
    """z (B, L, h, w) -> image (B, C, h*f, w*f), after post_quant_conv."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        h_ch = widths[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, h_ch, 3, padding=1)
        self.mid = Middle(h_ch, config.dropout)
        stages = []
        for level in reversed(range(len(widths))):
            stage = Level(h_ch, widths[level], config.num_res_blocks + 1, config.attention_at(level), config.dropout)
            if level > 0:
                stage.upsample = Upsample(widths[level], with_conv=True)
            stages.insert(0, stage)
            h_ch = widths[level]
        # Indexed by level as in the published weights (`up.0` is full resolution), so run from the last.
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(h_ch)
        self.conv_out = nn.Conv2d(h_ch, config.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            h = self.up[level](h)
            if level > 0:
                h = self.up[level].upsample(h)
        return self.conv_out(group_norm_act(h, self.norm_out, silu=True))


class AutoencoderKL(nn.Module):
    """Latent diffusion's first stage: image <-> latent, with a diagonal Gaussian posterior (Rombach et al. 2022)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        L = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # 1x1 convs between the networks and the latent; kept because the published weights have them.
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1)
        self.post_quant_conv = nn.Conv2d(L, L, 1)

    def encode_moments(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> [mean | logvar] (B, 2L, H/f, W/f), logvar not yet clamped."""
        cfg, f = self.config, self.config.downsampling_factor
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"Expected images of shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}.")
        B, _, H, W = x.shape
        if H % f or W % f:
            raise ValueError(f"Image size {H}x{W} must be divisible by the downsampling factor {f}; crop or pad it.")
        moments = self.quant_conv(self.encoder(x))
        assert moments.shape == (B, 2 * cfg.latent_channels, H // f, W // f)
        return moments

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """The posterior q(z | x) over latents (B, L, H/f, W/f)."""
        return DiagonalGaussian(self.encode_moments(x))

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, L, h, w) -> images (B, C, h*f, w*f)."""
        cfg, f = self.config, self.config.downsampling_factor
        if z.ndim != 4 or z.shape[1] != cfg.latent_channels:
            raise ValueError(f"Expected latents of shape (B, {cfg.latent_channels}, h, w), got {tuple(z.shape)}.")
        B, _, h, w = z.shape
        x = self.decoder(self.post_quant_conv(z))
        assert x.shape == (B, cfg.in_channels, h * f, w * f)
        return x

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction from one posterior sample, and the posterior (for the KL term)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator=generator)), posterior

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's output conv weight, where the adaptive GAN weight compares gradients (Esser et al. 2021)."""
        return self.decoder.conv_out.weight
