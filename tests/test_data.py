"""Tests for data/: the plume simulator and its cache, image files in every pixel mode, image folders
and their params.csv, and CIFAR-10 (offline, faked) with hostile batch files."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import unicodedata
import urllib.error
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import PIL
from PIL import Image

import data.plumes as plumes
from core import cli
from core.errors import UserError
from data import DatasetInfo, load_dataset
from data.fluid import advect, divergence, project
from data.imageio import MAX_PIXELS_ENV, list_images, load_image, max_image_pixels
from helpers import damaged_npz

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

    good = path.read_bytes()
    with np.load(path) as z:
        with_nan = {**z, "params": np.where(np.arange(2) == 0, np.nan, z["params"]).astype(z["params"].dtype)}
    with open(tmp_path / "nan.npz", "wb") as f:
        np.savez(f, **with_nan)
    for damaged in (b"not a zip file", damaged_npz(good, "compression"), damaged_npz(good, "encrypted"),
                    (tmp_path / "nan.npz").read_bytes()):
        path.write_bytes(damaged)
        with pytest.warns(UserWarning, match="unreadable"):
            rebuilt = load_dataset("plumes", RES, cache_dir=tmp_path, num_samples=3, seed=7)
        assert torch.equal(rebuilt.images, ds.images) and torch.equal(rebuilt.params, ds.params)
        assert path.read_bytes() == good  # regenerated, the same

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


def test_an_interrupted_simulation_goes_on_from_the_batches_it_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(plumes, "BATCH", 2)
    whole = load_dataset("plumes", RES, cache_dir=tmp_path / "whole", num_samples=5, seed=3)
    simulate, calls = plumes.generate, []

    def stopped_in_the_third_batch(seeds, resolution):
        calls.append(list(seeds))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return simulate(seeds, resolution)

    monkeypatch.setattr(plumes, "generate", stopped_in_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("plumes", RES, cache_dir=tmp_path / "cut", num_samples=5, seed=3)
    assert not plumes.cache_path(tmp_path / "cut", RES, 5, 3, train=True).exists()
    calls.clear()
    resumed = load_dataset("plumes", RES, cache_dir=tmp_path / "cut", num_samples=5, seed=3)
    assert calls == [whole.seeds[4:].tolist()]      # only the batch that never finished is simulated
    assert torch.equal(resumed.images, whole.images) and torch.equal(resumed.params, whole.params)
    assert torch.equal(resumed.seeds, whole.seeds)
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == [plumes.cache_path(".", RES, 5, 3, True).name]


def test_constant_parameter_normalizes_to_zero():
    info = DatasetInfo("x", 8, 1, (), ("a", "b"), ((2.0, 2.0), (0.0, 4.0)), 1)
    assert torch.equal(info.normalize_params(torch.tensor([[2.0, 3.0]])), torch.tensor([[0.0, 0.5]]))
    assert torch.equal(info.denormalize_params(torch.tensor([[0.0, 0.5]])), torch.tensor([[2.0, 3.0]]))


# ---------------------------------------------------------------- image files: every pixel mode

RED, GREEN, DARK, BLACK = (255, 0, 0), (0, 255, 0), (10, 20, 30), (0, 0, 0)
PALETTE = [*RED, *GREEN, *DARK]


def _row(mode, pixels, palette=None):
    """A one-row image in `mode` with the given pixel values, left to right."""
    image = Image.new(mode, (len(pixels), 1))
    if palette:
        image.putpalette(palette)
    for x, value in enumerate(pixels):
        image.putpixel((x, 0), value)
    return image


def _saves(image, **options):
    return lambda path: image.save(path, **options)


def _associated_alpha_tiff(image):
    """Pillow writes LA/RGBA TIFFs with unassociated alpha; flip ExtraSamples to 1 (premultiplied)."""
    def write(path):
        buffer = io.BytesIO()
        image.save(buffer, "TIFF")
        data = bytearray(buffer.getvalue())
        entry = data.find(struct.pack("<HH", 338, 3))  # little-endian IFD entry: tag ExtraSamples, type SHORT
        assert entry > 0
        struct.pack_into("<H", data, entry + 8, 1)
        path.write_bytes(bytes(data))
    return write


def _rgb16_png(pixels, key=None):
    """Pillow reads 48-bit PNGs but cannot write them, so build one chunk by chunk; `key`: a transparent
    colour (tRNS), 16 bits a sample as the pixels."""
    def write(path):
        def chunk(kind, body):
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        raw = b"\x00" + np.array(pixels, ">u2").tobytes()
        header = struct.pack(">IIBBBBB", len(pixels), 1, 16, 2, 0, 0, 0)
        transparent = chunk(b"tRNS", np.array(key, ">u2").tobytes()) if key else b""
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + transparent
                         + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return write


def _min_is_white_tiff(image):
    """A TIFF whose 0 is white (PhotometricInterpretation 0), as scanners write."""
    return lambda path: image.save(path, tiffinfo={262: 0})


def _two_frames(**options):
    """A red frame, then a green one."""
    return lambda path: _row("RGB", [RED] * 2).save(path, save_all=True, append_images=[_row("RGB", [GREEN] * 2)],
                                                    **options)


def _ycbcr(rgb):
    """JPEG's full-range YCbCr of an RGB triple (ITU-R 601 coefficients)."""
    r, g, b = rgb
    return (round(0.299 * r + 0.587 * g + 0.114 * b), round(128 - 0.168736 * r - 0.331264 * g + 0.5 * b),
            round(128 + 0.5 * r - 0.418688 * g - 0.081312 * b))


def _case(name, suffix, write, opens_as, expected, tol=0):
    """`expected`: per pixel an RGB triple, or one grey value for grey images."""
    return pytest.param(suffix, write, opens_as, expected, tol, id=name)


GREY_16_ROW = np.array([[0, 255, 32768, 65535]], np.uint16)
GREY_16_EXPECTED = [0, 1, 128, 255]  # v / 257 rounded: 65535 is white and 32768 mid-grey, not clipped at 255

