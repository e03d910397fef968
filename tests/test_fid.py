"""Tests of fid/: Fréchet distance, KID, statistics, the FID Inception network, folder input and CLI.

Everything runs on CPU with a random-weight network (weights="random"); the published weights are
not needed. Expected values come from closed forms, numpy/scipy reference computations, or the
published weight file's layout written out below.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil
import struct
import subprocess
import sys
import urllib.error
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

import fid
from data.imageio import list_images
from fid.__main__ import build_parser, check_kid_options, run as cli_main
from fid.folder import FolderBatches, ImageFolder, collate_images
from fid.frechet import frechet_distance
from fid.kid import check_kid_sizes, kid
from fid.stats import Provenance, Statistics, StreamingStatistics, load_statistics, save_statistics
from fid.weights import WEIGHTS_FILENAME, WEIGHTS_URL, build_fid_inception, load_fid_state_dict

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def random_rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_identity_covariances_is_squared_mean_shift():
    mu1, mu2 = np.array([1.0, 2.0, 3.0]), np.array([0.0, 4.0, 3.5])
    assert frechet_distance(mu1, np.eye(3), mu2, np.eye(3)) == pytest.approx(1 + 4 + 0.25, rel=1e-12)


def test_frechet_zero_for_identical_and_symmetric():
    rng = np.random.default_rng(1)
    mu1, mu2, s1, s2 = rng.normal(size=30), rng.normal(size=30), random_spd(rng, 30), random_spd(rng, 30)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


def test_frechet_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    for d in (5, 40):
        mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), random_spd(rng, d), random_spd(rng, d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_rank_deficient_covariances_match_closed_form():
    # Common rotation leaves the distance unchanged, so rotated singular diagonals keep the closed form.
    rng = np.random.default_rng(3)
    d = 12
    s1, s2 = rng.uniform(0.5, 2, size=d), rng.uniform(0.5, 2, size=d)
    s1[:4] = 0.0
    s2[2:7] = 0.0
    q = random_rotation(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, q @ np.diag(s1) @ q.T, mu2, q @ np.diag(s2) @ q.T)
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-7)


def test_frechet_sample_covariances_with_fewer_samples_than_dimensions():
    # With centred, scaled samples A and B (S1 = A^T A, S2 = B^T B), Tr((S1 S2)^(1/2)) is the sum of
    # the singular values of A B^T, a small well-conditioned problem to compare against.
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) * 1.5 + 0.5
    a, b = (x - x.mean(0)) / 3.0, (y - y.mean(0)) / 3.0
    expected = (np.sum((x.mean(0) - y.mean(0)) ** 2) + np.sum(a * a) + np.sum(b * b)
                - 2 * np.linalg.svd(a @ b.T, compute_uv=False).sum())
    got = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-10)



def test_statistics_of_fewer_features_than_dimensions_carry_an_exact_factor_that_gives_the_same_distance(monkeypatch):
    """A set of n <= d features keeps F (d, n - 1) with F F^T = sigma, and FID through it equals FID through the
    covariance's eigendecomposition, which it then does without; at n = d + 1 nothing is kept."""
    from fid.stats import StreamingStatistics
    rng = np.random.default_rng(6)
    d = 48
    x = rng.normal(size=(30, d)) @ rng.normal(size=(d, d)) + 3.0  # correlated, far from the origin
    y = rng.normal(size=(d, d)) * 1.5

    def stats(features, batches):
        accumulator = StreamingStatistics()
        for batch in np.array_split(features, batches):
            accumulator.update(batch)
        return accumulator.result()

    a, b = stats(x, 4), stats(y, 1)
    assert a.factor.shape == (d, 29) and b.factor.shape == (d, d - 1)  # centring takes one direction
    for s in (a, b):
        np.testing.assert_allclose(s.factor @ s.factor.T, s.sigma, rtol=0, atol=1e-12 * np.abs(s.sigma).max())
    through_covariances = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    eigh = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", None)  # (called: a TypeError)
    assert frechet_distance(a.mu, a.sigma, b.mu, b.sigma, factor1=a.factor, factor2=b.factor) == pytest.approx(
        through_covariances, rel=1e-12)
    monkeypatch.setattr(np.linalg, "eigh", eigh)
    assert stats(rng.normal(size=(d + 1, d)), 3).factor is None
    reused, accumulator = rng.normal(size=(10, d)), StreamingStatistics()  # a caller that refills one buffer
    accumulator.update(reused)
    reused[:] = rng.normal(size=(10, d))
    accumulator.update(reused)
    kept = accumulator.result()
    np.testing.assert_allclose(kept.factor @ kept.factor.T, kept.sigma, rtol=0, atol=1e-12 * np.abs(kept.sigma).max())

