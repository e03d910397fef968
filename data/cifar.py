"""`cifar10`: the CIFAR-10 train (50,000) or test (10,000) split, 32x32 RGB, ten labelled classes.

torchvision fetches the archive (checked against its MD5) and extracts it when the batches are
missing; the batches themselves (the python pickle format of https://www.cs.toronto.edu/~kriz/cifar.html)
are always read here, so a hand-placed `cifar-10-batches-py/` works offline. Unpickling can run any
code a file names, and a hand-placed file can be anything, so the batches are read by a restricted
unpickler that admits only the numpy array reconstruction a genuine batch needs, and their structure
is checked before use. Keys and class names may be byte strings: Python 3 writes them so for a batch
read with `encoding="bytes"` (as the dataset's page shows) and saved again.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import MissingFileError, UserError
from core.lock import taking_turns
from data.dataset import DatasetInfo, ImageDataset, resize_uint8, subset_indices, to_channels

FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
META = "batches.meta"
NUM_CLASSES = 10
IMAGE_BYTES = 3 * 32 * 32


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """`_codecs.encode` as protocol-2 pickles written by Python 3 use it for bytes, and for nothing else."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"it calls _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _array_globals() -> dict[tuple[str, str], Any]:
    """What a pickled uint8 array names, under every module path numpy has used for it.

    Python 2 wrote the genuine batches with `numpy.core.multiarray._reconstruct` (numpy 2 writes
    `numpy._core.multiarray`), protocol 5 uses `numpy.(_)core.numeric._frombuffer` instead, and both
    pass `numpy.ndarray` and `numpy.dtype`. The functions are taken from an array's own reduction
    rather than imported by name, since their modules moved between numpy versions.
    """
    sample = np.zeros(1, np.uint8)
    reconstruct, frombuffer = sample.__reduce__()[0], sample.__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): _latin1_bytes}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that can build dicts, lists, strings, numbers and numpy arrays, and calls nothing else."""

    ALLOWED = _array_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR-10 batch needs") from None


def _not_genuine(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a genuine CIFAR-10 batch ({why}), so it is not used; delete {path.parent} and "
                      f"run again to download CIFAR-10, or put the files from {ARCHIVE} there.")


def _unpickle(path: Path) -> Any:
    with open(path, "rb") as f:
        try:
            # The batches were pickled by Python 2; latin1 maps its byte strings to str losslessly.
            return _BatchUnpickler(f, encoding="latin1").load()
        except Exception as err:  # a malformed pickle can fail with almost any type; the file is at fault
            raise _not_genuine(path, f"{type(err).__name__}: {err}") from err


def _as_text(value: Any) -> Any:
    """A byte string as the str the genuine (Python 2) files give under latin1; anything else as it is."""
    return value.decode("latin1") if isinstance(value, bytes) else value


def _read_dict(path: Path) -> Any:
    """What the file holds, with the keys of a dict as str (b"data" -> "data")."""
    held = _unpickle(path)
    return {_as_text(key): value for key, value in held.items()} if isinstance(held, dict) else held


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, 3072) uint8 and labels (N,) int64 of one batch, after checking what the file holds."""
    batch = _read_dict(path)
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        what = f"a dict with keys {sorted(map(str, batch))[:6]}" if isinstance(batch, dict) else \
            f"a {type(batch).__name__}"
        raise _not_genuine(path, f"it holds {what}, not a dict with 'data' and 'labels'")
    data, labels = batch["data"], batch["labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[0] > 0 and data.shape[1] == IMAGE_BYTES):
        shape = f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _not_genuine(path, f"'data' must be a uint8 array of shape (N, {IMAGE_BYTES}), not {shape}")
    n = data.shape[0]
    # `type(...) is int` keeps out bools and floats, which int64 would silently accept.
    if not (isinstance(labels, list) and len(labels) == n and all(type(v) is int and 0 <= v < NUM_CLASSES for v in labels)):
        raise _not_genuine(path, f"'labels' must be a list of {n} ints from 0 to {NUM_CLASSES - 1}")
    return data, np.asarray(labels, dtype=np.int64)


def _read_class_names(path: Path) -> tuple[str, ...]:
    meta = _read_dict(path)
    names = meta.get("label_names") if isinstance(meta, dict) else None
    names = [_as_text(name) for name in names] if isinstance(names, list) else names
    if not (isinstance(names, list) and len(names) == NUM_CLASSES and all(isinstance(v, str) and v for v in names)
            and len(set(names)) == NUM_CLASSES):
        raise _not_genuine(path, f"it needs 'label_names', a list of {NUM_CLASSES} distinct class names")
    return tuple(names)


def _fetch(root: Path) -> None:
    """Download and extract CIFAR-10 into `root` (or extract an archive already there), as torchvision does."""
    from torchvision.datasets import cifar as torchvision_cifar  # (here: importing torchvision takes seconds)
    try:
        # torchvision's CIFAR10 class would do the same, then unpickle every batch with plain pickle.
        torchvision_cifar.download_and_extract_archive(torchvision_cifar.CIFAR10.url, str(root), filename=ARCHIVE,
                                                       md5=torchvision_cifar.CIFAR10.tgz_md5)
    except Exception as err:  # network, checksum and extraction failures: one advice, unless a bad archive is here
        archive = root / ARCHIVE
        # torchvision downloads again over an archive whose MD5 differs; offline that fails, and the advice to put
        # the archive in `root` would name the file that is already there.
        if archive.is_file() and not torchvision_cifar.check_integrity(str(archive), torchvision_cifar.CIFAR10.tgz_md5):
            raise MissingFileError(
                f"{archive} is not the genuine CIFAR-10 archive (its MD5 checksum differs: a download cut short, or "
                f"another file) and a new one could not be downloaded ({type(err).__name__}: {err}); replace it with "
                f"the file at {torchvision_cifar.CIFAR10.url}, or delete it and run again with internet access."
            ) from err
        raise MissingFileError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({type(err).__name__}: {err}); put "
            f"{ARCHIVE} (https://www.cs.toronto.edu/~kriz/{ARCHIVE}) or its extracted {FOLDER}/ folder "
            f"({', '.join(TRAIN_BATCHES)}, {', '.join(TEST_BATCHES)}, {META}) in {root}, or run once with internet access."
        ) from err


