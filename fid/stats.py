"""Feature statistics for FID (Heusel et al. 2017): mean and unbiased covariance, in float64.

`StreamingStatistics` merges per-batch moments with Chan et al.'s pairwise update, so a data set of
any size is summarised without holding its features, and without the cancellation that summing raw
outer products suffers when the mean is large relative to the spread.

Statistics files are `.npz` with arrays `mu` (d,) and `sigma` (d, d), the layout pytorch-fid reads
and writes, so files can be exchanged with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Statistics:
    """Mean `mu` (d,) and covariance `sigma` (d, d) of a feature set."""

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
            raise ValueError(
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
            raise ValueError(
                f"A covariance needs at least 2 images but {self.count} were seen; give more images."
            )
        sigma = self._scatter / (self.count - 1)
        # The accumulated matrix is symmetric only up to rounding; make it exact.
        return Statistics(mu=self._mean.copy(), sigma=(sigma + sigma.T) / 2)


def save_statistics(stats: Statistics, path: str | os.PathLike) -> None:
    """Write `mu` and `sigma` to an .npz file (the name is used as given; numpy adds .npz if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=stats.mu, sigma=stats.sigma)


def load_statistics(path: str | os.PathLike) -> Statistics:
    """Read an .npz with `mu` (d,) and `sigma` (d, d), as written by this package or pytorch-fid."""
    path = Path(path)
    try:
        with np.load(path) as data:
            keys = sorted(data.files)
            if "mu" not in keys or "sigma" not in keys:
                raise ValueError(
                    f"Statistics file {path} has arrays {keys} but needs 'mu' and 'sigma'; "
                    "create it with `python -m fid --save-stats FOLDER OUT.npz`."
                )
            mu = np.asarray(data["mu"], dtype=np.float64)
            sigma = np.asarray(data["sigma"], dtype=np.float64)
    except (OSError, EOFError) as err:
        raise ValueError(f"Cannot read statistics file {path} ({err}); recreate it with --save-stats.") from err
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(
            f"Statistics file {path} has mu of shape {mu.shape} and sigma of shape {sigma.shape}, "
            "but needs (d,) and (d, d); recreate it with --save-stats."
        )
    return Statistics(mu=mu, sigma=sigma)