def test_frechet_falls_back_to_offset_when_factorisation_fails(monkeypatch):
    rng = np.random.default_rng(5)
    mu1, mu2, s1, s2 = rng.normal(size=6), rng.normal(size=6), random_spd(rng, 6), random_spd(rng, 6)
    exact = frechet_distance(mu1, s1, mu2, s2)
    real_svd, calls = np.linalg.svd, []

    def flaky_svd(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise np.linalg.LinAlgError("SVD did not converge")
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(np.linalg, "svd", flaky_svd)
    with pytest.warns(RuntimeWarning, match="adding 1e-06"):
        got = frechet_distance(mu1, s1, mu2, s2)
    assert len(calls) == 2 and got == pytest.approx(exact, abs=1e-4)


def test_float32_statistics_of_fewer_samples_than_dimensions_match_float64_and_sqrtm(tmp_path):
    # Statistics files written in float32 by other tools: with fewer samples than dimensions the
    # covariance is singular, and float32 rounding leaves eigenvalues slightly below zero.
    rng = np.random.default_rng(14)
    d = 192
    x = np.maximum(rng.normal(size=(40, d)) + 0.5, 0.0)  # rank 39
    y = np.maximum(rng.normal(size=(60, d)) * 1.2 + 0.5, 0.0)  # rank 59
    files = []
    for name, features in (("x", x), ("y", y)):
        sigma = np.cov(features, rowvar=False)
        np.savez(tmp_path / f"{name}.npz", mu=features.mean(0).astype(np.float32), sigma=sigma.astype(np.float32))
        files.append(tmp_path / f"{name}.npz")
    s32 = np.load(files[0])["sigma"].astype(np.float64)
    assert np.linalg.eigvalsh(s32)[0] < 0  # positive semi-definite only up to float32 rounding
    # Exact value from the centred samples A, B (S1 = A^T A, S2 = B^T B): Tr((S1 S2)^(1/2)) = sum sv(A B^T).
    a, b = (x - x.mean(0)) / np.sqrt(39), (y - y.mean(0)) / np.sqrt(59)
    exact = (np.sum((x.mean(0) - y.mean(0)) ** 2) + np.sum(a * a) + np.sum(b * b)
             - 2 * np.linalg.svd(a @ b.T, compute_uv=False).sum())
    from_float64 = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    with pytest.warns(UserWarning, match="do not record which feature network"):  # pytorch-fid's files do not
        from_float32 = fid.fid_between(*files, fid.FeatureOptions(progress=False)).fid
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    by_sqrtm = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert from_float64 == pytest.approx(exact, rel=1e-12)
    assert from_float32 == pytest.approx(exact, rel=1e-7)
    assert from_float32 == pytest.approx(by_sqrtm, rel=1e-6)


def _with_negative_eigenvalue(rng: np.random.Generator, d: int, relative: float) -> np.ndarray:
    """A symmetric matrix of largest eigenvalue 1 whose smallest is -relative."""
    q = random_rotation(rng, d)
    eigenvalues = np.concatenate([[-relative], np.zeros(d // 2), rng.uniform(0.1, 1.0, d - d // 2 - 2), [1.0]])
    return (q * eigenvalues) @ q.T


def test_psd_tolerance_follows_the_stored_precision():
    # d * eps bounds what rounding to a precision can do: 64 * 1.2e-7 = 7.6e-6 in float32 and 1.4e-14
    # in float64. An eigenvalue of -1e-7 is rounding for float32 data but not for float64 data;
    # -1e-3 is beyond either.
    rng = np.random.default_rng(15)
    d, mu, other = 64, np.zeros(64), np.eye(64)
    slightly = _with_negative_eigenvalue(rng, d, 1e-7)
    assert np.isfinite(frechet_distance(mu, slightly.astype(np.float32), mu, other))
    with pytest.raises(ValueError, match="first covariance is not positive semi-definite: its eigenvalue -1e-07"):
        frechet_distance(mu, slightly, mu, other)
    clearly = _with_negative_eigenvalue(rng, d, 1e-3).astype(np.float32)
    with pytest.raises(ValueError, match="second covariance is not positive semi-definite"):
        frechet_distance(mu, other, mu, clearly)
    lopsided = slightly.astype(np.float32)
    lopsided[0, 1] += 1e-3
    with pytest.raises(ValueError, match="first covariance is not symmetric"):
        frechet_distance(mu, lopsided, mu, other)


@pytest.mark.parametrize("mu1, sigma1, mu2, sigma2, match", [
    (np.zeros(3), np.eye(3)[:2], np.zeros(3), np.eye(3), "must be square"),
    (np.zeros(3), np.eye(3), np.zeros(4), np.eye(4), "feature dimensions 3 and 4"),
    (np.zeros(2), np.eye(3), np.zeros(3), np.eye(3), "length 2 but its covariance"),
    (np.zeros((3, 3)), np.eye(3), np.zeros(3), np.eye(3), "must be a vector"),
    (np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2), "not symmetric"),
    (np.zeros(2), np.array([[1.0, np.nan], [np.nan, 1.0]]), np.zeros(2), np.eye(2), "NaN"),
    (np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2), "first covariance is not positive semi-definite"),
    (np.zeros(2), np.eye(2), np.zeros(2), np.array([[0.0, 1.0], [1.0, 0.0]]), "second covariance is not positive"),
])
def test_frechet_rejects_invalid_inputs(mu1, sigma1, mu2, sigma2, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(mu1, sigma1, mu2, sigma2)


# ----------------------------------------------------------------------------------------------
# KID


def test_kid_equals_direct_unbiased_mmd_on_full_sets():
    # One subset of the full (equal-size) sets is the whole sample: compare with the U-statistic of
    # Bińkowski et al. (2018), eq. for MMD^2_u, written out as plain loops.
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.3
    k = lambda a, b: (a @ b / 5 + 1) ** 3  # noqa: E731
    m = 12
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std = kid(x, y, num_subsets=3, subset_size=12)
    # Subsets as large as the sets are the whole sets, so every draw gives the same estimate.
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same_mean, same_std = kid(x, y, num_subsets=10, subset_size=200, seed=1)
    shifted_mean, _ = kid(x, y + 0.5, num_subsets=10, subset_size=200, seed=1)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 20 * (abs(same_mean) + same_std)


def test_kid_is_reproducible_with_seed_and_accepts_tensors():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(50, 4)), rng.normal(size=(60, 4))
    assert kid(x, y, 5, 20, seed=3) == kid(torch.from_numpy(x), torch.from_numpy(y), 5, 20, seed=3)


def test_kid_counts_its_subsets_on_a_bar_when_asked_and_gives_the_same_value(capsys):
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(50, 4)), rng.normal(size=(60, 4))
    quiet = kid(x, y, 7, 20, seed=3)
    assert capsys.readouterr().err == ""
    assert kid(x, y, 7, 20, seed=3, progress=True) == quiet
    bar = capsys.readouterr().err
    assert "KID subsets: 100%" in bar and "7/7" in bar


def test_kid_refuses_subsets_larger_than_either_set():
    rng = np.random.default_rng(16)
    x, y = rng.normal(size=(10, 4)), rng.normal(size=(30, 4))
    with pytest.raises(ValueError, match=r"KID needs at least 20 images per side for subsets of 20 but got 10 and 30; "
                                         r"pass a subset size of at most 10"):
        kid(x, y, num_subsets=5, subset_size=20)
    with pytest.raises(ValueError, match="subset size is 1 but the unbiased estimate needs at least 2"):
        kid(x, y, subset_size=1)
    with pytest.raises(ValueError, match="number of KID subsets is 0"):
        kid(x, y, num_subsets=0, subset_size=5)
    _, spread = kid(x, y, num_subsets=5, subset_size=10)
    assert spread > 0  # the larger set is still subsampled


def test_kid_of_a_set_of_one_advises_more_images_not_an_impossible_subset_size():
    with pytest.raises(ValueError) as info:
        kid(np.zeros((1, 4)), np.ones((5, 4)), num_subsets=5, subset_size=2)
    message = str(info.value)
    assert re.fullmatch(r"KID needs at least 2 images per side but got 1 and 5; give each side 2 images or more, "
                        r"or skip KID \(on the command line --no-kid\)\.", message), message


def test_kid_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="dimensions 4 and 5"):
        kid(np.zeros((10, 4)), np.zeros((10, 5)))


# ----------------------------------------------------------------------------------------------
# Streaming statistics and .npz files


def test_streaming_statistics_match_numpy_two_pass():
    rng = np.random.default_rng(9)
    # A large offset makes naive sum-of-squares accumulation lose digits; merging moments must not.
    features = rng.normal(size=(61, 7)) * rng.uniform(0.1, 2, size=7) + 1e4
    accumulator = StreamingStatistics()
    start = 0
    for size in (1, 7, 0, 3, 20, 30):
        accumulator.update(torch.from_numpy(features[start:start + size]))
        start += size
    stats = accumulator.result()
    assert accumulator.count == 61
    np.testing.assert_allclose(stats.mu, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-12)
    assert np.array_equal(stats.sigma, stats.sigma.T)


def test_streaming_statistics_reject_dimension_change_and_single_sample():
    accumulator = StreamingStatistics()
    accumulator.update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 2 images but 1"):
        accumulator.result()
    with pytest.raises(ValueError, match="dimension 4 but earlier batches had 3"):
        accumulator.update(np.zeros((2, 4)))


