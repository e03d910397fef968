"""`cifar10`: the CIFAR-10 train (50,000) or test (10,000) split, 32x32 RGB, ten labelled classes.

torchvision fetches and verifies the archive when the extracted batches are missing; the batches
themselves (the python pickle format of https://www.cs.toronto.edu/~kriz/cifar.html) are always
read here, so a hand-placed `cifar-10-batches-py/` works offline.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torchvision

from data.dataset import DatasetInfo, ImageDataset, resize_uint8, subset_indices, to_channels

FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
META = "batches.meta"


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        # The batches were pickled by Python 2; latin1 maps its byte strings to str keys losslessly.
        return pickle.load(f, encoding="latin1")


def _fetch(root: Path, train: bool) -> None:
    """Download and extract CIFAR-10 into `root` (or extract an archive already there) via torchvision."""
    try:
        torchvision.datasets.CIFAR10(root=str(root), train=train, download=True)
    except Exception as err:  # network, checksum and extraction failures all need the same advice
        raise RuntimeError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({type(err).__name__}: {err}); put "
            f"{ARCHIVE} (https://www.cs.toronto.edu/~kriz/{ARCHIVE}) or its extracted {FOLDER}/ folder "
            f"({', '.join(TRAIN_BATCHES)}, {', '.join(TEST_BATCHES)}, {META}) in {root}, or run once with internet access."
        ) from err


def load_cifar10(resolution: int, cache_dir: str | Path, train: bool = True, num_samples: int | None = None,
                 seed: int = 0, channels: int | None = None) -> ImageDataset:
    root = Path(cache_dir).expanduser().resolve()
    folder = root / FOLDER
    batches = TRAIN_BATCHES if train else TEST_BATCHES
    if not all((folder / name).is_file() for name in batches + (META,)):
        _fetch(root, train)

    parts = [_unpickle(folder / name) for name in batches]
    images = torch.from_numpy(np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32))
    labels = torch.from_numpy(np.concatenate([np.asarray(p["labels"], dtype=np.int64) for p in parts]))
    class_names = tuple(_unpickle(folder / META)["label_names"])

    keep = subset_indices(images.shape[0], num_samples, seed, f"the CIFAR-10 {'train' if train else 'test'} split")
    images = to_channels(resize_uint8(images[keep], resolution), channels or 3)
    labels = labels[keep]
    n = images.shape[0]
    info = DatasetInfo(name="cifar10", resolution=resolution, channels=images.shape[1], class_names=class_names,
                       param_names=(), param_ranges=(), num_samples=n)
    return ImageDataset(images, labels, torch.zeros(n, 0), info)