FILE_CASES = [
    *[_case(f"1-{s}", s, _saves(_row("1", [0, 1])), m, [0, 255]) for s, m in
      [("png", "1"), ("bmp", "1"), ("tiff", "1"), ("gif", "L")]],
    _case("1-transparent-png", "png", _saves(_row("1", [0, 1]), transparency=1), "1", [0, 0]),
    *[_case(f"L-{s}", s, _saves(_row("L", [0, 100, 255])), m, [0, 100, 255]) for s, m in
      [("png", "L"), ("tiff", "L"), ("bmp", "L"), ("pgm", "L"), ("gif", "P")]],
    _case("L-jpeg", "jpg", _saves(_row("L", [100] * 8)), "L", [100] * 8, tol=1),
    _case("L-transparent-png", "png", _saves(_row("L", [7, 100]), transparency=7), "L", [0, 100]),
    *[_case(f"P-{s}", s, _saves(_row("P", [0, 1, 2], PALETTE)), "P", [RED, GREEN, DARK])
      for s in ("png", "gif", "bmp", "tiff")],
    *[_case(f"P-transparent-{s}", s, _saves(_row("P", [0, 1, 2], PALETTE), transparency=1), "P", [RED, BLACK, DARK])
      for s in ("png", "gif")],
    _case("PA-tiff", "tiff", _saves(_row("PA", [(0, 255), (0, 128), (1, 0)], PALETTE)), "PA", [RED, (128, 0, 0), BLACK]),
    *[_case(f"LA-{s}", s, _saves(_row("LA", [(200, 255), (200, 128), (200, 0)])), "LA", [200, 100, 0])
      for s in ("png", "tiff")],
    _case("La-tiff", "tiff", _associated_alpha_tiff(_row("LA", [(100, 128), (200, 255)])), "La", [100, 200]),
    *[_case(f"RGBA-{s}", s, _saves(_row("RGBA", [(200, 100, 50, 255), (200, 100, 50, 128), (200, 100, 50, 0)]), **o),
            "RGBA", [(200, 100, 50), (100, 50, 25), BLACK])
      for s, o in [("png", {}), ("tiff", {}), ("webp", {"lossless": True})]],
    _case("RGBA-premultiplied-tiff", "tiff", _associated_alpha_tiff(_row("RGBA", [(100, 50, 25, 128)])), "RGBA",
          [(100, 50, 25)], tol=1),
    *[_case(f"RGB-{s}", s, _saves(_row("RGB", [RED, GREEN, DARK]), **o), m, [RED, GREEN, DARK]) for s, m, o in
      [("png", "RGB", {}), ("tiff", "RGB", {}), ("bmp", "RGB", {}), ("ppm", "RGB", {}), ("gif", "P", {}),
       ("webp", "RGB", {"lossless": True})]],
    _case("RGB-jpeg", "jpg", _saves(_row("RGB", [(10, 120, 200)] * 8), quality=95), "RGB", [(10, 120, 200)] * 8, tol=3),
    _case("RGB-transparent-png", "png", _saves(_row("RGB", [(1, 2, 3), (200, 100, 50)]), transparency=(1, 2, 3)), "RGB",
          [BLACK, (200, 100, 50)]),
    _case("RGB-16bit-png", "png", _rgb16_png([(65535, 32768, 0), (257, 0, 65535)]), "RGB", [(255, 128, 0), (1, 0, 255)]),
    # Pillow reads 16-bit RGB as its high bytes but keeps the key at 16 bits: the key is matched at 16 bits, so a
    # pixel one low bit from it stays opaque, and one whose high bytes equal a small key is not transparent.
    _case("RGB-16bit-transparent-png", "png",
          _rgb16_png([(0x8000, 0x4000, 0x2000), (0x8000, 0x4000, 0x2001)], key=(0x8000, 0x4000, 0x2000)), "RGB",
          [BLACK, (128, 64, 32)]),
    _case("RGB-16bit-small-key-png", "png",
          _rgb16_png([(1, 2, 3), (0x0100, 0x0200, 0x0300), (65535, 0, 0)], key=(1, 2, 3)), "RGB",
          [BLACK, (1, 2, 3), RED]),
    # CMYK without colour management: each channel is (255 - C)(255 - K) / 255.
    _case("CMYK-tiff", "tiff", _saves(_row("CMYK", [(0, 255, 255, 0), (100, 0, 0, 100), (0, 0, 0, 255)])), "CMYK",
          [RED, (94, 155, 155), BLACK]),
    _case("CMYK-jpeg", "jpg", _saves(_row("CMYK", [(0, 255, 255, 0)] * 8), quality=95), "CMYK", [RED] * 8, tol=3),
    _case("YCbCr-tiff", "tiff", _saves(_row("YCbCr", [_ycbcr(c) for c in (RED, GREEN, DARK)])), "YCbCr",
          [RED, GREEN, DARK], tol=2),
    # CIELAB white, sRGB mid-grey (L* 53.6) and sRGB red (53.2, 80.1, 67.2), in Pillow's 8-bit encoding
    # (L* x 2.55, a* + 128, b* + 128); 8-bit quantisation moves red by up to 11.
    _case("LAB-tiff", "tiff", _saves(_row("LAB", [(255, 128, 128), (137, 128, 128), (136, 208, 195)])), "LAB",
          [(255, 255, 255), (128, 128, 128), RED], tol=12),
    *[_case(f"{m}-{s}", s, _saves(Image.fromarray(GREY_16_ROW.astype(dtype))), m, GREY_16_EXPECTED) for s, m, dtype in
      [("png", "I;16", "<u2"), ("tiff", "I;16", "<u2"), ("tiff", "I;16B", ">u2"), ("pgm", "I", "<u2")]],
    # A TIFF whose 0 is white: Pillow stores 8-bit samples inverted and inverts them back when reading, but stores
    # and reads 16-bit ones as they are, so that file holds 0 for white (TIFF 6.0) and load_image inverts it.
    _case("L-min-is-white-tiff", "tiff", _min_is_white_tiff(_row("L", [0, 100, 255])), "L", [0, 100, 255]),
    _case("I;16-min-is-white-tiff", "tiff", _min_is_white_tiff(Image.fromarray(GREY_16_ROW)), "I;16", [255, 254, 127, 0]),
    # A dark 16-bit image stays dark: the scale is the mode's, not guessed from the image's largest value.
    _case("I;16-dark-png", "png", _saves(Image.fromarray(np.array([[0, 128, 255]], np.uint16))), "I;16", [0, 0, 1]),
    _case("I;16-transparent-png", "png",
          _saves(Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)), transparency=32768), "I;16", [0, 0, 255]),
    _case("I-tiff", "tiff", _saves(Image.fromarray(np.array([[0, 257, 32768, 65535]], np.int32))), "I", GREY_16_EXPECTED),
    _case("F-0..1-tiff", "tiff", _saves(_row("F", [0.0, 0.5, 1.0, 0.25])), "F", [0, 128, 255, 64]),
    _case("F-0..255-tiff", "tiff", _saves(_row("F", [0.0, 100.4, 255.0, 300.0])), "F", [0, 100, 255, 255]),
    *[_case(f"first-frame-{s}", s, _two_frames(**o), m, [RED, RED]) for s, m, o in
      [("gif", "P", {}), ("tiff", "RGB", {}), ("png", "RGB", {}), ("webp", "RGB", {"lossless": True})]],
]

# Modes no Pillow writer produces, fed to load_image as if a file had decoded to them.
MEMORY_CASES = [
    pytest.param(lambda: _row("HSV", [(0, 255, 255), (85, 255, 128)]), [RED, (0, 128, 0)], 0, id="HSV"),
    pytest.param(lambda: _row("RGBa", [(100, 50, 25, 128)]), [(100, 50, 25)], 0, id="RGBa"),
    pytest.param(lambda: _row("La", [(100, 128)]), [100], 0, id="La"),
    pytest.param(lambda: _row("RGBX", [(10, 20, 30, 0)]), [DARK], 0, id="RGBX"),
    *[pytest.param(lambda m=m: _row(m, [0, 255, 32768, 65535]), GREY_16_EXPECTED, 0, id=m) for m in ("I;16L", "I;16N")],
]


def _luma(rgb):
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _check_pixels(path, expected, tol):
    grey_source = not isinstance(expected[0], tuple)
    want_rgb = np.array([(v, v, v) if grey_source else v for v in expected])
    want_grey = np.array(expected if grey_source else [_luma(v) for v in expected])
    rgb = np.asarray(load_image(path, "RGB"), dtype=float)
    grey = np.asarray(load_image(path, "L"), dtype=float)
    assert rgb.shape == (1, len(expected), 3) and grey.shape == (1, len(expected))
    assert np.abs(rgb[0] - want_rgb).max() <= tol, rgb[0].tolist()
    # Colour -> L is luma, which Pillow rounds in fixed point: allow one level more.
    assert np.abs(grey[0] - want_grey).max() <= tol + (0 if grey_source else 1), grey[0].tolist()