def test_a_statistics_file_that_cannot_be_written_whole_leaves_the_one_before(tmp_path, monkeypatch):
    import errno

    from core import cli
    path, rng = tmp_path / "s.npz", np.random.default_rng(11)
    save_statistics(Statistics(mu=rng.normal(size=3), sigma=random_spd(rng, 3)), path)
    before = path.read_bytes()
    real_savez = np.savez

    def disk_fills(file, **arrays):
        real_savez(file, **arrays)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", disk_fills)
    with pytest.raises(OSError) as full:
        save_statistics(Statistics(mu=np.zeros(3), sigma=np.eye(3)), path)
    assert "disk full" in cli.explain(full.value)[0]
    with pytest.raises(OSError):
        save_statistics(Statistics(mu=np.zeros(3), sigma=np.eye(3)), tmp_path / "new.npz")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_statistics_npz_round_trip_uses_pytorch_fid_keys(tmp_path):
    rng = np.random.default_rng(10)
    stats = Statistics(mu=rng.normal(size=5), sigma=random_spd(rng, 5))
    save_statistics(stats, tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as raw:
        assert sorted(raw.files) == ["mu", "sigma"]
    loaded = load_statistics(tmp_path / "s.npz")
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    assert loaded.provenance is None
    # What they were computed from travels in arrays of their own, which pytorch-fid (reading mu and sigma) ignores.
    recorded = Provenance("FIDInceptionV3/pool3-2048", "0123456789abcdef", "all", 7)
    save_statistics(dataclasses.replace(stats, provenance=recorded), tmp_path / "r.npz")
    with np.load(tmp_path / "r.npz") as raw:
        assert np.array_equal(raw["mu"], stats.mu) and np.array_equal(raw["sigma"], stats.sigma)
    assert load_statistics(tmp_path / "r.npz").provenance == recorded
    # Without overwrite (the CLI without --overwrite) a file there by the time of writing is kept.
    with pytest.raises(FileExistsError, match=r"r\.npz was written by another command while this one computed"):
        save_statistics(stats, tmp_path / "r.npz", overwrite=False)
    assert load_statistics(tmp_path / "r.npz").provenance == recorded


def test_load_statistics_rejects_wrong_keys_and_shapes(tmp_path):
    np.savez(tmp_path / "keys.npz", mean=np.zeros(3), cov=np.eye(3))
    with pytest.raises(ValueError, match=r"keys\.npz has arrays \['cov', 'mean'\] but needs 'mu' and 'sigma'"):
        load_statistics(tmp_path / "keys.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"shapes\.npz has mu of shape \(3,\) and sigma of shape \(4, 4\)"):
        load_statistics(tmp_path / "shapes.npz")


# ----------------------------------------------------------------------------------------------
# The FID Inception network


def _conv(name: str, cin: int, cout: int, kh: int, kw: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.conv.weight", (cout, cin, kh, kw))] + [
        (f"{name}.bn.{p}", (cout,)) for p in ("weight", "bias", "running_mean", "running_var")
    ] + [(f"{name}.bn.num_batches_tracked", ())]


def _published_layout() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of pt_inception-2015-12-05-6726825d.pth, from the Inception V3 layer list
    (Szegedy et al. 2016, as ported from TF's 2015-12-05 graph), written out independently."""
    convs = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
             ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]
    for block, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs += [(f"{block}.branch1x1", cin, 64, 1, 1), (f"{block}.branch5x5_1", cin, 48, 1, 1),
                  (f"{block}.branch5x5_2", 48, 64, 5, 5), (f"{block}.branch3x3dbl_1", cin, 64, 1, 1),
                  (f"{block}.branch3x3dbl_2", 64, 96, 3, 3), (f"{block}.branch3x3dbl_3", 96, 96, 3, 3),
                  (f"{block}.branch_pool", cin, pool, 1, 1)]
    convs += [("Mixed_6a.branch3x3", 288, 384, 3, 3), ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
              ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)]
    for block, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs += [(f"{block}.branch1x1", 768, 192, 1, 1), (f"{block}.branch7x7_1", 768, c7, 1, 1),
                  (f"{block}.branch7x7_2", c7, c7, 1, 7), (f"{block}.branch7x7_3", c7, 192, 7, 1),
                  (f"{block}.branch7x7dbl_1", 768, c7, 1, 1), (f"{block}.branch7x7dbl_2", c7, c7, 7, 1),
                  (f"{block}.branch7x7dbl_3", c7, c7, 1, 7), (f"{block}.branch7x7dbl_4", c7, c7, 7, 1),
                  (f"{block}.branch7x7dbl_5", c7, 192, 1, 7), (f"{block}.branch_pool", 768, 192, 1, 1)]
    convs += [("Mixed_7a.branch3x3_1", 768, 192, 1, 1), ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
              ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
              ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)]
    for block, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs += [(f"{block}.branch1x1", cin, 320, 1, 1), (f"{block}.branch3x3_1", cin, 384, 1, 1),
                  (f"{block}.branch3x3_2a", 384, 384, 1, 3), (f"{block}.branch3x3_2b", 384, 384, 3, 1),
                  (f"{block}.branch3x3dbl_1", cin, 448, 1, 1), (f"{block}.branch3x3dbl_2", 448, 384, 3, 3),
                  (f"{block}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{block}.branch3x3dbl_3b", 384, 384, 3, 1),
                  (f"{block}.branch_pool", cin, 192, 1, 1)]
    layout = dict(entry for spec in convs for entry in _conv(*spec))
    layout["fc.weight"], layout["fc.bias"] = (1008, 2048), (1008,)
    return layout


@pytest.fixture(scope="module")
def net() -> fid.FIDInceptionV3:
    return build_fid_inception("random")


@pytest.fixture
def small_input(monkeypatch):
    # Tests of the plumbing around the network do not depend on its input resolution; 75x75, the
    # smallest Inception V3 accepts, makes them ~16x cheaper on CPU than 299x299.
    monkeypatch.setattr(fid.inception, "INPUT_SIZE", 75)


@pytest.fixture
def extractor(net, small_input) -> fid.FeatureExtractor:
    ex = fid.FeatureExtractor(weights="random", device="cpu", batch_size=4, progress=False)
    ex._model = net  # share the one random network across tests instead of rebuilding it
    return ex


def test_state_dict_has_exactly_the_published_keys_and_shapes(net):
    expected = _published_layout()
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert len(expected) == 94 * 6 + 2
    assert sorted(got) == sorted(expected)
    assert got == expected


@pytest.mark.parametrize("height, width", [(32, 32), (40, 64), (299, 299)])
def test_input_is_resized_bilinearly_to_299_scaled_to_minus_one_one_and_gives_2048_features(net, height, width):
    x = torch.rand(1, 3, height, width)
    seen = []
    hook = net.Conv2d_1a_3x3.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            features = net(x)
    finally:
        hook.remove()
    expected = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    assert features.shape == (1, 2048) and torch.isfinite(features).all()


def _pool_branch(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of the block's pool branch (its last channels) with that branch's conv reduced to
    copying input channel 0, so the pooling itself is visible. BN is at its identity init."""
    block = copy.deepcopy(block)
    conv = block.branch_pool.conv
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1.0
        out = block(x)
    scale = (1 + block.branch_pool.bn.eps) ** 0.5
    return out[0, out.shape[1] - conv.out_channels] * scale


@pytest.mark.parametrize("name", ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6e", "Mixed_7b"])
def test_average_pools_ignore_padding(net, name):
    block = getattr(net, name)
    ones = torch.ones(1, block.branch1x1.conv.in_channels, 5, 5)
    pooled = _pool_branch(block, ones)
    # Counting the zero padding would give 4/9 in corners and 6/9 on edges.
    torch.testing.assert_close(pooled, torch.ones(5, 5))


def test_last_block_pools_with_max_and_the_one_before_with_average(net):
    def spike(channels):
        x = torch.zeros(1, channels, 5, 5)
        x[0, 0, 2, 2] = 9.0
        return x

    around = torch.zeros(5, 5)
    around[1:4, 1:4] = 1.0
    torch.testing.assert_close(_pool_branch(net.Mixed_7c, spike(2048)), 9.0 * around)
    # Mixed_7b's average (padding excluded) spreads the spike as 9/9 inside, 9/6 on edges, 9/4 in corners.
    torch.testing.assert_close(_pool_branch(net.Mixed_7b, spike(1280)), around)


# ----------------------------------------------------------------------------------------------
# The network's faster forms: batch norms folded, channels_last, torch.compile


def with_trained_like_batch_norms(net: fid.FIDInceptionV3) -> fid.FIDInceptionV3:
    """A copy of `net` whose batch norms are not the identity of a fresh network, so folding them shows."""
    net = copy.deepcopy(net)
    generator = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.8, 1.2, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
    return net


def assert_same_features(got: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> None:
    """Equal up to float32 rounding through the network: 1e-5 of the largest feature."""
    got, expected = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    assert got.shape == expected.shape and expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_folded_batch_norm_is_the_same_affine_map():
    layer = fid.inception.BasicConv2d(5, 7, kernel_size=3, padding=1).eval()
    generator = torch.Generator().manual_seed(18)
    with torch.no_grad():
        for tensor in (layer.bn.running_mean, layer.bn.bias):
            tensor.normal_(0.0, 1.0, generator=generator)
        for tensor in (layer.bn.running_var, layer.bn.weight):
            tensor.uniform_(0.1, 3.0, generator=generator)
        x = torch.randn(2, 5, 6, 6, generator=generator)
        expected = layer(x)
        layer.fold_batch_norm()
        got = layer(x)
    assert isinstance(layer.bn, torch.nn.Identity) and layer.conv.bias is not None
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_copy_gives_the_same_features_and_leaves_the_network_alone(net, small_input, channels_last):
    trained = with_trained_like_batch_norms(net)
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    fast = fid.inception.inference_copy(trained, channels_last=channels_last)
    x = torch.rand(3, 3, 20, 24)
    with torch.no_grad():
        expected = trained(x)
        got = fast(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    assert_same_features(got, expected)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert fast.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    after = trained.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_extractor_runs_the_folded_channels_last_copy_on_cpu(extractor):
    network = extractor.network
    assert network is not extractor.model and network is extractor.network  # built once
    assert network.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(extractor.model.Conv2d_1a_3x3.bn, torch.nn.BatchNorm2d)  # the published layout is kept
    images = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        expected = extractor.model(images)
    assert_same_features(extractor.features(images), expected)


def test_inception_forward_is_one_graph_for_torch_compile(net, small_input):
    # A graph break would split what torch.compile fuses and add a round trip through Python per batch.
    explanation = torch._dynamo.explain(fid.inception.inference_copy(net, channels_last=True))(torch.rand(2, 3, 8, 8))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


needs_cpp_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="torch.compile on CPU needs a C++ compiler")


class _PoolsOfFoldedConv(torch.nn.Module):
    """The pieces of an Inception block in small: a folded convolution, both kinds of pool, a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = fid.inception.BasicConv2d(4, 8, kernel_size=3, padding=1).eval()
        self.average = fid.inception._tf_avg_pool()
        self.max = torch.nn.MaxPool2d(kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return torch.cat([x, self.average(x), self.max(x)], dim=1)


@needs_cpp_compiler
def test_compiled_pieces_of_the_network_match_eager():
    # Compiling the whole network takes over a minute on a CPU (the slow test below); these pieces take
    # about a second once torch's compiler cache is warm (about 20 s the first time on a machine).
    pieces = _PoolsOfFoldedConv()
    generator = torch.Generator().manual_seed(20)
    with torch.no_grad():
        pieces.conv.bn.running_mean.normal_(0.0, 0.1, generator=generator)
        pieces.conv.bn.running_var.uniform_(0.5, 1.5, generator=generator)
    pieces.conv.fold_batch_norm()
    pieces = pieces.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = pieces(x)
        got = torch.compile(pieces, dynamic=True)(x)
    assert_same_features(got, expected)


@pytest.mark.slow
@needs_cpp_compiler
def test_compiled_extractor_gives_the_eager_features(extractor):
    compiled = fid.FeatureExtractor(weights="random", device="cpu", batch_size=4, progress=False, compile=True)
    compiled._model = extractor.model
    torch._dynamo.reset()
    # Batches of 4 and 2, then another image size: shapes are dynamic, so one compilation serves all three.
    for images in (torch.rand(6, 3, 16, 16), torch.rand(4, 3, 24, 24)):
        assert_same_features(compiled.features(images), extractor.features(images))


# ----------------------------------------------------------------------------------------------
# Weights


def test_weights_without_batch_counters_load_and_foreign_weights_are_refused(net, tmp_path):
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    fresh = fid.FIDInceptionV3()
    load_fid_state_dict(fresh, state, source="copy")
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    del state["fc.bias"]
    with pytest.raises(ValueError, match=r"copy do not fit the FID Inception network .*fc\.bias"):
        load_fid_state_dict(fresh, state, source="copy")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match=r"foreign\.pth do not fit the FID Inception network"):
        build_fid_inception(tmp_path / "foreign.pth")
    with pytest.raises(FileNotFoundError, match=r"missing\.pth does not exist"):
        build_fid_inception(tmp_path / "missing.pth")
    # Each a UserError, so the command line says it in one sentence (they were tracebacks).
    from core.errors import UserError
    (tmp_path / "notes.txt").write_text("not weights")
    for wrong, message in ((tmp_path / "missing.pth", "does not exist"), (tmp_path, "is a folder"),
                           (tmp_path / "notes.txt", "as weights"), (tmp_path / "foreign.pth", "do not fit")):
        with pytest.raises(UserError, match=message):
            build_fid_inception(wrong)


def _offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)


