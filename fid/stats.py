"""Feature statistics for FID (Heusel et al. 2017): mean and unbiased covariance, in float64.

`StreamingStatistics` merges per-batch moments with Chan et al.'s pairwise update, so a data set of
any size is summarised without holding its features, and without the cancellation that summing raw
outer products suffers when the mean is large relative to the spread.

Statistics files are `.npz` with arrays `mu` (d,) and `sigma` (d, d), the layout pytorch-fid reads
and writes, so files can be exchanged with it. A file's arrays keep the precision they were saved in:
a float32 covariance is positive semi-definite only up to float32 rounding, and `frechet_distance`
needs to know that to accept it.

Files written here also record what they were computed from (`Provenance`: the feature network, a
fingerprint of its weights, which files of the folder were read, how many images), as four more
arrays that pytorch-fid ignores. FID compares two feature distributions, so statistics are only
comparable with features of the same network and weights: `check_same_features` refuses a file
computed with others, and accepts one without the record (an older or pytorch-fid file) with a
warning, since nothing can be checked.
"""

from __future__ import annotations

import errno
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.errors import ExistsError, UserError
from core.runtime import atomic_write
from .frechet import factor_of_features


@dataclass(frozen=True)
class Provenance:
    """What a set of statistics was computed from."""

    network: str      # the feature network and layer (`fid.features.NETWORK`, or `fid.domain.network_name`)
    weights: str      # fingerprint of the network's weights (`fid.features.weights_fingerprint`)
    files: str = ""   # which files of a folder were read ("pytorch-fid" or "all"; "" for images given directly)
    images: int = 0   # how many images


# The .npz arrays that hold a Provenance, field by field.
PROVENANCE_KEYS = {"network": "feature_network", "weights": "feature_weights", "files": "files", "images": "num_images"}


@dataclass(frozen=True)
class Statistics:
    """Mean `mu` (d,) and covariance `sigma` (d, d) of a feature set: float64 when computed here, the
    stored dtype when loaded from a file; `provenance` None when a file does not record it."""

    mu: np.ndarray
    sigma: np.ndarray
    provenance: Provenance | None = None
    # sigma = factor factor^T, (d, r), kept where computed from fewer images than dimensions (never saved).
    factor: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert self.mu.ndim == 1 and self.sigma.shape == (self.mu.size, self.mu.size), (
            f"mu {self.mu.shape} and sigma {self.sigma.shape} do not describe one feature space"
        )


class StreamingStatistics:
    """Accumulate the mean and covariance of (B, d) feature batches of any sizes; while no more than d
    features have come, also keep them, for the covariance's factor (`frechet.factor_of_features`)."""

    def __init__(self) -> None:
        self.count = 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None  # sum of outer products of deviations from the mean
        self._rows: list[np.ndarray] | None = []  # the features, until there are more than d

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        x = np.asarray(features, dtype=np.float64)
        assert x.ndim == 2, f"expected features of shape (B, d), got {x.shape}"
        if self._mean is not None and x.shape[1] != self._mean.size:
            raise UserError(
                f"Feature batch has dimension {x.shape[1]} but earlier batches had {self._mean.size}; "
                "feed features from one network layer only."
            )
        if x.shape[0] == 0:
            return
        if self._rows is not None and self.count + x.shape[0] <= x.shape[1]:
            self._rows.append(x.copy())  # (x may be the caller's own array, which it may reuse)
        else:
            self._rows = None
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        batch_scatter = centred.T @ centred
        if self._mean is None:
            self.count, self._mean, self._scatter = x.shape[0], batch_mean, batch_scatter
            return
        n_a, n_b = self.count, x.shape[0]
        n = n_a + n_b
        delta = batch_mean - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._scatter = self._scatter + batch_scatter + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def result(self) -> Statistics:
        if self.count < 2:
            raise UserError(
                f"A covariance needs at least 2 images but {self.count} were seen; give more images."
            )
        sigma = self._scatter / (self.count - 1)
        factor = None if self._rows is None else factor_of_features(np.concatenate(self._rows))
        # The accumulated matrix is symmetric only up to rounding; make it exact.
        return Statistics(mu=self._mean.copy(), sigma=(sigma + sigma.T) / 2, factor=factor)


def save_statistics(stats: Statistics, path: str | os.PathLike, overwrite: bool = True) -> None:
    """Write `mu`, `sigma` and any provenance to the .npz file `path`, making any missing folders on the way (as
    every output of this toolkit is made); a path `check_statistics_path` refuses is refused. Without `overwrite`
    an existing file, also one another command wrote while this one computed, is never replaced."""
    path = Path(path)
    check_statistics_path(path)  # (an existing file is kept by the write itself, without `overwrite`)
    record = {} if stats.provenance is None else {
        key: np.asarray(getattr(stats.provenance, field)) for field, key in PROVENANCE_KEYS.items()}
    try:  # whole or not at all: a full disk leaves the file that was there before, and no empty one
        atomic_write(path, lambda f: np.savez(f, mu=stats.mu, sigma=stats.sigma, **record), replace=overwrite)
    except FileExistsError:
        raise ExistsError(f"{path} was written by another command while this one computed; it is kept: pass "
                          f"--overwrite to replace it, or choose another name.") from None
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise  # the entry point's "disk full" line
        raise UserError(f"Cannot write statistics to {path} ({_reason(err)}); choose a writable path.") from err


