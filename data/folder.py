"""`folder:PATH` datasets: a directory of images, optionally in class subfolders, optionally with parameters.

Layout: images directly in PATH are unlabelled; images in PATH/<class>/... are labelled by the index of
<class> among the sorted class names, taken in Unicode NFC (macOS writes names decomposed, NFD);
hidden files and folders (".name") and the folders of `data.imageio.SYSTEM_FOLDERS` (a NAS's thumbnails,
recycle bins) are not part of the dataset.
An optional PATH/params.csv (UTF-8) gives numeric parameters per image: a header, then one row per
image, first column the image's path relative to PATH, matched in NFC too (`_read_params` lists what
it refuses).
Every image is decoded once, converted (RGB, or L for one channel; `data.imageio.load_image` says how
each pixel mode converts and what it refuses), its short side resized to the target with antialiased
Lanczos and the centre square kept, so mixed modes and sizes all work; images smaller than the target,
and strips, are loaded with a warning for the folder (`warn_enlarged_or_cropped`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from core.cli import launched_rank
from core.errors import UserError, warn_once
from core.progress import progress
from data.dataset import DatasetInfo, ImageDataset, fingerprints_kept, param_ranges, subset_indices
from data.imageio import IMAGE_EXTENSIONS, is_skipped_folder, list_images, load_image, max_image_pixels, nfc

PARAMS_FILE = "params.csv"
# The image column of the params.csv files the dataset writers make (data/writer.py): no parameter may take its name.
PATH_COLUMN = "path"


# Top-level folder names that name a split of a dataset rather than a class (compared in lower case).
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing")


def _classes(root: Path, files: list[Path]) -> tuple[tuple[str, ...], list[int]]:
    """Class names (sorted top-level subfolders that hold images, in NFC) and each file's label; () if unlabelled.

    Names are NFC-normalised, so that a folder copied from macOS (NFD) gives the same class names as
    one written elsewhere; two folders whose names differ only in normalisation are one class. Class
    folders named like splits (train, val, ...) that hold subfolders are warned about: that is a root
    of splits, which would train on the split names as labels.
    """
    tops = [f.relative_to(root).parts for f in files]
    loose = [f for f, parts in zip(files, tops) if len(parts) == 1]
    if len(loose) == len(files):
        return (), [0] * len(files)
    if loose:
        raise UserError(f"{root} has images both directly inside (e.g. {loose[0].name}) and in subfolders; "
                        f"move them all into class subfolders, or all to the top level for an unlabelled dataset.")
    splits = sorted({parts[0] for parts in tops if len(parts) > 2 and parts[0].lower() in SPLIT_NAMES})
    if splits:
        train = next((s for s in splits if s.lower() in SPLIT_NAMES[:2]), "train")
        # A validation split rather than a test split, where there are both.
        held_out = min((s for s in splits if s.lower() not in SPLIT_NAMES[:2]), default="val",
                       key=lambda s: SPLIT_NAMES.index(s.lower()))
        warnings.warn(f"{root} has class folders named {', '.join(splits)} that hold subfolders, so the split "
                      f"names become the labels; to learn the classes inside, point --dataset at folder:{root / train} "
                      f"and --test-dataset at folder:{root / held_out}.")
    names = tuple(sorted({nfc(parts[0]) for parts in tops}))
    warn_imageless_folders(root, names)
    index = {name: i for i, name in enumerate(names)}
    return names, [index[nfc(parts[0])] for parts in tops]


def warn_imageless_folders(root: Path, class_names: Sequence[str]) -> None:
    """Warn (once) about subfolders of a labelled folder that give no class: empty ones, or links to a
    folder already read, whose images belong to the class of the folder they were read in."""
    extra = sorted(d.name for d in root.iterdir()
                   if not is_skipped_folder(d.name) and d.is_dir() and nfc(d.name) not in class_names)
    if extra:
        warn_once(f"{len(extra)} subfolder(s) of {root} hold no images of their own (such as {extra[0]}: empty, or a "
                  f"link to a folder read once already), so they give no class ({len(class_names)} other subfolders do).")


def _read_params(root: Path, files: list[Path]) -> tuple[tuple[str, ...], torch.Tensor]:
    """Parameter names and values (N, P) for `files` from root/params.csv; no file -> ((), (N, 0)).

    Refused, naming the file and line: text that is not UTF-8 (a UTF-8 byte-order mark is fine), a
    header with no parameter column or with an empty or repeated name or a parameter named "path", a
    row with the wrong number of columns, an empty path, or a value that is not a finite number within
    float32's range, an image listed twice, an image with no row, and two images whose paths are equal
    in NFC. Paths match in NFC, so a row typed "é" finds a file macOS stored as "e" + a combining
    accent (the file is still opened by its real name). Rows that are empty or all blank cells are
    skipped. Rows for images that are not in the folder are ignored with a warning, so that removing a
    bad image does not also mean editing the table.
    """
    csv_path = root / PARAMS_FILE
    if not csv_path.is_file():
        return (), torch.zeros(len(files), 0)
    rows = _csv_rows(csv_path)
    names = _param_names(csv_path, rows)
    largest = torch.finfo(torch.float32).max
    keys = [nfc(file.relative_to(root).as_posix()) for file in files]  # files are opened by their real names
    present = set(keys)
    table: dict[str, tuple[int, list[float]]] = {}
    for line, row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue  # spreadsheets end their exports with rows like ",,"
        if len(row) != len(names) + 1:
            raise UserError(f"{csv_path} line {line} has {len(row)} columns but the header has {len(names) + 1}; fix that row.")
        if not row[0].strip():
            raise UserError(f"{csv_path} line {line} has an empty image path; give the image's path relative to {root}.")
        try:
            values = [float(v) for v in row[1:]]
        except ValueError:
            raise UserError(f"{csv_path} line {line} ({row[0]}) has a non-numeric parameter in {row[1:]}; "
                            f"make every parameter column a number.") from None
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"{csv_path} line {line} ({row[0]}) has a NaN or infinite parameter; give finite numbers.")
        if any(abs(v) > largest for v in values):
            raise UserError(f"{csv_path} line {line} ({row[0]}) has a parameter beyond float32's range "
                            f"(+-{largest:.3g}); rescale that parameter.")
        # One spelling per image: "./a.png", "a.png" and a Windows "sub\a.png" all name the same file.
        # NFC, as the file keys: a name typed on one system matches the same name stored by macOS (NFD).
        # Spaces around the cell are dropped ("a.png , 1"), unless the cell as written names an image: a
        # folder or file whose name starts with a space is matched by its exact (quoted) path.
        key = nfc(Path(row[0].replace("\\", "/")).as_posix())
        if key not in present:
            key = nfc(Path(row[0].strip().replace("\\", "/")).as_posix())
        if key in table:
            raise UserError(f"{csv_path} lines {table[key][0]} and {line} both give parameters for {key}; keep one of them.")
        table[key] = (line, values)

    if len(set(keys)) < len(keys):
        seen: set[str] = set()
        twin = next(key for key in keys if key in seen or seen.add(key))
        raise UserError(f"{root} holds two images named {twin} that differ only in how their accented letters are "
                        f"encoded (Unicode normalisation), so {csv_path} cannot tell them apart; rename one of them.")
    for key in keys:
        if key not in table:
            raise UserError(f"{csv_path} has no row for image {key}; add one (path relative to {root}).")
    unused = sorted(line for key, (line, _) in table.items() if key not in present)
    if unused:
        warnings.warn(f"{csv_path} has {len(unused)} row(s) for images that are not in {root} (lines "
                      f"{', '.join(map(str, unused[:5]))}{', ...' if len(unused) > 5 else ''}); they are ignored.")
    values = [table[key][1] for key in keys]
    return names, torch.tensor(values, dtype=torch.float32).view(len(files), len(names))


def param_names(root: Path) -> tuple[str, ...]:
    """The parameter names of root/params.csv (its header, checked as `load_folder` checks it; () without the
    file), read without decoding an image, so that commands can refuse a folder before doing so."""
    csv_path = root / PARAMS_FILE
    return _param_names(csv_path, _csv_rows(csv_path)) if csv_path.is_file() else ()


def _param_names(csv_path: Path, rows: list[tuple[int, list[str]]]) -> tuple[str, ...]:
    """The parameter names of a params.csv's header row (the first of `rows`), refused where that row is unusable."""
    if not rows or len(rows[0][1]) < 2:
        raise UserError(f"{csv_path} needs a header row 'path,<param1>,...' with at least one parameter column.")
    header_line, header = rows[0]
    names = tuple(h.strip() for h in header[1:])
    if Path(header[0].strip()).suffix.lower() in IMAGE_EXTENSIONS:
        raise UserError(f"{csv_path} starts with a row for an image ({header[0].strip()}) where its header belongs; add "
                        f"a first line 'path,<param1>,...' that names the columns.")
    for column, name in enumerate(names, start=2):
        if not name:
            raise UserError(f"{csv_path} line {header_line}: column {column} of the header has no name; name every "
                            f"parameter column.")
        if name == PATH_COLUMN:  # a dataset written from this folder would put the parameter where its paths go
            raise UserError(f"{csv_path} line {header_line}: column {column} of the header names a parameter "
                            f"{name!r}, the name of the image column in the params.csv of datasets written from this "
                            f"folder; rename that parameter.")
        first = names.index(name) + 2
        if first != column:
            raise UserError(f"{csv_path} line {header_line}: the header names parameter {name!r} in columns {first} "
                            f"and {column}; give each column its own name.")
    return names