@pytest.mark.filterwarnings("ignore:.*comes out nearly black:UserWarning")  # asserted by test_a_16_bit_image_*
@pytest.mark.parametrize("suffix, write, opens_as, expected, tol", FILE_CASES)
def test_load_image_converts_every_mode_pillow_writes(tmp_path, suffix, write, opens_as, expected, tol):
    path = tmp_path / f"image.{suffix}"
    write(path)
    try:
        with Image.open(path) as raw:
            mode = raw.mode
    except OSError:
        mode = "unreadable"
    if mode != opens_as:  # the case must exercise the mode it is named after (Pillow 12 cannot, for two of them)
        pytest.skip(f"this Pillow ({PIL.__version__}) writes a .{suffix} that it opens as {mode}, not {opens_as}")
    _check_pixels(path, expected, tol)


@pytest.mark.parametrize("make, expected, tol", MEMORY_CASES)
def test_load_image_converts_modes_only_memory_holds(tmp_path, monkeypatch, make, expected, tol):
    monkeypatch.setattr(Image, "open", lambda path: make())
    _check_pixels(tmp_path / "image.png", expected, tol)


def test_every_pillow_mode_is_covered():
    file_modes = {case.values[2] for case in FILE_CASES}
    memory_modes = {case.values[0]().mode for case in MEMORY_CASES}
    assert set(Image.MODES) <= file_modes | memory_modes, set(Image.MODES) - file_modes - memory_modes


@pytest.mark.parametrize("name, image, match", [
    ("nan.tiff", _row("F", [0.5, float("nan")]), "NaN or infinite"),
    ("inf.tiff", _row("F", [0.5, float("inf")]), "NaN or infinite"),
    ("negative.tiff", _row("F", [0.5, -0.2]), "negative pixel values"),
    ("int32.tiff", Image.fromarray(np.array([[0, 70000]], np.int32)), "from 0 to 70000, outside the 16-bit range"),
    ("signed.tiff", Image.fromarray(np.array([[-5, 100]], np.int32)), "from -5 to 100"),
])
def test_load_image_refuses_pixels_without_a_meaning(tmp_path, name, image, match):
    image.save(tmp_path / name)
    with pytest.raises(ValueError, match=match) as err:
        load_image(tmp_path / name)
    assert str(tmp_path / name) in str(err.value)


def test_load_image_refuses_broken_missing_and_bomb_files(tmp_path, monkeypatch):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[:2000])
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG not really")
    for name in ("garbage.png", "truncated.png"):
        with pytest.raises(ValueError, match=f"Cannot read image {tmp_path / name}"):
            load_image(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        load_image(tmp_path / "missing.png")



def test_load_image_refuses_what_pillow_and_fid_refuse_unless_the_environment_allows_more(tmp_path, monkeypatch):
    """The pixel limit is where Pillow (and so pytorch-fid's reader) refuses, 2x PIL.Image.MAX_IMAGE_PIXELS;
    between 1x and 2x Pillow only warns, and a 90-megapixel photo (over 1x by default) is read, silently here.
    SYNTHDIFF_MAX_IMAGE_PIXELS sets another limit; a tiny Pillow limit stands in for a huge image. FID's
    reader decodes as training does: the same limit, message and silence."""
    from fid.folder import read_rgb
    bomb = tmp_path / "bomb.png"
    _row("L", [0] * 10).save(bomb)
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4)  # refused above 8
    for read in (load_image, read_rgb):
        with pytest.raises(ValueError, match=rf"{bomb} has 10 pixels, more than the limit of 8, .* set the "
                                             rf"environment variable {MAX_PIXELS_ENV} to a larger number of pixels\."):
            read(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5)  # refused above 10: 10 pixels are read
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning is not passed on
        assert load_image(bomb).size == (10, 1) and read_rgb(bomb).size == (10, 1)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4)
    monkeypatch.setenv(MAX_PIXELS_ENV, "10")  # above Pillow's limit: Pillow's is raised to match
    assert load_image(bomb).size == (10, 1) and max_image_pixels() == 10 and 2 * Image.MAX_IMAGE_PIXELS >= 10
    assert read_rgb(bomb).size == (10, 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setenv(MAX_PIXELS_ENV, "9")  # below Pillow's limit: this one decides
    for read in (load_image, read_rgb):
        with pytest.raises(ValueError, match=rf"{bomb} has 10 pixels, more than the limit of 9, "):
            read(bomb)
    for bad in ("lots", "0", "-5", "1e9"):
        monkeypatch.setenv(MAX_PIXELS_ENV, bad)
        for read in (load_image, read_rgb):
            with pytest.raises(ValueError, match=rf"The environment variable {MAX_PIXELS_ENV} is '{bad}'; set it to "
                                                 rf"a whole number of pixels"):
                read(bomb)


def test_the_pixel_limit_from_the_environment_reaches_pillow_at_import():
    """Readers that open files with plain Pillow (torchvision's) get the limit too: importing data.imageio sets it."""
    code = "import data.imageio; from PIL import Image; print(Image.MAX_IMAGE_PIXELS)"
    env = {**os.environ, MAX_PIXELS_ENV: "500000000", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 250_000_000


# EXIF orientation -> how the stored pixels turn to stand upright, written out with numpy (rot90 turns
# anticlockwise): 3 half a turn, 6 a quarter clockwise, 8 a quarter anticlockwise, 2/4 mirrored.
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: np.rot90(a, 2), 4: lambda a: a[::-1],
           5: lambda a: np.rot90(a[:, ::-1], 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a[:, ::-1], -1),
           8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
def test_load_image_turns_photos_upright_by_their_exif_orientation(tmp_path, orientation, mode):
    stored = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3) * 5  # 3 wide, 5 tall: no symmetry
    image = Image.fromarray(stored, "RGB")
    if mode != "RGB":
        image = image.convert("L")
        if mode == "I;16":
            image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)  # 16-bit, same grey levels
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(tmp_path / "photo.png", exif=exif)
    read_as = "RGB" if mode == "RGB" else "L"
    want = UPRIGHT[orientation](np.asarray(load_image(tmp_path / "photo.png", read_as, upright=False)))
    got = np.asarray(load_image(tmp_path / "photo.png", read_as))
    assert got.shape[:2] == ((5, 3) if orientation < 5 else (3, 5))
    np.testing.assert_array_equal(got, want)


def test_a_faint_float_image_is_read_on_its_rule_with_a_warning_that_names_it(tmp_path):
    # A 0..1 render whose highlights overshoot 1 reads on the 0..255 scale: nearly black, so it is said.
    _row("F", [0.0, 0.2, 1.2]).save(tmp_path / "render.tiff")
    with pytest.warns(UserWarning, match=r"^\S*render\.tiff: a float image with values up to 1\.2, so it is read "
                                         r"on the 0\.\.255 scale and comes out nearly black") as said:
        assert np.asarray(load_image(tmp_path / "render.tiff", "L")).tolist() == [[0, 0, 1]]
    assert [str(w.message).count("(said for the first such image only)") for w in said] == [1]
    _row("F", [0.0, 0.2, 2.0]).save(tmp_path / "render2.tiff")
    with warnings.catch_warnings():  # once for a folder of renders, not once per image
        warnings.simplefilter("error")
        load_image(tmp_path / "render2.tiff")
    _row("F", [0.0, 100.0, 255.0]).save(tmp_path / "bright.tiff")  # plainly 0..255: no warning
    _row("F", [0.0, 0.5, 1.0]).save(tmp_path / "unit.tiff")        # plainly 0..1: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(tmp_path / "bright.tiff"), load_image(tmp_path / "unit.tiff")


