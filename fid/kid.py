"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs").

KID is the unbiased estimate of the squared maximum mean discrepancy between two feature sets under
the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3. Unlike FID it has an unbiased estimator, so
it is meaningful for small sets; it is averaged over random equal-size subsets, and the spread over
subsets is reported with it.
"""

from __future__ import annotations

import numpy as np
import torch


def kid(features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor, num_subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation (np.std, over subsets) of the unbiased MMD^2; features (n1, d), (n2, d).

    The subset size is clipped to the smaller set, and each subset is drawn without replacement.
    """
    x = _as_float64(features1, "first")
    y = _as_float64(features2, "second")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"The two feature sets have dimensions {x.shape[1]} and {y.shape[1]}; extract both with the same network."
        )
    m = min(x.shape[0], y.shape[0], subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set but got subsets of {m}; give more images.")
    if num_subsets < 1:
        raise ValueError(f"num_subsets is {num_subsets} but must be at least 1.")
    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets)
    for i in range(num_subsets):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        estimates[i] = _unbiased_mmd2(xs, ys)
    return float(estimates.mean()), float(estimates.std())


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
        raise ValueError(f"The {which} feature set has shape {x.shape} but must be (n, d).")
    return x
