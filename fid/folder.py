"""Batches of images from a folder, in the layout the FID network takes: float (B, 3, H, W) in [0, 1].

Files are listed and decoded by `data.imageio`, so every format and mode (greyscale, palette, alpha)
arrives as RGB the same way everywhere in the toolkit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from data.imageio import list_images, load_image

from . import inception


class ImageFolder(Dataset):
    """Every image under `root` (recursively, sorted) as a (3, H, W) float tensor in [0, 1]."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.files = list_images(self.root)
        if not self.files:
            raise ValueError(f"Image folder {self.root} contains no images; point to a folder of PNG/JPEG files.")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        array = np.asarray(load_image(self.files[index], mode="RGB"), dtype=np.uint8)
        # Same conversion as torchvision's ToTensor, which the reference FID code uses.
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def collate_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack a batch; images of different sizes are first resized to the network input.

    The network resizes every input to 299x299 with the same bilinear filter, and resizing an
    image to its own size is the identity, so the features do not depend on where it happens.
    """
    if all(image.shape == images[0].shape for image in images):
        return torch.stack(images)
    return torch.cat([
        F.interpolate(image[None], size=(inception.INPUT_SIZE,) * 2, mode="bilinear", align_corners=False)
        for image in images
    ])


def folder_loader(root: str | os.PathLike, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(ImageFolder(root), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_images, drop_last=False)
