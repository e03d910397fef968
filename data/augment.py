"""Training-time augmentation, applied by the training loop to a whole batch on its device.

Every random choice is drawn from the step's generator (seeded by run seed, step and rank), so a
resumed run augments exactly as an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Augment = Callable[[Any, torch.Generator], Any]


def random_hflip(batch: Any, generator: torch.Generator) -> Any:
    """Mirror each image left-right with probability 1/2 (DDPM's only augmentation).

    `batch` is any named tuple with an `image` field of shape (B, C, H, W); the rest passes through.
    """
    image = batch.image
    flip = torch.rand(image.shape[0], generator=generator, device=image.device) < 0.5
    return batch._replace(image=torch.where(flip[:, None, None, None], image.flip(3), image))


def random_view(batch: Any, generator: torch.Generator) -> Any:
    """Pick one of V precomputed views per item, uniformly: `views` (B, V, ...) -> (B, ...).

    For data whose augmentations are computed ahead of time, e.g. the latents of an image and of its
    mirror image, which a latent cache stores side by side because an encoder is not equivariant to
    mirroring.
    """
    views = batch.views
    b, v = views.shape[:2]
    pick = torch.randint(0, v, (b,), generator=generator, device=views.device)
    return batch._replace(views=views[torch.arange(b, device=views.device), pick].unsqueeze(1))


def random_crop(batch: Any, generator: torch.Generator, padding: int) -> Any:
    """Pad each image by `padding` pixels (reflecting its border) and cut a random window of its own
    size back out, i.e. shift it by up to `padding` pixels in each direction (the CIFAR ResNets'
    augmentation, He et al. 2016). Reflection keeps the padding in the image's own colours, where a
    constant would add a frame the test images never have.
    """
    image = batch.image
    if padding <= 0:
        return batch
    b, _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4, mode="reflect")
    dy, dx = (torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=image.device) for _ in range(2))
    rows = dy[:, None] + torch.arange(h, device=image.device)                       # (B, H)
    cols = dx[:, None] + torch.arange(w, device=image.device)                       # (B, W)
    crops = padded.permute(0, 2, 3, 1)[torch.arange(b, device=image.device)[:, None, None], rows[:, :, None],
                                       cols[:, None, :]]                              # (B, H, W, C)
    return batch._replace(image=crops.permute(0, 3, 1, 2).contiguous())


def random_noise(batch: Any, generator: torch.Generator, max_std: float) -> Any:
    """Add Gaussian pixel noise to each image, its standard deviation drawn uniformly from [0, max_std], and
    clamp to the [-1, 1] range. A classifier that judges generated images should have seen images with a
    little noise: one trained only on noise-free renders (a background of exactly 0) can read every image
    with a faint noise floor, which a generator leaves, as nothing it knows.
    """
    image = batch.image
    std = torch.rand(image.shape[0], generator=generator, device=image.device) * max_std
    noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
    return batch._replace(image=(image + std[:, None, None, None].to(image.dtype) * noise).clamp(-1, 1))


def compose(*augments: Augment | None) -> Augment | None:
    """The augmentations given (None entries skipped) applied in turn, or None if there are none."""
    chosen = [a for a in augments if a is not None]
    if not chosen:
        return None

    def apply(batch: Any, generator: torch.Generator) -> Any:
        for augment in chosen:
            batch = augment(batch, generator)
        return batch
    return apply
