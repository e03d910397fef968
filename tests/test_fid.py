"""Tests of fid/: Fréchet distance, KID, statistics, the FID Inception network, folder input and CLI.

Everything runs on CPU with a random-weight network (weights="random"); the published weights are
not needed. Expected values come from closed forms, numpy/scipy reference computations, or the
published weight file's layout written out below.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

import fid
from fid.__main__ import main as cli_main
from fid.folder import ImageFolder, collate_images
from fid.frechet import frechet_distance
from fid.kid import kid
from fid.stats import Statistics, StreamingStatistics, load_statistics, save_statistics
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
    mean, std = kid(x, y, num_subsets=1, subset_size=100)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == 0.0


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


def test_statistics_npz_round_trip_uses_pytorch_fid_keys(tmp_path):
    rng = np.random.default_rng(10)
    stats = Statistics(mu=rng.normal(size=5), sigma=random_spd(rng, 5))
    save_statistics(stats, tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as raw:
        assert sorted(raw.files) == ["mu", "sigma"]
    loaded = load_statistics(tmp_path / "s.npz")
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)


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
    assert cli_main([str(tmp_path / "a"), str(tmp_path / "a"), "--device", "cpu", "--num-workers", "0"]) == 1
    assert WEIGHTS_URL in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Image sources: folders, tensors, batches


def _write(folder: Path, name: str, image: Image.Image, **kwargs) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name, **kwargs)


def test_folder_reads_formats_and_converts_modes_to_rgb(tmp_path):
    rng = np.random.default_rng(11)
    rgb = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(colors=8)
    rgba = np.concatenate([rgb, np.full((6, 5, 1), 255, np.uint8)], axis=2)
    _write(tmp_path, "a_rgb.png", Image.fromarray(rgb))
    _write(tmp_path, "b_rgb.bmp", Image.fromarray(rgb))
    _write(tmp_path, "c_grey.png", Image.fromarray(grey, "L"))
    _write(tmp_path, "d_rgba.png", Image.fromarray(rgba, "RGBA"))
    _write(tmp_path, "e_palette.png", palette)
    _write(tmp_path / "sub", "f_rgb.jpg", Image.fromarray(rgb))
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = ImageFolder(tmp_path)
    assert [p.name for p in dataset.files] == ["a_rgb.png", "b_rgb.bmp", "c_grey.png", "d_rgba.png",
                                               "e_palette.png", "f_rgb.jpg"]
    as_tensor = lambda a: torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255  # noqa: E731
    for index in range(6):
        assert dataset[index].shape == (3, 6, 5) and dataset[index].dtype == torch.float32
    torch.testing.assert_close(dataset[0], as_tensor(rgb), rtol=0, atol=0)
    torch.testing.assert_close(dataset[1], as_tensor(rgb), rtol=0, atol=0)
    torch.testing.assert_close(dataset[2], as_tensor(np.repeat(grey[..., None], 3, axis=2)), rtol=0, atol=0)
    torch.testing.assert_close(dataset[3], as_tensor(rgb), rtol=0, atol=0)
    torch.testing.assert_close(dataset[4], as_tensor(palette.convert("RGB")), rtol=0, atol=0)
    with Image.open(tmp_path / "sub" / "f_rgb.jpg") as jpeg:  # lossy: compare with the decoded file
        torch.testing.assert_close(dataset[5], as_tensor(jpeg.convert("RGB")), rtol=0, atol=0)


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
    with pytest.raises(ValueError, match=r"must be a tensor \(B, 1 or 3, H, W\)"):
        extractor.statistics(torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match="is not a folder of images"):
        extractor.statistics(tmp_path / "nowhere")


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

    assert cli_main([a, b, *options, "--kid-subsets", "5", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    (fid_value,) = _numbers(out, "FID:")
    kid_mean, kid_std = _numbers(out, "KID:")
    f_a, f_b = extractor.features(a), extractor.features(b)
    s_a, s_b = StreamingStatistics(), StreamingStatistics()
    s_a.update(f_a)
    s_b.update(f_b)
    expected_fid = frechet_distance(s_a.result().mu, s_a.result().sigma, s_b.result().mu, s_b.result().sigma)
    expected_kid = kid(f_a, f_b, num_subsets=5, seed=3)
    assert fid_value == pytest.approx(expected_fid, rel=1e-5) and fid_value > 0
    assert (kid_mean, kid_std) == pytest.approx(expected_kid, rel=1e-5, abs=1e-8)

    assert cli_main(["--save-stats", a, stats, *options]) == 0
    np.testing.assert_allclose(load_statistics(stats).mu, s_a.result().mu, rtol=1e-6)
    capsys.readouterr()
    assert cli_main([stats, b, *options]) == 0
    out = capsys.readouterr().out
    assert _numbers(out, "FID:")[0] == pytest.approx(fid_value, rel=1e-5) and "KID" not in out

    assert cli_main([stats, str(tmp_path / "wrong.npz"), *options]) == 1
    assert "wrong.npz" in capsys.readouterr().err


def test_cli_help_runs_as_a_module_and_shows_defaults():
    done = subprocess.run([sys.executable, "-m", "fid", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    for option in ("--batch-size", "--num-workers", "--device", "--weights", "--save-stats", "--kid-subsets",
                   "--kid-subset-size", "--seed"):
        assert option in done.stdout
    assert "(default: 50)" in done.stdout and "(default: 1000)" in done.stdout