def _csv_rows(csv_path: Path) -> list[tuple[int, list[str]]]:
    """The rows of a UTF-8 CSV file, each with the line it starts on (a quoted cell can span lines)."""
    raw = csv_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # "-sig": spreadsheets often start UTF-8 files with a byte-order mark
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise UserError(f"{csv_path} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save it as UTF-8 "
                        f"(\"CSV UTF-8\" in a spreadsheet).") from None
    if "\x00" in text:  # UTF-16 without a byte-order mark decodes as UTF-8 but puts a NUL in every character
        line = text[:text.index("\x00")].count("\n") + 1
        raise UserError(f"{csv_path} has NUL bytes (from line {line}), as UTF-16 text does; save it as UTF-8.")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, start = [], 1
    try:
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as err:
        raise UserError(f"{csv_path} line {reader.line_num} is not valid CSV ({err}); fix that row.") from None
    return rows


def decode_square(path: Path, resolution: int, mode: str) -> np.ndarray:
    """The image file as training reads it: decoded upright in `mode` ("RGB" or "L", see `load_image`), its
    centre square resized to resolution x resolution -> uint8 (H, W[, C])."""
    return _decoded(path, resolution, mode)[0]


class _Decoded(dict):
    """Within `decoding_once`: (path, resolution, mode, size, mtime) -> (decode_square's array, the image's own
    size), and how many bytes the arrays take."""
    nbytes = 0


