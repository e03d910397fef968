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
