"""Reading and writing image files: the one place that knows about formats, modes and grids.

Every stage reads folders through `list_images` / `load_image` (so a corrupt file is always reported
the same way, by name) and writes what people look at through `save_images`, `save_grid` and
`save_gif`. Tensors here are images in [-1, 1], shape (B, C, H, W), C = 1 or 3.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import unicodedata
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from core.errors import MissingFileError, UserError, warn_once
from core.runtime import atomic_write

# Sets the most pixels an image may have (`max_image_pixels`); read at each decode, so it can be set at any time.
MAX_PIXELS_ENV = "SYNTHDIFF_MAX_IMAGE_PIXELS"
# The raster formats read as images: photos, renders and their usual containers. Pillow opens more
# (PSD, EPS, ICO, FITS, ...), whose files are left out with a warning (`list_images`).
IMAGE_EXTENSIONS = (".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp", ".avif", ".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx", ".ppm", ".pgm", ".pbm", ".pnm",
                    ".tga", ".qoi")
# Photo formats Pillow does not open at all (phones' HEIC, cameras' raw files, JPEG XL, HDR renders, vector
# art), which folders of photos often hold beside their JPEGs: left out with the same warning as the formats
# Pillow opens but that are not read here, so that a folder of iPhone photos that trains on its few JPEGs says so.
UNREAD_PHOTO_EXTENSIONS = frozenset({".heic", ".heif", ".hif", ".avifs", ".jxl", ".dng", ".cr2", ".cr3", ".crw", ".nef",
                                     ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2", ".pef", ".srw", ".x3f",
                                     ".3fr", ".iiq", ".erf", ".kdc", ".mrw", ".rwl", ".exr", ".hdr", ".svg", ".svgz"})


# Folders that systems and tools put beside the photos, never meant as data: skipped like hidden ones. Synology's
# thumbnails (@eaDir/IMG_1.JPG/SYNOFILE_THUMB_XL.jpg, one per photo: each would be read as an image of its class)
# and recycle bins, macOS's zip residue, Windows' drive folders, and ext4's lost+found at the root of a mounted
# disk (readable by root only: listing it would stop the listing).
SYSTEM_FOLDERS = frozenset({"@eaDir", "#recycle", "#snapshot", "__MACOSX", "$RECYCLE.BIN", "System Volume Information",
                            "lost+found"})


def is_skipped_folder(name: str) -> bool:
    """Whether a folder of this name is left out of every image folder: hidden (".name") or a `SYSTEM_FOLDERS` one."""
    return name.startswith(".") or name in SYSTEM_FOLDERS


def nfc(name: str) -> str:
    """`name` (a folder's or a path's) in Unicode NFC: macOS writes names decomposed (NFD), so one "é" can be
    one code point or two."""
    return unicodedata.normalize("NFC", name)


def list_images(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under `root`, sorted so every run sees the same order.

    The order is that of the paths in Unicode NFC, so that a folder copied from macOS (which stores
    names decomposed, NFD) lists as its copy made elsewhere does: the same --num-samples subsets,
    fingerprints and resume checks. Hidden files and folders (names starting with ".", such as macOS's
    "._photo.jpg" resource forks or Jupyter's ".ipynb_checkpoints/") and `SYSTEM_FOLDERS` (a NAS's
    thumbnails, recycle bins) are skipped: they are never meant as data, and such a folder would
    otherwise become a class. Links to folders are followed, each real folder once, so a link loop
    ends; a folder reached both through a link and without one is read at its own path, so a
    shortcut that sorts before a class folder does not take its class. An
    image name that is not a regular file (a broken link, a pipe) is refused, since opening a pipe would
    block forever and a broken link is an image the user expected to be there; so is one that is not
    UTF-8, which a dataset writer could not record, here rather than after it wrote the images.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"Image folder {root} does not exist or is not a directory; pass a directory that holds images.")

    def unreadable(err: OSError) -> None:
        raise UserError(f"Cannot list the folder {err.filename} ({err.strerror}); fix its permissions or move it out of {root}.")

    files, other_formats, seen = [], [], set()
    # Every folder reached without a link is read before any reached through one (os.walk does not enter
    # links), then those reached through one link, and so on.
    tops = [root]
    while tops:
        for folder, dirs, names in os.walk(tops.pop(0), onerror=unreadable):
            status = os.stat(folder)
            if (status.st_dev, status.st_ino) in seen:
                dirs[:] = []
                continue
            seen.add((status.st_dev, status.st_ino))
            # Sorted, so that which of two links to one folder is kept does not depend on the file system.
            visible = (d for d in dirs if not is_skipped_folder(d)) if recursive else ()
            dirs[:] = sorted(visible, key=lambda d: (nfc(d), d))
            tops += [Path(folder, d) for d in dirs if os.path.islink(os.path.join(folder, d))]
            for name in names:
                extension = os.path.splitext(name)[1].lower()
                if name.startswith("."):
                    continue
                if extension in _readable_extensions():
                    files.append(regular_file(_utf8_named(Path(folder, name), root)))
                elif extension in (*IMAGE_EXTENSIONS, *UNREAD_PHOTO_EXTENSIONS) or extension in _other_pillow_formats():
                    other_formats.append(Path(folder, name))
    if other_formats:
        warn_once(f"Leaving out {len(other_formats)} file(s) of {root} in formats not read as images here "
                  f"(such as {min(other_formats).relative_to(root)}); convert them to PNG to use them.")
    return sorted(files, key=lambda f: (tuple(nfc(part) for part in f.relative_to(root).parts), f))


def _utf8_named(path: Path, root: Path) -> Path:
    """`path`, refused if its name under `root` is not UTF-8 (a file system hands such bytes over as they are)."""
    try:
        str(path.relative_to(root)).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"The image {os.fsencode(path.relative_to(root))!r} in {root} has a name that is not UTF-8 "
                        f"(from an old zip file or another system), which a dataset written from it could not record; "
                        f"rename it to UTF-8 (the convmv tool converts a folder's names from Latin-1, for one).") from None
    return path


def regular_file(path: Path) -> Path:
    """`path`, refused if it is not a regular file: opening a pipe would block forever, and a broken link is
    an image the user expected to be there."""
    if not path.is_file():
        raise UserError(f"{path} is not a regular file (a broken link, a pipe or a device); remove it or "
                        f"replace it with the image.")
    return path


# Formats Pillow registers that hold data other than pictures (or only a stub without a decoder): files of
# these beside the images are not images left out, so they are not warned about.
NOT_PICTURES = frozenset({"BUFR", "GRIB", "HDF5", "MPEG", "WMF", "FITS"})


# Formats of IMAGE_EXTENSIONS that only recent Pillows (or builds with the codec's plugin) open.
RECENT_FORMATS = {".avif": "AVIF", ".qoi": "QOI", ".jp2": "JPEG2000", ".j2k": "JPEG2000", ".j2c": "JPEG2000",
                  ".jpc": "JPEG2000", ".jpf": "JPEG2000", ".jpx": "JPEG2000"}


@functools.cache
def _readable_extensions() -> frozenset[str]:
    """IMAGE_EXTENSIONS that this Pillow opens: with an older one, AVIF files say so as other formats do."""
    Image.init()
    return frozenset(ext for ext in IMAGE_EXTENSIONS if RECENT_FORMATS.get(ext, "JPEG") in Image.OPEN)


@functools.cache
def _other_pillow_formats() -> frozenset[str]:
    """Extensions of the picture formats Pillow can open that are not read as images here (PSD, EPS, ICO, ...)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and ext not in IMAGE_EXTENSIONS and fmt not in NOT_PICTURES)


ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 upright, 2-8 mirrored and/or turned
PHOTOMETRIC_TAG = 262  # TIFF PhotometricInterpretation: 0 "min-is-white" (0 is white), 1 "min-is-black"
GREY_16 = ("I;16", "I;16L", "I;16B", "I;16N")  # every byte order Pillow reports for 16-bit greyscale
HIGH_DEPTH = GREY_16 + ("I", "F")


