"""The DDPM U-Net (Ho et al. 2020), with one conditioning slot for labels, parameters or learned vectors.

The layout follows the DDPM reference code (hojonathanho/diffusion, `diffusion_tf/models/unet.py`):
a sinusoidal time embedding fed through an MLP; per resolution level `num_res_blocks` residual
blocks (with self-attention at chosen feature-map sizes) and a 2x downsample; a middle of
res-attention-res; a mirrored up path whose blocks each consume one skip connection. Two later
variants are switches on `UNetConfig`: the scale-shift ("FiLM") time conditioning of improved DDPM
(Nichol & Dhariwal 2021) and a conditioning vector added to the time embedding, with a learned null
vector for classifier-free guidance (Ho & Salimans 2022).

The network only maps (x_t, t, condition) to an output of x's shape; what that output means
(eps, x0, v) is decided by the diffusion code that wraps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import FieldError
from kernels.attention import attention
from kernels.dropout import Dropout
from kernels.group_norm import group_norm_act

CONDITIONING_KINDS = ("none", "class", "params")


def check_levels(config: Any, example: str) -> None:
    """The checks the U-Net's and the autoencoder's configs share: levels of residual blocks (`channel_mult`, each
    a positive multiplier, `example` a typical one), at least one block per level, and a dropout probability.
    They name their fields (core.errors.FieldError), so train.py reads them as options."""
    if not config.channel_mult or min(config.channel_mult) < 1:
        raise FieldError("{channel_mult} needs at least one level, each a positive multiplier (e.g. {example}), got "
                         "{value}.", example=example, value=" ".join(map(str, config.channel_mult)) or "(none)")
    if config.num_res_blocks < 1:
        raise FieldError("{num_res_blocks} must be at least 1, got {value}.", value=config.num_res_blocks)
    if not 0 <= config.dropout < 1:
        raise FieldError("{dropout} must be in [0, 1), got {value}.", value=config.dropout)


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a `UNet`; stored in checkpoints as `dataclasses.asdict(config)`.

    The output has `in_channels` channels: one eps, x0 or v prediction per input channel (no learned
    variances: no loss or sampler here uses them).
    """
    retired_keys = frozenset({"out_channels"})  # (not a field) in older checkpoints; always in_channels

    image_size: int = 32  # side of the training images; attention_resolutions refer to this size
    in_channels: int = 3  # image (or latent) channels
    base_channels: int = 128  # DDPM: 128 for CIFAR-10 and 256x256 LSUN/CelebA-HQ
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # channels per level / base; DDPM CIFAR-10: (1, 2, 2, 2)
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes (at image_size) with self-attention
    num_heads: int = 1  # attention heads; DDPM used 1, improved DDPM 4
    head_channels: int = 0  # if > 0, heads of this width instead (channels // head_channels heads; LDM: 32)
    dropout: float = 0.1  # DDPM: 0.1 on CIFAR-10, 0.0 elsewhere
    scale_shift_norm: bool = False  # False: DDPM adds the embedding; True: improved DDPM's FiLM (see ResBlock)
    resample_with_conv: bool = True  # DDPM: strided conv down / conv after nearest up; False: avg-pool / plain nearest
    cond: str = "none"  # what feeds the conditioning slot: "none", "class" labels or continuous "params"
    num_classes: int = 0  # number of labels, for cond="class"
    num_params: int = 0  # length of the parameter vector (normalised to [-1, 1] by the caller), for cond="params"

    def __post_init__(self) -> None:
        # JSON/YAML round trips give lists back; the frozen dataclass should still hash and compare equal.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        # Each check names the fields it is about ({placeholders}): code that builds this config (and a checkpoint)
        # reads them as fields, train.py as the options that set them (core.errors.FieldError). These are the
        # options no network can take at any size; `check_resolved` judges them against the size.
        if self.cond not in CONDITIONING_KINDS:
            raise FieldError("{cond} must be one of {kinds}, got {value!r}.", kinds=", ".join(CONDITIONING_KINDS),
                             value=self.cond)
        if self.in_channels < 1:
            raise FieldError("{in_channels} must be at least 1, got {value}.", value=self.in_channels)
        if self.base_channels < 1:
            raise FieldError("{base_channels} must be positive, got {value}; use 32 or a multiple of it.",
                             value=self.base_channels)
        check_levels(self, example="1 2 2 2")
        if self.num_heads < 1:
            raise FieldError("{num_heads} must be at least 1, got {value}.", value=self.num_heads)
        if self.head_channels < 0:
            raise FieldError("{head_channels} must be 0 (a fixed {num_heads} instead) or a positive width, got {value}.",
                             value=self.head_channels)
        for mult in self.channel_mult:
            channels = self.base_channels * mult
            if channels % 32:  # so every width, skips concatenated, splits into `num_groups` groups
                raise FieldError("{base_channels} times each {channel_mult} must be a multiple of 32, so that every "
                                 "width and every sum of widths at a skip connection splits into whole GroupNorm "
                                 "groups, got {base} x {mult} = {channels}; use {base_channels} 32 or a multiple of it.",
                                 base=self.base_channels, mult=mult, channels=channels)
            if self.head_channels and channels % self.head_channels:
                raise FieldError("{head_channels} {value} must divide every level's channels, got {channels}; use a "
                                 "width that divides {base_channels} times each {channel_mult}, or {head_channels} 0.",
                                 value=self.head_channels, channels=channels)
            if not self.head_channels and channels % self.num_heads:
                raise FieldError("{num_heads} {value} must divide every level's channels, got {channels}; use a count "
                                 "that divides {base_channels} times each {channel_mult}.",
                                 value=self.num_heads, channels=channels)

    def check_resolved(self) -> None:
        """Refuse the fields the data decides when they do not fit the rest: an `image_size` the levels
        cannot halve, attention at sizes that never occur, conditioning without classes or parameters.

        Separate from construction because these are only known once the data (or the VAE whose
        latents the model denoises) is: a preset's network options are applied before that. Its
        refusals name their fields as `__post_init__`'s do (the data's keep their names on a command line).
        """
        if self.cond == "class" and self.num_classes < 1:
            raise FieldError("{cond} class needs a positive {num_classes}, the number of labels, got {value}; set it, "
                             "or use {cond} none.", value=self.num_classes)
        if self.cond == "params" and self.num_params < 1:
            raise FieldError("{cond} params needs a positive {num_params}, the length of the parameter vector, got "
                             "{value}; set it, or use {cond} none.", value=self.num_params)
        levels = len(self.channel_mult)
        if self.image_size % 2 ** (levels - 1):
            raise FieldError("{image_size} {value} must be divisible by {factor}: the {levels} levels of "
                             "{channel_mult} halve it {halvings} times; use fewer {channel_mult} levels or another "
                             "size.", value=self.image_size, factor=2 ** (levels - 1), levels=levels,
                             halvings=levels - 1)
        sizes = tuple(self.image_size // 2**level for level in range(levels))
        if not set(self.attention_resolutions) <= set(sizes):
            raise FieldError("{attention_resolutions} {value} must be among the feature-map sizes {sizes} of a "
                             "{size}x{size} input; keep only those, or none for no attention.",
                             value=self.attention_resolutions, sizes=sizes, size=self.image_size)

    def heads_for(self, channels: int) -> int:
        """Attention heads at a level of `channels` channels: fixed count, or fixed width (head_channels)."""
        return channels // self.head_channels if self.head_channels else self.num_heads

    @property
    def embedding_dim(self) -> int:
        """Width E of the time embedding, and so of the conditioning space (4 * base, as in DDPM)."""
        return 4 * self.base_channels

    @classmethod
    def ddpm_cifar10(cls) -> UNetConfig:
        """The CIFAR-10 model of Ho et al. 2020 (35.7M parameters)."""
        return cls(image_size=32, in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2),
                   num_res_blocks=2, attention_resolutions=(16,), num_heads=1, dropout=0.1,
                   scale_shift_norm=False, resample_with_conv=True)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Transformer sinusoids of t, (B,) -> (B, dim): [sin(t * f_i), cos(t * f_i)], f_i = max_period^(-i / (dim/2 - 1)).

    The `dim/2 - 1` denominator is the one in the DDPM code (tensor2tensor's), so f runs from 1 to
    exactly 1/max_period. Computed in float32 even under autocast (bf16 knows t = 999 only to within 4), or
    in float64 for `dtype` float64, and returned in `dtype`, that of the layer that reads it; float t is
    accepted, though every sampler here calls the model at integer timesteps (PNDM rounds its half steps down).
    """
    assert t.ndim == 1 and dim % 2 == 0
    half = dim // 2
    compute = torch.promote_types(dtype, torch.float32)
    i = torch.arange(half, device=t.device, dtype=compute)
    freqs = torch.exp(-math.log(max_period) * i / (half - 1))
    angles = t.to(compute)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).to(dtype)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias, so the residual branch it ends starts as the identity (DDPM's init_scale=0)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def num_groups(channels: int) -> int:
    """DDPM's 32 groups, but never fewer than 4 channels per group.

    A group of one channel is an instance norm: it erases that channel's spatial mean, and with it
    the per-channel mean (DC component) of the noise. The output layer sits behind such a norm, so a
    narrow network (32 channels) then cannot predict the noise's mean colour, which the sampler
    amplifies by 1/sqrt(abar) at high noise into strong colour casts. From 128 channels on (every
    DDPM model) this is exactly GroupNorm(32).
    """
    return min(32, channels // 4)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels, eps=1e-6)  # eps 1e-6 as TF's group_norm in DDPM


class ResBlock(nn.Module):
    """Pre-activation residual block, optionally injecting the time/condition embedding between its two convs.

    With `emb_dim` 0 it is the plain residual block of the latent-diffusion autoencoder (no embedding).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int = 0, dropout: float = 0.0,
                 scale_shift_norm: bool = False):
        super().__init__()
        # True: Nichol & Dhariwal 2021, h = (1 + scale) * norm(h) + shift; False: Ho et al. 2020, h = norm(h + e).
        self.scale_shift_norm = scale_shift_norm
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels * (2 if scale_shift_norm else 1)) if emb_dim else None
        self.norm2 = group_norm(out_channels)
        self.dropout = Dropout(dropout)  # its p, applied inside the fused norm2 op (forward)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # DDPM's "nin" shortcut: a 1x1 conv only where the channel count changes.
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        # Each norm, its modulation, the SiLU after it and the dropout before conv2 are one fused op
        # (kernels.group_norm).
        h = self.conv1(group_norm_act(x, self.norm1, silu=True))
        drop = self.dropout.p if self.training else 0.0
        if self.emb_proj is None:
            h = group_norm_act(h, self.norm2, silu=True, dropout=drop)
        else:
            e = self.emb_proj(F.silu(emb))
            if self.scale_shift_norm:
                # silu(norm2(h) * (1 + scale) + shift): after the norm, which would otherwise remove the shift.
                scale, shift = e.chunk(2, dim=1)
                h = group_norm_act(h, self.norm2, scale=scale, shift=shift, silu=True, dropout=drop)
            else:
                # silu(norm2(h + e)). DDPM adds the embedding before a GroupNorm, which removes each group's
                # mean: only the part of e that varies within a group survives -- small models want
                # scale_shift_norm.
                h = group_norm_act(h, self.norm2, add=e, silu=True, dropout=drop)
        h = self.conv2(h)
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, added back residually (proj_out starts at zero)."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads  # head width is channels // num_heads; DDPM and the LDM autoencoder: one head
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)  # DDPM's separate q, k, v "nin" layers, fused
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        # Channels are laid out as [q | k | v], each split into heads of C // num_heads channels.
        qkv = self.qkv(group_norm_act(x, self.norm)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, H*W, head_dim)
        h = attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v: fused SDPA, or matmuls where faster
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class ResAttnBlock(nn.Module):
    """A residual block, followed by self-attention at the chosen resolutions: DDPM's unit of the U-Net."""

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig, attention: bool):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, config.embedding_dim, config.dropout, config.scale_shift_norm)
        self.attn = AttentionBlock(out_channels, config.heads_for(out_channels)) if attention else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


