"""Import of the published latent-diffusion / Stable Diffusion KL autoencoder weights.

CompVis released the first stages of latent diffusion (`kl-f4.zip`, `kl-f8.zip`, ... with a
`model.ckpt` inside), Stable Diffusion embeds the kl-f8 one under `first_stage_model.` in every
full checkpoint, and Stability's fine-tuned decoders (`vae-ft-mse-840000-ema-pruned`) ship it on its
own as `.ckpt` or `.safetensors`. All use latent-diffusion's module names. Our model keeps those
names except in two places, which is all the translation does:

- a residual block's 1x1 shortcut is `skip` here and `nin_shortcut` there;
- attention's q, k and v are three 1x1 convs there and one fused `qkv` conv here, whose output
  channels are laid out [q | k | v].

Files from the diffusers library use different names altogether and are refused by the key check.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import Tensor

from core.errors import UserError
from core.weights import check_state_dict, read_state_dict
from vae.autoencoder import AutoencoderConfig, AutoencoderKL

FULL_CHECKPOINT_PREFIX = "first_stage_model."  # where a full Stable Diffusion checkpoint keeps the autoencoder
# Not autoencoder weights: CompVis first-stage checkpoints carry the training loss (discriminator,
# LPIPS, output log-variance) under `loss.`, and the EMA-pruned fine-tuned VAEs keep the two scalars
# of the moving average that produced them. A run that starts from published weights starts its own
# loss afresh; the log-variance there is the 0 it was created with, as latent diffusion's optimizer
# never updates it (see vae.config.VAELossConfig).
IGNORED_PREFIXES = ("loss.",)
IGNORED_KEYS = frozenset({"model_ema.decay", "model_ema.num_updates"})


def _published_names(name: str) -> list[str]:
    """The published tensor(s) one of our tensors is made of; several are stacked along dim 0 (qkv = [q | k | v])."""
    module, _, param = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    if leaf == "skip":
        return [f"{parent}.nin_shortcut.{param}"]
    if leaf == "qkv":
        return [f"{parent}.{part}.{param}" for part in ("q", "k", "v")]
    return [name]


def _initial_state_dict(config: AutoencoderConfig) -> dict[str, Tensor]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        return AutoencoderKL(config).state_dict()


def _rename_to_published(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    published = {}
    for name, tensor in state_dict.items():
        names = _published_names(name)
        published.update(zip(names, tensor.chunk(len(names), dim=0)))
    return published


def published_keys(config: AutoencoderConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes latent-diffusion's `AutoencoderKL` has for `config` (248 tensors for kl-f8)."""
    return {name: tuple(t.shape) for name, t in _rename_to_published(_initial_state_dict(config)).items()}


def to_published(state_dict: Mapping[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """Our `AutoencoderKL(config).state_dict()` under latent-diffusion's names (q, k, v split off qkv)."""
    expected = {name: tuple(t.shape) for name, t in _initial_state_dict(config).items()}
    if {name: tuple(t.shape) for name, t in state_dict.items()} != expected:
        raise UserError("to_published expects the state dict of an AutoencoderKL built from the same config; "
                        "pass model.state_dict() together with model.config.")
    return _rename_to_published(state_dict)


def from_published(state_dict: Mapping[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """Latent-diffusion's autoencoder weights under our names, ready for `AutoencoderKL(config).load_state_dict`."""
    check_state_dict(state_dict, published_keys(config), source="the state dict given to from_published",
                     what=_describe(config))
    ours = {}
    for name in _initial_state_dict(config):
        parts = [state_dict[published] for published in _published_names(name)]
        ours[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return ours


def load_published_weights(model: AutoencoderKL, path: str | os.PathLike) -> None:
    """Load a published KL autoencoder (first-stage `.ckpt`, full Stable Diffusion checkpoint or `.safetensors`).

    The file's keys and shapes are checked against `model.config` before anything is copied, so a
    wrong file or config leaves the model untouched.
    """
    model.load_state_dict(from_published(read_published_weights(path, model.config), model.config), strict=True)


def read_published_weights(path: str | os.PathLike, config: AutoencoderConfig, *, mmap: bool = False,
                           names_only: bool = False) -> dict[str, Tensor]:
    """The autoencoder's tensors of a published file under their published names, checked against `config`:
    names and shapes, or with `names_only` the names (a start-up check, before the data has said how many
    channels its images have; with `mmap`, which maps the file and reads almost nothing of it)."""
    what = _describe(config)
    tensors = read_state_dict(path, what, mmap=mmap)
    if any(k.startswith(FULL_CHECKPOINT_PREFIX) for k in tensors):  # keep the autoencoder, drop the rest
        prefix = len(FULL_CHECKPOINT_PREFIX)
        tensors = {k[prefix:]: v for k, v in tensors.items() if k.startswith(FULL_CHECKPOINT_PREFIX)}
    found = {k: v for k, v in tensors.items() if not k.startswith(IGNORED_PREFIXES) and k not in IGNORED_KEYS}
    expected = published_keys(config)
    if names_only:
        expected = {name: tuple(found[name].shape) if name in found else shape for name, shape in expected.items()}
    check_state_dict(found, expected, source=str(path), what=what)
    return found


def _describe(config: AutoencoderConfig) -> str:
    """How error messages name the expected file, e.g. 'latent-diffusion KL autoencoder (f=8, 4 latent channels)'."""
    return f"latent-diffusion KL autoencoder (f={config.downsampling_factor}, {config.latent_channels} latent channels)"