def photo_with_damaged_exif(path: Path) -> None:
    """A JPEG that Pillow decodes with a "Corrupt EXIF data" warning."""
    pixels = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    payload = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12"  # an IFD cut off in its first entry
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    path.write_bytes(jpeg[:2] + app1 + jpeg[2:])


def test_pillows_warnings_name_the_first_file_that_gave_each_once(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        photo_with_damaged_exif(tmp_path / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = [load_image(tmp_path / name) for name in ("a.jpg", "b.jpg", "a.jpg")]
    assert [image.size for image in images] == [(8, 6)] * 3  # still decoded
    said = [str(w.message) for w in caught]
    # Pillow's own words once for the whole process, naming the first file: not once per file (a folder of
    # 50,000 such photos), and never without a name.
    assert len(said) == 1 and said[0].startswith(f"{tmp_path / 'a.jpg'}: Corrupt EXIF data"), said
    assert said[0].endswith("(said for the first such image only)")


def test_a_folder_dataset_and_fid_read_an_exif_turned_photo_their_own_ways(tmp_path):
    """Training data stands upright; FID reads the stored pixels, as pytorch-fid does."""
    from fid.folder import read_rgb
    stored = np.zeros((8, 8, 3), dtype=np.uint8)
    stored[0, :] = 255  # a white top row, which the tag turns into the right column
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "a").mkdir()
    Image.fromarray(stored).save(tmp_path / "a" / "photo.jpg", exif=exif, quality=100)
    images = load_dataset(f"folder:{tmp_path}", resolution=8, channels=3).images.float()  # stored 0..255
    assert images[0, :, :, -1].mean() > 200 and images[0, :, 0, :].mean() < 100
    fid_pixels = np.asarray(read_rgb(tmp_path / "a" / "photo.jpg"), dtype=float)
    assert fid_pixels[0].mean() > 200 and fid_pixels[:, -1].mean() < 100


def test_list_images_skips_hidden_follows_links_and_refuses_non_files(tmp_path):
    for name in ("a.png", "sub/b.png", ".hidden.png", "._a.png", ".ipynb_checkpoints/a-checkpoint.png"):
        _save(tmp_path / "data" / name, _row("L", [1]))
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    _save(tmp_path / "elsewhere" / "c.png", _row("L", [1]))
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "linked")
    os.symlink(tmp_path / "data", tmp_path / "data" / "sub" / "loop")  # a link back up must not recurse forever
    root = tmp_path / "data"
    assert [p.relative_to(root).as_posix() for p in list_images(root)] == ["a.png", "linked/c.png", "sub/b.png"]
    assert [p.name for p in list_images(root, recursive=False)] == ["a.png"]

    os.symlink(tmp_path / "gone.png", root / "sub" / "dangling.png")
    with pytest.raises(ValueError, match=f"{root / 'sub' / 'dangling.png'} is not a regular file"):
        list_images(root)
    os.remove(root / "sub" / "dangling.png")
    os.mkfifo(root / "pipe.png")  # opening it would block forever
    with pytest.raises(ValueError, match="pipe.png is not a regular file"):
        list_images(root)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        list_images(root / "a.png")


