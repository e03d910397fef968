"""From images to Inception features and their statistics.

A source of images is a folder path, a tensor (N, C, H, W) in [0, 1] with C = 1 or 3, or an iterable
of such tensors (e.g. batches straight from a sampler). Statistics are streamed batch by batch;
features are only gathered when asked for (KID needs them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Union

import numpy as np
import torch
from tqdm import tqdm

from .folder import folder_loader
from .inception import FEATURE_DIM, FIDInceptionV3
from .stats import Statistics, StreamingStatistics
from .weights import build_fid_inception

ImageSource = Union[str, os.PathLike, torch.Tensor, Iterable[torch.Tensor]]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class FeatureExtractor:
    """Runs the FID Inception network over image sources; the network is built on first use, once."""

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 batch_size: int = 50, num_workers: int = 0, progress: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size} but must be at least 1.")
        self.weights = weights
        self.device = torch.device(device or default_device())
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress
        self._model: FIDInceptionV3 | None = None

    @property
    def model(self) -> FIDInceptionV3:
        if self._model is None:
            self._model = build_fid_inception(self.weights).to(self.device)
        return self._model

    @torch.no_grad()
    def batches(self, source: ImageSource) -> Iterator[torch.Tensor]:
        """Features of `source`, one float32 CPU tensor (B, 2048) per batch."""
        images, total, name = self._image_batches(source)
        model = self.model  # built before the first batch is read, so a missing weights file fails fast
        for batch in tqdm(images, total=total, desc=f"FID features {name}", unit="batch", disable=not self.progress):
            batch = _check_images(batch).to(self.device, torch.float32)
            features = model(batch).cpu()
            assert features.shape == (batch.shape[0], FEATURE_DIM)
            yield features

    def statistics(self, source: ImageSource) -> Statistics:
        accumulator = StreamingStatistics()
        for features in self.batches(source):
            accumulator.update(features)
        return accumulator.result()

    def features(self, source: ImageSource) -> np.ndarray:
        """All features of `source` as one (N, 2048) float32 array."""
        chunks = [f.numpy() for f in self.batches(source)]
        if not chunks:
            raise ValueError("The image source yielded no images; give at least 2 images.")
        return np.concatenate(chunks)

    def _image_batches(self, source: ImageSource) -> tuple[Iterable[torch.Tensor], int | None, str]:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            check_folder(path)
            loader = folder_loader(path, self.batch_size, self.num_workers)
            return loader, len(loader), path.name
        if isinstance(source, torch.Tensor):
            if source.dim() != 4:
                raise ValueError(f"Images have shape {tuple(source.shape)} but must be (N, C, H, W).")
            return source.split(self.batch_size), -(-source.shape[0] // self.batch_size), "tensor"
        if isinstance(source, Iterable):
            return source, None, "batches"
        raise TypeError(f"Cannot read images from {type(source).__name__}; pass a folder, a tensor or batches.")


def check_folder(path: Path) -> None:
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder of images; pass an existing image folder.")


def _check_images(batch: torch.Tensor) -> torch.Tensor:
    """Validate one (B, C, H, W) batch in [0, 1] and give it 3 channels."""
    if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or batch.shape[1] not in (1, 3):
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"Image batch is {shape} but must be a tensor (B, 1 or 3, H, W).")
    if not batch.is_floating_point():
        raise ValueError(f"Image batch has dtype {batch.dtype}; pass floats in [0, 1] (e.g. uint8 / 255).")
    # Catch the commonest mix-up, images in [-1, 1], which would silently shift every feature.
    low, high = float(batch.min()), float(batch.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"Image values span [{low:.3g}, {high:.3g}] but must lie in [0, 1]; map [-1, 1] images with (x + 1) / 2."
        )
    return batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch


def compute_statistics(source: ImageSource, *, weights: str | os.PathLike | None = None,
                       device: str | torch.device | None = None, batch_size: int = 50, num_workers: int = 0,
                       progress: bool = True) -> Statistics:
    """FID statistics (mu, sigma) of the Inception features of `source`, streamed in float64."""
    return FeatureExtractor(weights, device, batch_size, num_workers, progress).statistics(source)


def compute_features(source: ImageSource, *, weights: str | os.PathLike | None = None,
                     device: str | torch.device | None = None, batch_size: int = 50, num_workers: int = 0,
                     progress: bool = True) -> np.ndarray:
    """Inception features (N, 2048) of `source`, all held in memory (needed for KID)."""
    return FeatureExtractor(weights, device, batch_size, num_workers, progress).features(source)
