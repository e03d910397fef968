"""Reading and writing image files: the one place that knows about formats, modes and grids.

Every stage reads folders through `list_images` / `load_image` (so a corrupt file is always reported
the same way, by name) and writes what people look at through `save_images`, `save_grid` and
`save_gif`. Tensors here are images in [-1, 1], shape (B, C, H, W), C = 1 or 3.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from core.runtime import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def list_images(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under `root`, sorted so every run sees the same order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist; pass a directory that holds images.")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return files


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Open an image and convert it to `mode` ("RGB" or "L"); a corrupt file raises naming the file.

    Palette and alpha images are composited on black first, so transparent regions become black in
    every mode rather than whatever colour the palette happened to store there.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(background, im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit greyscale: rescale to 8 bits instead of letting PIL clip at 255.
                arr = np.asarray(im, dtype=np.float64)
                hi = 65535.0 if arr.max() > 255 else 255.0
                im = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
            return im.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Cannot read image {path} ({err}); remove or replace the file.") from err


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    assert images.dim() == 4, f"expected (B, C, H, W), got {tuple(images.shape)}"
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _to_pil(array_hwc: np.ndarray) -> Image.Image:
    if array_hwc.shape[-1] == 1:
        return Image.fromarray(array_hwc[..., 0], "L")
    return Image.fromarray(array_hwc, "RGB")


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile a batch into one (H, W, C) uint8 array, `nrow` images per row (default: square-ish)."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    ncol = math.ceil(b / nrow)
    grid = np.zeros((ncol * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for k in range(b):
        r, q = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y : y + h, x : x + w] = arr[k]
    return grid


def atomic_save_image(image: Image.Image, path: str | os.PathLike, **kwargs) -> None:
    """Write all or nothing (see core.runtime.atomic_write), so a crash never leaves a half-written picture."""
    path = Path(path)
    image_format = path.suffix.lstrip(".").upper().replace("JPG", "JPEG")
    atomic_write(path, lambda f: image.save(f, format=image_format, **kwargs))


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> None:
    """Save a batch in [-1, 1] as one PNG grid."""
    atomic_save_image(_to_pil(make_grid(images, nrow)), path)


def save_images(images: torch.Tensor, folder: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Save each image of a batch in [-1, 1] as its own PNG, `folder/name`."""
    assert len(names) == images.shape[0], "one name per image"
    folder = Path(folder)
    paths = []
    for array, name in zip(to_uint8(images), names):
        path = folder / name
        atomic_save_image(_to_pil(array), path)
        paths.append(path)
    return paths


def save_gif(frames: Sequence[torch.Tensor], path: str | os.PathLike, nrow: int | None = None,
             duration_ms: int = 60, hold_last_ms: int = 1500) -> None:
    """Animate a sequence of batches (each (B, C, H, W) in [-1, 1]) as a looping GIF of grids."""
    assert len(frames) > 0, "a GIF needs at least one frame"
    pictures = [_to_pil(make_grid(f, nrow)).convert("RGB") for f in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [hold_last_ms]
    atomic_write(path, lambda f: pictures[0].save(f, format="GIF", save_all=True, append_images=pictures[1:],
                                                  duration=durations, loop=0))