FIRST_ONLY = "(said for the first such image only)"  # the end of a warning that later files do not repeat


def load_image(path: str | os.PathLike, mode: str = "RGB", upright: bool = True) -> Image.Image:
    """Decode an image file into `mode` ("RGB" or "L"), the same way for every pixel mode Pillow reads.

    - EXIF orientation (photos from cameras and phones store the sensor's pixels and a tag that says
      how to turn them): applied when `upright`, so an image is read the way image viewers show it.
      `upright=False` keeps the stored pixels, as readers that ignore the tag do (pytorch-fid).
    - Multi-frame files (animated GIF, PNG or WebP, multi-page TIFF): the first frame only.
    - Alpha (RGBA, LA, PA, palettes with transparency, a transparent colour key) is composited on
      black, so transparent regions are black in every mode rather than whatever colour happened to
      be stored there. Premultiplied RGBa and La already hold their colour composited on black. The
      colour key of a 16-bit RGB PNG is matched at 16 bits, though Pillow reads its pixels as 8-bit.
    - 16-bit greyscale (I;16, I;16L, I;16B, I;16N): 0..65535 maps to 0..255 (v / 257, rounded:
      65535 -> 255, 32768 -> 128), so a dark 16-bit image stays dark. One whose values all fit in
      12 bits is read nearly black, with a warning: likely 10- or 12-bit camera data, never scaled up.
      A TIFF whose 0 is white (PhotometricInterpretation 0, as scanners write) is inverted first, as
      Pillow itself inverts one of 8 bits.
    - 32-bit integer greyscale (I: 16-bit PGM/PPM, signed or 32-bit TIFF): read on the same 0..65535
      scale; a value outside it has no known white level, so such a file is refused.
    - 32-bit float greyscale (F): read as 0..1 if its largest value is at most 1, otherwise as
      0..255; values above the top clip to white. One whose largest value is between 1 and 25.5 is
      read nearly black, with a warning: likely a 0..1 render whose highlights overshoot 1. NaN or
      infinity, and values below zero by more than half a grey level, have no meaning in either
      convention and are refused.
    - 1 (bilevel) gives 0 and 255; CMYK (without colour management), YCbCr, LAB and HSV go to RGB by
      Pillow's conversions. "L" is ITU-R 601 luma of the RGB image (of the grey value for grey modes).
    - An image of more than `max_image_pixels()` pixels is refused as a possible decompression bomb:
      by default twice `PIL.Image.MAX_IMAGE_PIXELS` (about 179 million), where Pillow itself, and so
      FID's reader, refuses; the environment variable SYNTHDIFF_MAX_IMAGE_PIXELS sets another limit.

    A file that cannot be decoded or converted raises ValueError naming it; a missing one FileNotFoundError.
    Pillow's warnings about a file it still decodes are shown as `naming_the_file` says.
    """
    with naming_the_file(path):
        return _load_image(path, mode, upright)


