"""FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) with the Inception network and weights of
the published numbers, written in plain PyTorch. Command line: `python -m fid --help`."""

from __future__ import annotations

from core import cli

if cli.started_as("fid"):  # `python -m fid`: a stop while the imports below take seconds (torch) is one line
    cli.catch_early_sigterm()

from .compare import FIDResult, fid_between  # noqa: E402
from .features import FeatureExtractor, FeatureOptions, compute_features, compute_statistics
from .frechet import frechet_distance
from .inception import FIDInceptionV3
from .kid import KIDOptions, kid
from .stats import Statistics, StreamingStatistics, load_statistics, save_statistics
from .weights import WEIGHTS_FILENAME, WEIGHTS_URL, build_fid_inception

__all__ = [
    "FIDInceptionV3", "FIDResult", "FeatureExtractor", "FeatureOptions", "KIDOptions", "Statistics",
    "StreamingStatistics", "WEIGHTS_FILENAME", "WEIGHTS_URL", "build_fid_inception", "compute_features",
    "compute_statistics", "fid_between", "frechet_distance", "kid", "load_statistics", "save_statistics",
]
