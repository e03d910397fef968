"""`folder:PATH` datasets: a directory of images, optionally in class subfolders, optionally with parameters.

Layout: images directly in PATH are unlabelled; images in PATH/<class>/... are labelled by the index of
<class> among the sorted class names. An optional PATH/params.csv gives numeric parameters per image:
a header, then one row per image, first column the image's path relative to PATH.
Every image is decoded once, converted (RGB, or L for one channel), its short side resized to the
target with antialiased Lanczos and the centre square kept, so mixed modes and sizes all work.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data.dataset import DatasetInfo, ImageDataset, param_ranges, subset_indices
from data.imageio import IMAGE_EXTENSIONS, list_images, load_image

PARAMS_FILE = "params.csv"


def _classes(root: Path, files: list[Path]) -> tuple[tuple[str, ...], list[int]]:
    """Class names (sorted top-level subfolders that hold images) and each file's label; () if unlabelled."""
    tops = [f.relative_to(root).parts for f in files]
    loose = [f for f, parts in zip(files, tops) if len(parts) == 1]
    if len(loose) == len(files):
        return (), [0] * len(files)
    if loose:
        raise ValueError(f"{root} has images both directly inside (e.g. {loose[0].name}) and in subfolders; "
                         f"move them all into class subfolders, or all to the top level for an unlabelled dataset.")
    names = tuple(sorted({parts[0] for parts in tops}))
    index = {name: i for i, name in enumerate(names)}
    return names, [index[parts[0]] for parts in tops]


def _read_params(root: Path, files: list[Path]) -> tuple[tuple[str, ...], torch.Tensor]:
    """Parameter names and values (N, P) for `files` from root/params.csv; no file -> ((), (N, 0))."""
    csv_path = root / PARAMS_FILE
    if not csv_path.is_file():
        return (), torch.zeros(len(files), 0)
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or len(rows[0]) < 2:
        raise ValueError(f"{csv_path} needs a header row 'path,<param1>,...' with at least one parameter column.")
    names = tuple(h.strip() for h in rows[0][1:])
    table: dict[str, list[float]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(names) + 1:
            raise ValueError(f"{csv_path} line {line} has {len(row)} columns but the header has {len(names) + 1}; fix that row.")
        try:
            values = [float(v) for v in row[1:]]
        except ValueError:
            raise ValueError(f"{csv_path} line {line} ({row[0]}) has a non-numeric parameter in {row[1:]}; "
                             f"make every parameter column a number.") from None
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{csv_path} line {line} ({row[0]}) has a NaN or infinite parameter; give finite numbers.")
        table[Path(row[0].strip()).as_posix()] = values
    values = []
    for file in files:
        key = file.relative_to(root).as_posix()
        if key not in table:
            raise ValueError(f"{csv_path} has no row for image {key}; add one (path relative to {root}).")
        values.append(table[key])
    return names, torch.tensor(values, dtype=torch.float32).view(len(files), len(names))


def _square(image: Image.Image, resolution: int) -> np.ndarray:
    """Centre square of `image`, resized to resolution x resolution with antialiased Lanczos -> (H, W[, C])."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    # Crop box in source coordinates, so the resize is one resampling step at sub-pixel precision.
    return np.asarray(image.resize((resolution, resolution), Image.LANCZOS, box=(left, top, left + side, top + side)))


def load_folder(root: str | Path, resolution: int, num_samples: int | None = None, seed: int = 0,
                channels: int | None = None) -> ImageDataset:
    """Decode the folder into memory; channels None -> 3, or 1 if every image is greyscale (R = G = B)."""
    root = Path(root).expanduser().resolve()
    files = list_images(root)
    if not files:
        raise ValueError(f"{root} contains no images ({', '.join(IMAGE_EXTENSIONS)}); point --dataset folder:PATH at a folder of images.")
    class_names, labels = _classes(root, files)
    param_names, params = _read_params(root, files)
    keep = subset_indices(len(files), num_samples, seed, f"folder {root}").tolist()
    files = [files[i] for i in keep]

    mode = "L" if channels == 1 else "RGB"
    decoded = [_square(load_image(f, mode), resolution) for f in tqdm(files, desc=f"Decoding {root.name}", unit="img")]
    images = torch.from_numpy(np.stack(decoded))
    images = images.unsqueeze(1) if mode == "L" else images.permute(0, 3, 1, 2)
    if channels is None and (images[:, :1] == images).all():
        images = images[:, :1]
    images = images.contiguous()
    assert images.shape == (len(files), channels or images.shape[1], resolution, resolution), tuple(images.shape)

    params = params[keep]
    info = DatasetInfo(name=f"folder:{root}", resolution=resolution, channels=images.shape[1],
                       class_names=class_names, param_names=param_names, param_ranges=param_ranges(params),
                       num_samples=len(files))
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64)[keep], params, info)
