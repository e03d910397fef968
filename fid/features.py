"""From images to features and their statistics: Inception's (the published FID), or with `features=`
a classifier trained here (its penultimate layer, see `fid.domain`).

A source of images is a folder path (read as pytorch-fid reads it, see `fid.folder`), a tensor
(N, C, H, W) in [0, 1] with C = 1 or 3, or an iterable of such tensors (e.g. batches straight from a
sampler). Statistics are streamed batch by batch; features are only gathered when asked for (KID
needs them).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, Iterable, Iterator, Union

import numpy as np
import torch

from .domain import ClassifierFeatures, fit_to
from .folder import FolderBatches, ImageFolder, check_enough_images, check_file_selection
from .inception import FEATURE_DIM, FIDInceptionV3, inference_copy
from .stats import Provenance, Statistics, StreamingStatistics
from .weights import build_fid_inception

from core.checkpoint import state_fingerprint
from core.errors import UserError
from core.progress import progress
from core.runtime import check_num_workers, resolve_device
from core.speed import check_compile, inference_memory_format
from data.folder import decode_square
from data.imageio import as_rgb

ImageSource = Union[str, os.PathLike, ImageFolder, torch.Tensor, Iterable[torch.Tensor]]
# What features are computed with, as statistics files record it: this network, its pool3 features.
NETWORK = f"FIDInceptionV3/pool3-{FEATURE_DIM}"


def weights_fingerprint(model: FIDInceptionV3) -> str:
    """A hash of the weights features depend on: the same for the published file downloaded or given as a
    path, and for a copy re-saved without BatchNorm's `num_batches_tracked` counters (which eval mode
    never reads)."""
    return state_fingerprint({name: value for name, value in model.state_dict().items()
                              if not name.endswith("num_batches_tracked")})


@dataclasses.dataclass(frozen=True)
class FeatureOptions:
    """How features are computed, as `python -m fid`'s options set it: with which network, where, how fast."""

    weights: str | os.PathLike | None = None   # Inception's weights file (None: the published one, downloaded once)
    features: str | os.PathLike | None = None  # a classify checkpoint whose penultimate features replace Inception's
    device: str | torch.device | None = None   # None or "auto": CUDA where there is one (core.runtime.resolve_device)
    batch_size: int = 50                       # images per forward pass
    num_workers: int = 0                       # image decoding processes (0: decode in this one)
    files: str = "pytorch-fid"                 # which files of a folder are read: "pytorch-fid" or "all" (fid.folder)
    compile: bool = False                      # torch.compile the network: slow to start, then faster; same features
    progress: bool = True                      # a progress bar per source

    def extractor(self) -> FeatureExtractor:
        """A `FeatureExtractor` with these options (each checked now; the network is built on first use)."""
        return FeatureExtractor(**dataclasses.asdict(self))


