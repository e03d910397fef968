"""Image folders and CIFAR-10 files as they come from the real world: a camera card's names and junk, a NAS's
thumbnail folders, several damaged photos in one folder, the centre-square resize against an independent
computation, and CIFAR-10's official archive (faked offline) with byte-string keys or a bad checksum."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageCms

from core.errors import UserError
from data import load_dataset
from data.folder import _square
from data.imageio import MAX_PIXELS_ENV, list_images

RES = 16


def _photo(path, size=(24, 20), colour=(200, 60, 30), **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **options)


# ---------------------------------------------------------------- folders as people have them


def test_a_camera_card_folder_reads_its_images_in_code_point_order_and_nothing_else(tmp_path):
    """Upper-case and mixed-case extensions, progressive and ICC-tagged JPEGs are images; Windows' and macOS's
    files, notes and extension-less files are not. Classes sort by code point as torchvision's ImageFolder sorts
    them (capitals first), files by path, neither by the order the file system lists them in."""
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    names = ["ant/IMG_0002.JPG", "ant/IMG_0001.jpeg", "Dog/b.PNG", "Dog/a.Jpg", "\u00e9l\u00e9phant/x.JPEG"]
    for name in reversed(names):  # written in the opposite order to the one read
        _photo(tmp_path / name, format="PNG" if name.endswith(".PNG") else "JPEG")
    _photo(tmp_path / "ant" / "progressive.jpg", progressive=True, quality=90)
    _photo(tmp_path / "ant" / "tagged.jpg", colour=(10, 120, 200), icc_profile=srgb, quality=95)
    for junk in ("Thumbs.db", "ant/desktop.ini", "Dog/README", "Dog/notes.txt", ".DS_Store", "ant/._IMG_0001.jpeg"):
        (tmp_path / junk).write_bytes(b"\x00\x05\x16\x07 not an image")
    _photo(tmp_path / "Dog" / "no_extension", format="PNG")  # not listed: a file is an image by its extension
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    _photo(tmp_path / ".git" / "objects" / "c.png")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset(f"folder:{tmp_path}", RES)
    assert ds.info.class_names == ("Dog", "ant", "\u00e9l\u00e9phant")
    assert ds.files == ("Dog/a.Jpg", "Dog/b.PNG", "ant/IMG_0001.jpeg", "ant/IMG_0002.JPG", "ant/progressive.jpg",
                        "ant/tagged.jpg", "\u00e9l\u00e9phant/x.JPEG")
    assert ds.labels.tolist() == [0, 0, 1, 1, 1, 1, 2]
    # An ICC profile is not applied: the stored values are read as sRGB (an sRGB profile changes nothing).
    assert (ds.images[5].float().mean((1, 2)) - torch.tensor([10.0, 120.0, 200.0])).abs().max() <= 3


def test_a_nas_thumbnail_folder_recycle_bin_and_zip_residue_are_not_read(tmp_path):
    """Synology keeps a thumbnail of every photo in @eaDir/<photo>/ beside it, and deleted photos in #recycle;
    macOS zips carry __MACOSX/ of "._" files. None of them is data: no thumbnail is read as an image of its
    class, no bin becomes a class, and no folder is warned about as an empty class."""
    for name in ("cats/a.jpg", "dogs/b.jpg"):
        _photo(tmp_path / name)
        _photo(tmp_path / name.split("/")[0] / "@eaDir" / "a.jpg" / "SYNOFILE_THUMB_XL.jpg", size=(8, 8))
    _photo(tmp_path / "#recycle" / "cats" / "deleted.jpg")
    _photo(tmp_path / "@eaDir" / "cats" / "SYNOFILE_THUMB_M.jpg")
    (tmp_path / "__MACOSX" / "cats").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "cats" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset(f"folder:{tmp_path}", RES)
    assert ds.info.class_names == ("cats", "dogs") and ds.files == ("cats/a.jpg", "dogs/b.jpg")


def test_lost_and_found_at_the_root_of_a_disk_does_not_stop_the_listing(tmp_path, monkeypatch):
    """ext4 puts lost+found, readable by root only, at the root of every disk: a dataset kept at a disk's root is
    listed without it (the suite may run as root, for whom nothing is locked: the refusal is simulated)."""
    _photo(tmp_path / "cats" / "a.png")
    (tmp_path / "lost+found").mkdir()
    scandir = os.scandir

    def denied(path):
        if os.path.basename(path) == "lost+found":
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["cats/a.png"]


def _truncated_jpeg(path):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:-200])


def test_every_damaged_image_of_a_folder_is_named_in_one_error(tmp_path, monkeypatch):
    """A folder of thousands of photos with a few damaged ones names them all at once, rather than one per run
    of a decode that takes minutes; one damaged image keeps its own message."""
    for k in range(30):
        _photo(tmp_path / f"{k:03d}.jpg")
    (tmp_path / "010.jpg").write_bytes(b"")                     # an empty file (a failed copy)
    _truncated_jpeg(tmp_path / "020.jpg")                       # a download cut short
    (tmp_path / "025.jpg").write_bytes(b"<html>404 Not Found</html>")  # a scraper's error page
    with pytest.raises(UserError) as err:
        load_dataset(f"folder:{tmp_path}", RES)
    message = str(err.value)
    assert message.startswith(f"3 images of {tmp_path} cannot be used (010.jpg, 020.jpg, 025.jpg); fix or remove "
                              f"each of them, as this says of the first: Cannot read image {tmp_path / '010.jpg'} ")
    assert message.endswith("remove or replace the file.") and "\n" not in message

    for name in ("010.jpg", "020.jpg"):
        _photo(tmp_path / name)
    with pytest.raises(UserError, match=rf"^Cannot read image {tmp_path / '025.jpg'} \(UnidentifiedImageError: "):
        load_dataset(f"folder:{tmp_path}", RES)

    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")  # not any image's fault: said once, as the environment's
    with pytest.raises(UserError, match=rf"^The environment variable {MAX_PIXELS_ENV} is 'lots'"):
        load_dataset(f"folder:{tmp_path}", RES)


# ---------------------------------------------------------------- the centre square, computed independently


def _lanczos_weights(size, start, length, out):
    """(out, size) weights that resample the source span [start, start + length) to `out` samples with Lanczos-3,
    widened by the scale when shrinking (antialiasing), normalised, and clipped to the image."""
    scale = length / out
    stretch = max(scale, 1.0)
    weights = np.zeros((out, size))
    for i in range(out):
        centre = start + (i + 0.5) * scale
        j = np.arange(max(0, int(np.floor(centre - 3 * stretch))), min(size, int(np.ceil(centre + 3 * stretch))))
        x = (j + 0.5 - centre) / stretch
        w = np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)
        weights[i, j] = w / w.sum()
    return weights


def _centre_square(pixels, resolution):
    """The centre square of (H, W, 3) pixels resampled to resolution x resolution, in float64."""
    h, w = pixels.shape[:2]
    side = min(h, w)
    rows = _lanczos_weights(h, (h - side) / 2, side, resolution)
    cols = _lanczos_weights(w, (w - side) / 2, side, resolution)
    return np.clip(np.einsum("yh,hwc,xw->yxc", rows, pixels.astype(float), cols), 0, 255)


def _texture(h, w, seed=0):
    """Smooth colour noise: detail at every scale from a few pixels up, as photos have."""
    from scipy.ndimage import gaussian_filter
    noise = gaussian_filter(np.random.default_rng(seed).normal(0, 1, (h, w, 3)), (1.5, 1.5, 0))
    return np.clip(128 + 60 * noise / noise.std(), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(64, 48), (48, 64), (33, 50), (101, 77), (31, 32), (7, 10), (5, 5), (3, 100),
                                  (1000, 999)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("resolution", [8, 32])
def test_the_centre_square_is_the_lanczos_resample_of_the_exact_centre(size, resolution):
    """Against a float64 Lanczos-3 of the exact (sub-pixel) centre square: shrinking and enlarging, odd sizes,
    1:33 strips. Pillow resamples in two 8-bit passes, rounding in between: a level or two on most pixels, and up
    to 8 where the texture's detail overshoots (measured: mean under 0.35, largest 7.1)."""
    w, h = size
    pixels = _texture(h, w)
    ours = _square(Image.fromarray(pixels), resolution).astype(float)
    error = np.abs(ours - _centre_square(pixels, resolution))
    assert error.mean() < 0.5 and error.max() <= 8, (error.mean(), error.max())