class Downsample(nn.Module):
    """Halve H and W: 3x3 conv with stride 2, or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        # TF's 'SAME' padding, used by DDPM, pads a stride-2 3x3 conv on the bottom/right only.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then (optionally) a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """DDPM U-Net: (x_t, t, condition) -> tensor of x_t's shape.

    Conditioning (Ho & Salimans 2022): a vector in the E-dimensional time-embedding space is added to
    the time embedding. It comes from class labels (an embedding table), from a parameter vector (a
    small MLP), or directly from the caller (`cond_emb`, e.g. one learned vector per image in
    diffusion inversion). Rows marked in `null_mask` get the learned `null_embedding` instead, which
    is what classifier-free guidance trains and samples with.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.check_resolved()
        self.config = config
        ch, E = config.base_channels, config.embedding_dim
        levels = [ch * m for m in config.channel_mult]
        sizes = [config.image_size // 2**i for i in range(len(levels))]

        self.time_mlp = nn.Sequential(nn.Linear(ch, E), nn.SiLU(), nn.Linear(E, E))
        if config.cond == "class":
            self.cond_encoder = nn.Embedding(config.num_classes, E)
        elif config.cond == "params":
            self.cond_encoder = nn.Sequential(nn.Linear(config.num_params, E), nn.SiLU(), nn.Linear(E, E))
        if config.cond != "none":  # an unconditional model has no conditioning parameters at all
            self.null_embedding = nn.Parameter(torch.zeros(E))  # starts as "add nothing to the time embedding"

        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        skip_channels = [ch]  # channels of every tensor the down path leaves for the up path
        self.down_blocks, self.downsamples = nn.ModuleList(), nn.ModuleList()
        for level, (out_ch, size) in enumerate(zip(levels, sizes)):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(ResAttnBlock(skip_channels[-1], out_ch, config, size in config.attention_resolutions))
                skip_channels.append(out_ch)
            self.down_blocks.append(blocks)
            if level < len(levels) - 1:
                self.downsamples.append(Downsample(out_ch, config.resample_with_conv))
                skip_channels.append(out_ch)

        self.mid = nn.ModuleList([ResAttnBlock(levels[-1], levels[-1], config, attention=True),
                                  ResAttnBlock(levels[-1], levels[-1], config, attention=False)])

        self.up_blocks, self.upsamples = nn.ModuleList(), nn.ModuleList()
        h_ch = levels[-1]
        for level in reversed(range(len(levels))):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                attention = sizes[level] in config.attention_resolutions
                blocks.append(ResAttnBlock(h_ch + skip_channels.pop(), levels[level], config, attention))
                h_ch = levels[level]
            self.up_blocks.append(blocks)
            if level > 0:
                self.upsamples.append(Upsample(h_ch, config.resample_with_conv))
        assert not skip_channels

        self.norm_out = group_norm(h_ch)
        self.conv_out = nn.Conv2d(h_ch, config.in_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        # DDPM initialises every dense/conv weight with Xavier-uniform (variance_scaling, fan_avg) and
        # zero bias, except the last layer of each residual branch and the output, which start at zero.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                zero_init(m.conv2)
            elif isinstance(m, AttentionBlock):
                zero_init(m.proj_out)
        zero_init(self.conv_out)

    def check_inputs(self, x: Tensor, t: Tensor, cond: Tensor | None = None, *, null_mask: Tensor | None = None,
                     cond_emb: Tensor | None = None) -> None:
        """Refuse a call `forward` cannot compute, with one sentence; the public entry points (the
        samplers, inversion) call it once, so that `forward` reads like the network it is."""
        B, C, H, W = x.shape
        factor = 2 ** (len(self.config.channel_mult) - 1)
        if C != self.config.in_channels:
            raise ValueError(f"Expected {self.config.in_channels} input channels, got {C}.")
        if H % factor or W % factor:
            raise ValueError(f"Image size {H}x{W} must be divisible by {factor} (2 ** (len(channel_mult) - 1)).")
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), one timestep per image, got {tuple(t.shape)}.")
        kind = self.config.cond
        if kind == "none":
            if cond is not None or cond_emb is not None or null_mask is not None:
                raise ValueError("This model was trained without conditioning; "
                                 "call it without cond, cond_emb or null_mask.")
            return
        if cond is not None and cond_emb is not None:
            raise ValueError("Pass either cond or cond_emb, not both.")
        if cond_emb is not None and cond_emb.shape != (B, self.config.embedding_dim):
            raise ValueError(f"cond_emb must have shape ({B}, {self.config.embedding_dim}), got {tuple(cond_emb.shape)}.")
        if cond is not None:
            if cond.ndim == 0 or cond.shape[0] != B:
                raise ValueError(f"cond must have one row per image ({B}), got shape {tuple(cond.shape)}.")
            self.check_condition(cond)
        if null_mask is not None and (null_mask.shape != (B,) or null_mask.dtype != torch.bool):
            raise ValueError(f"null_mask must be a bool tensor of shape ({B},), "
                             f"got {null_mask.dtype} {tuple(null_mask.shape)}.")

    def check_condition(self, cond: Tensor) -> None:
        """Refuse labels or parameters `embed_condition` cannot embed."""
        kind = self.config.cond
        if kind == "none":
            raise ValueError("This model was trained without conditioning; call it with cond=None.")
        if kind == "class" and (cond.ndim != 1 or cond.dtype.is_floating_point or cond.dtype == torch.bool):
            raise ValueError(f"cond='class' expects integer labels of shape (B,), got {cond.dtype} {tuple(cond.shape)}.")
        if kind == "params" and (cond.ndim != 2 or cond.shape[1] != self.config.num_params
                                 or not cond.dtype.is_floating_point):
            raise ValueError(f"cond='params' expects float parameters of shape (B, {self.config.num_params}), "
                             f"got {cond.dtype} {tuple(cond.shape)}.")

    def embed_condition(self, cond: Tensor, null_mask: Tensor | None = None) -> Tensor:
        """Conditioning vectors (B, E) for labels (B,) or parameters (B, P) of a conditional model.

        Rows where `null_mask` is True get the null embedding. Public so that inversion can start
        its per-image vectors from, e.g., the mean embedding of a class.
        """
        return self._apply_null_mask(self.cond_encoder(cond), null_mask)

    def _apply_null_mask(self, emb: Tensor, null_mask: Tensor | None) -> Tensor:
        if null_mask is None:
            return emb
        # torch.where, not indexing: no data-dependent shapes, so torch.compile sees one graph.
        return torch.where(null_mask[:, None], self.null_embedding.to(emb.dtype), emb)

    def _condition_vector(self, cond: Tensor | None, cond_emb: Tensor | None, null_mask: Tensor | None,
                          batch: int) -> Tensor | None:
        if self.config.cond == "none":
            return None
        if cond_emb is not None:
            return self._apply_null_mask(cond_emb, null_mask)
        if cond is None:  # a conditional model called without a condition: every row is null
            return self._apply_null_mask(self.null_embedding.expand(batch, -1), null_mask)
        return self.embed_condition(cond, null_mask)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, *, null_mask: Tensor | None = None,
                cond_emb: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,) int or float timesteps, cond labels (B,) / params (B, P) / None (all null).

        `null_mask` (B,) bool swaps in the null embedding per row; `cond_emb` (B, E) replaces `cond`
        with vectors already in the conditioning space. `check_inputs` says what a valid call is.
        """
        B, _, H, W = x.shape
        # In the time MLP's own dtype: float32 under autocast, float64 or bf16 for a network converted to either.
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels, dtype=self.time_mlp[0].weight.dtype))
        cond_vec = self._condition_vector(cond, cond_emb, null_mask, B)
        if cond_vec is not None:
            emb = emb + cond_vec

        hs = [self.conv_in(x)]
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                hs.append(block(hs[-1], emb))
            if level < len(self.downsamples):
                hs.append(self.downsamples[level](hs[-1]))

        h = hs[-1]
        for block in self.mid:
            h = block(h, emb)

        for i, blocks in enumerate(self.up_blocks):
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)

        out = self.conv_out(group_norm_act(h, self.norm_out, silu=True))
        assert out.shape == x.shape
        return out