class FeatureExtractor:
    """Runs the feature network over image sources; the network is built on first use, once.

    By default that is the FID Inception network: features come from `network`, a copy of `model` with
    its batch norms folded, channels_last on CPU, and through torch.compile with `compile`: the same
    features as `model` gives, to float rounding. With `features` (a classify-stage checkpoint) it is
    that classifier's penultimate layer instead (`fid.domain`), and `weights` is refused (it would not be read).
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 batch_size: int = 50, num_workers: int = 0, progress: bool = True,
                 files: str = "pytorch-fid", compile: bool = False,
                 features: str | os.PathLike | None = None) -> None:
        if batch_size < 1:
            raise UserError(f"The batch size (--batch-size) is {batch_size} but must be at least 1.")
        if features is not None and weights is not None:
            raise UserError("--weights names Inception's weights, which --features CKPT replaces by the classifier's "
                            "own features, so they would not be read; drop --weights (or --features).")
        check_num_workers(num_workers)
        check_file_selection(files)
        self.weights = weights
        # The rule every command shares: "auto" (None) takes CUDA where there is one; a device this machine lacks is
        # refused now, also where only statistics files are compared.
        self.device = resolve_device("auto" if device is None else str(device))
        check_compile(compile, self.device)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress
        self.files = files  # which files of a folder are read: "pytorch-fid" or "all" (see fid.folder)
        self.compile = compile  # torch.compile the network: slow to start, then faster; same features to rounding
        self.memory_format = inference_memory_format(self.device)  # channels-last on the CPU
        self.checkpoint = features  # a classify checkpoint whose penultimate features replace Inception's
        self._domain: ClassifierFeatures | None = None
        self._model: FIDInceptionV3 | None = None
        self._network: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._fingerprint: str | None = None

    @property
    def model(self) -> FIDInceptionV3:
        """The network as loaded, with the published weights' layout."""
        if self._model is None:
            self._model = build_fid_inception(self.weights).to(self.device)
        return self._model

    @property
    def domain(self) -> ClassifierFeatures:
        """The classifier's penultimate features (only with `features`)."""
        assert self.checkpoint is not None, "no classifier checkpoint was given (features=)"
        if self._domain is None:
            self._domain = ClassifierFeatures(self.checkpoint, self.device)
        return self._domain

    @property
    def dim(self) -> int:
        """Size of one feature vector."""
        return FEATURE_DIM if self.checkpoint is None else self.domain.dim

    @property
    def network(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What features are computed with: `model`'s faster copy (`inference_copy`), or the classifier's
        penultimate layer; compiled if asked."""
        if self._network is None:
            fast = self.domain if self.checkpoint is not None else inference_copy(
                self.model, channels_last=self.memory_format == torch.channels_last)
            # Dynamic shapes: one compilation serves every image size and every batch size from 2 up
            # (oneDNN's choice of convolution splits that at 16 on CPU; 1 is specialised too).
            self._network = torch.compile(fast, dynamic=True) if self.compile else fast
        return self._network

    @torch.no_grad()
    def batches(self, source: ImageSource) -> Iterator[torch.Tensor]:
        """Features of `source`, one float32 CPU tensor (B, d) per batch (d = 2048 for Inception)."""
        images, total, name = self._image_batches(source)
        network = self.network  # built before the first batch is read, so a missing weights file fails fast
        for batch in progress(images, total=total, desc=f"FID features {name}", unit="batch",
                              disable=not self.progress):
            batch = _check_layout(batch).to(self.device, torch.float32, memory_format=self.memory_format)
            low_high = torch.stack(torch.aminmax(batch))  # one pass over the batch for both bounds
            features = network(batch).cpu()
            # Read once the features are here: on CUDA, reading it first would hold back the network.
            _check_range(*low_high.tolist())
            assert features.shape == (batch.shape[0], self.dim)
            yield features

    @property
    def network_name(self) -> str:
        """The feature network and layer statistics record (without building Inception)."""
        return NETWORK if self.checkpoint is None else self.domain.name

    def provenance(self, files: str = "", images: int = 0) -> Provenance:
        """What statistics computed here are made of: this network and its weights, and which images."""
        if self.checkpoint is not None:
            return Provenance(self.domain.name, self.domain.fingerprint, files, images)
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return Provenance(NETWORK, self._fingerprint, files, images)

    def statistics(self, source: ImageSource) -> Statistics:
        """Statistics of `source`'s features, with their provenance."""
        if isinstance(source, (str, os.PathLike)):
            source = ImageFolder(source, self.files)
        if isinstance(source, ImageFolder):
            check_enough_images(source)  # before the network is built or any image read
        accumulator = StreamingStatistics()
        for features in self.batches(source):
            accumulator.update(features)
        files = self.files if isinstance(source, (str, os.PathLike, ImageFolder)) else ""
        return dataclasses.replace(accumulator.result(), provenance=self.provenance(files, accumulator.count))

    def features(self, source: ImageSource) -> np.ndarray:
        """All features of `source` as one (N, d) float32 array."""
        chunks = [f.numpy() for f in self.batches(source)]
        if not chunks:
            raise UserError("The image source yielded no images; give at least 2 images.")
        return np.concatenate(chunks)

    def _image_batches(self, source: ImageSource) -> tuple[Iterable[torch.Tensor], int | None, str]:
        if isinstance(source, (str, os.PathLike)):
            source = ImageFolder(source, self.files)
        if isinstance(source, ImageFolder):
            # Large images, and mixed sizes, are brought to the classifier's input (centre square, resized) or
            # to Inception's 299x299 image by image as they are decoded (see FolderBatches).
            if self.checkpoint is None:
                batches = FolderBatches(source, self.batch_size, self.num_workers)
            else:
                # As the classify stage reads its training images (upright, alpha on black, Lanczos centre square,
                # in the classifier's channels), so that these features are the ones its training and the sweep see.
                info = self.domain.classifier.info
                mode = "L" if info.channels == 1 else "RGB"
                source = source.decoded_by(functools.partial(decode_square, resolution=info.resolution, mode=mode))
                batches = FolderBatches(source, self.batch_size, self.num_workers,
                                        functools.partial(fit_to, resolution=info.resolution), info.resolution)
            return batches, len(batches), source.root.name
        if isinstance(source, torch.Tensor):
            if source.dim() != 4:
                raise UserError(f"Images have shape {tuple(source.shape)} but must be (N, C, H, W).")
            return source.split(self.batch_size), -(-source.shape[0] // self.batch_size), "tensor"
        if isinstance(source, Iterable):
            return source, None, "batches"
        raise TypeError(f"Cannot read images from {type(source).__name__}; pass a folder, a tensor or batches.")


def _check_layout(batch: torch.Tensor) -> torch.Tensor:
    """Validate one (B, C, H, W) float batch and give it 3 channels; its values are checked by `_check_range`."""
    if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or batch.shape[1] not in (1, 3):
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise UserError(f"Image batch is {shape} but must be a tensor (B, 1 or 3, H, W).")
    if not batch.is_floating_point():
        raise UserError(f"Image batch has dtype {batch.dtype}; pass floats in [0, 1] (e.g. uint8 / 255).")
    return as_rgb(batch)


def _check_range(low: float, high: float) -> None:
    """Refuse a batch whose values span [low, high], outside [0, 1] (NaN, which bounds propagate, included)."""
    if math.isnan(low) or math.isnan(high):  # a diverged model's images: the statistics would be NaN, or SVD fail
        raise UserError("Image values include NaN (images of a model that diverged?); pass images with values in [0, 1].")
    # Catch the commonest mix-up, images in [-1, 1], which would silently shift every feature.
    if low < -1e-3 or high > 1 + 1e-3:
        raise UserError(
            f"Image values span [{low:.3g}, {high:.3g}] but must lie in [0, 1]; map [-1, 1] images with (x + 1) / 2."
        )


def compute_statistics(source: ImageSource, options: FeatureOptions = FeatureOptions()) -> Statistics:
    """FID statistics (mu, sigma) of the Inception features of `source` (or with `options.features`, a classify
    checkpoint's penultimate features), streamed in float64."""
    return options.extractor().statistics(source)


def compute_features(source: ImageSource, options: FeatureOptions = FeatureOptions()) -> np.ndarray:
    """Inception features (N, 2048) of `source` (or with `options.features`, a classify checkpoint's (N, 512)), all
    held in memory (needed for KID)."""
    return options.extractor().features(source)
