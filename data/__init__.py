"""Datasets: images in [-1, 1] with labels and/or numeric parameters, chosen by a spec string.

    "plumes"       procedural smoke plumes (built in, offline), parameters ("wind", "temperature")
    "folder:PATH"  a folder of images; class subfolders become labels, PATH/params.csv gives parameters
    "cifar10"      CIFAR-10 through torchvision, ten classes
"""

from __future__ import annotations

from pathlib import Path

from data.dataset import DatasetInfo, ImageDataset

SPECS = ("plumes", "folder:PATH", "cifar10")

__all__ = ["DatasetInfo", "ImageDataset", "SPECS", "load_dataset"]


def load_dataset(spec: str, resolution: int, *, cache_dir: str | Path = ".cache/datasets", train: bool = True,
                 num_samples: int | None = None, seed: int = 0, channels: int | None = None) -> ImageDataset:
    """Load the dataset named by `spec` at `resolution` x `resolution`, decoded into memory.

    `num_samples` picks a seeded subset (folder, cifar10) or sets how many plumes to simulate;
    `train` picks the split of plumes and cifar10 (a folder is one split); `channels` forces
    1 (greyscale) or 3 (RGB), None keeps the source's own.
    """
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an integer of at least 8, got {resolution!r}.")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (greyscale), 3 (RGB) or None (the data's own), got {channels!r}.")
    # Imported lazily so that asking for one source never pays for (or fails on) another's imports.
    if spec == "plumes":
        from data.plumes import load_plumes
        return load_plumes(resolution, cache_dir, train=train, num_samples=num_samples, seed=seed, channels=channels)
    if spec == "cifar10":
        from data.cifar import load_cifar10
        return load_cifar10(resolution, cache_dir, train=train, num_samples=num_samples, seed=seed, channels=channels)
    if spec.startswith("folder:") and len(spec) > len("folder:"):
        from data.folder import load_folder
        return load_folder(spec[len("folder:"):], resolution, num_samples=num_samples, seed=seed, channels=channels)
    raise ValueError(f"Unknown dataset {spec!r}; choose one of {', '.join(SPECS)}.")