def test_offline_without_weights_names_file_url_and_remedy(monkeypatch, tmp_path, capsys):
    _offline(monkeypatch)
    with pytest.raises(FileNotFoundError) as info:
        build_fid_inception()
    message = str(info.value)
    assert WEIGHTS_FILENAME in message and WEIGHTS_URL in message and "--weights PATH" in message
    assert "checkpoints" in message
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "0.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "1.png")
    folder = str(tmp_path / "a")
    assert cli_main([folder, folder, "--device", "cpu", "--num-workers", "0", "--no-kid"]) == 1
    assert WEIGHTS_URL in capsys.readouterr().err


def test_weights_failing_the_hash_check_name_the_cached_file_to_delete(monkeypatch):
    def bad_hash(*args, **kwargs):
        raise RuntimeError('invalid hash value (expected "6726825d", got "0000")')

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", bad_hash)
    with pytest.raises(ValueError, match=rf"RuntimeError: invalid hash value .*; delete \S*{WEIGHTS_FILENAME} and run"):
        build_fid_inception()


# ----------------------------------------------------------------------------------------------
# Image sources: folders, tensors, batches


def _write(folder: Path, name: str, image: Image.Image, **kwargs) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name, **kwargs)


def _png(path: Path, array: np.ndarray, color_type: int) -> None:
    """Write a 16-bit PNG (colour type 2: RGB, 4: grey + alpha, 6: RGBA), which Pillow cannot save."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = array.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def _as_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def test_default_file_selection_is_pytorch_fids_and_all_reads_every_image(tmp_path):
    # pytorch-fid lists `*.<ext>` in the folder itself for bmp jpeg jpg pgm png ppm tif tiff webp,
    # with pathlib's glob: lower-case only (on Linux and macOS), hidden files included, sorted.
    image = Image.new("RGB", (4, 4), (10, 20, 30))
    names = [".hidden.png", "a.png", "b.PNG", "c.jpeg", "d.gif", "e.webp", "f.tif", "g.ppm", "h.JPG",
             "sub/i.png", "j.png/k.bmp"]
    for name in names:
        _write(tmp_path / Path(name).parent, Path(name).name, image)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"Leaving out 5 image file\(s\) .* such as b\.PNG\); pass --files all"):
        default = ImageFolder(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in default.files] == [
        ".hidden.png", "a.png", "c.jpeg", "e.webp", "f.tif", "g.ppm"]
    # "all" is what training's folder datasets read: data.imageio's listing, whatever its rules.
    every = ImageFolder(tmp_path, files="all")
    assert every.files == list_images(tmp_path)
    assert {"b.PNG", "d.gif", "h.JPG", "j.png/k.bmp", "sub/i.png"} <= {p.relative_to(tmp_path).as_posix()
                                                                      for p in every.files}
    _write(tmp_path / "classes" / "cat", "0.png", image)
    with pytest.raises(ValueError, match=r"no images pytorch-fid would read .* but 1 others such as cat/0\.png; "
                                         r"pass --files all"):
        ImageFolder(tmp_path / "classes")
    with pytest.raises(ValueError, match="files is 'some' but must be one of 'pytorch-fid', 'all'"):
        ImageFolder(tmp_path, files="some")
    # A broken link among the files it reads is refused, as training refuses it, not skipped.
    os.symlink(tmp_path / "gone.png", tmp_path / "dead.png")
    for files in ("pytorch-fid", "all"):
        with pytest.raises(ValueError, match=r"dead\.png is not a regular file"):
            ImageFolder(tmp_path, files=files)


def test_folder_images_are_what_pil_convert_rgb_gives_as_in_pytorch_fid(tmp_path):
    # pytorch-fid reads Image.open(path).convert("RGB"): alpha dropped (not composited), palette
    # transparency ignored. Transparent pixels here hold colours, so compositing would show.
    rng = np.random.default_rng(11)
    rgb = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
    alpha = rng.integers(0, 256, size=(6, 5, 1), dtype=np.uint8)
    alpha[0, 0] = 0
    palette = Image.fromarray(rgb).quantize(colors=8)
    kinds = {
        "rgb.png": Image.fromarray(rgb), "rgb.bmp": Image.fromarray(rgb), "rgb.ppm": Image.fromarray(rgb),
        "rgb.jpg": Image.fromarray(rgb), "rgb.webp": Image.fromarray(rgb),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "grey.png": Image.fromarray(grey, "L"), "grey.pgm": Image.fromarray(grey, "L"),
        "bilevel.png": Image.fromarray(grey > 127),
        "rgba.png": Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA"),
        "rgba.webp": Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA"),
        "la.png": Image.fromarray(np.stack([grey, alpha[..., 0]], axis=2), "LA"),
        "palette.png": palette, "pa.tif": palette.convert("PA"),
    }
    for name, image in kinds.items():
        _write(tmp_path, name, image)
    _write(tmp_path, "palette_transparent.png", palette, transparency=int(np.asarray(palette)[0, 0]))
    # Pillow reads 16-bit colour PNGs as 8 bits per channel, identically for both.
    _png(tmp_path / "rgb16.png", rng.integers(0, 65536, size=(6, 5, 3)), color_type=2)
    _png(tmp_path / "rgba16.png", rng.integers(0, 65536, size=(6, 5, 4)), color_type=6)
    _png(tmp_path / "la16.png", rng.integers(0, 65536, size=(6, 5, 2)), color_type=4)
    dataset = ImageFolder(tmp_path)
    assert len(dataset) == len(kinds) + 4
    modes = set()
    for index, path in enumerate(dataset.files):
        with Image.open(path) as image:
            modes.add(image.mode)
            expected = _as_tensor(image.convert("RGB"))
        assert dataset[index].dtype == torch.float32
        torch.testing.assert_close(dataset[index], expected, rtol=0, atol=0, msg=path.name)
    assert {"RGBA", "LA", "P", "PA", "CMYK", "1"} <= modes
    with Image.open(tmp_path / "palette_transparent.png") as image:
        assert "transparency" in image.info  # kept its colour above, not turned black
    torch.testing.assert_close(dataset[dataset.files.index(tmp_path / "rgba.png")], _as_tensor(rgb), rtol=0, atol=0)


def test_16_bit_greyscale_is_rescaled_where_pytorch_fid_clips(tmp_path):
    values = np.array([[0, 255, 256, 1000], [20000, 40000, 65000, 65535]], dtype=np.uint16)
    _write(tmp_path, "grey16.png", Image.fromarray(values))
    (tmp_path / "grey16.pgm").write_bytes(b"P5\n4 2\n65535\n" + values.astype(">u2").tobytes())
    rescaled = np.floor(values / 65535 * 255 + 0.5).astype(np.uint8)
    dataset = ImageFolder(tmp_path)
    for index, path in enumerate(dataset.files):
        torch.testing.assert_close(dataset[index], _as_tensor(np.repeat(rescaled[..., None], 3, axis=2)),
                                   rtol=0, atol=0)
        with Image.open(path) as image:
            clipped = np.asarray(image.convert("RGB"))[..., 0]
        assert np.array_equal(clipped, np.minimum(values, 255))  # what pytorch-fid would see


def test_pillows_warnings_while_reading_name_the_first_file_once(tmp_path):
    # A palette with its transparency as bytes warns when converted to RGB, as pytorch-fid converts it.
    palette = Image.fromarray(np.arange(30, dtype=np.uint8).reshape(5, 6)).convert("P")
    for name in ("a.png", "b.png"):
        palette.save(tmp_path / name, transparency=bytes([0] * 4 + [255] * 252))
    dataset = ImageFolder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = [dataset[index] for index in (0, 1, 0)]
    assert all(image.shape == (3, 5, 6) for image in images)  # still read
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and said[0].startswith(f"{dataset.files[0]}: Palette images with Transparency"), said


def test_collate_resizes_mixed_sizes_exactly_as_the_network_would():
    a, b = torch.rand(3, 10, 12), torch.rand(3, 299, 299)
    batch = collate_images([a, b])
    resized_a = F.interpolate(a[None], size=(299, 299), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(batch[0], resized_a, rtol=0, atol=0)
    # Resizing to the size an image already has is the identity, so the network's own resize
    # leaves pre-resized images untouched.
    torch.testing.assert_close(batch[1], b, rtol=0, atol=0)
    torch.testing.assert_close(F.interpolate(batch, size=(299, 299), mode="bilinear", align_corners=False), batch,
                               rtol=0, atol=0)
    same = collate_images([a, a.clone()])
    assert same.shape == (2, 3, 10, 12)


def test_large_images_are_resized_one_by_one_as_decoded_with_the_features_the_network_gives(extractor, tmp_path):
    # A batch of photos was held at full size until the network resized it (a 12-megapixel photo is
    # 144 MB as floats, so memory grew with photo size times batch size); each image with more pixels
    # than the input is now resized on its own as it is decoded. INPUT_SIZE is 75 here (small_input).
    rng = np.random.default_rng(21)
    large = rng.integers(0, 256, size=(3, 400, 600, 3), dtype=np.uint8)
    for i, array in enumerate(large):
        _write(tmp_path / "large", f"{i}.png", Image.fromarray(array))
    batches = list(FolderBatches(ImageFolder(tmp_path / "large"), batch_size=2, num_workers=0))
    assert [tuple(batch.shape) for batch in batches] == [(2, 3, 75, 75), (1, 3, 75, 75)]
    # The same features as before: the whole batch at full size, resized by the network itself.
    full_size = torch.from_numpy(large).permute(0, 3, 1, 2).float() / 255
    assert_same_features(extractor.features(tmp_path / "large"), extractor.model(full_size))
    from_folder, from_tensor = extractor.statistics(tmp_path / "large"), extractor.statistics(full_size)
    np.testing.assert_allclose(from_folder.mu, from_tensor.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_folder.sigma, from_tensor.sigma, rtol=1e-4, atol=1e-6)
    # Mixed with images smaller than the input (left for the network, or fitted when sizes differ):
    # each image gets the features the network gives it on its own.
    small = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    for name, array in (("0.png", large[0]), ("1.png", small), ("2.png", large[1]), ("3.png", small[::-1])):
        _write(tmp_path / "mixed", name, Image.fromarray(array))
    batches = list(FolderBatches(ImageFolder(tmp_path / "mixed"), batch_size=2, num_workers=0))
    assert [tuple(batch.shape) for batch in batches] == [(2, 3, 75, 75)] * 2
    one_by_one = torch.cat([extractor.model(_as_tensor(array)[None]) for array in (large[0], small, large[1],
                                                                                     small[::-1])])
    assert_same_features(extractor.features(tmp_path / "mixed"), one_by_one)


def test_folder_tensor_and_batch_sources_give_the_same_statistics(extractor, tmp_path):
    rng = np.random.default_rng(12)
    arrays = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    for i, array in enumerate(arrays):
        _write(tmp_path, f"{i}.png", Image.fromarray(array))
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255
    from_folder = extractor.statistics(tmp_path)
    from_tensor = extractor.statistics(images)
    from_batches = extractor.statistics(iter([images[:1], images[1:]]))
    for other in (from_tensor, from_batches):
        np.testing.assert_allclose(other.mu, from_folder.mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(other.sigma, from_folder.sigma, rtol=1e-4, atol=1e-6)
    assert from_folder.mu.shape == (2048,) and from_folder.sigma.shape == (2048, 2048)


def test_folder_features_match_pytorch_fids_with_the_same_weights(net, tmp_path):
    # pytorch-fid's own code on the same files with the same weights: decoding, the resize to 299 and
    # the network agree, to float rounding (our batch norms are folded and run channels_last).
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    from unittest import mock
    trained = with_trained_like_batch_norms(net)
    rng = np.random.default_rng(19)
    rgb = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    _write(tmp_path, "rgb.png", Image.fromarray(rgb))
    _write(tmp_path, "rgba.png", Image.fromarray(np.concatenate([rgb[::-1], rgb[..., :1]], axis=2), "RGBA"))
    _write(tmp_path, "palette.png", Image.fromarray(rgb[:, ::-1]).quantize(colors=16))
    ours = fid.FeatureExtractor(weights="random", device="cpu", batch_size=3, progress=False)
    ours._model = trained
    state = trained.state_dict()
    with mock.patch("pytorch_fid.inception.load_state_dict_from_url", lambda *args, **kwargs: state):
        theirs = fid_score.InceptionV3([3]).eval()
    files = sorted(tmp_path.glob("*.png"))
    with mock.patch.object(fid_score, "tqdm", lambda batches: batches):
        expected = fid_score.get_activations(files, theirs, batch_size=3, device="cpu", num_workers=0)
    assert_same_features(ours.features(tmp_path), expected)


def test_one_channel_images_are_repeated_to_rgb(extractor):
    grey = torch.rand(1, 1, 20, 20)
    np.testing.assert_allclose(extractor.features(grey), extractor.features(grey.repeat(1, 3, 1, 1)), rtol=0, atol=0)


def test_bad_image_sources_raise_clear_errors(extractor, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        extractor.statistics(tmp_path / "empty")
    _write(tmp_path / "broken", "good.png", Image.new("RGB", (8, 8)))
    (tmp_path / "broken" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=r"Cannot read image .*bad\.png"):
        extractor.statistics(tmp_path / "broken")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]; map \[-1, 1\] images"):
        extractor.statistics(torch.rand(2, 3, 8, 8) * 2 - 1)
    diverged = torch.rand(4, 3, 8, 8)
    diverged[3, 1, 2, 5] = float("nan")  # one pixel: the bounds are NaN, and NaN passes every comparison
    with pytest.raises(ValueError, match=r"^Image values include NaN .*; pass images with values in \[0, 1\]\.$"):
        extractor.statistics(diverged)
    with pytest.raises(ValueError, match=r"must be a tensor \(B, 1 or 3, H, W\)"):
        extractor.statistics(torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match="is not a folder of images"):
        extractor.statistics(tmp_path / "nowhere")
    # macOS's "._" copies are hidden files that pytorch-fid's selection reads: the error says how to skip them.
    _write(tmp_path / "mac", "a.png", Image.new("RGB", (8, 8)))
    _write(tmp_path / "mac", "b.png", Image.new("RGB", (8, 8)))
    (tmp_path / "mac" / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    with pytest.raises(ValueError, match=r"Cannot read image \S*\._a\.png \(.*\): it is a hidden file, .* pass "
                                         r"--files all, which skips hidden files\.$"):
        extractor.statistics(tmp_path / "mac")
    # An image over the pixel limit: the limit and how to raise it, as training says.
    _write(tmp_path / "big", "a.png", Image.new("RGB", (8, 8)))
    _write(tmp_path / "big", "b.png", Image.new("RGB", (40, 40)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SYNTHDIFF_MAX_IMAGE_PIXELS", "1000")
        with pytest.raises(ValueError, match=r"b\.png has 1,600 pixels, more than the limit of 1,000.* "
                                             r"SYNTHDIFF_MAX_IMAGE_PIXELS"):
            extractor.statistics(tmp_path / "big")
        patch.setenv("SYNTHDIFF_MAX_IMAGE_PIXELS", "abc")
        with pytest.raises(ValueError, match=r"SYNTHDIFF_MAX_IMAGE_PIXELS is 'abc'"):
            extractor.statistics(tmp_path / "big")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_unreadable_file_is_one_sentence_also_from_a_worker_process(extractor, tmp_path, num_workers):
    # Raised inside a DataLoader worker, the error would arrive as "Caught ValueError in DataLoader
    # worker process 0. Original Traceback ...".
    _write(tmp_path, "a.png", Image.new("RGB", (8, 8)))
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    extractor.num_workers = num_workers
    with pytest.raises(ValueError) as info:
        extractor.statistics(tmp_path)
    message = str(info.value)
    assert re.fullmatch(r"Cannot read image \S*b\.png \([^\n]*\); remove or replace the file\.", message), message


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="no signal masks here")
def test_folder_workers_start_with_stop_signals_blocked(tmp_path, monkeypatch):
    # Workers are born with the starting thread's signal mask: a job's SIGTERM or Ctrl-C, which reaches the whole
    # process group, must not kill one while it starts (see core.cli.stop_signals_held).
    import signal
    _write(tmp_path, "a.png", Image.new("RGB", (8, 8)))
    masks, start_workers = [], torch.utils.data.DataLoader.__iter__

    def iter_recording_mask(loader):
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return start_workers(loader)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", iter_recording_mask)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert len(list(FolderBatches(ImageFolder(tmp_path), batch_size=1, num_workers=1, size=8))) == 1
    assert masks and {signal.SIGINT, signal.SIGTERM} <= masks[0]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # answered again once they run


KEPT_TRACEBACK = """
import sys
from PIL import Image
from fid.folder import FolderBatches, ImageFolder
Image.new("RGB", (8, 8)).save(sys.argv[1] + "/a.png")
open(sys.argv[1] + "/b.png", "wb").write(b"not a png")
try:
    for batch in FolderBatches(ImageFolder(sys.argv[1]), batch_size=1, num_workers=1):
        pass