@pytest.mark.parametrize("size, resolution", [((64, 48), 12), ((48, 64), 12), ((6, 4), 8), ((4, 6), 8),
                                              ((30, 10), 20)], ids=["shrink-wide", "shrink-tall", "enlarge-wide",
                                                                    "enlarge-tall", "enlarge-3:1"])
def test_the_centre_square_is_pils_resize_then_centre_crop_where_that_crop_is_whole_pixels(size, resolution):
    """Where the short side scales to `resolution` and the crop falls on whole output pixels, the centre square is
    what torchvision's Resize(resolution) + CenterCrop(resolution) give with Pillow's Lanczos. Elsewhere they round
    the resized size and the crop to whole pixels, off the exact centre by up to half an output pixel."""
    from torchvision.transforms import functional
    w, h = size
    image = Image.fromarray(_texture(h, w, seed=1))
    reference = functional.center_crop(functional.resize(image, resolution, functional.InterpolationMode.LANCZOS),
                                       [resolution, resolution])
    error = np.abs(_square(image, resolution).astype(int) - np.asarray(reference, dtype=int))
    assert error.max() <= 1, error.max()


# ---------------------------------------------------------------- CIFAR-10's official archive, faked offline

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _cifar_image(k, i):
    """A 32x32 RGB image (H, W, 3) in which each channel says which it is: red rises down, green across."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0] = np.arange(32)[:, None] * 8
    image[..., 1] = np.arange(32)[None, :] * 8
    image[..., 2] = 10 * k + i
    return image


def _cifar_archive(key=lambda name: name.encode("latin1"), n=2):
    """cifar-10-python.tar.gz as the official one is laid out, its batches pickled by Python 3 with keys and class
    names as `key` makes them (bytes: what `pickle.load(f, encoding="bytes")` gives, saved again)."""
    def member(tar, name, content):
        raw = pickle.dumps(content, protocol=2)
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for k, name in enumerate(BATCHES):
            # Each row: 1024 red values, then 1024 green, then 1024 blue, each plane row by row.
            rows = np.stack([_cifar_image(k, i).transpose(2, 0, 1).reshape(-1) for i in range(n)])
            member(tar, name, {key("batch_label"): key(f"training batch {k + 1} of 5"), key("data"): rows,
                               key("labels"): [(k + i) % 10 for i in range(n)],
                               key("filenames"): [key(f"image_{k}_{i}.png") for i in range(n)]})
        member(tar, "batches.meta", {key("label_names"): [key(c) for c in CLASSES], key("num_cases_per_batch"): n,
                                     key("num_vis"): 3072})
    return buffer.getvalue()


def _offline(monkeypatch, archive=None):
    """No network; the archive's checksum is what torchvision expects, if `archive` is given (the genuine
    archive's MD5 cannot be made by a fake)."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torchvision.datasets.utils, "_urlretrieve", refuse)
    monkeypatch.setattr(torchvision.datasets.utils, "_get_redirect_url", lambda url, max_hops=3: url)
    if archive is not None:
        monkeypatch.setattr(torchvision.datasets.cifar.CIFAR10, "tgz_md5", hashlib.md5(archive).hexdigest())


