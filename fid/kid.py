"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs").

KID is the unbiased estimate of the squared maximum mean discrepancy between two feature sets under
the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3. Unlike FID it has an unbiased estimator, so
it is meaningful for small sets; it is averaged over random equal-size subsets, and the spread over
subsets is reported with it.

A subset can be no larger than the smaller set. We refuse a larger subset size rather than shrink it
quietly: a shrunk subset is the whole set, every draw then gives the same estimate, and the spread
reads as a confident 0. The spread measures how much the estimate moves between subsets drawn from
these sets, not the uncertainty of KID itself; it shrinks as the subset size approaches the number
of images and is exactly 0 when they are equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from core.errors import UserError


@dataclass(frozen=True)
class KIDOptions:
    """How KID is estimated: the subsets it averages over."""

    subsets: int = 100        # random subsets drawn
    subset_size: int = 1000   # images per subset (Binkowski et al. 2018 use 1000); each side needs at least this many
    seed: int = 0             # seed of the subset draws


def kid(features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor, num_subsets: int = 100,
        subset_size: int = 1000, seed: int = 0, progress: bool = False) -> tuple[float, float]:
    """Mean and standard deviation (np.std, over subsets) of the unbiased MMD^2; features (n1, d), (n2, d).

    Each subset of `subset_size` rows is drawn without replacement, so both sets need at least that many.
    With `progress`, a bar counts the subsets (a subset of 1000 Inception features takes about 0.3 s on a
    small CPU: the default 100 take half a minute).
    """
    x = _as_float64(features1, "first")
    y = _as_float64(features2, "second")
    if x.shape[1] != y.shape[1]:
        raise UserError(
            f"The two feature sets have dimensions {x.shape[1]} and {y.shape[1]}; extract both with the same network."
        )
    check_kid_sizes(x.shape[0], y.shape[0], num_subsets, subset_size)
    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets)
    for i in tqdm(range(num_subsets), desc="KID subsets", unit="subset", disable=not progress):
        xs = x[rng.choice(x.shape[0], subset_size, replace=False)]
        ys = y[rng.choice(y.shape[0], subset_size, replace=False)]
        estimates[i] = _unbiased_mmd2(xs, ys)
    return float(estimates.mean()), float(estimates.std())


def check_kid_sizes(n1: int | None, n2: int | None, num_subsets: int, subset_size: int) -> None:
    """Refuse subset settings KID cannot honour; n1, n2 are the set sizes (None: not known yet)."""
    if num_subsets < 1:
        raise UserError(f"The number of KID subsets is {num_subsets} but must be at least 1.")
    if subset_size < 2:
        raise UserError(f"The KID subset size is {subset_size} but the unbiased estimate needs at least 2; "
                        "pass 2 or more.")
    known = [n for n in (n1, n2) if n is not None]
    got = " and ".join(str(n) for n in known)
    if known and min(known) < 2:  # no subset size is possible: advise more images only
        raise UserError(f"KID needs at least 2 images per side but got {got}; give each side 2 images or more, "
                        "or skip KID (on the command line --no-kid).")
    if known and min(known) < subset_size:
        raise UserError(
            f"KID needs at least {subset_size} images per side for subsets of {subset_size} but got {got}; "
            f"pass a subset size of at most {min(known)} (on the command line --kid-subset-size N, or --no-kid to "
            "skip KID) or more images."
        )


def _polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """U-statistic of MMD^2 for equal-size samples: within-set sums leave out the diagonal (k(x, x))."""
    m = x.shape[0]
    k_xx = _polynomial_kernel(x, x)
    k_yy = _polynomial_kernel(y, y)
    k_xy = _polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def _as_float64(features: np.ndarray | torch.Tensor, which: str) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise UserError(f"The {which} feature set has shape {x.shape} but must be (n, d).")
    return x
