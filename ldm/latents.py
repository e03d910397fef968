"""The latent cache: every training image's posterior under a frozen autoencoder, encoded once.

Latent diffusion trains on z ~ q(z | x), a fresh draw each time an image is seen. The encoder is
the expensive half of that, and it is frozen, so the cache keeps each image's posterior mean and
standard deviation and the training loop draws z = (mean + std * eps) * scale_factor per step, the
scale measured on the cache itself (`vae.stage.latent_scale_factor`). With horizontal flips the mirror image
is encoded too (a convolutional encoder is not equivariant to mirroring, so a flipped latent is not
the mirror image's latent) and one of the two views is drawn.

A cache file is named by the autoencoder's weight fingerprint and a hash of the images, labels and
parameters, and both are stored in it and checked when it is read, with the latents' shape: a
different autoencoder, or changed data, never reuses a cache, and a file whose contents are not what
its name promises is encoded again and replaced (saying so).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from core.distributed import main_process_first
from core.runtime import Runtime, atomic_write
from data import DatasetInfo, ImageDataset
from data.imageio import from_uint8
from vae.autoencoder import AutoencoderKL

VERSION = 1  # bump when what a cache file holds changes


class LatentBatch(NamedTuple):
    """One item (or a collated batch) of a latent dataset."""
    views: Tensor    # (V, 2L, h, w) posterior [mean | std] of the image (V = 1) or of it and its mirror (V = 2)
    label: Tensor    # int64 class index
    params: Tensor   # (P,) raw parameters in the data's units
    index: Tensor    # int64 position of the image in its dataset


class LatentDataset(torch.utils.data.Dataset):
    """Posterior moments (N, V, 2L, h, w), stored in float16, with the images' labels and parameters.

    `info` describes the images the latents come from, so checkpoints record the real data.
    """

    def __init__(self, moments: Tensor, labels: Tensor, params: Tensor, info: DatasetInfo):
        assert moments.ndim == 5 and moments.shape[0] == info.num_samples == len(labels) == len(params), (
            f"moments {tuple(moments.shape)} do not match {info.num_samples} images")
        self.moments, self.labels, self.params, self.info = moments, labels, params, info

    def __len__(self) -> int:
        return self.moments.shape[0]

    def __getitem__(self, i: int) -> LatentBatch:
        return LatentBatch(self.moments[i].float(), self.labels[i], self.params[i], torch.tensor(i))


def draw_latent(moments: Tensor, generator: torch.Generator) -> Tensor:
    """z = mean + std * eps from posterior moments (B, 2L, h, w) = [mean | std]."""
    mean, std = moments.chunk(2, dim=1)
    return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


def scaled_x0(scale: float) -> Callable[[Any, torch.Generator | None], Tensor]:
    """x0 of a batch of cached latents, as the diffusion model sees it: `scale` times a draw from each image's
    posterior (its mean where `generator` is None, as an inversion's evaluation takes it)."""
    def x0(batch: Any, generator: torch.Generator | None) -> Tensor:
        moments = batch.views[:, 0]
        return scale * (moments.chunk(2, dim=1)[0] if generator is None else draw_latent(moments, generator))
    return x0


def cache_path(cache_dir: str | Path, info: DatasetInfo, vae_fingerprint: str, images_hash: str, views: int) -> Path:
    name = re.sub(r"[^A-Za-z0-9]+", "_", info.name).strip("_")[-40:] or "data"
    return Path(cache_dir) / "latents" / f"{name}-r{info.resolution}-vae{vae_fingerprint}-data{images_hash}-v{views}-{VERSION}.npz"


@torch.no_grad()
def encode_dataset(autoencoder: AutoencoderKL, dataset: ImageDataset, views: int, batch: int) -> Tensor:
    """[mean | std] of every image (and its mirror image, with views = 2): (N, V, 2L, h, w) float16."""
    device = next(autoencoder.parameters()).device
    out = []
    for start in tqdm(range(0, len(dataset), batch), desc=f"Encoding {len(dataset)} images into latents", unit="batch"):
        x = from_uint8(dataset.images[start:start + batch].to(device))
        per_view = []
        for view in range(views):
            posterior = autoencoder.encode(x.flip(3) if view else x)
            per_view.append(torch.cat([posterior.mean, posterior.std], dim=1))
        out.append(torch.stack(per_view, dim=1).half().cpu())
    return torch.cat(out)


def _read(path: Path, vae_fingerprint: str, images_hash: str, expected: tuple[int, ...]) -> tuple[Tensor | None, str]:
    """The moments cached at `path`, or None and why they cannot be used ("" when there is no file).

    The file's name says what it should hold, but only its contents say what it does: a file copied or
    renamed into place, or written by other code, is checked before it is trusted."""
    if not path.is_file():
        return None, ""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return None, "holds one bare array, not an .npz archive"
        with loaded as z:
            missing = [key for key in ("moments", "vae_fingerprint", "data_hash") if key not in z.files]
            if missing:
                return None, f"lacks {', '.join(missing)}"
            moments, fingerprint, hashed = z["moments"], str(z["vae_fingerprint"]), str(z["data_hash"])
    except MemoryError:
        raise  # the machine's limit, not the file's fault: the entry point says so
    except Exception as err:  # a damaged archive raises anything from BadZipFile to NotImplementedError
        # (compression) and RuntimeError (encryption flag); an interruption passes
        return None, f"is unreadable ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
    if fingerprint != vae_fingerprint:
        return None, f"was encoded by another autoencoder (weights {fingerprint}, not {vae_fingerprint})"
    if hashed != images_hash:
        return None, f"was encoded from other images (data {hashed}, not {images_hash})"
    if moments.shape != expected or moments.dtype != np.float16:
        return None, f"holds {moments.dtype} latents of shape {moments.shape}, not float16 {expected}"
    if not np.isfinite(moments).all():
        return None, "holds NaN or infinite values"
    return torch.from_numpy(moments), ""


def latent_dataset(autoencoder: AutoencoderKL, vae_fingerprint: str, dataset: ImageDataset, *, hflip: bool,
                   cache_dir: str | Path, batch: int, runtime: Runtime) -> LatentDataset:
    """The latent dataset of `dataset` under `autoencoder`, from the cache or encoded (once, by the main
    process under torchrun) and cached."""
    views = 2 if hflip else 1
    f, L = autoencoder.config.downsampling_factor, autoencoder.config.latent_channels
    r = dataset.info.resolution // f
    expected = (len(dataset), views, 2 * L, r, r)
    images_hash = dataset.fingerprint()
    path = cache_path(cache_dir, dataset.info, vae_fingerprint, images_hash, views)
    with main_process_first(runtime):
        moments, unusable = _read(path, vae_fingerprint, images_hash, expected)
        if moments is None and runtime.is_main:
            if unusable:
                print(f"Latent cache {path} {unusable}; encoding again.", flush=True)
            moments = encode_dataset(autoencoder, dataset, views, batch)
            # Atomically, so the file that replaces an unusable one is whole or absent.
            atomic_write(path, lambda file: np.savez(file, moments=moments.numpy(), vae_fingerprint=vae_fingerprint,
                                                     data_hash=images_hash))
    if moments is None:  # another process wrote it while this one waited
        moments, unusable = _read(path, vae_fingerprint, images_hash, expected)
        assert moments is not None, f"the main process did not leave a usable latent cache at {path}: it {unusable}"
    return LatentDataset(moments, dataset.labels, dataset.params, dataset.info)