@pytest.mark.parametrize("key", [lambda name: name.encode("latin1"), str], ids=["bytes-keys", "str-keys"])
def test_cifar10_is_read_from_its_archive_with_channels_labels_and_names_in_place(tmp_path, monkeypatch, key):
    archive = _cifar_archive(key)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(archive)
    _offline(monkeypatch, archive)
    train = load_dataset("cifar10", 32, cache_dir=tmp_path)
    assert train.info.class_names == tuple(CLASSES) and len(train) == 10
    assert train.labels.tolist() == [(k + i) % 10 for k in range(5) for i in range(2)]
    expected = np.stack([_cifar_image(k, i) for k in range(5) for i in range(2)])  # (N, H, W, RGB)
    assert torch.equal(train.images, torch.from_numpy(expected).permute(0, 3, 1, 2))
    test = load_dataset("cifar10", 32, cache_dir=tmp_path, train=False)
    assert test.labels.tolist() == [5, 6] and torch.equal(test.images[1].permute(1, 2, 0),
                                                          torch.from_numpy(_cifar_image(5, 1)))


def test_a_cifar10_archive_with_the_wrong_checksum_is_named_as_such_offline(tmp_path, monkeypatch):
    """A download cut short stays on disk; offline, torchvision cannot fetch it again, and the advice is to replace
    that file, not to put in place an archive that is already there."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(_cifar_archive()[:500])
    _offline(monkeypatch)
    with pytest.raises(FileNotFoundError, match=rf"^{archive} is not the genuine CIFAR-10 archive \(its MD5 checksum "
                                                rf"differs: .*URLError.*; replace it with the file at https://\S+, or "
                                                rf"delete it and run again with internet access\.$"):
        load_dataset("cifar10", 32, cache_dir=tmp_path)
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_a_planted_batch_in_a_cifar10_archive_is_refused_without_running(tmp_path, monkeypatch):
    """The archive's checksum protects the genuine download; a batch file is still read without plain pickle, so a
    hand-made archive (here one whose checksum the test makes torchvision accept) runs nothing either."""
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    buffer = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(_cifar_archive(str)), mode="r:gz") as genuine, \
            tarfile.open(fileobj=buffer, mode="w:gz") as planted:
        for info in genuine.getmembers():
            raw = genuine.extractfile(info).read()
            if info.name.endswith("data_batch_3"):
                raw = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": Planted()}, protocol=2)
                info.size = len(raw)
            planted.addfile(info, io.BytesIO(raw))
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(buffer.getvalue())
    _offline(monkeypatch, buffer.getvalue())
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    with pytest.raises(UserError, match=rf"^{batch} is not a genuine CIFAR-10 batch \(UnpicklingError: it names "
                                        rf"posix\.system, which no CIFAR-10 batch needs\), so it is not used; delete "):
        load_dataset("cifar10", 32, cache_dir=tmp_path)
    assert not marker.exists()
