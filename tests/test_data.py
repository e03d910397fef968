"""Tests for data/: the plume simulator and its cache, image folders, and CIFAR-10 (offline, faked)."""

from __future__ import annotations

import json
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import data.plumes as plumes
from data import DatasetInfo, load_dataset
from data.fluid import advect, divergence, project

RES = 16


# ---------------------------------------------------------------- fluid operators

def test_projection_removes_divergence():
    g = torch.Generator().manual_seed(0)
    velocity = torch.nn.functional.interpolate(torch.randn(3, 2, 8, 10, generator=g), size=(40, 48), mode="bicubic")
    projected = project(velocity)
    before, after = divergence(velocity).norm(), divergence(projected).norm()
    assert after < 1e-5 * before
    # The mean flow (the wind) is untouched, and projecting twice changes nothing.
    assert torch.allclose(projected.mean(dim=(2, 3)), velocity.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(project(projected), projected, atol=1e-5)


def test_advection_keeps_constant_field_and_translates_blob():
    g = torch.Generator().manual_seed(1)
    swirl = 3 * torch.randn(2, 2, 24, 24, generator=g)
    assert torch.allclose(advect(torch.full((2, 3, 24, 24), 0.7), swirl, 0.5), torch.tensor(0.7))

    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((xs - 16) ** 2 + (ys - 14) ** 2) / 8).view(1, 1, 32, 32)
    velocity = torch.tensor([2.5, -1.5]).view(1, 2, 1, 1).expand(1, 2, 32, 32)
    moved = advect(blob, velocity, dt=1.0)[0, 0]
    assert moved.sum() == pytest.approx(blob.sum().item(), rel=1e-5)
    assert (moved * xs).sum() / moved.sum() == pytest.approx(16 + 2.5, abs=1e-3)
    assert (moved * ys).sum() / moved.sum() == pytest.approx(14 - 1.5, abs=1e-3)


# ---------------------------------------------------------------- plumes

@pytest.fixture(scope="module")
def plume_batch():
    seeds = plumes.sample_seeds(0, 4, train=True)
    return seeds, plumes.generate(seeds, RES)


def test_plumes_deterministic_per_sample(plume_batch):
    seeds, (images, params) = plume_batch
    again, again_params = plumes.generate(seeds, RES)
    assert torch.equal(images, again) and torch.equal(params, again_params)
    alone, alone_params = plumes.generate([seeds[2]], RES)
    assert torch.equal(alone[0], images[2]) and torch.equal(alone_params[0], params[2])
    # Different seeds give different plumes and parameters.
    for k in range(1, 4):
        assert (images[k].int() - images[0].int()).abs().float().mean() > 1
        assert not torch.equal(params[k], params[0])
    assert plumes.sample_seeds(0, 4, train=False)[0] not in seeds


def test_plumes_look_like_smoke_on_black(plume_batch):
    _, (images, params) = plume_batch
    assert images.shape == (4, 3, RES, RES) and images.dtype == torch.uint8
    assert (images[:, :, 0, :].float().mean() < images.float().mean())  # black sky above most plumes
    assert images.float().amax(dim=(1, 2, 3)).min() > 100             # every sample has visible smoke
    lo, hi = plumes.WIND_RANGE, plumes.TEMPERATURE_RANGE
    assert ((params[:, 0] >= lo[0]) & (params[:, 0] <= lo[1]) & (params[:, 1] >= hi[0]) & (params[:, 1] <= hi[1])).all()


