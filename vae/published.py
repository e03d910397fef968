"""Import of the published latent-diffusion / Stable Diffusion KL autoencoder weights.

The same network is published under two sets of names:

- **latent-diffusion's.** CompVis released the first stages of latent diffusion (`kl-f4.zip`,
  `kl-f8.zip`, ... with a `model.ckpt` inside), Stable Diffusion embeds the kl-f8 one under
  `first_stage_model.` in every full checkpoint, and Stability's fine-tuned decoders
  (`vae-ft-mse-840000-ema-pruned`) ship it on its own as `.ckpt` or `.safetensors`. Our model keeps
  these names except in two places: a residual block's 1x1 shortcut is `skip` here and `nin_shortcut`
  there, and attention's q, k and v are three 1x1 convs there and one fused `qkv` conv here, whose
  output channels are laid out [q | k | v].
- **diffusers'.** The `diffusion_pytorch_model.safetensors` (or `.bin`) of a diffusers `AutoencoderKL`
  folder (`stabilityai/sd-vae-ft-mse`, the SDXL VAE, ...) numbers the blocks `down_blocks.L.resnets.I`,
  `mid_block.resnets.0`, `mid_block.attentions.0`, ..., runs the decoder's `up_blocks` lowest
  resolution first (latent-diffusion's `up` list is indexed by resolution level, highest first), calls
  the shortcut `conv_shortcut`, the attention's norm `group_norm`, and holds its projections as linear
  layers, 2-D weights: `to_q`, `to_k`, `to_v`, `to_out.0`, or `query`, `key`, `value`, `proj_attn` in
  files written before diffusers 0.14.

A file's naming is told from its keys; every key and shape is checked against the config before
anything is copied. Both normalise every layer in 32 groups (diffusers: its config's `norm_num_groups`),
which our blocks do from 128 channels on (`ddpm.unet.num_groups`): a narrower config would load such a
file and compute another function, so that is refused where the file's groups are known (a diffusers
folder's `config.json`) and warned about where they are not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from core.errors import UserError, warn_once
from core.weights import (DIFFUSERS_ATTENTION, check_state_dict, diffusers_attention_naming, diffusers_config,
                          diffusers_linear, diffusers_weights_file, read_state_dict)
from ddpm.unet import num_groups
from vae.autoencoder import AutoencoderConfig, AutoencoderKL

FULL_CHECKPOINT_PREFIX = "first_stage_model."  # where a full Stable Diffusion checkpoint keeps the autoencoder
# Not autoencoder weights: CompVis first-stage checkpoints carry the training loss (discriminator,
# LPIPS, output log-variance) under `loss.`, and the EMA-pruned fine-tuned VAEs keep the two scalars
# of the moving average that produced them. A run that starts from published weights starts its own
# loss afresh; the log-variance there is the 0 it was created with, as latent diffusion's optimizer
# never updates it (see vae.config.VAELossConfig).
IGNORED_PREFIXES = ("loss.",)
IGNORED_KEYS = frozenset({"model_ema.decay", "model_ema.num_updates"})
PUBLISHED_GROUPS = 32  # latent-diffusion's Normalize at every width, and diffusers' default norm_num_groups

# The namings a published file comes in, and how each calls an attention block's q, k, v and output layers.
LATENT_DIFFUSION, DIFFUSERS, DIFFUSERS_LEGACY = "latent-diffusion", "diffusers", "diffusers-legacy"
NAMINGS = (LATENT_DIFFUSION, DIFFUSERS, DIFFUSERS_LEGACY)
_ATTENTION_LAYERS = {LATENT_DIFFUSION: ("q", "k", "v", "proj_out"), **DIFFUSERS_ATTENTION}
_DIFFUSERS_MID = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}


def _diffusers_module(module: str, levels: int) -> str:
    """Our module path (latent-diffusion's, but for skip and qkv) under diffusers' block names."""
    net, _, rest = module.partition(".")
    if net not in ("encoder", "decoder"):
        return module  # quant_conv, post_quant_conv
    part = rest.split(".")
    if part[0] == "mid":  # mid.block_1 -> mid_block.resnets.0
        part = ["mid_block", *_DIFFUSERS_MID[part[1]].split("."), *part[2:]]
    elif part[0] == "norm_out":
        part[0] = "conv_norm_out"
    elif part[0] in ("down", "up"):  # down|up.LEVEL.block|attn.I... and down|up.LEVEL.downsample|upsample.conv
        level = int(part[1]) if part[0] == "down" else levels - 1 - int(part[1])
        kind = {"block": ["resnets"], "attn": ["attentions"], "downsample": ["downsamplers", "0"],
                "upsample": ["upsamplers", "0"]}[part[2]]
        part = [f"{part[0]}_blocks", str(level), *kind, *part[3:]]
    if part[-1] == "skip":
        part[-1] = "conv_shortcut"
    elif part[-1] == "norm" and "attentions" in part:
        part[-1] = "group_norm"
    return ".".join([net, *part])


def _published_names(name: str, naming: str, levels: int) -> list[str]:
    """The published tensor(s) one of our tensors is made of, under `naming`; several are stacked along
    dim 0 (qkv = [q | k | v])."""
    module, _, param = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    q, k, v, out = _ATTENTION_LAYERS[naming]
    if naming == LATENT_DIFFUSION:
        if leaf == "skip":
            return [f"{parent}.nin_shortcut.{param}"]
    else:
        parent = _diffusers_module(parent, levels)
        if leaf not in ("qkv", "proj_out"):
            return [f"{_diffusers_module(module, levels)}.{param}"]
    if leaf == "qkv":
        return [f"{parent}.{part}.{param}" for part in (q, k, v)]
    if leaf == "proj_out":
        return [f"{parent}.{out}.{param}"]
    return [name]


def _published_shape(name: str, shape: torch.Size, naming: str) -> tuple[int, ...]:
    """The shape a published tensor has: diffusers' attention projections are linear layers, (out, in)
    where our 1x1 convolutions are (out, in, 1, 1)."""
    if naming != LATENT_DIFFUSION and diffusers_linear(name, naming):
        return tuple(shape[:2])
    return tuple(shape)


def _initial_state_dict(config: AutoencoderConfig) -> dict[str, Tensor]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        return AutoencoderKL(config).state_dict()


def _rename_to_published(state_dict: Mapping[str, Tensor], config: AutoencoderConfig,
                         naming: str) -> dict[str, Tensor]:
    published = {}
    for name, tensor in state_dict.items():
        names = _published_names(name, naming, len(config.channel_mult))
        for part, chunk in zip(names, tensor.chunk(len(names), dim=0)):
            published[part] = chunk.reshape(_published_shape(part, chunk.shape, naming))
    return published


def published_keys(config: AutoencoderConfig, naming: str = LATENT_DIFFUSION) -> dict[str, tuple[int, ...]]:
    """The names and shapes a published `AutoencoderKL` has for `config` under `naming` (248 tensors for
    kl-f8 in latent-diffusion's naming, as many in diffusers')."""
    return {name: tuple(t.shape) for name, t in _rename_to_published(_initial_state_dict(config), config,
                                                                     naming).items()}


def naming_of(keys) -> str:
    """Which naming a published file's keys are in: diffusers' numbered blocks, with or without its
    pre-0.14 attention names, or latent-diffusion's."""
    keys = list(keys)
    if not any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in keys):
        return LATENT_DIFFUSION
    return diffusers_attention_naming(keys)


