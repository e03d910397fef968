"""The in-memory dataset every source produces, and the metadata a checkpoint keeps about it.

Each source (plumes, folder, cifar10) decodes its images once into one uint8 tensor (N, C, H, W), so
that `__getitem__` is an index plus a conversion and a 2-core training loop is never data-bound.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Hashable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from core.errors import UserError
from data.imageio import from_uint8


class Batch(NamedTuple):
    """One item, or (collated) one batch, of an image dataset."""
    image: torch.Tensor   # (C, R, R) float32 in [-1, 1]; batched (B, C, R, R)
    label: torch.Tensor   # int64 class index (0 for unlabelled data)
    params: torch.Tensor  # (P,) float32 raw parameters in the data's units
    index: torch.Tensor   # int64 position of the item in its dataset (inversion learns one vector per index)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about the data it was trained on; plain Python so checkpoints can hold it."""

    name: str
    resolution: int
    channels: int
    class_names: tuple[str, ...]
    param_names: tuple[str, ...]
    param_ranges: tuple[tuple[float, float], ...]
    num_samples: int

    def __post_init__(self) -> None:
        assert self.channels in (1, 3), f"channels must be 1 or 3, got {self.channels}"
        assert len(self.param_ranges) == len(self.param_names), "one (min, max) range per parameter"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        # Checkpoints and JSON turn tuples into lists; restore them so infos compare equal.
        return cls(
            name=str(d["name"]),
            resolution=int(d["resolution"]),
            channels=int(d["channels"]),
            class_names=tuple(str(c) for c in d["class_names"]),
            param_names=tuple(str(p) for p in d["param_names"]),
            param_ranges=tuple((float(lo), float(hi)) for lo, hi in d["param_ranges"]),
            num_samples=int(d["num_samples"]),
        )

    def _bounds(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert p.shape[-1] == len(self.param_names), (
            f"expected {len(self.param_names)} parameters {self.param_names}, got shape {tuple(p.shape)}")
        if type(p) is torch.Tensor:  # (not a traced or fake tensor, which must not outlive its trace in a cache)
            return _bounds_on(self.param_ranges, p.device, p.dtype)
        return _bounds_on.__wrapped__(self.param_ranges, p.device, p.dtype)

    def normalize_params(self, p: torch.Tensor) -> torch.Tensor:
        """Raw parameters (..., P) -> [-1, 1] over the dataset's range; a constant parameter maps to 0."""
        lo, span = self._bounds(p)
        return torch.where(span > 0, 2 * (p - lo) / span.clamp(min=1e-12) - 1, torch.zeros_like(p))

    def denormalize_params(self, p: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize_params` (a constant parameter comes back as its one value)."""
        lo, span = self._bounds(p)
        return lo + (p + 1) / 2 * span


@functools.lru_cache(maxsize=64)
def _bounds_on(ranges: tuple[tuple[float, float], ...], device: torch.device, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, span) of each parameter's range on `device`, made once: a copy from the host to a GPU waits for
    the GPU, and a parameter-conditioned run normalises its parameters at every step."""
    table = torch.tensor(ranges, dtype=dtype, device=device).view(-1, 2)
    return table[:, 0], table[:, 1] - table[:, 0]


def content_hash(*tensors: torch.Tensor) -> str:
    """16 hex digits of SHA-256 over the tensors' shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


_FINGERPRINTS: dict[Hashable, str] | None = None  # within `fingerprints_kept`: by `ImageDataset.content_key`


@contextlib.contextmanager
def fingerprints_kept() -> Iterator[None]:
    """Within the body, a set of known content (`ImageDataset.content_key`) is hashed once, however often its
    fingerprint is asked for: a command that trains many runs on the same folders in one process (each run, and
    each check of a kept run, records its sets' fingerprints). `data.folder.decoding_once` opens it."""
    global _FINGERPRINTS
    outer = _FINGERPRINTS
    _FINGERPRINTS = {} if outer is None else outer
    try:
        yield
    finally:
        _FINGERPRINTS = outer


class ImageDataset(torch.utils.data.Dataset):
    """Images (N, C, R, R) uint8 with labels (N,) int64 and raw parameters (N, P) float32, held in memory.

    Items are `Batch(image, label, params, index)`; the default collate stacks them into a `Batch`.
    `seeds` optionally records how each sample was made (the plume simulation seed), `files` where
    each image came from (a folder's relative paths); `source(i)` names item i either way.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, params: torch.Tensor, info: DatasetInfo,
                 seeds: torch.Tensor | None = None, files: tuple[str, ...] | None = None,
                 content_key: Hashable | None = None):
        n = images.shape[0]
        assert images.dtype == torch.uint8 and images.shape == (n, info.channels, info.resolution, info.resolution), (
            f"images {tuple(images.shape)} {images.dtype} do not match {info}")
        assert labels.shape == (n,) and labels.dtype == torch.int64, f"labels {tuple(labels.shape)} {labels.dtype}"
        assert params.shape == (n, len(info.param_names)) and params.dtype == torch.float32, (
            f"params {tuple(params.shape)} {params.dtype}")
        assert info.num_samples == n, f"info says {info.num_samples} samples, got {n}"
        assert files is None or len(files) == n, f"{len(files)} file names for {n} images"
        self.images, self.labels, self.params, self.info, self.seeds = images, labels, params, info, seeds
        self.files = files
        # What fixes these items, where the loader knows it without reading them (`fingerprint`): equal keys, equal
        # items. None: unknown.
        self.content_key = content_key

    def source(self, i: int) -> str:
        """Where item i came from, for records that must point back at it: its file, else its seed or position."""
        if self.files is not None:
            return self.files[i]
        if self.seeds is not None:
            return f"{self.info.name}#seed={int(self.seeds[i])}"
        return f"{self.info.name}#{i}"

    def __len__(self) -> int:
        return self.images.shape[0]

    def fingerprint(self) -> str:
        """A hash of everything a model learns from: images, labels and parameters. Equal data, equal
        fingerprint; one changed pixel, label or value, another. Within `fingerprints_kept`, a set whose
        `content_key` was hashed already is not hashed again."""
        kept = _FINGERPRINTS
        if kept is None or self.content_key is None:
            return content_hash(self.images, self.labels, self.params)
        if self.content_key not in kept:
            kept[self.content_key] = content_hash(self.images, self.labels, self.params)
        return kept[self.content_key]

    def description(self) -> dict[str, Any]:
        """What a checkpoint records about its training data: `info` and the fingerprint."""
        return {**self.info.to_dict(), "fingerprint": self.fingerprint()}

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageDataset:
        """The items at `indices` (positions, or a mask of them), as a dataset of their own (its info counts only
        them)."""
        indices = torch.as_tensor(indices)
        indices = indices.nonzero().flatten() if indices.dtype == torch.bool else indices.long().flatten()
        info = DatasetInfo(**{**self.info.to_dict(), "num_samples": len(indices)})
        seeds = None if self.seeds is None else self.seeds[indices]
        files = None if self.files is None else tuple(self.files[int(i)] for i in indices)
        whole = torch.equal(indices, torch.arange(len(self)))  # (all of them, in order: the same items)
        key = self.content_key if self.content_key is None or whole else (self.content_key, indices.numpy().tobytes())
        return ImageDataset(self.images[indices], self.labels[indices], self.params[indices], info, seeds, files, key)

    def with_channels(self, channels: int) -> ImageDataset:
        """These items with `channels` channels (see `to_channels`): grey replicated to RGB, or RGB as luma."""
        if channels == self.info.channels:
            return self
        info = DatasetInfo(**{**self.info.to_dict(), "channels": channels})
        key = None if self.content_key is None else (self.content_key, "channels", channels)
        return ImageDataset(to_channels(self.images, channels), self.labels, self.params, info, self.seeds, self.files,
                            key)

    def __getitem__(self, i: int) -> Batch:
        return Batch(from_uint8(self.images[i]), self.labels[i], self.params[i], torch.tensor(i))


def shared_images(train: ImageDataset, test: ImageDataset) -> int:
    """How many of `test`'s images are exact copies of images in `train` (as decoded: same size and channels)."""
    if test.images.shape[1:] != train.images.shape[1:]:
        return 0
    seen = set(_pixel_digests(train.images))
    return sum(digest in seen for digest in _pixel_digests(test.images))


def _pixel_digests(images: torch.Tensor) -> list[bytes]:
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in images.reshape(len(images), -1).numpy()]


def grey_as_rgb(dataset: ImageDataset, channels: int, network: str, say: bool) -> ImageDataset:
    """`dataset` for `network`, whose inputs have `channels` channels: greyscale images are RGB ones with three
    equal channels, so an RGB network (published weights, an RGB autoencoder) takes them, and then draws such
    images (said when `say`). Any other difference is left to the caller's check, which refuses it."""
    if dataset.info.channels != 1 or channels != 3:
        return dataset
    if say:
        print(f"Note: {dataset.info.name} is greyscale and {network} takes RGB images; each image is given to it as "
              f"RGB with three equal channels.", flush=True)
    return dataset.with_channels(3)


def param_ranges(params: torch.Tensor) -> tuple[tuple[float, float], ...]:
    """(min, max) of each column of (N, P) parameters."""
    if params.shape[0] == 0 or params.shape[1] == 0:
        return ()
    lo, hi = params.min(dim=0).values, params.max(dim=0).values
    return tuple((float(a), float(b)) for a, b in zip(lo, hi))


# ITU-R 601 luma, the grey level of an (R, G, B) pixel: Pillow's conversion to "L", by which grey images load.
LUMA = (0.299, 0.587, 0.114)


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) with C in {1, 3} -> `channels` (1: ITU-R 601 luma, 3: grey replicated)."""
    c = images.shape[1]
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}; pick greyscale (1) or RGB (3).")
    if c == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor(LUMA).view(1, 3, 1, 1)
    return (images.float() * weights).sum(dim=1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 1000) -> torch.Tensor:
    """Antialiased bicubic resize of uint8 (N, C, H, W) squares to (N, C, size, size), in chunks to bound memory."""
    assert images.dim() == 4 and images.dtype == torch.uint8, f"expected uint8 (N, C, H, W), got {tuple(images.shape)}"
    if images.shape[-2:] == (size, size):
        return images
    out = [F.interpolate(part.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
           .round().clamp(0, 255).to(torch.uint8) for part in images.split(chunk)]
    return torch.cat(out) if out else images.new_zeros(0, images.shape[1], size, size)


def subset_indices(total: int, num_samples: int | None, seed: int, what: str) -> torch.Tensor:
    """Sorted indices of a seeded random subset of `num_samples` out of `total` (all when None)."""
    if num_samples is None:
        return torch.arange(total)
    if not 0 < num_samples <= total:
        raise UserError(f"Asked for {num_samples} samples but {what} has {total}; pass a number of samples "
                        f"(--num-samples) from 1 to {total}.")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:num_samples].sort().values