def test_list_images_reads_jpeg_and_netpbm_under_every_usual_name_and_warns_of_formats_it_leaves_out(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    for name, fmt in (("a.jfif", "JPEG"), ("b.jpe", "JPEG"), ("c.pnm", "PPM"), ("d.tga", "TGA"), ("e.apng", "PNG")):
        Image.fromarray(pixels).save(tmp_path / name, format=fmt)
    Image.fromarray(pixels).save(tmp_path / "f.ico", format="ICO")      # a format Pillow reads, not as data here
    (tmp_path / "g.h5").write_bytes(b"\x89HDF\r\n\x1a\n")                 # data beside the images: no picture
    with pytest.warns(UserWarning, match=r"Leaving out 1 file\(s\) of .* in formats not read as images here "
                                         r"\(such as f\.ico\)"):
        listed = list_images(tmp_path)
    assert [p.name for p in listed] == ["a.jfif", "b.jpe", "c.pnm", "d.tga", "e.apng"]
    assert np.array_equal(np.asarray(load_image(tmp_path / "c.pnm")), pixels)


def test_a_16_bit_image_holding_12_bit_values_is_read_on_its_rule_with_a_warning(tmp_path):
    _row("I;16", [0, 2048, 4095]).save(tmp_path / "camera.png")
    with pytest.warns(UserWarning, match=r"camera\.png: a 16-bit image with values up to 4095, so it is read on the "
                                         r"0\.\.65535 scale and comes out nearly black"):
        assert np.asarray(load_image(tmp_path / "camera.png", "L")).tolist() == [[0, 8, 16]]
    _row("I;16", [0, 1024, 1023]).save(tmp_path / "camera2.png")
    with warnings.catch_warnings():  # a folder of such frames is warned about once, not once per frame
        warnings.simplefilter("error")
        assert np.asarray(load_image(tmp_path / "camera2.png", "L")).tolist() == [[0, 4, 4]]
    _row("I;16", [0, 2048, 65535]).save(tmp_path / "full.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(tmp_path / "full.png")


def test_list_images_refuses_a_folder_it_cannot_read(tmp_path, monkeypatch):
    _save(tmp_path / "open" / "a.png", _row("L", [1]))
    (tmp_path / "locked").mkdir()
    scandir = os.scandir

    def denied(path):  # the suite may run as root, for whom chmod 000 locks nothing
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(ValueError, match=f"Cannot list the folder {tmp_path / 'locked'} \\(Permission denied\\)"):
        list_images(tmp_path)


def test_list_images_warns_of_photos_in_formats_pillow_cannot_open(tmp_path):
    _save(tmp_path / "IMG_1.JPG", _row("RGB", [RED]))
    for name in ("IMG_2.HEIC", "IMG_3.dng", "scan.jxl", "render.exr"):  # iPhone, camera raw, JPEG XL, HDR
        (tmp_path / name).write_bytes(b"\0\0\0\x18ftypheic")
    with pytest.warns(UserWarning, match=r"Leaving out 4 file\(s\) of .* in formats not read as images here \(such "
                                         r"as IMG_2\.HEIC\); convert them to PNG to use them\."):
        assert [p.name for p in list_images(tmp_path)] == ["IMG_1.JPG"]


def test_list_images_refuses_names_that_are_not_utf8_before_anything_is_written(tmp_path):
    """A name from an old zip (Latin-1 "café") would load, but no dataset exported from it could record it."""
    from data import export
    for root, name in ((tmp_path / "image", b"cls/caf\xe9.png"), (tmp_path / "class", b"caf\xe9/a.png")):
        _save(root / "ok" / "b.png", _row("RGB", [RED]))
        path = os.path.join(os.fsencode(root), name)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                _row("RGB", [RED]).save(f, format="PNG")
        except OSError:
            pytest.skip("this file system stores only UTF-8 names")
        message = (rf"^The image {re.escape(repr(name))} in {re.escape(str(root))} has a name that is not UTF-8 .*; "
                   r"rename it to UTF-8 \(the convmv tool converts a folder's names from Latin-1, for one\)\.$")
        with pytest.raises(UserError, match=message):
            list_images(root)
        with pytest.raises(UserError, match=message):
            export.main([f"folder:{root}", str(tmp_path / "out"), "--resolution", str(RES)])
        assert not (tmp_path / "out").exists()


def test_list_images_sorts_accented_names_the_same_however_they_are_normalised(tmp_path):
    """macOS stores "é" as "e" + a combining accent (NFD), which sorts before "f" where "é" (NFC) sorts after "z": a
    folder copied from there lists, subsets (--num-samples) and fingerprints as its copy made elsewhere."""
    names = ("\u00e9clair.png", "fig.png", "zo\u00eb.png")
    for form in ("NFC", "NFD"):
        for k, name in enumerate(names):
            _save(tmp_path / form / "p\u00e2te" / unicodedata.normalize(form, name), _row("RGB", [(60 * k, 0, 0)]))
    if unicodedata.normalize("NFD", names[0]) not in os.listdir(tmp_path / "NFD" / "p\u00e2te"):
        pytest.skip("this file system normalises file names itself, so no NFD name can be stored")
    for form in ("NFC", "NFD"):
        listed = [unicodedata.normalize("NFC", p.name) for p in list_images(tmp_path / form)]
        assert listed == ["fig.png", "zo\u00eb.png", "\u00e9clair.png"], form
    nfc, nfd = (load_dataset(f"folder:{tmp_path / form}", RES, num_samples=2) for form in ("NFC", "NFD"))
    assert torch.equal(nfc.images, nfd.images) and nfc.fingerprint() == nfd.fingerprint()


def test_a_link_to_a_class_folder_does_not_take_its_class_from_the_real_folder(tmp_path):
    for name, colour in (("apes/a.png", DARK), ("cat/c.png", GREEN), ("zebra/z.png", RED)):
        _save(tmp_path / name, _row("RGB", [colour]))
    os.symlink(tmp_path / "zebra", tmp_path / "animals")  # a shortcut, sorting before the folder it leads to
    os.symlink(tmp_path / "cat", tmp_path / "apes" / "cats")  # one inside a class folder that sorts first
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["apes/a.png", "cat/c.png",
                                                                                   "zebra/z.png"]
    with pytest.warns(UserWarning, match=r"1 subfolder\(s\) of \S+ hold no images of their own \(such as animals: "
                                         r"empty, or a link to a folder read once already\)"):
        ds = load_dataset(f"folder:{tmp_path}", RES)
    assert ds.info.class_names == ("apes", "cat", "zebra") and ds.labels.tolist() == [0, 1, 2]


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


def test_subfolders_that_give_no_class_are_warned_about(tmp_path):
    for name in ("cats/a.png", "dogs/b.png"):
        _save(tmp_path / name, Image.new("RGB", (8, 8), (200, 10, 10)))
    (tmp_path / "birds").mkdir()
    os.symlink(tmp_path / "cats", tmp_path / "kittens")  # read once, as cats
    with pytest.warns(UserWarning, match=r"2 subfolder\(s\) of .* hold no images of their own \(such as birds"):
        ds = load_dataset(f"folder:{tmp_path}", RES)
    assert ds.info.class_names == ("cats", "dogs") and len(ds) == 2


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


@pytest.mark.parametrize("content, match", [
    pytest.param(b"path,speed\na.png,1\nb.png,2\n./a.png,3\n",
                 r"lines 2 and 4 both give parameters for a\.png", id="duplicate-row"),
    pytest.param(b"path,speed,angle,speed\na.png,1,2,3\nb.png,1,2,3\n",
                 r"line 1: the header names parameter 'speed' in columns 2 and 4", id="duplicate-column"),
    pytest.param(b"path,speed,,angle\na.png,1,2,3\nb.png,1,2,3\n",
                 r"line 1: column 3 of the header has no name", id="empty-column-name"),
    # An exported copy's params.csv would write the parameter over its image paths.
    pytest.param(b"file,path\na.png,1\nb.png,2\n",
                 r"line 1: column 2 of the header names a parameter 'path', the name of the image column in the "
                 r"params\.csv of datasets written from this folder; rename that parameter\.$", id="parameter-named-path"),
    pytest.param(b"path,speed\na.png,1\n,2\nb.png,3\n", r"line 3 has an empty image path", id="empty-path"),
    pytest.param(b"a.png,1\nb.png,2\n", r"starts with a row for an image \(a\.png\) where its header belongs",
                 id="no-header"),
    pytest.param(b"path,speed\na.png,1e39\nb.png,2\n",
                 r"line 2 \(a\.png\) has a parameter beyond float32's range", id="beyond-float32"),
    # Line numbers count lines, not rows: a quoted path may span two.
    pytest.param(b'path,speed\n"a\n.png",1\nb.png,fast\n', r"line 4 \(b\.png\) has a non-numeric", id="line-numbers"),
    pytest.param(b'path,speed\na.png,1\nb.png,"' + b"x" * 200_000 + b'"\n', r"line 3 is not valid CSV", id="csv-error"),
    pytest.param("path,speed\na.png,1\n\u00e9t\u00e9.png,2\n".encode("latin-1"),
                 r"is not UTF-8 text \(byte 0xe9 on line 3\)", id="latin-1"),
    pytest.param("path,speed\na.png,1\nb.png,2\n".encode("utf-16"),
                 r"is not UTF-8 text \(byte 0xff on line 1\)", id="utf-16"),
    pytest.param("path,speed\na.png,1\nb.png,2\n".encode("utf-16-le"),
                 r"has NUL bytes \(from line 1\), as UTF-16 text does", id="utf-16-without-bom"),
])
def test_folder_params_csv_refuses_defects_naming_file_and_line(tmp_path, content, match):
    for name in ("a.png", "b.png"):
        _save(tmp_path / name, Image.new("RGB", (20, 20)))
    (tmp_path / "params.csv").write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        load_dataset(f"folder:{tmp_path}", RES)
    assert str(tmp_path.resolve() / "params.csv") in str(err.value)


def test_folder_params_csv_accepts_bom_blank_rows_and_other_spellings_and_warns_on_unused_rows(tmp_path):
    _save(tmp_path / "cats" / "a.png", Image.new("RGB", (20, 20)))
    _save(tmp_path / "dogs" / "b.png", Image.new("RGB", (20, 20)))
    # Excel's "CSV UTF-8": a byte-order mark, CRLF line ends, a Windows path, a trailing row of blank cells.
    (tmp_path / "params.csv").write_bytes("\ufeffpath,speed\r\ncats\\a.png,1\r\n,\r\n./dogs/b.png,2\r\n"
                                          "gone.png,5\r\n\r\n".encode("utf-8"))
    with pytest.warns(UserWarning, match=r"1 row\(s\) for images that are not in .* \(lines 5\); they are ignored"):
        ds = load_dataset(f"folder:{tmp_path}", RES)
    assert ds.info.param_names == ("speed",) and ds.params.tolist() == [[1.0], [2.0]]
    assert ds.info.param_ranges == ((1.0, 2.0),)  # the row for the missing image counts nowhere


def test_folder_params_csv_matches_a_name_that_starts_with_a_space_by_its_exact_path(tmp_path):
    _save(tmp_path / " lead" / "a.png", Image.new("RGB", (20, 20)))
    _save(tmp_path / "x" / " b.png", Image.new("RGB", (20, 20)))
    _save(tmp_path / "x" / "c.png", Image.new("RGB", (20, 20)))
    # Quoted cells keep their spaces; an unquoted padded cell (" x/c.png ") is still trimmed.
    (tmp_path / "params.csv").write_text('path,v\n" lead/a.png",1\n"x/ b.png",2\n x/c.png ,3\n')
    ds = load_dataset(f"folder:{tmp_path}", RES)
    assert ds.info.class_names == (" lead", "x") and sorted(ds.params.flatten().tolist()) == [1.0, 2.0, 3.0]
    assert ds.params[ds.labels == 0].tolist() == [[1.0]]


def test_folder_ignores_hidden_files_and_folders(tmp_path):
    _save(tmp_path / "cats" / "a.png", Image.new("RGB", (20, 20)))
    _save(tmp_path / "dogs" / "b.png", Image.new("RGB", (20, 20)))
    _save(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png", Image.new("RGB", (20, 20)))
    (tmp_path / "cats" / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    ds = load_dataset(f"folder:{tmp_path}", RES)
    assert ds.info.class_names == ("cats", "dogs") and len(ds) == 2


def test_folder_class_names_and_params_paths_are_equal_in_every_unicode_normalisation(tmp_path):
    """macOS stores "é" decomposed (NFD: "e" + a combining accent): a folder from there gives the same classes
    as one written elsewhere, and params.csv rows typed precomposed (NFC) find its files."""
    nfd, nfc = unicodedata.normalize("NFD", "chat \u00e9"), unicodedata.normalize("NFC", "chat \u00e9")
    assert nfd != nfc
    _save(tmp_path / "train" / nfd / "a.png", Image.new("RGB", (20, 20), (200, 0, 0)))
    _save(tmp_path / "train" / "dog" / "b.png", Image.new("RGB", (20, 20)))
    if nfd not in os.listdir(tmp_path / "train"):
        pytest.skip("this file system normalises file names itself, so no NFD name can be stored")
    _save(tmp_path / "test" / nfc / "c.png", Image.new("RGB", (20, 20)))
    _save(tmp_path / "test" / "dog" / "d.png", Image.new("RGB", (20, 20)))
    (tmp_path / "train" / "params.csv").write_text(f"path,speed\n{nfc}/a.png,1\ndog/b.png,2\n", encoding="utf-8")
    train = load_dataset(f"folder:{tmp_path / 'train'}", RES)
    test = load_dataset(f"folder:{tmp_path / 'test'}", RES)
    assert train.info.class_names == test.info.class_names == (nfc, "dog")
    assert train.labels.tolist() == test.labels.tolist() == [0, 1]
    assert train.params.tolist() == [[1.0], [2.0]]
    assert train.files[0] == f"{nfd}/a.png" and train.images[0, 0].float().mean() > 150  # opened by its real name

    # Two folders spelt both ways are one class; two images spelt both ways cannot be told apart by params.csv.
    _save(tmp_path / "test" / nfd / "c.png", Image.new("RGB", (20, 20)))
    both = load_dataset(f"folder:{tmp_path / 'test'}", RES)
    assert both.info.class_names == (nfc, "dog") and both.labels.tolist() == [0, 0, 1]
    (tmp_path / "test" / "params.csv").write_text(f"path,speed\n{nfc}/c.png,1\ndog/d.png,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"two images named chat \u00e9/c\.png that differ only in how their accented"):
        load_dataset(f"folder:{tmp_path / 'test'}", RES)


@pytest.mark.parametrize("splits", [("train", "val"), ("Training", "Validation"), ("TRAIN", "valid", "test")])
def test_folder_warns_when_its_class_folders_are_splits_holding_classes(tmp_path, splits):
    for split in splits:
        for cls in ("cat", "dog"):
            _save(tmp_path / split / cls / "a.png", Image.new("RGB", (20, 20)))
    root = tmp_path.resolve()
    named = ", ".join(sorted(splits))
    with pytest.warns(UserWarning, match=rf"class folders named {named} that hold subfolders") as got:
        ds = load_dataset(f"folder:{tmp_path}", RES)
    assert ds.info.class_names == tuple(sorted(splits))  # still loaded as asked
    message = str(got[0].message)
    assert f"--dataset at folder:{root / splits[0]} and --test-dataset at folder:{root / splits[1]}." in message


def test_folder_does_not_warn_for_classes_that_are_not_splits(tmp_path):
    _save(tmp_path / "cats" / "indoor" / "a.png", Image.new("RGB", (20, 20)))
    _save(tmp_path / "trains" / "steam" / "b.png", Image.new("RGB", (20, 20)))
    _save(tmp_path / "test" / "c.png", Image.new("RGB", (20, 20)))  # a class named test, with no subfolders
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_dataset(f"folder:{tmp_path}", RES).info.class_names == ("cats", "test", "trains")


def _size_warnings(spec, resolution):
    """The UserWarnings loading `spec` at `resolution` gives, as text, and the dataset."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_dataset(spec, resolution)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)], dataset


def test_images_smaller_than_the_resolution_are_enlarged_with_one_warning_for_the_folder(tmp_path):
    mixed, large = tmp_path / "mixed", tmp_path / "large"
    _save(mixed / "cats" / "tiny.png", Image.new("RGB", (8, 8), (200, 0, 0)))
    _save(mixed / "cats" / "small.png", Image.new("RGB", (12, 10)))
    _save(mixed / "dogs" / "big.png", Image.new("RGB", (40, 30)))
    said, dataset = _size_warnings(f"folder:{mixed}", RES)
    assert len(dataset) == 3 and dataset.images[dataset.files.index("cats/tiny.png"), 0].min() > 150  # not refused
    assert said == [f"2 of the 3 images of {mixed.resolve()} have a short side under the {RES} px they are resized to "
                    f"(the smallest: cats/tiny.png, 8x8), so they are enlarged and come out blurred; pass a smaller "
                    f"--resolution (at 8 px none is), or remove them."]
    assert _size_warnings(f"folder:{mixed}", 8)[0] == []  # none is smaller than 8 px: nothing to say
    for name, size in (("a.png", (RES, RES)), ("b.png", (300, 200)), ("c.png", (RES, 4 * RES))):
        _save(large / name, Image.new("RGB", size))
    assert _size_warnings(f"folder:{large}", RES)[0] == []


def test_strips_whose_centre_square_keeps_little_of_them_are_warned_about_once(tmp_path):
    for k in range(3):
        _save(tmp_path / f"strip{k}.png", Image.new("RGB", (RES * 50, RES)))   # 1:50, at the resolution
    _save(tmp_path / "line.png", Image.new("RGB", (RES, RES * 1000)))          # 1:1000, standing
    _save(tmp_path / "wide.png", Image.new("RGB", (RES * 4, RES)))             # 1:4: a quarter kept, not a strip
    said, dataset = _size_warnings(f"folder:{tmp_path}", RES)
    assert len(dataset) == 5
    assert said == [f"4 of the 5 images of {tmp_path.resolve()} have a long side over 4 times their short side (the "
                    f"longest: line.png, {RES}x{RES * 1000}), so the centre square they are cut to keeps little of "
                    f"them (1/1000 of that one); crop them to the part that matters, or remove them."]


def test_entry_points_print_data_errors_as_one_line(tmp_path, capsys):
    _save(tmp_path / "a.png", Image.new("RGB", (20, 20)))
    (tmp_path / "params.csv").write_bytes("path,température\na.png,1\n".encode("latin-1"))
    assert cli.run(lambda argv: load_dataset(f"folder:{tmp_path}", RES), []) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "params.csv is not UTF-8" in err


# ---------------------------------------------------------------- cifar10

def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", refuse)


def test_cifar10_offline_error_names_files_and_place(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", 32, cache_dir=tmp_path)
    message = str(err.value)
    assert "cifar-10-python.tar.gz" in message and "data_batch_1" in message and "test_batch" in message
    assert str(tmp_path.resolve()) in message
    # A cache folder the failed download would have made is not left behind, empty.
    with pytest.raises(FileNotFoundError):
        load_dataset("cifar10", 32, cache_dir=tmp_path / "new" / "cache")
    assert not (tmp_path / "new").exists() and tmp_path.exists()


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


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _python2_pickle(obj):
    """`obj` pickled as the genuine batches are: protocol 2 from Python 2, whose strings are byte strings
    (BINSTRING), with numpy 1's module path for the array constructor."""
    class Python2Pickler(pickle._Pickler):
        dispatch = dict(pickle._Pickler.dispatch)

        def save_byte_string(self, value):
            raw = value if isinstance(value, bytes) else value.encode("latin1")
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
            self.memoize(value)

        dispatch[str] = dispatch[bytes] = save_byte_string

    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _write_cifar(folder, dump, n=3, seed=0):
    """A complete fake cifar-10-batches-py/ whose files hold what the genuine ones do; returns the batches."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batches[name] = {"batch_label": f"batch {k}", "labels": [int(v) for v in rng.integers(0, 10, n)],
                         "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "filenames": [f"image_{k}_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(dump(batches[name]))
    (folder / "batches.meta").write_bytes(dump({"num_cases_per_batch": n, "label_names": CIFAR_CLASSES, "num_vis": 3072}))
    return batches


@pytest.mark.parametrize("dump", [_python2_pickle, lambda obj: pickle.dumps(obj, protocol=2)],
                         ids=["python2", "python3-protocol2"])
def test_cifar10_reads_batches_pickled_like_the_genuine_ones(tmp_path, monkeypatch, dump):
    _no_network(monkeypatch)
    assert b"numpy.core.multiarray" in _python2_pickle(np.zeros(1, np.uint8))  # the spelling genuine files use
    batches = _write_cifar(tmp_path / "cifar-10-batches-py", dump)
    train = load_dataset("cifar10", 32, cache_dir=tmp_path)
    assert len(train) == 15 and train.info.class_names == tuple(CIFAR_CLASSES)
    expected = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert train.labels.tolist() == sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])



def test_a_datasets_size_is_known_before_its_images_are_decoded(tmp_path, monkeypatch):
    """`dataset_size` counts what `load_dataset` then gives, without decoding (spied) or resizing an image."""
    from data import dataset_size
    from helpers import colour_folder
    _no_network(monkeypatch)
    folder = colour_folder(tmp_path / "photos", 2, seed=0)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(folder / ".thumbs" / "hidden.png")  # never read
    _write_cifar(tmp_path / "cifar-10-batches-py", lambda obj: pickle.dumps(obj, protocol=2), n=4)
    import data.cifar, data.folder
    monkeypatch.setattr(data.folder, "load_image", None)  # (called: a TypeError)
    monkeypatch.setattr(data.cifar, "resize_uint8", None)
    sizes = {"folder": dataset_size(f"folder:{folder}"), "train": dataset_size("cifar10", cache_dir=tmp_path),
             "test": dataset_size("cifar10", cache_dir=tmp_path, train=False)}
    monkeypatch.undo()
    assert sizes == {"folder": 6, "train": 20, "test": 4}
    assert sizes == {"folder": len(load_dataset(f"folder:{folder}", 16)),
                     "train": len(load_dataset("cifar10", 16, cache_dir=tmp_path)),
                     "test": len(load_dataset("cifar10", 16, cache_dir=tmp_path, train=False))}
    monkeypatch.setattr(plumes, "DEFAULT_NUM_SAMPLES", 3)  # (what the plumes give without --num-samples)
    assert dataset_size("plumes") == len(load_dataset("plumes", 16, cache_dir=tmp_path)) == 3
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet'; choose one of plumes, folder:PATH, cifar10"):
        dataset_size("imagenet")

def test_cifar10_counted_then_loaded_is_read_once_and_a_changed_batch_again(tmp_path, monkeypatch):
    """A sweep counts the real split (`dataset_size`) and then loads it: the files are unpickled once (spied),
    counting it again reads nothing, and a batch file rewritten in between is read again, its new images too."""
    import data.cifar
    from data import dataset_size
    _no_network(monkeypatch)
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, lambda obj: pickle.dumps(obj, protocol=2), n=4)
    reads = []
    unpickle = data.cifar._unpickle
    monkeypatch.setattr(data.cifar, "_unpickle", lambda path: reads.append(path.name) or unpickle(path))
    train_files = [f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta"]

    assert dataset_size("cifar10", cache_dir=tmp_path) == 20 and reads == train_files
    assert dataset_size("cifar10", cache_dir=tmp_path) == 20 and reads == train_files
    first = load_dataset("cifar10", 32, cache_dir=tmp_path)
    assert len(first) == 20 and reads == train_files                  # the counted split, not read again
    assert len(load_dataset("cifar10", 32, cache_dir=tmp_path)) == 20 and reads == 2 * train_files  # taken once
    assert dataset_size("cifar10", cache_dir=tmp_path) == 20 and reads == 2 * train_files  # its count is known

    # data_batch_3 rewritten with six other images: the count and the images are read from the files again.
    rewritten = _write_cifar(tmp_path / "other", lambda obj: pickle.dumps(obj, protocol=2), n=6, seed=1)
    (folder / "data_batch_3").write_bytes((tmp_path / "other" / "data_batch_3").read_bytes())
    reads.clear()
    assert dataset_size("cifar10", cache_dir=tmp_path) == 22 and reads == train_files
    (folder / "data_batch_3").write_bytes((tmp_path / "other" / "data_batch_1").read_bytes())  # the same size
    os.utime(folder / "data_batch_3", ns=(0, (folder / "data_batch_3").stat().st_mtime_ns + 1_000_000))
    changed = load_dataset("cifar10", 32, cache_dir=tmp_path)
    assert reads == 2 * train_files
    expected = rewritten["data_batch_1"]["data"].reshape(-1, 3, 32, 32)
    assert torch.equal(changed.images[8:14], torch.from_numpy(expected))
    assert torch.equal(changed.images[:8], first.images[:8]) and torch.equal(changed.images[14:], first.images[12:])


class _Planted:
    """Unpickles by calling whatever `reduce` names: what a planted batch file would do."""

    def __init__(self, reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


@pytest.mark.parametrize("target", ["data_batch_1", "batches.meta"])
@pytest.mark.parametrize("payload, names", [
    (lambda marker: (os.system, (f"touch {marker}",)), "posix.system"),
    # Protocol 2 reaches a method through getattr, and spells builtins as Python 2 did.
    (lambda marker: (Path.write_text, (marker, "ran")), "__builtin__.getattr"),
    (lambda marker: (exec, (f"open({str(marker)!r}, 'w').close()",)), "__builtin__.exec"),
], ids=["os.system", "write_text", "exec"])
def test_cifar10_refuses_planted_pickles_without_running_them(tmp_path, monkeypatch, target, payload, names):
    _no_network(monkeypatch)
    folder = tmp_path / "cifar-10-batches-py"
    batches = _write_cifar(folder, lambda obj: pickle.dumps(obj, protocol=2))
    marker = tmp_path / "marker"
    planted = {**batches["data_batch_1"], "labels": _Planted(payload(marker))} if target != "batches.meta" else \
        {"label_names": _Planted(payload(marker))}
    (folder / target).write_bytes(pickle.dumps(planted, protocol=2))
    with pytest.raises(ValueError, match=rf"{folder / target} is not a genuine CIFAR-10 batch .*it names {names}") as err:
        load_dataset("cifar10", 32, cache_dir=tmp_path)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    pickle.loads((folder / target).read_bytes())  # plain pickle would have run it
    assert marker.exists()


@pytest.mark.parametrize("target, content, match", [
    ("data_batch_2", [1, 2, 3], r"it holds a list, not a dict with 'data' and 'labels'"),
    ("data_batch_2", {"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, r"not a float32 array of shape \(2, 3072\)"),
    ("data_batch_2", {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, r"not a uint8 array of shape \(2, 100\)"),
    ("data_batch_2", {"data": [[0] * 3072], "labels": [0]}, r"'data' must be a uint8 array of shape \(N, 3072\), not list"),
    ("data_batch_2", {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, r"'labels' must be a list of 2 ints from 0 to 9"),
    ("data_batch_2", {"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, r"'labels' must be a list of 2 ints"),
    ("data_batch_2", {"data": np.zeros((2, 3072), np.uint8), "labels": [True, False]}, r"'labels' must be a list of 2 ints"),
    ("batches.meta", {"label_names": CIFAR_CLASSES[:9]}, r"it needs 'label_names', a list of 10 distinct class names"),
    ("batches.meta", {"label_names": ["cat"] * 10}, r"it needs 'label_names', a list of 10 distinct class names"),
    ("data_batch_2", b"\x80\x02not a pickle at all", r"UnpicklingError"),
    # _codecs.encode is admitted for the byte strings of protocol 2, and for the latin1 encoding only.
    ("data_batch_2", _Planted((__import__("codecs").encode, ("text", "rot13"))), r"encoding 'rot13'"),
])
def test_cifar10_refuses_batches_of_the_wrong_structure(tmp_path, monkeypatch, target, content, match):
    _no_network(monkeypatch)
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, lambda obj: pickle.dumps(obj, protocol=2))
    (folder / target).write_bytes(content if isinstance(content, bytes) else pickle.dumps(content, protocol=2))
    with pytest.raises(ValueError, match=rf"{folder / target} is not a genuine CIFAR-10 batch .*{match}"):
        load_dataset("cifar10", 32, cache_dir=tmp_path)


def test_a_truncated_cifar10_batch_is_reported_in_one_line(tmp_path, monkeypatch, capsys):
    _no_network(monkeypatch)
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, lambda obj: pickle.dumps(obj, protocol=2))
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:3000])  # a copy cut short
    assert cli.run(lambda argv: load_dataset("cifar10", 32, cache_dir=tmp_path, train=False), []) == 1
    assert capsys.readouterr().err == (
        f"error: {folder / 'test_batch'} is not a genuine CIFAR-10 batch (UnpicklingError: pickle data was truncated), "
        f"so it is not used; delete {folder} and run again to download CIFAR-10, or put the files from "
        f"cifar-10-python.tar.gz there.\n")


def test_a_test_set_named_plumes_or_cifar10_is_their_test_split(tmp_path, monkeypatch):
    """`--test-dataset plumes` (and the experiment's and the sweep's `--test plumes`) is the held-out split, never
    the training split it would be scored on while called "heldout"."""
    from data import load_test_set
    import data.cifar as cifar
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    train = load_dataset(f"folder:{tmp_path}", 8)
    splits = []

    def fake(resolution, cache_dir, train=True, num_samples=None, seed=0, channels=None):
        splits.append(train)
        return images
    images = train
    monkeypatch.setattr(plumes, "load_plumes", fake)
    monkeypatch.setattr(cifar, "load_cifar10", fake)
    for spec, test_spec in (("plumes", ""), (f"folder:{tmp_path}", "plumes"), ("plumes", "plumes"),
                            (f"folder:{tmp_path}", "cifar10")):
        splits.clear()
        _, split = load_test_set(train, spec, test_spec, 3)
        assert splits == [False] and split == "heldout", (spec, test_spec)


def test_a_plume_set_that_another_process_is_simulating_is_waited_for_and_read_not_simulated_again(tmp_path,
                                                                                                    monkeypatch):
    """torchrun's ranks (or two runs sharing a cache) asking for the same uncached set at once: one simulates,
    the others wait for its lock, then read its cache."""
    import threading
    import time
    from core.lock import taking_turns
    from data import plumes
    made = []
    simulate = plumes.generate
    monkeypatch.setattr(plumes, "generate",
                        lambda seeds, resolution: made.append(list(seeds)) or simulate(seeds, resolution))
    path = plumes.cache_path(tmp_path, 16, 3, 0, True)
    got = {}
    with taking_turns(path.with_name(path.name + ".lock"), "a test's plumes"):  # "another process" simulating
        waiting = threading.Thread(target=lambda: got.update(dataset=plumes.load_plumes(16, tmp_path, num_samples=3)))
        waiting.start()
        time.sleep(0.5)
        assert waiting.is_alive() and made == []  # it waits rather than simulating the same set again
        first = plumes._simulate_in_parts(path, plumes.sample_seeds(0, 3, True), 16)
    waiting.join(timeout=120)
    assert len(made) == 1 and torch.equal(got["dataset"].images, first[0])


def test_more_plumes_than_the_memory_holds_are_refused_before_any_is_simulated(tmp_path, monkeypatch):
    from core.errors import UserError
    monkeypatch.setattr("core.runtime.device_memory", lambda device: 5 * 3 * 32 * 32)  # exactly five 32x32 plumes
    monkeypatch.setattr(plumes, "sample_seeds", lambda *args: pytest.fail("seeds were drawn before the size check"))
    with pytest.raises(UserError, match=r"^6 plumes at 32x32 as a dataset take 0.0 GiB, more than the 0.0 GiB of "
                                        r"memory this machine has; ask for fewer \(--num-samples\)\.$"):
        plumes.load_plumes(32, tmp_path, num_samples=6)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr("core.runtime.device_memory", lambda device: 5 * 3 * 32 * 32)
    assert len(plumes.load_plumes(32, tmp_path, num_samples=5)) == 5  # a set that fits is made


def test_a_file_given_as_a_folder_is_called_a_file(tmp_path):
    from data import check_spec
    (tmp_path / "image.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"image.png is a file, not a folder; pass a directory of images"):
        check_spec(f"folder:{tmp_path / 'image.png'}", "--dataset")
    with pytest.raises(FileNotFoundError, match=r"the folder \S*absent does not exist"):
        check_spec(f"folder:{tmp_path / 'absent'}", "--dataset")
    check_spec(f"folder:{tmp_path}", "--dataset")
