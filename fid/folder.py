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

import functools
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageMode
from torch.utils.data import DataLoader, Dataset

from core.errors import UserError
from data.imageio import list_images, load_image

from . import inception

# pytorch-fid's IMAGE_EXTENSIONS, matched as `*.<ext>` (lower case) in the folder itself.
PYTORCH_FID_EXTENSIONS = ("bmp", "jpeg", "jpg", "pgm", "png", "ppm", "tif", "tiff", "webp")
FILE_SELECTIONS = ("pytorch-fid", "all")


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
    chosen = sorted(p for ext in PYTORCH_FID_EXTENSIONS for p in root.glob(f"*.{ext}") if p.is_file())
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
    try:
        with Image.open(path) as image:
            if ImageMode.getmode(image.mode).typestr in ("|u1", "|b1"):  # 8 or 1 bits per channel
                return image.convert("RGB")
    except Exception as err:
        # Pillow's parsers meet malformed bytes with many exception types (OSError, SyntaxError,
        # struct.error, EOFError, ...); whichever it is, the file is at fault.
        raise UserError(
            f"Cannot read image {path} ({type(err).__name__}: {err}); remove or replace the file."
        ) from err
    return load_image(path, mode="RGB", upright=False)


class ImageFolder(Dataset):
    """The images `list_fid_images(root, files)` selects, each a (3, H, W) float tensor in [0, 1]."""

    def __init__(self, root: str | os.PathLike, files: str = "pytorch-fid") -> None:
        self.root = Path(root)
        self.files = list_fid_images(self.root, files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        array = np.asarray(read_rgb(self.files[index]), dtype=np.uint8)
        # Same conversion as torchvision's ToTensor, which pytorch-fid uses.
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


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


def _inception_size(image: torch.Tensor) -> torch.Tensor:
    return F.interpolate(image, size=(inception.INPUT_SIZE,) * 2, mode="bilinear", align_corners=False)


class FolderBatches:
    """Batches of an ImageFolder in file order, decoded by `num_workers` processes (0: this one).

    A file that cannot be read raises its own one-sentence error here, whichever process read it.
    Raised inside a DataLoader worker, it would reach the user wrapped in that worker's traceback
    ("Caught ValueError in DataLoader worker process 0. Original Traceback ..."), so workers hand it
    back as the batch instead and it is raised on arrival.
    """

    def __init__(self, folder: ImageFolder, batch_size: int, num_workers: int,
                 fit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        # `fit`: how images of mixed sizes are brought to one size (see collate_images); picklable for workers.
        self.loader = DataLoader(_ErrorsAsItems(folder), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                 collate_fn=functools.partial(_collate_or_error, fit=fit), drop_last=False)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.loader:
            if isinstance(batch, Exception):
                raise batch
            yield batch


class _ErrorsAsItems(Dataset):
    """The folder's images, with an error returned as the item rather than raised."""

    def __init__(self, folder: ImageFolder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> torch.Tensor | Exception:
        try:
            return self.folder[index]
        except (ValueError, OSError) as err:  # a file that cannot be read, or that vanished
            return err


def _collate_or_error(items: list[torch.Tensor | Exception],
                      fit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor | Exception:
    errors = [item for item in items if isinstance(item, Exception)]
    return errors[0] if errors else collate_images(items, fit)
