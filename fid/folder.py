"""Batches of images from a folder, in the layout the FID network takes: float (B, 3, H, W) in [0, 1].

Which files are read, and how each becomes RGB, follow pytorch-fid (mseitzer/pytorch-fid,
`fid_score.py`), so that a folder gives the features it gives there:

- Files: by default (`files="pytorch-fid"`) the top-level files matching `*.<ext>` for its
  extensions, listed by pathlib's glob as it lists them (so extensions match case-sensitively except
  on Windows) and sorted. `files="all"` reads every image `data.imageio.list_images` finds instead,
  as training's folder datasets do: subfolders too, any case, GIF included.
- Conversion: `Image.open(path).convert("RGB")`, so an alpha channel is dropped, not composited,
  and a palette's transparent entry keeps its colour. The one exception is greyscale stored with
  more than 8 bits per pixel (16- or 32-bit integer, 32-bit float), which that conversion clips at
  255 (a 16-bit image turns almost white); it is read by `data.imageio.load_image`, which rescales it.
  EXIF orientation is ignored, as there (training's datasets turn photos upright).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageMode
from torch.utils.data import DataLoader, Dataset

from core.cli import ignore_stop_signals, stop_signals_held
from core.errors import UserError
from data.imageio import decode_image, list_images, load_image, naming_the_file, regular_file

from . import inception

# pytorch-fid's IMAGE_EXTENSIONS, matched as `*.<ext>` (lower case) in the folder itself.
PYTORCH_FID_EXTENSIONS = ("bmp", "jpeg", "jpg", "pgm", "png", "ppm", "tif", "tiff", "webp")
FILE_SELECTIONS = ("pytorch-fid", "all")
MIN_IMAGES = 2  # per folder: the fewest a covariance (FID's sigma) can be estimated from


def check_file_selection(files: str) -> None:
    if files not in FILE_SELECTIONS:
        raise UserError(f"files is {files!r} but must be one of {', '.join(map(repr, FILE_SELECTIONS))}.")


def check_folder(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"{path} is not a folder of images; pass an existing image folder.")


def list_fid_images(root: str | os.PathLike, files: str = "pytorch-fid") -> list[Path]:
    """The image files FID reads from `root`, sorted; `files` is "pytorch-fid" or "all" (module docstring).

    With "pytorch-fid", image files it leaves out (in subfolders, with upper-case extensions, GIFs)
    are reported with a warning, or in the error when they are all there is.
    """
    check_file_selection(files)
    root = Path(root)
    check_folder(root)
    if files == "all":
        return _nonempty(root, list_images(root), [])
    # A match that is neither a file nor a folder (a broken link, a pipe) is refused, as training refuses it.
    chosen = sorted(regular_file(p) for ext in PYTORCH_FID_EXTENSIONS for p in root.glob(f"*.{ext}") if not p.is_dir())
    try:
        left_out = sorted(set(list_images(root)) - set(chosen))
    except (ValueError, OSError):
        # Only the advice below needs the full listing: a subfolder that cannot be listed must not
        # stop the files pytorch-fid reads from being read.
        left_out = []
    return _nonempty(root, chosen, left_out)


def _nonempty(root: Path, chosen: list[Path], left_out: list[Path]) -> list[Path]:
    """`chosen`, or an error if it is empty; image files left out are named in the error or a warning."""
    if not chosen and not left_out:
        raise UserError(f"Image folder {root} contains no images; point to a folder of PNG/JPEG files.")
    if not chosen:
        raise UserError(
            f"Image folder {root} contains no images pytorch-fid would read (top-level files ending in "
            f".{', .'.join(PYTORCH_FID_EXTENSIONS)}) but {len(left_out)} others such as "
            f"{left_out[0].relative_to(root)}; pass --files all (files='all' in Python) to read them."
        )
    if left_out:
        warnings.warn(
            f"Leaving out {len(left_out)} image file(s) of {root} that pytorch-fid would not read either (in "
            f"subfolders, upper-case or GIF, such as {left_out[0].relative_to(root)}); pass --files all "
            "(files='all' in Python) to read them.",
            UserWarning, stacklevel=3,
        )
    return chosen


def read_rgb(path: Path) -> Image.Image:
    """The RGB image pytorch-fid reads from `path`, except that wide greyscale is rescaled, not clipped."""
    # Decoded as training decodes (one error naming the file, the same pixel limit and advice), without
    # turning it upright by its EXIF tag, as pytorch-fid reads it.
    with _hidden_file_advice(path), naming_the_file(path):
        with decode_image(path) as image:
            if ImageMode.getmode(image.mode).typestr in ("|u1", "|b1"):  # 8 or 1 bits per channel
                return image.convert("RGB")
    return load_image(path, mode="RGB", upright=False)


@contextlib.contextmanager
def _hidden_file_advice(path: Path) -> Iterator[None]:
    """An unreadable hidden file (macOS's "._a.jpg" copies) is one only pytorch-fid's file selection reads: say so."""
    try:
        yield
    except UserError as err:
        if Path(path).name.startswith(".") and str(err).startswith("Cannot read image"):
            raise UserError(f"{str(err).removesuffix('; remove or replace the file.')}: it is a hidden file, which "
                            f"pytorch-fid's file selection reads; remove it, or pass --files all, which skips hidden "
                            f"files.") from err
        raise


class ImageFolder(Dataset):
    """The images `list_fid_images(root, files)` selects, each a (3, H, W) float tensor in [0, 1] as pytorch-fid
    reads it, or with `decode` (a picklable path -> uint8 (H, W[, C]) array) as that function reads it."""

    def __init__(self, root: str | os.PathLike, files: str = "pytorch-fid",
                 decode: Callable[[Path], np.ndarray] | None = None) -> None:
        self.root = Path(root)
        self.files = list_fid_images(self.root, files)
        self.decode = decode

    def decoded_by(self, decode: Callable[[Path], np.ndarray]) -> "ImageFolder":
        """The same files, read by `decode`."""
        folder = copy.copy(self)
        folder.decode = decode
        return folder

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.decode is not None:
            with _hidden_file_advice(self.files[index]):
                array = self.decode(self.files[index])
            array = array[..., None] if array.ndim == 2 else array  # greyscale: one channel
        else:
            array = np.asarray(read_rgb(self.files[index]), dtype=np.uint8)
        # Same conversion as torchvision's ToTensor, which pytorch-fid uses (in place: one float copy
        # of a large photo, not two).
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def check_enough_images(folder: ImageFolder) -> None:
    """Refuse a folder with fewer images than FID's covariance needs, naming it, before any features are computed."""
    if len(folder) < MIN_IMAGES:
        raise UserError(f"Image folder {folder.root} holds {len(folder)} image(s) but FID needs at least "
                        f"{MIN_IMAGES} per folder to estimate a covariance; add images to it.")


def collate_images(images: list[torch.Tensor],
                   fit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Stack a batch; images of different sizes are first brought to the network input by `fit`
    ((1, C, H, W) -> (1, C, S, S)), by default Inception's bilinear resize to 299x299.

    The network resizes every input to 299x299 with the same bilinear filter, and resizing an
    image to its own size is the identity, so the features do not depend on where it happens.
    """
    if all(image.shape == images[0].shape for image in images):
        return torch.stack(images)
    fit = fit or _inception_size
    return torch.cat([fit(image[None]) for image in images])


def _inception_size(image: torch.Tensor, size: int | None = None) -> torch.Tensor:
    size = inception.INPUT_SIZE if size is None else size
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)


class FolderBatches:
    """Batches of an ImageFolder in file order, decoded by `num_workers` processes (0: this one).

    `fit` brings an image (1, C, H, W) to the network's input (1, C, size, size): by default
    Inception's bilinear resize to `inception.INPUT_SIZE`; for another network give both (picklable,
    for workers). An image with more pixels than size x size is fitted on its own as soon as it is
    decoded, so a batch of photos holds batch_size inputs, not batch_size photos (a 12-megapixel
    photo is 144 MB as floats); the network's own fit then leaves it as it is (see collate_images), so
    the features are those of fitting the batch there. Smaller images are batched as they are
    (brought to one size by `fit` only when their sizes differ) and fitted by the network, on its device.

    A file that cannot be read raises its own one-sentence error here, whichever process read it.
    Raised inside a DataLoader worker, it would reach the user wrapped in that worker's traceback
    ("Caught ValueError in DataLoader worker process 0. Original Traceback ..."), so workers hand it
    back as the batch instead and it is raised on arrival. So are warnings: a worker would print its own,
    beside this process's progress bar (or drop them where this process records its warnings), so they
    come back with the batch and are warned again here, where this process's filters and bar see them.
    """

    def __init__(self, folder: ImageFolder, batch_size: int, num_workers: int,
                 fit: Callable[[torch.Tensor], torch.Tensor] | None = None, size: int | None = None) -> None:
        if fit is None:
            size = inception.INPUT_SIZE if size is None else size
            fit = functools.partial(_inception_size, size=size)  # the size read here, also in worker processes
        assert size is not None, "give the input size that `fit` brings images to"
        self.loader = DataLoader(_ErrorsAsItems(folder, fit, size), batch_size=batch_size, shuffle=False,
                                 num_workers=num_workers, collate_fn=functools.partial(_collate_or_error, fit=fit),
                                 drop_last=False, worker_init_fn=ignore_stop_signals if num_workers else None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[torch.Tensor]:
        with stop_signals_held():  # the workers start here (see `core.cli.stop_signals_held`)
            batches = iter(self.loader)
        try:
            for batch, warned in batches:
                for category, message, once in warned:
                    if once is not None:  # a warning each worker gives once (core.errors.warn_once): shown once
                        if once in _RELAYED:
                            continue
                        _RELAYED.add(once)
                    warnings.warn(message, category, stacklevel=2)
                if isinstance(batch, Exception):
                    raise batch
                yield batch
        finally:
            # The workers stop when their iterator goes. A traceback keeps this frame, and a name in it would keep
            # them running (they ignore SIGTERM), so that Python's exit, which joins them, would wait for ever.
            del batches


_RELAYED: set[str] = set()  # the `once_key`s of workers' warnings this process has shown (core.errors.warn_once)


class _Read(NamedTuple):
    """An image, or a batch, as a worker hands it back: itself or the error that stopped it, and the warnings
    (category, message) raised while it was read."""
    value: torch.Tensor | Exception
    warned: tuple[tuple[type[Warning], str, str | None], ...]  # with the key of one given once per process


class _ErrorsAsItems(Dataset):
    """The folder's images, each with more pixels than size x size fitted to the network input on its
    own; an error is returned as the item rather than raised, and warnings with it (`_Read`)."""

    def __init__(self, folder: ImageFolder, fit: Callable[[torch.Tensor], torch.Tensor], size: int) -> None:
        self.folder, self.fit, self.size = folder, fit, size

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> _Read:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # which are shown is for the filters of the process that warns again
            value = self._read(index)
        return _Read(value, tuple((w.category, str(w.message), getattr(w.message, "once_key", None))
                                  for w in caught))

    def _read(self, index: int) -> torch.Tensor | Exception:
        try:
            image = self.folder[index]
        except (ValueError, OSError) as err:  # a file that cannot be read, or that vanished
            return err
        if image.shape[-2] * image.shape[-1] > self.size ** 2:
            # A copy: a fit that only crops (a classifier's centre square) would return a view that keeps
            # the whole photo alive.
            image = self.fit(image[None])[0].clone()
        return image


def _collate_or_error(items: list[_Read], fit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> _Read:
    errors = [item.value for item in items if isinstance(item.value, Exception)]
    warned = tuple(w for item in items for w in item.warned)
    return _Read(errors[0] if errors else collate_images([item.value for item in items], fit), warned)