@contextlib.contextmanager
def naming_the_file(path: str | os.PathLike) -> Iterator[None]:
    """Pillow's warnings about a file it still decodes ("Corrupt EXIF data", "Palette images with Transparency
    expressed in bytes ...") name no file, and neither do ours about its pixels. Each one raised inside is
    shown once per process, with the path of the first file that gave it: a folder of 50,000 such files gives
    one line, not 50,000 (nor 50,000 without a name)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    # (A warning of ours said once per process keeps its key, which names what it is about; its text names a value
    # of the first such file.)
    shown = dict.fromkeys((str(w.message).strip(), w.category, getattr(w.message, "once_key", None)) for w in caught)
    for message, category, once in shown:
        said = message if message.endswith(f"{FIRST_ONLY}.") else f"{message} {FIRST_ONLY}"
        warn_once(f"decoding: {once or message}", f"{path}: {said}", category)


def _load_image(path: str | os.PathLike, mode: str, upright: bool) -> Image.Image:
    if mode not in ("RGB", "L"):
        raise UserError(f"load_image converts to 'RGB' or 'L', not {mode!r}; pass one of those.")
    with decode_image(path) as im:
        # Read before an EXIF turn, whose new image has no TIFF tags.
        min_is_white = im.mode in GREY_16 and getattr(im, "tag_v2", {}).get(PHOTOMETRIC_TAG) == 0
        if im.format == "PNG" and im.mode == "RGB" and isinstance(im.info.get("transparency"), tuple):
            im = _colour_key_at_16_bits(im, path)
        if upright and im.getexif().get(ORIENTATION_TAG, 1) != 1:
            im = ImageOps.exif_transpose(im)
        if im.mode in HIGH_DEPTH:
            return _high_depth_to_grey(im, path, min_is_white).convert(mode)
        if im.mode == "RGBa":
            im = Image.merge("RGB", im.split()[:3])
        elif im.mode == "La":
            im = im.getchannel(0)
        elif im.has_transparency_data:
            im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
        try:
            # Colour spaces go through RGB, whose luma Pillow computes for every source the same way
            # (LAB, for one, has no direct conversion to L).
            if im.mode not in ("1", "L", "RGB"):
                im = im.convert("RGB")
            return im.convert(mode)
        except ValueError as err:
            raise UserError(f"Image {path} has pixel mode {im.mode}, which cannot be converted to {mode} ({err}); "
                            f"save it as 8-bit RGB or greyscale.") from err


def _colour_key_at_16_bits(im: Image.Image, path: str | os.PathLike) -> Image.Image:
    """An RGB PNG with a transparent colour key (tRNS): as RGBA, transparent where all 16 bits of a pixel's
    samples equal the key, if it stores 16-bit samples; as it is (8-bit samples) otherwise.

    Pillow reads 16-bit RGB as each sample's high byte but keeps the key at 16 bits, so its own comparison
    would leave a keyed pixel opaque and make an opaque one whose high bytes equal a small key transparent.
    The low bytes come from decoding the file again through Pillow's little-endian unpacker, which takes
    the second byte of each (big-endian) sample and unfilters the rows just as the first decode did.
    """
    with Image.open(path) as again:
        if [tile[3] for tile in again.tile] != ["RGB;16B"]:
            return im
        again.tile = [(*tile[:3], "RGB;16L") for tile in again.tile]
        again.load()
        low = np.asarray(again, dtype=np.uint16)
    samples = np.asarray(im, dtype=np.uint16) * 256 + low
    opaque = (samples != np.array(im.info["transparency"], dtype=np.uint16)).any(axis=-1)
    keyed = im.copy()  # keeps the EXIF orientation
    del keyed.info["transparency"]
    keyed.putalpha(Image.fromarray(opaque.astype(np.uint8) * 255, "L"))
    return keyed


def max_image_pixels() -> int | None:
    """The most pixels `load_image` decodes: $SYNTHDIFF_MAX_IMAGE_PIXELS if set, else 2 x PIL.Image.MAX_IMAGE_PIXELS.

    The default is where Pillow's own refusal starts (it only warns from 1x), so training and FID (which
    decodes through `decode_image` too) read every photo pytorch-fid (plain Pillow) reads, 100-megapixel
    cameras' included, while a decompression bomb (a small file that claims billions of pixels) is still
    refused before it is decoded. A larger limit from the environment also raises Pillow's, which would
    otherwise refuse first. None: no limit (PIL.Image.MAX_IMAGE_PIXELS set to None).
    """
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise UserError(f"The environment variable {MAX_PIXELS_ENV} is {value!r}; set it to a whole number of pixels "
                        f"such as 300000000, or unset it for the default limit.")
    if Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = (limit + 1) // 2  # Pillow refuses above twice this; only ever raised
    return limit


# At import too, so that plain Pillow (pytorch-fid, torchvision) allows what the environment allows.
with contextlib.suppress(UserError):  # a bad value is reported where an image is read
    max_image_pixels()


def decode_image(path: str | os.PathLike) -> Image.Image:
    """Open `path` and decode its first frame; any failure is one error naming the file."""
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            # Pillow warns from 1x MAX_IMAGE_PIXELS and raises above 2x; `limit` decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
            try:
                if limit is not None and im.width * im.height > limit:  # header read, pixels not yet
                    raise Image.DecompressionBombError(f"({im.width * im.height} pixels)")  # told as Pillow's
                im.load()
            except BaseException:
                im.close()
                raise
        return im
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))  # Pillow raises in open(), before im.size is ours
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise UserError(f"Image {path} has {pixels}, more than the limit of {limit:,}, so it is refused as a possible "
                        f"decompression bomb; shrink it, or if you trust the file set the environment variable "
                        f"{MAX_PIXELS_ENV} to a larger number of pixels.") from None
    except FileNotFoundError:
        raise MissingFileError(f"Image {path} does not exist; check the path.") from None
    except Exception as err:
        # Pillow's parsers meet malformed bytes with many exception types (OSError, SyntaxError,
        # struct.error, EOFError, IndexError, ...); whichever it is, the file is at fault. Ctrl-C and
        # stop signals (core.cli.RunInterrupted) are no Exception: an interruption passes through.
        raise UserError(f"Cannot read image {path} ({type(err).__name__}: {err}); remove or replace the file.") from err


FAINT_16_BIT_MAX = 4095  # a 16-bit image whose largest value fits 12 bits is under 6.3% grey on 0..65535
FAINT_FLOAT_MAX = 25.5  # a float image whose largest value is above 1 and at most this is under 10% grey on 0..255


def _high_depth_to_grey(im: Image.Image, path: str | os.PathLike, min_is_white: bool = False) -> Image.Image:
    """16-bit, 32-bit integer or float greyscale -> 8-bit "L", by the rules in `load_image`; `min_is_white`: a
    16-bit image whose 0 is white."""
    values = np.asarray(im)  # uint16 in the file's byte order, int32 or float32
    if min_is_white:
        values = 65535 - values.astype(np.int32)
    if im.mode == "F":
        if not np.isfinite(values).all():
            raise UserError(f"Image {path} has NaN or infinite pixel values; replace them with finite ones "
                            f"(0..1 or 0..255) and save it again.")
        top = 1.0 if values.max() <= 1 else 255.0
        if 1 < values.max() <= FAINT_FLOAT_MAX:
            # Read on 0..255, such an image is nearly black; more likely it is a 0..1 image (a render) whose
            # highlights overshoot 1. Which it is cannot be told from one file: say so, and keep the rule.
            # (`load_image` names the file in front of every warning raised while it decodes one)
            # Said for the first such file only: a folder of renders would otherwise print a line per image.
            warn_once("faint float", f"a float image with values up to {values.max():.4g}, so it is read on the "
                      f"0..255 scale and comes out nearly black; if its scale is 0..1 (highlights above 1), clip it "
                      f"to 1 or save it as 8- or 16-bit {FIRST_ONLY}.")
        scaled = values.astype(np.float64) * (255.0 / top)
        if scaled.min() < -0.5:
            raise UserError(f"Image {path} is a float image with negative pixel values (down to {values.min():g}), "
                            f"which neither 0..1 nor 0..255 gives a meaning; rescale it to one of those ranges.")
    else:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise UserError(f"Image {path} is a 32-bit integer image with values from {low} to {high}, outside the "
                            f"16-bit range 0..65535 this loader maps to 8 bits; save it as an 8- or 16-bit image.")
        if 0 < high <= FAINT_16_BIT_MAX:
            # Cameras and microscopes store 10- or 12-bit data in 16-bit files without scaling it up, and
            # the file does not say so: warn, and keep the rule (a truly dark 16-bit image exists too).
            # Said for the first such file only: a folder of camera frames would otherwise print a line per image.
            warn_once("faint 16-bit", f"a 16-bit image with values up to {high}, so it is read on the 0..65535 scale "
                      f"and comes out nearly black; if it holds 12-bit (0..4095) or 10-bit data, scale it to "
                      f"0..65535 or save it as 8-bit {FIRST_ONLY}.")
        scaled = values.astype(np.float64) / 257.0  # 65535 -> 255 exactly
    grey = np.floor(np.clip(scaled, 0.0, 255.0) + 0.5).astype(np.uint8)
    key = im.info.get("transparency")
    if isinstance(key, (int, float)):
        grey[values == key] = 0  # a transparent grey level, composited on black like every alpha
    return Image.fromarray(grey, "L")


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """Stored uint8 pixels (any shape) -> float32 in [-1, 1], the range every model here sees."""
    return images.float() / 127.5 - 1


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """A (B, 1 or 3, H, W) batch as RGB: greyscale repeated across three channels (a view), colour as it is."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    assert images.dim() == 4, f"expected (B, C, H, W), got {tuple(images.shape)}"
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _to_pil(array_hwc: np.ndarray) -> Image.Image:
    if array_hwc.shape[-1] == 1:
        return Image.fromarray(array_hwc[..., 0], "L")
    return Image.fromarray(array_hwc, "RGB")


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile a batch into one (H, W, C) uint8 array, `nrow` images per row (default: square-ish)."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    ncol = math.ceil(b / nrow)
    grid = np.zeros((ncol * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for k in range(b):
        r, q = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y : y + h, x : x + w] = arr[k]
    return grid


def atomic_save_image(image: Image.Image, path: str | os.PathLike, **kwargs) -> None:
    """Write all or nothing (see core.runtime.atomic_write), so a crash never leaves a half-written picture."""
    path = Path(path)
    image_format = path.suffix.lstrip(".").upper().replace("JPG", "JPEG")
    atomic_write(path, lambda f: image.save(f, format=image_format, **kwargs))


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> None:
    """Save a batch in [-1, 1] as one PNG grid."""
    atomic_save_image(_to_pil(make_grid(images, nrow)), path)


def save_images(images: torch.Tensor, folder: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Save each image of a batch in [-1, 1] as its own PNG, `folder/name`."""
    assert len(names) == images.shape[0], "one name per image"
    folder = Path(folder)
    paths = []
    for array, name in zip(to_uint8(images), names):
        path = folder / name
        atomic_save_image(_to_pil(array), path)
        paths.append(path)
    return paths


def save_gif(frames: Sequence[torch.Tensor], path: str | os.PathLike, nrow: int | None = None,
             duration_ms: int = 60, hold_last_ms: int = 1500) -> None:
    """Animate a sequence of batches (each (B, C, H, W) in [-1, 1]) as a looping GIF of grids."""
    assert len(frames) > 0, "a GIF needs at least one frame"
    pictures = [_to_pil(make_grid(f, nrow)).convert("RGB") for f in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [hold_last_ms]
    atomic_write(path, lambda f: pictures[0].save(f, format="GIF", save_all=True, append_images=pictures[1:],
                                                  duration=durations, loop=0))