def test_wind_bends_the_plume():
    candidates = plumes.sample_seeds(5, 200, train=True)
    winds = plumes.draw_inputs(candidates)["wind"]
    left = [s for s, w in zip(candidates, winds) if w < -0.7][:3]
    right = [s for s, w in zip(candidates, winds) if w > 0.7][:3]
    density, _, _ = plumes.simulate(left + right, grid=32)
    source_x = plumes.draw_inputs(left + right)["source_x"]
    xs = (torch.arange(32.0) + 0.5) / 32
    centroid = (density * xs).sum(dim=(1, 2)) / density.sum(dim=(1, 2))
    shift = centroid - source_x
    assert (shift[:3] < -0.05).all() and (shift[3:] > 0.05).all(), shift


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_plumes_dataset_shapes(tmp_path, resolution):
    ds = load_dataset("plumes", resolution, cache_dir=tmp_path, num_samples=2)
    image, label, params, index = ds[1]
    assert int(index) == 1
    assert image.shape == (3, resolution, resolution) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and image.max() > 0
    assert label.dtype == torch.int64 and label.shape == () and params.shape == (2,) and params.dtype == torch.float32
    assert ds.info.resolution == resolution and ds.info.channels == 3 and len(ds) == 2


def test_plumes_cache_round_trip_and_info(tmp_path, monkeypatch):
    ds = load_dataset("plumes", RES, cache_dir=tmp_path, num_samples=3, seed=7)
    path = plumes.cache_path(tmp_path, RES, 3, 7, train=True)
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))

    def fail(*args, **kwargs):
        raise AssertionError("regenerated instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(plumes, "generate", fail)
        cached = load_dataset("plumes", RES, cache_dir=tmp_path, num_samples=3, seed=7)
    assert torch.equal(cached.images, ds.images) and torch.equal(cached.params, ds.params)
    assert torch.equal(cached.seeds, ds.seeds) and cached.info == ds.info

    path.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = load_dataset("plumes", RES, cache_dir=tmp_path, num_samples=3, seed=7)
    assert torch.equal(rebuilt.images, ds.images)

    info = ds.info
    assert info.name == "plumes" and info.param_names == ("wind", "temperature") and info.class_names == ()
    assert info.num_samples == 3
    assert info.param_ranges == tuple((float(a), float(b)) for a, b in zip(ds.params.min(0).values, ds.params.max(0).values))
    normalized = info.normalize_params(ds.params)
    assert normalized.min() == -1 and normalized.max() == 1
    assert torch.allclose(info.denormalize_params(normalized), ds.params, atol=1e-5)
    assert DatasetInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info

    grey = load_dataset("plumes", RES, cache_dir=tmp_path, num_samples=3, seed=7, channels=1)
    assert grey[0][0].shape == (1, RES, RES) and grey.info.channels == 1


def test_constant_parameter_normalizes_to_zero():
    info = DatasetInfo("x", 8, 1, (), ("a", "b"), ((2.0, 2.0), (0.0, 4.0)), 1)
    assert torch.equal(info.normalize_params(torch.tensor([[2.0, 3.0]])), torch.tensor([[0.0, 0.5]]))
    assert torch.equal(info.denormalize_params(torch.tensor([[0.0, 0.5]])), torch.tensor([[2.0, 3.0]]))


# ---------------------------------------------------------------- folders

def _save(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_folder_class_subfolders_give_labels(tmp_path):
    _save(tmp_path / "dogs" / "b.png", Image.new("RGB", (20, 20), (200, 10, 10)))
    _save(tmp_path / "cats" / "a.jpg", Image.new("RGB", (20, 20), (10, 200, 10)))
    _save(tmp_path / "dogs" / "nested" / "c.png", Image.new("RGB", (20, 20), (10, 10, 200)))
    ds = load_dataset(f"folder:{tmp_path}", RES)
    assert ds.info.class_names == ("cats", "dogs") and ds.info.name == f"folder:{tmp_path.resolve()}"
    assert [int(ds[i][1]) for i in range(3)] == [0, 1, 1]  # cats/a, dogs/b, dogs/nested/c
    assert ds[0][0][1].mean() > 0.5 and ds[1][0][0].mean() > 0.5 and ds[2][0][2].mean() > 0.5
    assert ds[0][2].shape == (0,) and ds.info.param_names == ()


def test_folder_mixed_modes_and_sizes(tmp_path):
    _save(tmp_path / "l.png", Image.new("L", (30, 20), 128))
    _save(tmp_path / "rgb.jpg", Image.new("RGB", (40, 17), (255, 0, 0)))
    _save(tmp_path / "rgba.png", Image.new("RGBA", (25, 25), (0, 255, 0, 255)))
    _save(tmp_path / "p.png", Image.new("RGB", (33, 50), (0, 0, 255)).convert("P"))
    # White centre square between black side bands: the centre crop must keep only the white.
    wide = np.zeros((16, 48), np.uint8)
    wide[:, 16:32] = 255
    _save(tmp_path / "wide.png", Image.fromarray(wide))
    ds = load_dataset(f"folder:{tmp_path}", RES)
    assert ds.info.channels == 3 and ds.info.class_names == () and len(ds) == 5
    for i in range(5):
        image, label, _, index = ds[i]
        assert int(index) == i
        assert image.shape == (3, RES, RES) and -1 <= image.min() and image.max() <= 1 and label == 0
    assert ds.images[4].min() >= 250
    assert load_dataset(f"folder:{tmp_path}", RES, channels=1)[0][0].shape == (1, RES, RES)


def test_folder_of_grey_images_is_one_channel(tmp_path):
    _save(tmp_path / "a.png", Image.new("L", (24, 24), 10))
    _save(tmp_path / "b.png", Image.new("RGB", (24, 30), (99, 99, 99)))
    ds = load_dataset(f"folder:{tmp_path}", RES)
    assert ds.info.channels == 1 and ds[1][0].shape == (1, RES, RES)


def test_folder_params_csv(tmp_path):
    for name in ("a.png", "b.png"):
        _save(tmp_path / name, Image.new("RGB", (20, 20)))
    (tmp_path / "params.csv").write_text("filename,speed,angle\nb.png,2.5,-1\na.png,0.5,3\n")
    ds = load_dataset(f"folder:{tmp_path}", RES)
    assert ds.info.param_names == ("speed", "angle")
    assert torch.equal(ds.params, torch.tensor([[0.5, 3.0], [2.5, -1.0]]))
    assert ds.info.param_ranges == ((0.5, 2.5), (-1.0, 3.0))

    (tmp_path / "params.csv").write_text("filename,speed\na.png,1\nb.png,fast\n")
    with pytest.raises(ValueError, match=r"line 3 \(b.png\).*non-numeric"):
        load_dataset(f"folder:{tmp_path}", RES)
    (tmp_path / "params.csv").write_text("filename,speed\na.png,1\n")
    with pytest.raises(ValueError, match="no row for image b.png"):
        load_dataset(f"folder:{tmp_path}", RES)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="contains no images"):
        load_dataset(f"folder:{tmp_path}", RES)
    _save(tmp_path / "good.png", Image.new("RGB", (20, 20)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset(f"folder:{tmp_path}", RES)
    with pytest.raises(ValueError, match="folder:PATH"):
        load_dataset("imagenet", RES)


# ---------------------------------------------------------------- cifar10

def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", refuse)


def test_cifar10_offline_error_names_files_and_place(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(RuntimeError) as err:
        load_dataset("cifar10", 32, cache_dir=tmp_path)
    message = str(err.value)
    assert "cifar-10-python.tar.gz" in message and "data_batch_1" in message and "test_batch" in message
    assert str(tmp_path.resolve()) in message


def test_cifar10_reads_extracted_batches(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [int(v) for v in rng.integers(0, 10, 2)]}
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": classes}))

    train = load_dataset("cifar10", 32, cache_dir=tmp_path)
    assert len(train) == 10 and train.info.class_names == tuple(classes) and train.info.channels == 3
    first = batches["data_batch_1"]
    assert torch.equal(train.images[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))
    assert int(train[0][1]) == first["labels"][0] and train[0][2].shape == (0,)

    test = load_dataset("cifar10", RES, cache_dir=tmp_path, train=False)
    assert len(test) == 2 and test[1][0].shape == (3, RES, RES)
    assert test.labels.tolist() == batches["test_batch"]["labels"]