def to_published(state_dict: Mapping[str, Tensor], config: AutoencoderConfig,
                 naming: str = LATENT_DIFFUSION) -> dict[str, Tensor]:
    """Our `AutoencoderKL(config).state_dict()` under a published naming (q, k, v split off qkv)."""
    if naming not in NAMINGS:
        raise UserError(f"to_published takes naming {', '.join(NAMINGS)}, not {naming!r}.")
    expected = {name: tuple(t.shape) for name, t in _initial_state_dict(config).items()}
    if {name: tuple(t.shape) for name, t in state_dict.items()} != expected:
        raise UserError("to_published expects the state dict of an AutoencoderKL built from the same config; "
                        "pass model.state_dict() together with model.config.")
    return _rename_to_published(state_dict, config, naming)


def from_published(state_dict: Mapping[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """Published autoencoder weights, in either naming, under our names, ready for
    `AutoencoderKL(config).load_state_dict`."""
    naming = naming_of(state_dict)
    check_state_dict(state_dict, published_keys(config, naming), source="the state dict given to from_published",
                     what=_describe(config, naming))
    ours = {}
    for name, tensor in _initial_state_dict(config).items():
        names = _published_names(name, naming, len(config.channel_mult))
        chunk_shape = (tensor.shape[0] // len(names), *tensor.shape[1:])
        parts = [state_dict[published].reshape(chunk_shape) for published in names]
        ours[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return ours


def load_published_weights(model: AutoencoderKL, path: str | os.PathLike) -> None:
    """Load a published KL autoencoder: a first-stage `.ckpt`, a full Stable Diffusion checkpoint, a
    `.safetensors` file, or a diffusers AutoencoderKL's weights file or folder.

    The file's keys and shapes are checked against `model.config` before anything is copied, so a
    wrong file or config leaves the model untouched.
    """
    model.load_state_dict(from_published(read_published_weights(path, model.config), model.config), strict=True)


def read_published_weights(path: str | os.PathLike, config: AutoencoderConfig, *, mmap: bool = False,
                           names_only: bool = False) -> dict[str, Tensor]:
    """The autoencoder's tensors of a published file under their published names, checked against `config`:
    names and shapes, or with `names_only` the names (a start-up check, before the data has said how many
    channels its images have; with `mmap`, which maps the file and reads almost nothing of it)."""
    path = diffusers_weights_file(path, "vae")
    fields = diffusers_config(path.parent)
    if fields is not None:
        _check_diffusers_config(fields, config, path)
    tensors = read_state_dict(path, _describe(config, None), mmap=mmap)
    if any(k.startswith(FULL_CHECKPOINT_PREFIX) for k in tensors):  # keep the autoencoder, drop the rest
        prefix = len(FULL_CHECKPOINT_PREFIX)
        tensors = {k[prefix:]: v for k, v in tensors.items() if k.startswith(FULL_CHECKPOINT_PREFIX)}
    found = {k: v for k, v in tensors.items() if not k.startswith(IGNORED_PREFIXES) and k not in IGNORED_KEYS}
    naming = naming_of(found)
    _check_groups(config, path, naming, fields)
    expected = published_keys(config, naming)
    if names_only:
        expected = {name: tuple(found[name].shape) if name in found else shape for name, shape in expected.items()}
    check_state_dict(found, expected, source=str(path), what=_describe(config, naming))
    return found


# diffusers AutoencoderKL settings our network has only one way (latent diffusion's), with diffusers' defaults.
_FIXED = {"act_fn": "silu", "mid_block_add_attention": True, "use_quant_conv": True, "use_post_quant_conv": True}


def _check_diffusers_config(fields: dict, config: AutoencoderConfig, path: Path) -> None:
    """Refuse a diffusers config.json of another class, of settings this autoencoder cannot take, or of other
    sizes than the options give, each in one sentence before the weights are read."""
    where = path.parent / "config.json"
    kind = fields.get("_class_name", "AutoencoderKL")
    if kind != "AutoencoderKL":
        raise UserError(f"{where} describes a diffusers {kind}, not an AutoencoderKL; pass the autoencoder's folder "
                        f"(the vae/ of a Stable Diffusion pipeline, say).")
    fixed = [f"{key} {fields[key]!r}" for key, value in _FIXED.items() if fields.get(key, value) != value]
    if fixed:
        raise UserError(f"{where} describes an AutoencoderKL with {', '.join(fixed)}, which this autoencoder (latent "
                        f"diffusion's: SiLU, attention in the middle, quant convolutions) cannot express; it cannot be "
                        f"imported.")
    widths = [config.base_channels * m for m in config.channel_mult]
    sizes = {"block_out_channels": (list(widths), "--base-channels and --channel-mult"),
             "layers_per_block": (config.num_res_blocks, "--num-res-blocks"),
             "latent_channels": (config.latent_channels, "--latent-channels")}
    differ = [(key, option) for key, (ours, option) in sizes.items() if key in fields and fields[key] != ours]
    if differ:
        listed = "; ".join(f"{key} {fields[key]!r} (these options: {sizes[key][0]!r})" for key, _ in differ)
        raise UserError(f"{where} describes another autoencoder than these options ({listed}); set "
                        f"{' and '.join(option for _, option in differ)} to match it.")


def _check_groups(config: AutoencoderConfig, path: Path, naming: str, fields: dict | None) -> None:
    """Refuse (or, where the file's groups are a guess, warn about) a config whose GroupNorms would split
    channels other than the published network's did."""
    known = None
    if naming != LATENT_DIFFUSION and fields is not None:
        known = fields.get("norm_num_groups", PUBLISHED_GROUPS)
    groups = PUBLISHED_GROUPS if known is None else known
    widths = sorted({config.base_channels * m for m in config.channel_mult})
    differ = [width for width in widths if num_groups(width) != groups]
    if not differ:
        return
    ours = ", ".join(f"{width} channels in {num_groups(width)} groups" for width in differ)
    if known is not None:
        raise UserError(f"{path.parent / 'config.json'} normalises every layer in {known} groups, where this autoencoder "
                        f"normalises its layers of {ours} (ddpm.unet.num_groups), so the weights would compute another "
                        f"function here; pass an autoencoder config with at least 128 channels at every level "
                        f"(--base-channels 128, as in the kl-f4 and kl-f8 presets).")
    warn_once(f"{path}: published autoencoders normalise every layer in {groups} groups, where this autoencoder "
              f"normalises its layers of {ours} (ddpm.unet.num_groups), so weights trained by latent diffusion or "
              f"diffusers compute another function here (a file vae.published.to_published wrote from such a model "
              f"loads exactly).")


def _describe(config: AutoencoderConfig, naming: str | None = LATENT_DIFFUSION) -> str:
    """How error messages name the expected file, e.g. 'latent-diffusion KL autoencoder (f=8, 4 latent channels)'
    (naming None: before the file has said which)."""
    network = {None: "KL autoencoder", LATENT_DIFFUSION: "latent-diffusion KL autoencoder"}.get(
        naming, "diffusers AutoencoderKL")
    return f"{network} (f={config.downsampling_factor}, {config.latent_channels} latent channels)"
