"""Fréchet distance between two Gaussians, the quantity FID reports (Heusel et al. 2017):

    d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).

The last term avoids a general matrix square root. For any factors S1 = F1 F1^T and S2 = F2 F2^T,
S1 S2 has the same non-zero eigenvalues as (F1^T F2)(F1^T F2)^T, so Tr((S1 S2)^(1/2)) is the sum of
the singular values of F1^T F2. The factors come from each covariance's eigendecomposition,
F = V diag(lambda)^(1/2) over the eigenvalues above the matrix's rounding noise, so the
rank-deficient covariances of small sample sets are handled exactly (where `sqrtm` of the
non-symmetric product drifts into complex values) and the singular value problem shrinks to
rank x rank. A set of n <= d feature vectors gives its factor directly, F = V S from the SVD
U S V^T of its centred features over sqrt(n - 1) (`factor_of_features`), which spares the d x d
eigendecomposition (seconds at Inception's d = 2048) for an n x d SVD.

How much rounding noise a covariance carries depends on the precision it was stored in: statistics
files saved in float32 (as some tools write them) are positive semi-definite only up to float32
rounding. Let eps be the machine epsilon of that precision and d the dimension. Rounding changes
each entry by at most eps/2 |S_ij| <= eps/2 ||S||_2 (no entry of a PSD matrix exceeds its largest
eigenvalue), so the perturbation E has ||E||_2 <= ||E||_F <= d eps/2 ||S||_2, and by Weyl's
inequality no eigenvalue moves further than that. A covariance is therefore refused only when an
eigenvalue lies further below zero than d eps ||S||_2 (that bound with a factor 2 of headroom for the
arithmetic that computed S), or when it differs from its transpose by more than d eps max|S_ij|
(rounding keeps symmetry; arithmetic that computed the two triangles apart may not): any matrix that
rounding could have made from a true covariance is accepted.

Which eigenvalues count as zero is a different question. The worst case above is far from typical
(in practice rounding moves eigenvalues by eps ||S||_2 or less), and cutting at it would drop the small but real
variances of a large sample set. Eigenvalues up to max(eps, d eps_64) ||S||_2 are dropped: below
what the stored numbers resolve, or below what float64 arithmetic on d x d matrices (the covariance's
own accumulation, our eigensolver) resolves.
"""

from __future__ import annotations

import warnings

import numpy as np

from core.errors import UserError