except ValueError as err:
    kept = err  # as an interactive session keeps sys.last_traceback
print("refused")
"""


def test_a_failed_folder_read_lets_python_exit_while_its_traceback_is_kept(tmp_path):
    # The loader's iterator was a name in the generator's frame, which the traceback kept: its worker (which ignores
    # SIGTERM) ran on, and Python's exit waited for it for ever.
    script = tmp_path / "script.py"
    script.write_text(KEPT_TRACEBACK)
    (tmp_path / "images").mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(fid.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "images")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "refused", done.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# Command line


def _numbers(text: str, label: str) -> list[float]:
    line = next(line for line in text.splitlines() if line.startswith(label))
    return [float(v) for v in re.findall(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?", line)]


def test_cli_end_to_end_with_folders_and_saved_statistics(tmp_path, capsys, extractor, monkeypatch):
    def shared_random_net(weights):
        assert weights == "random"  # the CLI's --weights reaches the network builder
        return extractor.model

    monkeypatch.setattr("fid.features.build_fid_inception", shared_random_net)
    rng = np.random.default_rng(13)
    for i in range(2):
        _write(tmp_path / "a", f"{i}.png", Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
        _write(tmp_path / "b", f"{i}.png", Image.fromarray(rng.integers(0, 128, (24, 24, 3), dtype=np.uint8)))
    a, b, stats = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "out" / "a.npz")
    options = ["--weights", "random", "--device", "cpu", "--num-workers", "0", "--batch-size", "2"]

    assert cli_main([a, b, *options, "--kid-subsets", "5", "--kid-subset-size", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    (fid_value,) = _numbers(out, "FID:")
    kid_mean, kid_std = _numbers(out, "KID:")
    f_a, f_b = extractor.features(a).astype(np.float64), extractor.features(b).astype(np.float64)
    # Closed form for two samples each: centred rows A, B (sigma = A^T A / (n - 1), n - 1 = 1) give
    # Tr((S_a S_b)^(1/2)) as the sum of the singular values of A B^T.
    c_a, c_b = f_a - f_a.mean(0), f_b - f_b.mean(0)
    expected_fid = (np.sum((f_a.mean(0) - f_b.mean(0)) ** 2) + np.sum(c_a ** 2) + np.sum(c_b ** 2)
                    - 2 * np.linalg.svd(c_a @ c_b.T, compute_uv=False).sum())
    expected_kid = kid(f_a, f_b, num_subsets=5, subset_size=2, seed=3)
    assert fid_value == pytest.approx(expected_fid, rel=1e-5) and fid_value > 0
    assert (kid_mean, kid_std) == pytest.approx(expected_kid, rel=1e-5, abs=1e-8)

    assert cli_main(["--save-stats", a, stats, *options]) == 0
    np.testing.assert_allclose(load_statistics(stats).mu, f_a.mean(0), rtol=1e-6)
    from fid.features import NETWORK, weights_fingerprint
    assert load_statistics(stats).provenance == Provenance(NETWORK, weights_fingerprint(extractor.model),
                                                           "pytorch-fid", 2)
    assert cli_main(["--save-stats", b, stats, *options]) == 1 and "already exists" in capsys.readouterr().err
    assert cli_main(["--save-stats", b, stats, *options, "--overwrite"]) == 0
    np.testing.assert_allclose(load_statistics(stats).mu, f_b.mean(0), rtol=1e-6)
    assert cli_main(["--save-stats", a, stats, *options, "--overwrite"]) == 0
    capsys.readouterr()
    assert cli_main([stats, b, *options]) == 0
    out = capsys.readouterr().out
    assert _numbers(out, "FID:")[0] == pytest.approx(fid_value, rel=1e-5) and "KID" not in out

    assert cli_main([stats, str(tmp_path / "wrong.npz"), *options]) == 1
    assert "wrong.npz" in capsys.readouterr().err

    # Folders smaller than KID's default subsets: FID all the same, KID skipped with a warning that says how.
    assert cli_main([a, b, *options]) == 0
    captured = capsys.readouterr()
    assert _numbers(captured.out, "FID:")[0] == pytest.approx(fid_value, rel=1e-5) and "KID" not in captured.out
    assert "warning: KID skipped" in captured.err and "--kid-subset-size 2" in captured.err


def test_cli_kid_skipped_for_small_folders_advises_subset_sizes_that_work(tmp_path, capsys, extractor, monkeypatch):
    monkeypatch.setattr("fid.features.build_fid_inception", lambda weights: extractor.model)
    rng = np.random.default_rng(22)
    for i in range(3):
        _write(tmp_path / "a", f"{i}.png", Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
        _write(tmp_path / "b", f"{i}.png", Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    paths = [str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "random", "--device", "cpu", "--num-workers", "0"]
    assert cli_main(paths) == 0
    err = capsys.readouterr().err
    # Not "3 or less": subsets of fewer than 2 images are refused.
    advice = re.search(r"warning: KID skipped: .* one has 3; pass a --kid-subset-size from (\d+) to (\d+) to get it\.",
                       err)
    assert advice, err
    for size in advice.groups():  # both ends of the advised range are accepted, by the options and by KID
        check_kid_options(build_parser().parse_args([*paths, "--kid-subset-size", size]))
        check_kid_sizes(3, 3, num_subsets=100, subset_size=int(size))


def test_cli_help_runs_as_a_module_and_shows_defaults():
    done = subprocess.run([sys.executable, "-m", "fid", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    for option in ("--batch-size", "--num-workers", "--device", "--weights", "--save-stats", "--kid-subsets",
                   "--kid-subset-size", "--seed", "--files", "--compile"):
        assert option in done.stdout
    assert "(default: 50)" in done.stdout and "default 1000" in done.stdout
    assert "(default: pytorch-fid)" in done.stdout


def test_help_shows_no_default_of_none():
    """An option without a default says in its help what happens without it (--kid-subset-size: "default 1000"),
    which argparse's "(default: None)" after it would contradict."""
    shown = " ".join(build_parser().format_help().split())
    assert "(default: None)" not in shown and "(default 1000;" in shown and "(default: 50)" in shown


