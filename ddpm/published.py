"""Import of published DDPM U-Nets saved by diffusers as a `UNet2DModel`.

Ho et al.'s own models (`google/ddpm-cifar10-32`, `google/ddpm-ema-cifar10-32`, the 256 px CelebA-HQ,
LSUN church, bedroom and cat ones) are published as diffusers folders: `config.json` and
`diffusion_pytorch_model.safetensors` (or `.bin`). Our U-Net is DDPM's network, so with the matching
options (`--preset ddpm-cifar10` for CIFAR-10) those weights compute here what they computed there.

diffusers names the blocks differently and in places holds them differently:

- our `down_blocks.L.I.res|attn` are its `down_blocks.L.resnets|attentions.I`, our `downsamples.L` its
  `down_blocks.L.downsamplers.0` (likewise up), `mid.0`/`mid.1` its `mid_block.resnets.0`,
  `mid_block.attentions.0`, `mid_block.resnets.1`, and `time_mlp.0`/`.2` its `time_embedding.linear_1`/`_2`;
- a residual block's time projection `emb_proj` is `time_emb_proj`, the 1x1 shortcut `skip` is
  `conv_shortcut`, an attention's norm `group_norm`;
- attention's fused q|k|v 1x1 convolution is three linear layers, and its output 1x1 convolution a linear
  layer: `to_q`, `to_k`, `to_v`, `to_out.0` (`query`, `key`, `value`, `proj_attn` before diffusers 0.14);
- a class-conditional model keeps one table of num_classes + 1 rows, the last the null class that
  classifier-free guidance needs (our `null_embedding`).

What the weights cannot tell (the sinusoids' layout, the downsampling's padding, the normalisation's
groups and epsilon, how the time embedding enters a block, the heads) is read from `config.json` and
compared with this U-Net's before anything is copied; a weights file without its `config.json` is
taken on trust, with a warning.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import torch
from torch import Tensor

from core.errors import UserError, warn_once
from core.weights import (DIFFUSERS_ATTENTION, check_state_dict, diffusers_attention_naming, diffusers_config,
                          diffusers_linear, diffusers_weights_file, read_state_dict)
from ddpm.unet import UNet, UNetConfig, num_groups

DIFFUSERS, DIFFUSERS_LEGACY = "diffusers", "diffusers-legacy"
_PREFIXES = {"time_mlp.0.": "time_embedding.linear_1.", "time_mlp.2.": "time_embedding.linear_2.",
             "norm_out.": "conv_norm_out.", "mid.0.res.": "mid_block.resnets.0.",
             "mid.0.attn.": "mid_block.attentions.0.", "mid.1.res.": "mid_block.resnets.1."}
_RESAMPLERS = {"downsamples": ("down_blocks", "downsamplers"), "upsamples": ("up_blocks", "upsamplers")}
_LAYERS = {"emb_proj": "time_emb_proj", "skip": "conv_shortcut", "norm": "group_norm"}
CLASS_TABLE = "class_embedding.weight"


def unet2d_config(config: UNetConfig, heads: bool = True) -> dict[str, Any]:
    """`diffusers.UNet2DModel` arguments for the same U-Net as `UNet(config)` (same parameter count).

    Two differences remain that cost no parameters: diffusers uses one GroupNorm group count for every
    width, where ours takes min(32, C // 4) per width (`ddpm.unet.num_groups`; equal from 128 channels
    on, so exact for DDPM's CIFAR-10 model), and one attention head width, where ours may fix the head
    count instead. A class-conditional model gets num_classes + 1 embeddings: the extra one is the null
    class that classifier-free guidance needs, the counterpart of our `null_embedding`. With `heads` False,
    attention_head_dim is left at None (one head per block) whatever the config's heads.
    """
    if config.cond == "params":
        raise UserError("UNet2DModel has no parameter-vector conditioning; use a U-Net with --cond none or class.")
    if not config.resample_with_conv:
        raise UserError("UNet2DModel has no average-pool downsampling; use a U-Net that resamples with convolutions.")
    widths = tuple(config.base_channels * m for m in config.channel_mult)
    sizes = [config.image_size // 2**level for level in range(len(widths))]
    attention = [size in config.attention_resolutions for size in sizes]
    attention_widths = [w for w, a in zip(widths, attention) if a] + [widths[-1]]  # the middle block has attention
    if not heads:
        head_dim = None
    elif config.head_channels:
        head_dim = config.head_channels
    elif config.num_heads == 1:
        head_dim = None  # diffusers: one head as wide as the block
    elif len(set(attention_widths)) == 1:
        head_dim = attention_widths[0] // config.num_heads
    else:
        raise UserError(f"UNet2DModel keeps one head width in every attention block, and this U-Net has "
                        f"{config.num_heads} heads in blocks of {' and '.join(map(str, sorted(set(attention_widths))))} "
                        f"channels; use --head-channels (a head width) instead of --num-heads.")
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


# UNet2DModel's defaults, for the fields compared below that an older config.json may leave out. But for
# attention_head_dim: files older than that field (google/ddpm-cifar10-32's, by diffusers 0.0.4) are DDPM's
# single-head models, where today's default (8) would split them into heads of 8 channels.
_UNET2D_DEFAULTS = {"flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "norm_eps": 1e-5,
                    "norm_num_groups": 32, "attn_norm_num_groups": None, "resnet_time_scale_shift": "default",
                    "attention_head_dim": None, "downsample_type": "conv", "upsample_type": "conv",
                    "time_embedding_type": "positional", "act_fn": "silu", "center_input_sample": False,
                    "mid_block_scale_factor": 1, "add_attention": True, "class_embed_type": None}
# What DDPM's network has one way only, ours too: a UNet2DModel set otherwise cannot be imported.
_FIXED = {"flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0, "norm_eps": 1e-6,
          "downsample_type": "conv", "upsample_type": "conv", "time_embedding_type": "positional", "act_fn": "silu",
          "center_input_sample": False, "mid_block_scale_factor": 1, "add_attention": True, "class_embed_type": None}
# What the U-Net's options set, and which options.
_BY_OPTIONS = {"block_out_channels": "--base-channels and --channel-mult", "layers_per_block": "--num-res-blocks",
               "down_block_types": "--attention-resolutions", "up_block_types": "--attention-resolutions",
               "resnet_time_scale_shift": "--scale-shift-norm or --no-scale-shift-norm"}


def _config_mismatch(fields: Mapping[str, Any], config: UNetConfig) -> tuple[str, str]:
    """How a diffusers UNet2DModel config.json differs from `config` in what the weights cannot show, as
    (settings no option of ours can match, settings the named options can): ('', '') where it computes the
    same function."""
    theirs = {key: fields.get(key, _UNET2D_DEFAULTS.get(key)) for key in _UNET2D_DEFAULTS}
    fixed = [f"{key} {theirs[key]!r}" for key, value in _FIXED.items() if _plain(theirs[key]) != _plain(value)]
    ours = unet2d_config(config, heads=False)  # heads are compared block by block below
    options = [f"{key} {_plain(fields[key])!r} (these options: {_plain(ours[key])!r}; {option})"
               for key, option in _BY_OPTIONS.items() if key in fields and _plain(fields[key]) != _plain(ours[key])]
    if fields.get("out_channels", 3) != fields.get("in_channels", 3):  # a learnt variance, say
        fixed.append(f"out_channels {fields.get('out_channels', 3)!r} for in_channels {fields.get('in_channels', 3)!r}")
    if theirs["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        fixed.append(f"resnet_time_scale_shift {theirs['resnet_time_scale_shift']!r}")
    widths = [config.base_channels * m for m in config.channel_mult]
    if "block_out_channels" in fields and _plain(fields["block_out_channels"]) != tuple(widths):
        return "; ".join(fixed), "; ".join(options)  # the heads and groups below are of other widths
    # Heads per attention block: diffusers keeps one head width (None: one head per block), ours a count or a width.
    head_dim = theirs["attention_head_dim"]
    sizes = [config.image_size // 2**level for level in range(len(widths))]
    attention_widths = sorted({w for w, size in zip(widths, sizes) if size in config.attention_resolutions}
                              | {widths[-1]})
    heads = [(w, 1 if head_dim is None else w // head_dim, config.heads_for(w)) for w in attention_widths]
    if any(theirs_n != ours_n for _, theirs_n, ours_n in heads):
        per_block = ", ".join(f"{t} at {w} channels" for w, t, _ in heads)
        option = "--num-heads 1" if head_dim is None else f"--head-channels {head_dim}"
        options.append(f"attention_head_dim {head_dim!r}: {per_block} (these options: "
                       f"{', '.join(str(o) for _, _, o in heads)}; {option})")
    groups = theirs["norm_num_groups"]
    narrow = [f"{width} channels in {num_groups(width)}" for width in sorted(set(widths)) if num_groups(width) != groups]
    if narrow:
        fixed.append(f"norm_num_groups {groups!r} (this U-Net normalises {', '.join(narrow)} groups: ours takes 32 "
                     f"from 128 channels on)")
    attn_groups = theirs["attn_norm_num_groups"]
    if attn_groups is None and theirs["resnet_time_scale_shift"] == "default":
        attn_groups = groups  # what diffusers' attention blocks then use
    if attn_groups != num_groups(widths[-1]) and not narrow:
        fixed.append(f"attn_norm_num_groups {fields.get('attn_norm_num_groups')!r} (this U-Net normalises its middle "
                     f"attention in {num_groups(widths[-1])} groups)")
    return "; ".join(fixed), "; ".join(options)


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _diffusers_names(name: str, naming: str) -> list[str]:
    """The diffusers tensor(s) one of our U-Net's tensors is made of; several are stacked along dim 0."""
    for old, new in _PREFIXES.items():
        if name.startswith(old):
            name = new + name[len(old):]
            break
    part = name.split(".")
    if part[0] in ("down_blocks", "up_blocks") and part[3] in ("res", "attn"):  # LEVEL.I.res|attn.LAYER
        part = [part[0], part[1], "resnets" if part[3] == "res" else "attentions", part[2], *part[4:]]
    elif part[0] in _RESAMPLERS:  # downsamples.LEVEL.conv -> down_blocks.LEVEL.downsamplers.0.conv
        part = [_RESAMPLERS[part[0]][0], part[1], _RESAMPLERS[part[0]][1], "0", *part[2:]]
    *module, leaf, param = part
    q, k, v, out = DIFFUSERS_ATTENTION[naming]
    if leaf == "qkv":
        return [".".join([*module, layer, param]) for layer in (q, k, v)]
    leaf = out if leaf == "proj_out" else _LAYERS.get(leaf, leaf)
    return [".".join([*module, leaf, param])]


def _meta_state_dict(config: UNetConfig) -> dict[str, Tensor]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        return UNet(config).state_dict()


def to_diffusers(state_dict: Mapping[str, Tensor], config: UNetConfig, naming: str = DIFFUSERS) -> dict[str, Tensor]:
    """Our `UNet(config).state_dict()` under UNet2DModel's names (`unet2d_config(config)` builds that model)."""
    unet2d_config(config)  # refuses what UNet2DModel cannot hold
    out = {}
    for name, tensor in state_dict.items():
        if name in ("cond_encoder.weight", "null_embedding"):
            continue  # the class table, below
        names = _diffusers_names(name, naming)
        for part, chunk in zip(names, tensor.chunk(len(names), dim=0)):
            out[part] = chunk.flatten(1) if diffusers_linear(part, naming) else chunk
    if config.cond == "class":
        out[CLASS_TABLE] = torch.cat([state_dict["cond_encoder.weight"], state_dict["null_embedding"][None]])
    return out


def published_keys(config: UNetConfig, naming: str = DIFFUSERS) -> dict[str, tuple[int, ...]]:
    """The names and shapes of a UNet2DModel file for `config` (328 tensors for DDPM's CIFAR-10 model)."""
    return {name: tuple(t.shape) for name, t in to_diffusers(_meta_state_dict(config), config, naming).items()}


def from_diffusers(state_dict: Mapping[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """A UNet2DModel's weights, in either of diffusers' attention namings, under our names."""
    naming = diffusers_attention_naming(state_dict)
    check_state_dict(state_dict, published_keys(config, naming), source="the state dict given to from_diffusers",
                     what=_describe(config))
    ours = {}
    for name, tensor in _meta_state_dict(config).items():
        if name == "cond_encoder.weight":
            ours[name] = state_dict[CLASS_TABLE][:-1]
        elif name == "null_embedding":
            ours[name] = state_dict[CLASS_TABLE][-1]
        else:
            names = _diffusers_names(name, naming)
            chunk_shape = (tensor.shape[0] // len(names), *tensor.shape[1:])
            parts = [state_dict[part].reshape(chunk_shape) for part in names]
            ours[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return ours


def read_published_unet(path: str | os.PathLike, config: UNetConfig, *, mmap: bool = False,
                        names_only: bool = False) -> dict[str, Tensor]:
    """A UNet2DModel's tensors (a diffusers folder, or its weights file), checked against `config`: its
    config.json where there is one, then the names and shapes (with `names_only` the names: a start-up
    check before the data has said how many channels and classes it has; `mmap` then reads almost
    nothing of the file)."""
    path = diffusers_weights_file(path, "unet")
    fields = diffusers_config(path.parent)
    if fields is not None and fields.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UserError(f"{path.parent / 'config.json'} describes a diffusers {fields['_class_name']}, not a UNet2DModel; "
                        f"pass the folder of a pixel-space DDPM model (google/ddpm-cifar10-32, say).")
    if fields is None:
        warn_once(f"{path} has no diffusers config.json beside it, so its time embedding, padding and normalisation "
                  f"cannot be checked; it is taken to be DDPM's, as in Ho et al.'s published models.")
    else:
        fixed, options = _config_mismatch(fields, config)
        where = path.parent / "config.json"
        if fixed:
            raise UserError(f"{where} describes a UNet2DModel set otherwise than DDPM's network ({fixed}), which this "
                            f"U-Net cannot express; it cannot be imported.")
        if not names_only and fields.get("in_channels", 3) != config.in_channels:
            raise UserError(f"{where} describes a model of {fields.get('in_channels', 3)}-channel images, and the data "
                            f"has {config.in_channels} channels; train on images of its channels.")
        if options:
            raise UserError(f"{where} describes another network than these options give ({options}); set those "
                            f"options to match it (--preset ddpm-cifar10 gives Ho et al.'s CIFAR-10 model).")
    tensors = read_state_dict(path, _describe(config), mmap=mmap)  # read once its config has passed
    table = tensors.get(CLASS_TABLE)
    if (table is None) != (config.cond != "class"):
        held = "an unconditional model (no class table)" if table is None else \
            f"a class-conditional model ({len(table) - 1} classes and the null one)"
        advice = "drop --cond class (or pass --cond none)" if table is None else "pass --cond class"
        raise UserError(f"{path} holds {held}, and this U-Net is {'' if table is None else 'not '}class-conditional; "
                        f"{advice}.")
    if not names_only and table is not None and len(table) not in (config.num_classes, config.num_classes + 1):
        raise UserError(f"{path} holds {len(table) - 1} classes and the null one, and the data has "
                        f"{config.num_classes}; train on data of its classes.")
    expected = published_keys(config, diffusers_attention_naming(tensors))
    if not names_only and table is not None and len(table) == config.num_classes:
        raise UserError(f"{path} holds {len(table)} class embeddings for the data's {config.num_classes} classes and no "
                        f"null class after them, which classifier-free guidance (and this U-Net) needs; it cannot be "
                        f"imported as a class-conditional model.")
    if names_only:
        expected = {name: tuple(tensors[name].shape) if name in tensors else shape for name, shape in expected.items()}
    check_state_dict(tensors, expected, source=str(path), what=_describe(config))
    return tensors


# diffusers' names of our schedules and predictions (DDPMScheduler's beta_schedule and prediction_type).
_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def check_published_schedule(path: str | os.PathLike, diffusion: Any) -> None:
    """Refuse diffusion options other than those the published model was trained with, where its folder says
    (the scheduler_config.json beside the weights, or in the scheduler/ folder of a pipeline): the schedule, its
    range and length, and what the network predicts. Without such a file the options are taken as given."""
    weights = diffusers_weights_file(path, "unet")
    fields = diffusers_config(weights.parent, "scheduler_config.json")
    if fields is None:  # a pipeline's unet/ folder: its scheduler beside it
        fields = diffusers_config(weights.parent.parent / "scheduler", "scheduler_config.json")
    if fields is None:
        return
    kind = fields.get("beta_schedule", "linear")
    prediction = fields.get("prediction_type", "epsilon")
    unexpressed = [f"{key} {fields[key]!r}" for key, ours in (("trained_betas", None), ("rescale_betas_zero_snr", False))
                   if fields.get(key, ours) not in (ours, [])]
    unexpressed += [f"beta_schedule {kind!r}"] * (kind not in _SCHEDULES)
    unexpressed += [f"prediction_type {prediction!r}"] * (prediction not in _PREDICTIONS)
    if unexpressed:
        raise UserError(f"The model's scheduler config asks for {', '.join(unexpressed)}, which this toolkit's "
                        f"schedules cannot express; it cannot be imported.")
    differ = []
    if _SCHEDULES[kind] != diffusion.schedule:
        differ.append(f"--schedule {_SCHEDULES[kind]} (these options: {diffusion.schedule})")
    steps = fields.get("num_train_timesteps", 1000)
    if steps != diffusion.num_timesteps:
        differ.append(f"--num-timesteps {steps} (these options: {diffusion.num_timesteps})")
    if kind != "squaredcos_cap_v2" and _SCHEDULES[kind] == diffusion.schedule:
        first, last = fields.get("beta_start", 0.0001), fields.get("beta_end", 0.02)
        try:  # the range these options give at the model's T (the published linear range is scaled by 1000 / T)
            at_their_steps = dataclasses.replace(diffusion, num_timesteps=steps).make_schedule()
            ours = (float(at_their_steps.betas[0]), float(at_their_steps.betas[-1]))
        except UserError:  # no schedule of these options at that T: compare their own
            schedule = diffusion.make_schedule()
            ours = (float(schedule.betas[0]), float(schedule.betas[-1]))
        if max(abs(first - ours[0]), abs(last - ours[1])) > 1e-9:
            differ.append(f"--beta-range {first:g} {last:g} (these options: {ours[0]:g} {ours[1]:g})")
    if _PREDICTIONS[prediction] != diffusion.prediction:
        differ.append(f"--prediction {_PREDICTIONS[prediction]} (these options: {diffusion.prediction})")
    if differ:
        raise UserError(f"The published model was trained with {'; '.join(differ)} (its scheduler_config.json); pass "
                        f"those options (--preset ddpm-cifar10 gives Ho et al.'s).")


def load_published_unet(net: UNet, path: str | os.PathLike) -> None:
    """Load a diffusers UNet2DModel (folder or weights file) into `net`; a wrong file leaves it untouched."""
    net.load_state_dict(from_diffusers(read_published_unet(path, net.config), net.config), strict=True)


def _describe(config: UNetConfig) -> str:
    """How error messages name the expected file, e.g. 'diffusers UNet2DModel (128 channels x 1 2 2 2, unconditional)'."""
    mult = " ".join(map(str, config.channel_mult))
    cond = "class-conditional" if config.cond == "class" else "unconditional"
    return f"diffusers UNet2DModel ({config.base_channels} channels x {mult}, {cond})"