_FLOAT64_EPS = float(np.finfo(np.float64).eps)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, *, factor1: np.ndarray | None = None,
                     factor2: np.ndarray | None = None) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (d,), sigma (d, d).

    The covariances' dtypes set the rounding they are allowed (float32 files are accepted up to
    float32 rounding; see the module docstring). `eps` is added to both diagonals only if the
    eigen- or singular value decomposition fails to converge on the exact matrices. `factor1`
    and `factor2`, where given, are (d, r) factors of the covariances from `factor_of_features`,
    used instead of factorising them.
    """
    mu1, sigma1, precision1 = _check_gaussian(mu1, sigma1, "first")
    mu2, sigma2, precision2 = _check_gaussian(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise UserError(
            f"The two statistics have feature dimensions {mu1.size} and {mu2.size}; "
            "compute both with the same network."
        )
    diff = mu1 - mu2
    try:
        tr_covmean = _trace_sqrt_product(sigma1, precision1, sigma2, precision2, factor1, factor2)
    except np.linalg.LinAlgError:
        warnings.warn(f"Factorisation did not converge; adding {eps} to the covariance diagonals.", RuntimeWarning)
        offset = eps * np.eye(sigma1.shape[0])
        tr_covmean = _trace_sqrt_product(sigma1 + offset, precision1, sigma2 + offset, precision2)
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    # Rounding can push a true zero slightly below it.
    return max(distance, 0.0)


def factor_of_features(features: np.ndarray) -> np.ndarray:
    """F (d, r) with F F^T the unbiased covariance of `features` (n, d), from their SVD, keeping the
    directions `_psd_factor` would keep of that covariance computed in float64. Cheaper than factorising
    the covariance where n < d, and exact: no eigenvalue of rounding noise to cut."""
    x = np.asarray(features, dtype=np.float64)
    assert x.ndim == 2 and x.shape[0] >= 2, f"need (n >= 2, d) features, got {x.shape}"
    _, singular, rows = np.linalg.svd((x - x.mean(axis=0)) / np.sqrt(x.shape[0] - 1), full_matrices=False)
    eigenvalues = singular**2  # the covariance's non-zero eigenvalues, descending
    keep = eigenvalues > x.shape[1] * _FLOAT64_EPS * eigenvalues.max(initial=0.0)
    return rows[keep].T * singular[keep]


def _trace_sqrt_product(sigma1: np.ndarray, precision1: float, sigma2: np.ndarray, precision2: float,
                        factor1: np.ndarray | None = None, factor2: np.ndarray | None = None) -> float:
    """Tr((sigma1 sigma2)^(1/2)) for symmetric positive semi-definite inputs (or their given factors)."""
    f1 = _psd_factor(sigma1, precision1, "first") if factor1 is None else factor1
    f2 = _psd_factor(sigma2, precision2, "second") if factor2 is None else factor2
    assert f1.shape[0] == sigma1.shape[0] and f2.shape[0] == sigma2.shape[0], (f1.shape, f2.shape)
    if f1.shape[1] == 0 or f2.shape[1] == 0:
        return 0.0
    return float(np.linalg.svd(f1.T @ f2, compute_uv=False).sum())


def _psd_factor(sigma: np.ndarray, precision: float, which: str) -> np.ndarray:
    """F of shape (d, rank) with sigma = F F^T up to rounding, or an error if sigma is not PSD."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)  # ascending
    norm = float(np.abs(eigenvalues).max(initial=0.0))  # ||sigma||_2
    bound = sigma.shape[0] * precision * norm
    if eigenvalues.size and eigenvalues[0] < -bound:
        raise UserError(
            f"The {which} covariance is not positive semi-definite: its eigenvalue {eigenvalues[0]:.3g} lies further "
            f"below zero than rounding explains (-{bound:.3g}), so it is not a covariance matrix; pass the sigma "
            "computed from features, stored in the precision it was computed in."
        )
    keep = eigenvalues > max(precision, sigma.shape[0] * _FLOAT64_EPS) * norm
    return eigenvectors[:, keep] * np.sqrt(eigenvalues[keep])


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray, float]:
    """mu and the symmetrised sigma in float64, and the machine epsilon of the precision sigma came in."""
    sigma = np.asarray(sigma)
    # Our arithmetic is float64, so nothing is resolved more finely than that.
    precision = max(float(np.finfo(sigma.dtype).eps) if np.issubdtype(sigma.dtype, np.floating) else 0.0,
                    _FLOAT64_EPS)
    mu = np.asarray(mu, dtype=np.float64)
    sigma = sigma.astype(np.float64)
    if mu.ndim != 1:
        raise UserError(f"The {which} mean has shape {mu.shape} but must be a vector (d,); pass mu, not features.")
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise UserError(f"The {which} covariance has shape {sigma.shape} but must be square (d, d).")
    if sigma.shape[0] != mu.size:
        raise UserError(
            f"The {which} mean has length {mu.size} but its covariance is {sigma.shape}; pass matching mu and sigma."
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"The {which} mean or covariance contains NaN or infinity; recompute the statistics.")
    bound = sigma.shape[0] * precision * float(np.abs(sigma).max(initial=0.0))
    asymmetry = float(np.abs(sigma - sigma.T).max(initial=0.0))
    if asymmetry > bound:
        raise UserError(
            f"The {which} covariance is not symmetric: it differs from its transpose by up to {asymmetry:.3g}, more "
            f"than rounding explains ({bound:.3g}), so it is not a covariance matrix; pass the sigma computed from "
            "features, stored in the precision it was computed in."
        )
    return mu, (sigma + sigma.T) / 2, precision