def load_cifar10(resolution: int, cache_dir: str | Path, train: bool = True, num_samples: int | None = None,
                 seed: int = 0, channels: int | None = None) -> ImageDataset:
    images, labels, class_names = _read_split(cache_dir, train)
    keep = subset_indices(images.shape[0], num_samples, seed, f"the CIFAR-10 {'train' if train else 'test'} split")
    images = to_channels(resize_uint8(images[keep], resolution), channels or 3)
    labels = labels[keep]
    n = images.shape[0]
    info = DatasetInfo(name="cifar10", resolution=resolution, channels=images.shape[1], class_names=class_names,
                       param_names=(), param_ranges=(), num_samples=n)
    return ImageDataset(images, labels, torch.zeros(n, 0), info)


# What `split_size` learnt, by `_split_key`: each split's image count (a few bytes each), and the split it read
# last, until `_read_split` takes it.
_sizes: dict[tuple, int] = {}
_held: dict[tuple, tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]] = {}


def split_size(cache_dir: str | Path, train: bool = True) -> int:
    """How many images the split holds (50,000 and 10,000 for the genuine files), read without resizing one.

    A caller counts a split to decide how much of it to load (`data.dataset_size`, then `load_dataset`), so
    the split read here is kept for the `load_cifar10` that follows instead of being read again (about 1.3 s
    for the train split): at most one split's 32x32 images (150 MB for the train split, 30 MB for the test
    split) are held, from the count until the load takes them or another split is counted. Counting again
    a split already read in this process reads nothing. Both are keyed by the folder, the split and each
    file's size and modification time, so a file changed in between is read again."""
    folder = fetch_split(cache_dir, train)
    key = _split_key(folder, train)
    if key not in _sizes:
        _held.clear()  # (the one held split, replaced)
        _held[key] = _read_files(folder, train)
    return _sizes[key]


def _split_key(folder: Path, train: bool) -> tuple:
    """What identifies the files of a split as read: the folder, the split and each file's (size, mtime_ns)."""
    files = (TRAIN_BATCHES if train else TEST_BATCHES) + (META,)
    return str(folder), train, tuple((stat.st_size, stat.st_mtime_ns) for stat in (os.stat(folder / f) for f in files))


def _read_split(cache_dir: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """The split's 32x32 images (N, 3, 32, 32) uint8, labels (N,) and class names, fetched first if absent
    (or the ones `split_size` just read from the same files)."""
    folder = fetch_split(cache_dir, train)
    key = _split_key(folder, train)
    split = _held.pop(key, None)
    return split if split is not None else _read_files(folder, train)


def _read_files(folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """`_read_split` from the files in `folder`, noting the split's size for `split_size`."""
    key = _split_key(folder, train)
    batches = TRAIN_BATCHES if train else TEST_BATCHES
    parts = [_read_batch(folder / name) for name in batches]
    images = torch.from_numpy(np.concatenate([data for data, _ in parts]).reshape(-1, 3, 32, 32))
    labels = torch.from_numpy(np.concatenate([labels for _, labels in parts]))
    class_names = _read_class_names(folder / META)
    _sizes[key] = len(labels)
    return images, labels, class_names


def fetch_split(cache_dir: str | Path, train: bool = True) -> Path:
    """The folder that holds the split's batch files and the class names, downloaded and extracted into
    `cache_dir` first where they are not there (none of them is read: `_read_split` checks what they hold).
    Offline, a missing split raises `MissingFileError` saying where to put the files."""
    root = Path(cache_dir).expanduser().resolve()
    folder = root / FOLDER
    batches = TRAIN_BATCHES if train else TEST_BATCHES
    def present() -> bool:
        return all((folder / name).is_file() for name in batches + (META,))

    if not present():
        made = [path for path in (root, *root.parents) if not path.exists()]  # what the lock is about to create
        try:
            # One process downloads and extracts; any other (a torchrun job's ranks) waits, then finds the files.
            with taking_turns(root / f"{FOLDER}.lock", f"CIFAR-10 in {root}"):
                if not present():
                    _fetch(root)
        except MissingFileError:
            for path in made:  # a failed download leaves no empty cache folder behind (a full one is kept)
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
    return folder
