"""Feature statistics for FID (Heusel et al. 2017): mean and unbiased covariance, in float64.

`StreamingStatistics` merges per-batch moments with Chan et al.'s pairwise update, so a data set of
any size is summarised without holding its features, and without the cancellation that summing raw
outer products suffers when the mean is large relative to the spread.

Statistics files are `.npz` with arrays `mu` (d,) and `sigma` (d, d), the layout pytorch-fid reads
and writes, so files can be exchanged with it. A file's arrays keep the precision they were saved in:
a float32 covariance is positive semi-definite only up to float32 rounding, and `frechet_distance`
needs to know that to accept it.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError


@dataclass(frozen=True)
class Statistics:
    """Mean `mu` (d,) and covariance `sigma` (d, d) of a feature set: float64 when computed here, the
    stored dtype when loaded from a file."""

    mu: np.ndarray
    sigma: np.ndarray

    def __post_init__(self) -> None:
        assert self.mu.ndim == 1 and self.sigma.shape == (self.mu.size, self.mu.size), (
            f"mu {self.mu.shape} and sigma {self.sigma.shape} do not describe one feature space"
        )


class StreamingStatistics:
    """Accumulate the mean and covariance of (B, d) feature batches of any sizes."""

    def __init__(self) -> None:
        self.count = 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None  # sum of outer products of deviations from the mean

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
        # The accumulated matrix is symmetric only up to rounding; make it exact.
        return Statistics(mu=self._mean.copy(), sigma=(sigma + sigma.T) / 2)


def save_statistics(stats: Statistics, path: str | os.PathLike) -> None:
    """Write `mu` and `sigma` to an .npz file (the name is used as given; numpy adds .npz if missing)."""
    path = Path(path)
    prepare_statistics_path(path)
    try:
        np.savez(path, mu=stats.mu, sigma=stats.sigma)
    except OSError as err:
        raise UserError(f"Cannot write statistics to {path} ({_reason(err)}); choose a writable path.") from err


def prepare_statistics_path(path: str | os.PathLike) -> None:
    """Create the folder `path` will be written to, so that a bad path fails before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"Cannot write statistics to the folder {path}; pass a file name such as {path / 'stats.npz'}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"Cannot write statistics to {path} ({_reason(err)}); choose a writable path.") from err


def _reason(err: OSError) -> str:
    return f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)


def load_statistics(path: str | os.PathLike) -> Statistics:
    """Read an .npz with `mu` (d,) and `sigma` (d, d), as written by this package or pytorch-fid."""
    path = Path(path)
    try:
        loaded = np.load(path)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UserError("it holds one unnamed array")
        with loaded:
            keys = sorted(loaded.files)
            arrays = {key: _as_float(loaded[key]) for key in ("mu", "sigma") if key in keys}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:  # missing, truncated, pickled, not a zip
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
    return Statistics(mu=mu, sigma=sigma)


def _as_float(array: np.ndarray) -> np.ndarray:
    """Floating arrays as stored (their precision sets the rounding allowed later); others as float64."""
    array = np.asarray(array)
    return array if np.issubdtype(array.dtype, np.floating) else array.astype(np.float64)
