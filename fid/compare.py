"""FID (and optionally KID) between two sources, each images or precomputed statistics."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from .features import FeatureExtractor, FeatureOptions, ImageSource
from .folder import ImageFolder, check_enough_images
from .frechet import frechet_distance
from .kid import KIDOptions, check_kid_sizes, kid
from .stats import Statistics, StreamingStatistics, check_same_features, load_statistics

from core.errors import UserError

Source = Union[ImageSource, Statistics]


@dataclass(frozen=True)
class FIDResult:
    """FID, and with KID its mean and standard deviation over random subsets (the spread between
    subsets of these images, not a standard error of KID)."""

    fid: float
    kid_mean: float | None = None
    kid_std: float | None = None


def is_statistics_source(source: Source) -> bool:
    """True for a `Statistics` object or a path to an .npz file (which need no network)."""
    if isinstance(source, Statistics):
        return True
    return isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() == ".npz"


def fid_between(a: Source, b: Source, options: FeatureOptions = FeatureOptions(),
                kid_options: KIDOptions | None = None) -> FIDResult:
    """FID between `a` and `b` (folders, .npz files, `Statistics`, image tensors or batch iterables), in the
    features `options` say (Inception's, or with `options.features` a classify checkpoint's penultimate
    features, `fid.domain`; which files of a folder are read, see `fid.folder`); and KID where `kid_options`
    are given.

    With KID, both sides must be images: KID (Bińkowski et al. 2018) needs the features themselves, which
    are then held in memory; otherwise only streamed statistics are kept. Each side needs at least
    `kid_options.subset_size` images, and a folder at least 2 (refused up front).
    """
    with_kid = kid_options is not None
    if with_kid and (is_statistics_source(a) or is_statistics_source(b)):
        raise UserError("KID needs the images of both sides, not saved statistics; pass two image sources.")
    extractor = options.extractor()
    # Both folders are listed and checked to hold 2 images or more (a covariance needs them), and KID's
    # subset size checked against them, before minutes are spent on the features of either side.
    a, b = _open(a, options.files), _open(b, options.files)
    for source in (a, b):
        if isinstance(source, ImageFolder):
            check_enough_images(source)
    if not with_kid:
        s_a, s_b = _statistics(a, extractor), _statistics(b, extractor)
        check_same_features([(_describe(source), s.provenance) for source, s in ((a, s_a), (b, s_b))])
        return FIDResult(fid=_frechet(s_a, s_b))
    check_kid_sizes(_count(a), _count(b), kid_options.subsets, kid_options.subset_size)
    f_a, f_b = extractor.features(a), extractor.features(b)
    s_a, s_b = _statistics_of(f_a), _statistics_of(f_b)
    kid_mean, kid_std = kid(f_a, f_b, num_subsets=kid_options.subsets, subset_size=kid_options.subset_size,
                            seed=kid_options.seed, progress=options.progress)
    return FIDResult(fid=_frechet(s_a, s_b), kid_mean=kid_mean, kid_std=kid_std)


def _frechet(a: Statistics, b: Statistics) -> float:
    """FID of two sides' statistics, through the covariances' factors where they were kept (sets smaller than d)."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, factor1=a.factor, factor2=b.factor)


def _open(source: Source, files: str) -> Source:
    """A folder path as its ImageFolder; a statistics path checked to exist; other sources as they are."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    if is_statistics_source(source):
        if not Path(source).is_file():
            raise UserError(f"Statistics file {source} does not exist; create it with --save-stats.")
        return source
    return ImageFolder(source, files)


def _count(source: Source) -> int | None:
    """Number of images in a source, where it is known before reading it."""
    if isinstance(source, ImageFolder):
        return len(source)
    if isinstance(source, torch.Tensor):
        return source.shape[0]
    return None


def _describe(source: Source) -> str:
    if isinstance(source, ImageFolder):
        return f"the features of {source.root}"
    if isinstance(source, (str, os.PathLike)):
        return f"statistics file {source}" if is_statistics_source(source) else f"the features of {source}"
    return "the statistics given" if isinstance(source, Statistics) else "the features of the images given"


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
