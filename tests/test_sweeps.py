"""Sweeps and interpolation in sample.py, checked against plain sampling: a sweep's cell is the image
sample.py draws for that row's seed at that column's condition, and an interpolation's ends are the
images of its two seeds (or conditions)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from ddpm.conditioning import slerp
from helpers import RES


@pytest.fixture
def params_run(params_ckpt) -> Path:
    """A pixel model conditioned on two parameters, on a folder with a params.csv (see conftest.py)."""
    return params_ckpt.parent


@pytest.fixture
def class_run(class_ckpt) -> Path:
    """A pixel model conditioned on three classes (see conftest.py)."""
    return class_ckpt.parent


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


def cell(grid: np.ndarray, row: int, column: int) -> np.ndarray:
    """Image (row, column) of a grid saved with 2-pixel padding."""
    y, x = 2 + row * (RES + 2), 2 + column * (RES + 2)
    return grid[y:y + RES, x:x + RES]


def draw(ckpt: Path, out: Path, *extra: str) -> Path:
    return sample.main(["--ckpt", str(ckpt), "--steps", "4", "--out", str(out), "--device", "cpu", *extra])


def test_a_sweep_cell_is_that_rows_image_at_that_columns_value(params_run, tmp_path):
    ckpt = params_run / "checkpoint.pt"
    out = draw(ckpt, tmp_path / "sweep", "--sweep", "wind=0:1:3", "--num", "2", "--param", "heat=3")
    grid = pixels(out / "sweep.png")
    assert grid.shape[:2] == (2 * (RES + 2) + 2, 3 * (RES + 2) + 2)          # rows: images, columns: values
    with Image.open(out / "sweep.gif") as gif:  # a frame per value, showing every row side by side
        assert gif.size == (2 * (RES + 2) + 2, RES + 4)
    rows = list(csv.DictReader((out / "sweep.csv").read_text().splitlines()))
    assert [float(r["wind"]) for r in rows] == [0.0, 0.5, 1.0] * 2 and {r["heat"] for r in rows} == {"3.0"}
    for row in range(2):
        for column, wind in enumerate(("0", "0.5", "1")):
            alone = draw(ckpt, tmp_path / f"alone-{row}-{column}", "--param", f"wind={wind}", "--param", "heat=3",
                         "--first-index", str(row), "--num", "1")
            assert np.abs(cell(grid, row, column) - pixels(alone / "images" / f"{row:06d}.png")).max() <= 1
    # The noise is held fixed along a row: the columns differ only through the condition.
    assert not np.array_equal(cell(grid, 0, 0), cell(grid, 1, 0))


def test_a_class_sweep_steps_through_the_classes(class_run, tmp_path):
    out = draw(class_run / "checkpoint.pt", tmp_path / "sweep", "--sweep", "class", "--num", "1")
    rows = list(csv.DictReader((out / "sweep.csv").read_text().splitlines()))
    assert [r["class"] for r in rows] == ["blue", "green", "red"]
    out = draw(class_run / "checkpoint.pt", tmp_path / "some", "--sweep", "class=red,blue", "--num", "1")
    assert [r["class"] for r in csv.DictReader((out / "sweep.csv").read_text().splitlines())] == ["red", "blue"]


def test_interpolation_strips_end_at_the_images_of_their_two_seeds_and_conditions(params_run, tmp_path):
    ckpt = params_run / "checkpoint.pt"
    fixed = ("--param", "wind=0.2", "--param", "heat=4")
    out = draw(ckpt, tmp_path / "interp", "--interpolate", "--num", "1", "--frames", "4", *fixed,
               "--interpolate-to", "wind=1")
    images = draw(ckpt, tmp_path / "plain", "--num", "2", *fixed)  # deterministic DDIM: noise alone decides
    noise_strip, cond_strip = pixels(out / "interpolate-noise.png"), pixels(out / "interpolate-condition.png")
    assert noise_strip.shape[1] == 4 * (RES + 2) + 2
    assert np.abs(cell(noise_strip, 0, 0) - pixels(images / "images" / "000000.png")).max() <= 1
    assert np.abs(cell(noise_strip, 0, 3) - pixels(images / "images" / "000001.png")).max() <= 1
    assert np.abs(cell(cond_strip, 0, 0) - pixels(images / "images" / "000000.png")).max() <= 1
    far = draw(ckpt, tmp_path / "far", "--num", "1", "--param", "wind=1", "--param", "heat=4")
    assert np.abs(cell(cond_strip, 0, 3) - pixels(far / "images" / "000000.png")).max() <= 1
    with Image.open(out / "interpolate-noise.gif") as gif:
        assert gif.n_frames > 1


def test_class_interpolation_runs_through_the_embeddings_and_bad_requests_are_refused(class_run, tmp_path):
    ckpt = class_run / "checkpoint.pt"
    out = draw(ckpt, tmp_path / "ok", "--interpolate", "--num", "1", "--frames", "3", "--class", "blue",
               "--interpolate-to", "red")
    assert (out / "interpolate-condition.png").is_file()
    for extra, message in ((("--sweep", "wind=0:1:3"), "use --sweep class"),
                           (("--sweep", "class=purple"), "Unknown class 'purple'"),
                           (("--interpolate-to", "red"), "has no effect without --interpolate"),
                           (("--frames", "1", "--interpolate"), "--frames must be at least 2")):
        with pytest.raises(ValueError, match=message):
            draw(ckpt, tmp_path / "never", *extra)
    assert not (tmp_path / "never").exists()


def test_bad_parameter_sweeps_are_refused_before_any_image(params_run, tmp_path):
    ckpt = params_run / "checkpoint.pt"
    for spec, message in (("wind", "NAME=START:STOP:N"), ("wind=0:1", "NAME=START:STOP:N"),
                          ("wind=a:1:3", "must be numbers"), ("wind=0:1:1", "N from 2 to 256"),
                          ("wind=0:1:100000", "N from 2 to 256"),
                          ("rain=0:1:3", "NAME=START:STOP:N")):
        with pytest.raises(ValueError, match=message):
            draw(ckpt, tmp_path / "never", "--sweep", spec)
    with pytest.raises(ValueError, match="twice"):
        draw(ckpt, tmp_path / "never", "--param", "wind=0", "--param", "wind=1")
    with pytest.raises(ValueError, match="finite"):
        draw(ckpt, tmp_path / "never", "--param", "wind=nan")
    assert not (tmp_path / "never").exists()


def test_slerp_keeps_the_norm_of_gaussian_noise_and_hits_both_ends():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    b = b * (a.norm() / b.norm())                                   # equal norms, as two draws nearly have
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)
    assert torch.allclose(path.flatten(1).norm(dim=1), a.norm().expand(5), rtol=1e-5)  # on the sphere
    linear_mid = (a + b) / 2
    assert linear_mid.norm() < 0.8 * a.norm()                       # what a straight line would do instead
    cosines = [torch.dot(p.flatten(), a.flatten()) / (p.norm() * a.norm()) for p in path]
    angles = torch.arccos(torch.stack(cosines).clamp(-1, 1))
    assert torch.allclose(angles.diff(), angles[-1].expand(4) / 4, atol=1e-4)  # constant angular speed


def test_a_parameter_outside_the_training_range_is_drawn_with_a_warning():
    from data import DatasetInfo
    from ddpm.conditioning import parse_param_values
    info = DatasetInfo("p", 16, 3, (), ("wind", "heat"), ((-1.0, 1.0), (2.0, 5.0)), 10)
    with pytest.warns(UserWarning, match=r"'heat=6'.*2 to 5.*extrapolation"):
        assert parse_param_values(["wind=1", "heat=6"], info) == {"wind": 1.0, "heat": 6.0}
    with pytest.warns(UserWarning, match="'wind=-1.5'"):
        parse_param_values(["wind=-1.5"], info, option="--interpolate-to")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_param_values(["wind=-1", "heat=2"], info) == {"wind": -1.0, "heat": 2.0}  # the ends are inside