_DECODED: _Decoded | None = None
DECODED_BYTES_KEPT = 4 * 2**30  # at most this many bytes of decoded images are kept; later ones are decoded each time


@contextlib.contextmanager
def decoding_once() -> Iterator[None]:
    """Within the body, an image file is decoded once at each size and mode, however often it is loaded: for a
    command that trains many runs on the same folders in one process (`evaluate.experiment`, `evaluate.sweep`:
    each row's seeds, the real row's checks, the measures), which decoded each folder once per run. A file is
    known by its path, size and modification time, so one rewritten meanwhile is decoded again; the images are
    kept (uint8, at the training size) until the body ends, up to `DECODED_BYTES_KEPT`."""
    global _DECODED
    outer = _DECODED
    _DECODED = _Decoded() if outer is None else outer
    try:
        with fingerprints_kept():  # (and each set of kept images is hashed once: `load_folder`)
            yield
    finally:
        _DECODED = outer


def _decoded(path: Path, resolution: int, mode: str) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode_square`'s array of `path` and the image's own (width, height), decoded once within `decoding_once`
    (kept arrays are shared, and read-only: callers copy them before changing them, as `np.stack` does)."""
    kept, key = _DECODED, None
    if kept is not None:
        status = path.stat()
        key = (path, resolution, mode, status.st_size, status.st_mtime_ns)
        if key in kept:
            return kept[key]
    image = load_image(path, mode)
    square = _square(image, resolution)
    if kept is not None and kept.nbytes + square.nbytes <= DECODED_BYTES_KEPT:
        square.setflags(write=False)  # shared from now on: a change would reach every later load
        kept[key] = square, image.size
        kept.nbytes += square.nbytes
    return square, image.size


def _square(image: Image.Image, resolution: int) -> np.ndarray:
    """Centre square of `image`, resized to resolution x resolution with antialiased Lanczos -> (H, W[, C])."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    # Crop box in source coordinates, so the resize is one resampling step at sub-pixel precision.
    return np.asarray(image.resize((resolution, resolution), Image.LANCZOS, box=(left, top, left + side, top + side)))


# An image whose long side is more than this many times its short side keeps under 1/this of itself in the centre
# square it is cut to: a strip (a spectrogram, a scanned line of text, a panorama) more than a picture of a subject.
STRIP_ASPECT = 4


def warn_enlarged_or_cropped(root: Path, files: Sequence[Path], sizes: Sequence[tuple[int, int]], resolution: int
                             ) -> None:
    """Warn, once for the folder, about images (`files`, of (width, height) `sizes`) that `_square` enlarges,
    their short side being under `resolution` (blurred: the detail is not there), and about strips, whose centre
    square keeps under 1/`STRIP_ASPECT` of them. Neither is refused: a folder of mixed sizes trains."""
    def named(k: int) -> str:
        return f"{files[k].relative_to(root).as_posix()}, {sizes[k][0]}x{sizes[k][1]}"

    small = [k for k, (w, h) in enumerate(sizes) if min(w, h) < resolution]
    if small:
        smallest = min(small, key=lambda k: (min(sizes[k]), k))
        side = min(sizes[smallest])
        none = f" (at {side} px none is)" if side >= 8 else ""  # (no resolution is below 8 px)
        warnings.warn(f"{len(small)} of the {len(files)} images of {root} have a short side under the {resolution} px "
                      f"they are resized to (the smallest: {named(smallest)}), so they are enlarged and come out "
                      f"blurred; pass a smaller --resolution{none}, or remove them.")
    strips = [k for k, (w, h) in enumerate(sizes) if max(w, h) > STRIP_ASPECT * min(w, h)]
    if strips:
        longest = max(strips, key=lambda k: (max(sizes[k]) / min(sizes[k]), -k))
        part = f"{max(sizes[longest]) / min(sizes[longest]):.1f}".removesuffix(".0")
        warnings.warn(f"{len(strips)} of the {len(files)} images of {root} have a long side over {STRIP_ASPECT} times "
                      f"their short side (the longest: {named(longest)}), so the centre square they are cut to keeps "
                      f"little of them (1/{part} of that one); crop them to the part that matters, or remove them.")


def _unusable_images(root: Path, unusable: list[tuple[Path, UserError]]) -> UserError:
    """The error for the images of `root` that could not be decoded: the file's own for one; for several, their
    names and the first one's error, so that a folder of 50,000 photos with ten damaged ones is decoded once, not
    ten times."""
    if len(unusable) == 1:
        return unusable[0][1]
    names = [file.relative_to(root).as_posix() for file, _ in unusable]
    listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return UserError(f"{len(names)} images of {root} cannot be used ({listed}); fix or remove each of them, as this "
                     f"says of the first: {unusable[0][1]}")


def load_folder(root: str | Path, resolution: int, num_samples: int | None = None, seed: int = 0,
                channels: int | None = None) -> ImageDataset:
    """Decode the folder into memory; channels None -> 3, or 1 if every image is greyscale (R = G = B)."""
    root = Path(root).expanduser().resolve()
    files = list_images(root)
    if not files:
        # No option named: --dataset, --images, --real and data.export's SPEC all come here.
        raise UserError(f"{root} contains no images ({', '.join(IMAGE_EXTENSIONS[:8])}, ...); put images in it, or "
                        f"name a folder that holds some.")
    class_names, labels = _classes(root, files)
    param_names, params = _read_params(root, files)
    keep = subset_indices(len(files), num_samples, seed, f"folder {root}").tolist()
    files = [files[i] for i in keep]

    mode = "L" if channels == 1 else "RGB"
    max_image_pixels()  # a bad limit in the environment is refused once, not as the fault of every image
    decoded, sizes, unusable = [], [], []
    for file in progress(files, desc=f"Decoding {root.name}", unit="img", disable=launched_rank() > 0):
        try:
            square, size = _decoded(file, resolution, mode)
            decoded.append(square)
            sizes.append(size)
        except UserError as err:  # a damaged file: go on, so that one run names every file to remove
            unusable.append((file, err))
    if unusable:
        raise _unusable_images(root, unusable)
    warn_enlarged_or_cropped(root, files, sizes, resolution)
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
    # Kept decoded arrays are the same read-only objects at every load within `decoding_once`, so a set made of
    # them, with the same labels and parameters, holds the same items: hashed once (`ImageDataset.fingerprint`).
    labels = torch.tensor(labels, dtype=torch.int64)[keep]
    kept = _DECODED is not None and not any(square.flags.writeable for square in decoded)
    key = (info, tuple(map(id, decoded)), labels.numpy().tobytes(), params.numpy().tobytes()) if kept else None
    return ImageDataset(images, labels, params, info, files=tuple(f.relative_to(root).as_posix() for f in files),
                        content_key=key)