def test_cli_compile_option_compiles_the_network_once(tmp_path, capsys, extractor, monkeypatch):
    monkeypatch.setattr("fid.features.build_fid_inception", lambda weights: extractor.model)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **options: compiled.append(options) or model)
    for i in range(2):
        _write(tmp_path / "a", f"{i}.png", Image.new("RGB", (8, 8), (100 * i, 0, 0)))
    a, options = str(tmp_path / "a"), ["--weights", "random", "--device", "cpu", "--num-workers", "0", "--no-kid"]
    assert cli_main([a, a, *options, "--compile"]) == 0
    assert compiled == [{"dynamic": True}]  # one network for both sides
    assert _numbers(capsys.readouterr().out, "FID:")[0] == pytest.approx(0.0, abs=1e-3)


def _one_sentence_error(capsys) -> str:
    err = capsys.readouterr().err
    # Without progress bars, and warnings (an old statistics file's), which are lines of their own.
    lines = [line for line in err.strip().splitlines() if not line.startswith(("FID features", "warning: "))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), err
    assert not re.search(r"\.\s+[A-Z]", lines[0]), err  # no second sentence
    return lines[0]


@pytest.mark.parametrize("case, match", [
    ("missing folder", "nowhere is not a folder of images"),
    ("unknown device", r"Unknown --device 'tpu9'; use auto, cpu, cuda or cuda:N"),  # (core.runtime.resolve_device's)
    ("absent device", r"--device cuda:99 (was asked for but PyTorch sees no CUDA GPU|does not exist)"),
    ("zero batch size", r"batch size \(--batch-size\) is 0 but must be at least 1"),
    ("negative workers", r"--num-workers must be from 0 \(decode in this process\) to \d+ \(4 per CPU core; each "
                         r"worker is a process\), got -1"),
    ("a process per image and more", r"--num-workers must be from 0 .* got 100000000"),
    ("truncated statistics", "Cannot read statistics file .*half.npz"),
    ("indefinite statistics", "first covariance is not positive semi-definite"),
    ("too few images for a KID subset size given", "KID needs at least 1000 images per side .* got 2 and 2"),
    ("images in subfolders only", "no images pytorch-fid would read .* pass --files all"),
    ("unreadable image in a worker", r"Cannot read image .*bad\.png"),
    ("unwritable statistics path", "Cannot write statistics to"),
    ("KID options with --no-kid", r"--kid-subsets, --seed set up KID, but --no-kid skips it; drop them"),
    ("KID options with statistics files", r"--kid-subset-size sets up KID, but a statistics file holds no features"),
])
def test_cli_errors_are_one_sentence_with_exit_status_1(case, match, tmp_path, capsys, extractor, monkeypatch):
    monkeypatch.setattr("fid.features.build_fid_inception", lambda weights: extractor.model)
    for i in range(2):
        _write(tmp_path / "a", f"{i}.png", Image.new("RGB", (8, 8), (i, 0, 0)))
        _write(tmp_path / "classes" / "cat", f"{i}.png", Image.new("RGB", (8, 8)))
    _write(tmp_path / "broken", "good.png", Image.new("RGB", (8, 8)))
    (tmp_path / "broken" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    np.savez(tmp_path / "good.npz", mu=np.zeros(3), sigma=np.eye(3))
    (tmp_path / "half.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:100])
    np.savez(tmp_path / "indefinite.npz", mu=np.zeros(3), sigma=np.diag([1.0, -1.0, 1.0]))
    (tmp_path / "file").write_text("")
    a, options = str(tmp_path / "a"), ["--weights", "random", "--device", "cpu", "--num-workers", "0", "--no-kid"]
    argv = {
        "missing folder": [str(tmp_path / "nowhere"), a, *options],
        "unknown device": [a, a, *options, "--device", "tpu9"],
        "absent device": [a, a, *options, "--device", "cuda:99"],
        "zero batch size": [a, a, *options, "--batch-size", "0"],
        "negative workers": [a, a, *options, "--num-workers", "-1"],
        "a process per image and more": [a, a, *options, "--num-workers", "100000000"],
        "truncated statistics": [str(tmp_path / "half.npz"), str(tmp_path / "good.npz")],
        "indefinite statistics": [str(tmp_path / "indefinite.npz"), str(tmp_path / "good.npz")],
        "too few images for a KID subset size given": [a, a, "--weights", "random", "--device", "cpu",
                                                       "--kid-subset-size", "1000"],
        "images in subfolders only": [str(tmp_path / "classes"), a, *options],
        "unreadable image in a worker": [str(tmp_path / "broken"), a, *options, "--num-workers", "1"],
        "unwritable statistics path": ["--save-stats", a, str(tmp_path / "file" / "a.npz"), *options],
        "KID options with --no-kid": [a, a, *options, "--kid-subsets", "5", "--seed", "2"],
        "KID options with statistics files": [str(tmp_path / "good.npz"), str(tmp_path / "good.npz"),
                                              "--kid-subset-size", "3"],
    }[case]
    assert cli_main(argv) == 1
    assert re.search(match, _one_sentence_error(capsys))


@pytest.mark.parametrize("case, match", [
    ("one image on the second side", r"^error: Image folder \S*one holds 1 image\(s\) but FID needs at least 2 per "
                                     r"folder to estimate a covariance; add images to it\.$"),
    ("one image on the first side", r"Image folder \S*one holds 1 image\(s\) but FID needs at least 2"),
    ("one image to save statistics of", r"Image folder \S*one holds 1 image\(s\) but FID needs at least 2"),
    ("KID subset size 0", r"--kid-subset-size is 0 but KID's unbiased estimate needs subsets of at least 2 images; "
                          r"pass 2 or more"),
    ("KID subset size 1, KID skipped", r"--kid-subset-size is 1 but .* at least 2 images"),
    ("no KID subsets", r"--kid-subsets is 0 but must be from 1 to 100,000"),
    ("two billion KID subsets", r"--kid-subsets is 2000000000 but must be from 1 to 100,000"),
    ("statistics name without .npz", r"Statistics files are \.npz files but \S*statsnoext does not end in \.npz; "
                                     r"name it \S*out/statsnoext\.npz\.$"),
    ("statistics name in upper case", r"\S*s\.NPZ does not end in \.npz; name it \S*out/s\.npz\.$"),
    ("statistics file that exists", r"\S*kept\.npz already exists; pass --overwrite to replace it"),
    ("--overwrite without --save-stats", r"--overwrite applies to --save-stats only"),
])
def test_cli_refuses_bad_input_before_building_the_network_or_writing(case, match, tmp_path, capsys, monkeypatch):
    def refuse(weights):
        raise AssertionError("the network was built before the input was checked")

    monkeypatch.setattr("fid.features.build_fid_inception", refuse)
    for i in range(3):
        _write(tmp_path / "a", f"{i}.png", Image.new("RGB", (8, 8), (i, 0, 0)))
    _write(tmp_path / "one", "0.png", Image.new("RGB", (8, 8)))
    (tmp_path / "kept.npz").write_bytes(b"statistics saved earlier")
    a, one, out = str(tmp_path / "a"), str(tmp_path / "one"), tmp_path / "out"
    options = ["--weights", "random", "--device", "cpu", "--num-workers", "0"]
    argv = {
        "one image on the second side": [a, one, *options],
        "one image on the first side": [one, a, *options, "--no-kid"],
        "one image to save statistics of": ["--save-stats", one, str(out / "one.npz"), *options],
        "KID subset size 0": [a, a, *options, "--kid-subset-size", "0"],
        "KID subset size 1, KID skipped": [a, a, *options, "--kid-subset-size", "1", "--no-kid"],
        "no KID subsets": [a, a, *options, "--kid-subsets", "0"],
        "two billion KID subsets": [a, a, *options, "--kid-subsets", "2000000000"],
        "statistics name without .npz": ["--save-stats", a, str(out / "statsnoext"), *options],
        "statistics name in upper case": ["--save-stats", a, str(out / "s.NPZ"), *options],
        "statistics file that exists": ["--save-stats", a, str(tmp_path / "kept.npz"), *options],
        "--overwrite without --save-stats": [a, a, *options, "--overwrite"],
    }[case]
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    assert cli_main(argv) == 1
    assert re.search(match, _one_sentence_error(capsys))
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before  # nothing written


def test_one_image_folder_and_statistics_name_without_npz_are_refused_in_python_too(tmp_path, monkeypatch):
    monkeypatch.setattr("fid.features.build_fid_inception", lambda weights: pytest.fail("network built"))
    for i in range(2):
        _write(tmp_path / "a", f"{i}.png", Image.new("RGB", (8, 8), (i, 0, 0)))
    _write(tmp_path / "one", "0.png", Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match=r"Image folder \S*one holds 1 image\(s\) but FID needs at least 2"):
        fid.fid_between(tmp_path / "a", tmp_path / "one", fid.FeatureOptions(weights="random", device="cpu",
                                                                          progress=False))
    with pytest.raises(ValueError, match=r"Image folder \S*one holds 1 image\(s\)"):
        fid.compute_statistics(tmp_path / "one", fid.FeatureOptions(weights="random", device="cpu", progress=False))
    stats = Statistics(mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(ValueError, match=r"does not end in \.npz; name it \S*stats\.npz"):
        save_statistics(stats, tmp_path / "stats")
    assert not list(tmp_path.glob("stats*"))  # numpy would have written stats.npz


def test_decoding_workers_leave_stop_signals_to_the_main_process(tmp_path):
    # A scheduler's SIGTERM (or a terminal's Ctrl-C) reaches the whole process group: a worker that died of it
    # would print a DataLoader traceback beside the main process's one line.
    import signal
    from core.cli import ignore_stop_signals
    for k in range(2):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(tmp_path / f"{k}.png")
    assert FolderBatches(ImageFolder(tmp_path), 2, 2).loader.worker_init_fn is ignore_stop_signals
    assert FolderBatches(ImageFolder(tmp_path), 2, 0).loader.worker_init_fn is None
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in previous)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------
# warnings while a progress bar is on screen


def plain_showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python's own way of showing a warning (as the Python API and --debug show them), written out: pytest
    records warnings instead of showing them."""
    (sys.stderr if file is None else file).write(warnings.formatwarning(message, category, filename, lineno, line))


def screen_lines(text: str) -> list[str]:
    """What a terminal shows of `text`: each line as the last carriage return left it."""
    return [line.split("\r")[-1] for line in text.split("\n")]


def test_a_warning_while_features_are_computed_goes_above_the_bar_on_a_line_of_its_own(capsys):
    """Python's own showwarning wrote a warning raised under the bar after the bar, on its line
    ("... 0/2 [00:00<?, ?batch/s]/path/file.py:12: UserWarning: ...")."""
    from fid.inception import FEATURE_DIM
    ex = fid.FeatureExtractor(weights="random", device="cpu", batch_size=2, progress=True)

    def warning_network(batch: torch.Tensor) -> torch.Tensor:
        warnings.warn(f"a batch of {len(batch)}", UserWarning)
        return torch.zeros(len(batch), FEATURE_DIM)
    ex._network = warning_network
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = plain_showwarning
        assert ex.features(torch.rand(3, 3, 8, 8)).shape == (3, FEATURE_DIM)
        assert warnings.showwarning is plain_showwarning
    err = capsys.readouterr().err
    assert "FID features tensor" in err                                      # the bar was on screen
    for size in (2, 1):
        (shown,) = [line for line in screen_lines(err) if f"UserWarning: a batch of {size}" in line]
        assert shown.startswith(f"{__file__}:")                              # the warning alone on its line


def test_warnings_above_a_bar_keep_the_shown_form_and_recorded_warnings_and_end_with_it(capsys):
    from tqdm import tqdm
    from core.cli import print_warning
    from core.progress import progress, warnings_above
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = print_warning  # the commands' one line ("warning: ..."), kept as it is
        for _ in progress(range(1), desc="bar", mininterval=0):
            warnings.warn("the commands' form")
        warnings.showwarning = plain_showwarning
        with pytest.raises(ZeroDivisionError):
            with tqdm(range(2), desc="bar") as bar, warnings_above(bar):
                assert warnings.showwarning is not plain_showwarning
                1 / 0
        assert warnings.showwarning is plain_showwarning                   # restored, though the body raised
        with pytest.raises(ZeroDivisionError):
            for _ in progress(range(2), desc="bar"):
                1 / 0
        assert warnings.showwarning is plain_showwarning
    assert "warning: the commands' form" in screen_lines(capsys.readouterr().err)
    with pytest.warns(UserWarning, match="recorded"):                      # pytest's record is kept
        for _ in progress(range(1), desc="bar"):
            warnings.warn("recorded")
    assert "recorded" not in capsys.readouterr().err


def warning_decode(path: Path) -> np.ndarray:
    """A decoder (for `ImageFolder.decoded_by`, picklable for workers) that warns about every file it reads."""
    warnings.warn(f"decoded {path.name}", UserWarning)
    return np.zeros((8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize("workers", [0, 2])
def test_warnings_of_decoding_workers_are_warned_in_the_main_process(tmp_path, workers):
    """A DataLoader worker showed its warnings itself, beside the main process's bar (Python's showwarning), or
    nowhere where the main process records them (pytest; `catch_warnings(record=True)`)."""
    for k in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{k}.png")
    folder = ImageFolder(tmp_path).decoded_by(warning_decode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(FolderBatches(folder, 2, workers))
    assert [len(batch) for batch in batches] == [2, 1]
    assert sorted(str(w.message) for w in caught) == ["decoded 0.png", "decoded 1.png", "decoded 2.png"]
    assert all(w.category is UserWarning for w in caught)


def once_decode(path: Path) -> np.ndarray:
    """A decoder that says something once per process (as `load_image` does of a file Pillow warns about)."""
    from core.errors import warn_once
    warn_once("odd files", f"{path.name} is odd (said for the first such file only)")
    return np.zeros((8, 8, 3), dtype=np.uint8)


def once_named_decode(path: Path) -> np.ndarray:
    """A decoder that says, once per process, something naming a value of the file (as `load_image` says of faint
    16-bit images), through `naming_the_file`, as `load_image` does."""
    from core.errors import warn_once
    from data.imageio import naming_the_file
    with naming_the_file(path):
        warn_once("faint", f"values up to {len(path.name) + int(path.stem)}, said for the first such image only.")
    return np.zeros((8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize("decode, said, workers", [
    (once_decode, " is odd (said for the first such file only)", 0),
    (once_decode, " is odd (said for the first such file only)", 2),
    # Its text differs from file to file, and each worker's first file gave another.
    (once_named_decode, ": values up to ", 2),
])
def test_a_warning_given_once_per_process_is_shown_once_however_many_workers_give_it(tmp_path, monkeypatch, decode,
                                                                                     said, workers):
    """Each of 2 workers said its first-only warning once, and the main process showed both."""
    import core.errors
    import fid.folder
    monkeypatch.setattr(core.errors, "_WARNED", set())   # (workers start as copies of this process)
    monkeypatch.setattr(fid.folder, "_RELAYED", set())
    for k in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{k}.png")
    folder = ImageFolder(tmp_path).decoded_by(decode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sum(len(batch) for batch in FolderBatches(folder, 1, workers)) == 4
    assert len(caught) == 1 and said in str(caught[0].message)