def check_statistics_path(path: str | os.PathLike, overwrite: bool = True) -> None:
    """Refuse, before any features are computed and without writing anything, a path statistics cannot be saved
    to: a folder, a name numpy would change (one not ending in .npz), a place under a file or in a folder this
    user cannot write into, or without `overwrite` a file that exists. Folders on the way that do not exist yet
    are fine: `save_statistics` makes them once there is something to write."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"Cannot write statistics to the folder {path}; pass a file name such as {path / 'stats.npz'}.")
    if not path.name.endswith(".npz"):  # numpy's test: it would append .npz, and write another file than named
        suggestion = path.with_suffix(".npz") if path.suffix.lower() == ".npz" else path.with_name(path.name + ".npz")
        raise UserError(f"Statistics files are .npz files but {path} does not end in .npz; name it {suggestion}.")
    if path.is_file() and not overwrite:
        raise ExistsError(f"{path} already exists; pass --overwrite to replace it, or choose another name.")
    there = next(folder for folder in path.absolute().parents if folder.exists())  # ("/" at the latest)
    if not there.is_dir():
        raise UserError(f"Cannot write statistics to {path} ({there} is a file, not a folder); choose a writable path.")
    if not os.access(there, os.W_OK | os.X_OK):
        raise UserError(f"Cannot write statistics to {path} (the folder {there} is not writable); choose a writable "
                        f"path.")


def _reason(err: OSError) -> str:
    return f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)


def load_statistics(path: str | os.PathLike) -> Statistics:
    """Read an .npz with `mu` (d,) and `sigma` (d, d), as written by this package or pytorch-fid."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            start = f.read(6)
    except OSError:  # missing or unreadable: np.load below says which
        start = None
    # Anything but a zip of .npy arrays or one .npy array (text, a pickle) numpy would refuse as "pickled
    # data", which says nothing true about such a file.
    if start is not None and not (start.startswith(b"PK") or start == b"\x93NUMPY"):
        what = "it holds text or another format" if start else "it is empty"
        raise UserError(f"Statistics file {path} is not a NumPy .npz file ({what}); create it with "
                        f"`python -m fid --save-stats FOLDER OUT.npz`.")
    try:
        with open(path, "rb") as file:  # (ours to close: numpy leaves a file it opened open when it cannot parse it)
            loaded = np.load(file)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise UserError("it holds one unnamed array")
            keys = sorted(loaded.files)
            arrays = {key: _as_float(loaded[key]) for key in ("mu", "sigma") if key in keys}
            record = {field: loaded[key][()] for field, key in PROVENANCE_KEYS.items() if key in keys}
    except MemoryError:
        raise  # the machine's limit, not the file's fault: the entry point says so
    except Exception as err:  # missing, truncated, not a zip, or damaged: a damaged archive raises anything from BadZipFile to
        # NotImplementedError (compression) and RuntimeError (encryption flag); an interruption passes
        reason = str(err).split(". ")[0].rstrip(".")  # numpy's messages run on for several sentences
        raise UserError(f"Cannot read statistics file {path} ({reason}); recreate it with --save-stats.") from err
    if len(arrays) != 2:
        raise UserError(
            f"Statistics file {path} has arrays {keys} but needs 'mu' and 'sigma'; "
            "create it with `python -m fid --save-stats FOLDER OUT.npz`."
        )
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise UserError(
            f"Statistics file {path} has mu of shape {mu.shape} and sigma of shape {sigma.shape}, "
            "but needs (d,) and (d, d); recreate it with --save-stats."
        )
    provenance = None
    if len(record) == len(PROVENANCE_KEYS):
        try:
            provenance = Provenance(str(record["network"]), str(record["weights"]), str(record["files"]),
                                    int(record["images"]))
        except (TypeError, ValueError) as err:
            raise UserError(f"Statistics file {path} records what it was computed from in a form this code cannot "
                            f"read ({err}); recreate it with --save-stats.") from err
    return Statistics(mu=mu, sigma=sigma, provenance=provenance)


def check_same_features(sides: Sequence[tuple[str, Provenance | None]], warn: bool = True) -> None:
    """Refuse to compare statistics of features from different networks or weights.

    `sides` names each side of a comparison ("statistics file real.npz", "this run's features") with
    what it was computed from, None for a file that does not say (written by an older version or by
    pytorch-fid): those are accepted with one warning (unless `warn` is off), since nothing can be checked.
    """
    unknown = [name for name, provenance in sides if provenance is None]
    if unknown and warn:
        several = len(unknown) > 1
        warnings.warn(f"{' and '.join(unknown)} {'do' if several else 'does'} not record which feature network and "
                      f"weights computed {'them' if several else 'it'} (an older or pytorch-fid file), so the FID is "
                      f"only meaningful if both sides' features come from the same network and weights.",
                      UserWarning, stacklevel=2)
    known = [(name, provenance) for name, provenance in sides if provenance is not None]
    for (name_a, a), (name_b, b) in zip(known, known[1:]):
        if a.network != b.network:
            raise UserError(f"{name_a} holds features of {a.network} but {name_b} of {b.network}; compute both "
                            f"sides with the same network (--features CKPT for a classifier's, none for Inception's).")
        if a.weights != b.weights:
            option = "--features" if a.network.startswith("classify ") else "--weights"  # see fid.domain
            raise UserError(f"{name_a} was computed with feature weights {a.weights} but {name_b} with "
                            f"{b.weights}; recompute the statistics with --save-stats and the same {option}.")


def _as_float(array: np.ndarray) -> np.ndarray:
    """Floating arrays as stored (their precision sets the rounding allowed later); others as float64."""
    array = np.asarray(array)
    if np.iscomplexobj(array):  # numpy would drop the imaginary part with a warning, and FID read nonsense
        raise UserError("it holds complex numbers")
    return array if np.issubdtype(array.dtype, np.floating) else array.astype(np.float64)
