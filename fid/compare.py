"""FID (and optionally KID) between two sources, each images or precomputed statistics."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from .features import FeatureExtractor, ImageSource, check_folder
from .frechet import frechet_distance
from .kid import kid
from .stats import Statistics, StreamingStatistics, load_statistics

Source = Union[ImageSource, Statistics]


@dataclass(frozen=True)
class FIDResult:
    fid: float
    kid_mean: float | None = None
    kid_std: float | None = None


def is_statistics_source(source: Source) -> bool:
    """True for a `Statistics` object or a path to an .npz file (which need no network)."""
    if isinstance(source, Statistics):
        return True
    return isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() == ".npz"


def fid_between(a: Source, b: Source, *, with_kid: bool = False, kid_subsets: int = 100,
                kid_subset_size: int = 1000, seed: int = 0, weights: str | os.PathLike | None = None,
                device: str | torch.device | None = None, batch_size: int = 50, num_workers: int = 0,
                progress: bool = True) -> FIDResult:
    """FID between `a` and `b` (folders, .npz files, `Statistics`, image tensors or batch iterables).

    With `with_kid`, both sides must be images: KID (Bińkowski et al. 2018) needs the features
    themselves, which are then held in memory; otherwise only streamed statistics are kept.
    """
    for source in (a, b):  # fail before spending minutes on the other side
        _check_path(source)
    extractor = FeatureExtractor(weights, device, batch_size, num_workers, progress)
    if not with_kid:
        s_a, s_b = _statistics(a, extractor), _statistics(b, extractor)
        return FIDResult(fid=frechet_distance(s_a.mu, s_a.sigma, s_b.mu, s_b.sigma))
    if is_statistics_source(a) or is_statistics_source(b):
        raise ValueError("KID needs the images of both sides, not saved statistics; pass two image sources.")
    f_a, f_b = extractor.features(a), extractor.features(b)
    s_a, s_b = _statistics_of(f_a), _statistics_of(f_b)
    kid_mean, kid_std = kid(f_a, f_b, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    return FIDResult(fid=frechet_distance(s_a.mu, s_a.sigma, s_b.mu, s_b.sigma), kid_mean=kid_mean, kid_std=kid_std)


def _check_path(source: Source) -> None:
    if not isinstance(source, (str, os.PathLike)):
        return
    if is_statistics_source(source):
        if not Path(source).is_file():
            raise ValueError(f"Statistics file {source} does not exist; create it with --save-stats.")
    else:
        check_folder(Path(source))


def _statistics(source: Source, extractor: FeatureExtractor) -> Statistics:
    if isinstance(source, Statistics):
        return source
    if is_statistics_source(source):
        return load_statistics(source)
    return extractor.statistics(source)


def _statistics_of(features: np.ndarray) -> Statistics:
    accumulator = StreamingStatistics()
    accumulator.update(features)
    return accumulator.result()
