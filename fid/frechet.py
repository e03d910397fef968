"""Fréchet distance between two Gaussians, the quantity FID reports (Heusel et al. 2017):

    d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).

The last term avoids a general matrix square root. For any factors S1 = F1 F1^T and S2 = F2 F2^T,
S1 S2 has the same non-zero eigenvalues as (F1^T F2)(F1^T F2)^T, so Tr((S1 S2)^(1/2)) is the sum of
the singular values of F1^T F2. Factors come from Cholesky with complete pivoting, which stops at
the numerical rank: the rank-deficient covariances of small sample sets are handled exactly (where
`sqrtm` of the non-symmetric product drifts into complex values), and the singular value problem
shrinks to rank x rank, which also keeps it fast.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg.lapack

# Relative tolerances for accepting floating-point noise in a covariance matrix.
_SYMMETRY_RTOL = 1e-6
_PSD_RTOL = 1e-6


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (d,), sigma (d, d).

    `eps` is added to both diagonals only if the factorisation fails on the exact matrices.
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "first")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"The two statistics have feature dimensions {mu1.size} and {mu2.size}; "
            "compute both with the same network."
        )
    diff = mu1 - mu2
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        warnings.warn(f"Factorisation did not converge; adding {eps} to the covariance diagonals.", RuntimeWarning)
        offset = eps * np.eye(sigma1.shape[0])
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    # Rounding can push a true zero slightly below it.
    return max(distance, 0.0)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((sigma1 sigma2)^(1/2)) for symmetric positive semi-definite inputs."""
    f1, f2 = _psd_factor(sigma1, "first"), _psd_factor(sigma2, "second")
    if f1.shape[1] == 0 or f2.shape[1] == 0:
        return 0.0
    return float(np.linalg.svd(f1.T @ f2, compute_uv=False).sum())


def _psd_factor(sigma: np.ndarray, which: str) -> np.ndarray:
    """F of shape (d, rank) with sigma = F F^T, or an error if sigma is not positive semi-definite."""
    lower, piv, rank, info = scipy.linalg.lapack.dpstrf(sigma, lower=1)
    assert info >= 0, f"dpstrf rejected its argument (info={info})"
    factor = np.empty((sigma.shape[0], rank))
    # LAPACK factors P^T sigma P = L L^T with row k of L belonging to variable piv[k] (1-based).
    factor[piv - 1] = np.tril(lower)[:, :rank]
    # Pivoting stops once every remaining diagonal entry is negligible; for a PSD matrix what is left
    # over is then negligible too, for an indefinite one it is not.
    scale = max(float(np.abs(sigma).max(initial=0.0)), np.finfo(np.float64).tiny)
    if np.abs(sigma - factor @ factor.T).max(initial=0.0) > _PSD_RTOL * scale:
        raise ValueError(
            f"The {which} covariance is not positive semi-definite, so it is not a covariance matrix; "
            "pass the sigma computed from features."
        )
    return factor


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"The {which} mean has shape {mu.shape} but must be a vector (d,); pass mu, not features.")
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"The {which} covariance has shape {sigma.shape} but must be square (d, d).")
    if sigma.shape[0] != mu.size:
        raise ValueError(
            f"The {which} mean has length {mu.size} but its covariance is {sigma.shape}; pass matching mu and sigma."
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"The {which} mean or covariance contains NaN or infinity; recompute the statistics.")
    scale = max(float(np.abs(sigma).max(initial=0.0)), np.finfo(np.float64).tiny)
    if np.abs(sigma - sigma.T).max(initial=0.0) > _SYMMETRY_RTOL * scale:
        raise ValueError(f"The {which} covariance is not symmetric, so it is not a covariance matrix.")
    return mu, (sigma + sigma.T) / 2
