"""Writing image datasets to disk: the torchvision ImageFolder layout, a manifest, and a params.csv
that `folder:` reads back, written so that an interrupted job is continued, never repeated.

    DIR/CLASS/NNNNNN.png   one image per item (DIR/NNNNNN.png when items have no class), NNNNNN its index
    DIR/manifest.csv       index, file, and what made each image (seed, class, source file, parameters, ...)
    DIR/params.csv         path,<param>,... when items have numeric parameters (data/folder.py's format)
    DIR/dataset.json       the request that made the folder (everything but its size)

Both `sample.py --dataset-out` (synthetic sets) and `python -m data.export` (real ones) write through
`DatasetWriter`. Every file goes through `core.runtime.atomic_write`, so an image that exists is
complete; rerunning a command skips the images already there and adds the rest, and a larger count
extends the set, because item k is a function of k alone. A folder made by another request is
refused rather than mixed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from core import cli
from core.config import flat_fields
from core.errors import ExistsError, UserError
from core.lock import holds_files
from core.runtime import FIXED_AMP, precision_name, write_csv, write_json
from data.dataset import DatasetInfo
from data.folder import PATH_COLUMN
from data.imageio import list_images, save_images

MANIFEST, PARAMS, REQUEST = "manifest.csv", "params.csv", "dataset.json"
IMAGE_FILE = re.compile(r"\d{6,}\.png")  # an item's image: NNNNNN.png (`Item.file`)
# Entries that sets written before recorded in their request and that are no longer compared: a size (an
# inversion's per_image; a size is never part of a request), and --amp as typed ("auto" means another
# precision on another machine; "precision" records the one it resolved to).
FORMER_ENTRIES = ("per_image", "amp")
# Request entries added since sets were first written: a set whose record lacks one was written before it
# existed and is continued without that check.
LATER_ENTRIES = ("source_fingerprint", "precision")
# The precision an --amp typed into a set written before "precision" resolved to on any machine ("auto": unknown).
FORMER_PRECISION = {amp: precision_name(dtype) for amp, dtype in FIXED_AMP.items()}
AMP_OF_PRECISION = {precision: amp for amp, precision in FORMER_PRECISION.items()}  # the --amp that gives one
FORMAT = "synthdiff-dataset"
# The manifest's own columns. A parameter of the same name (a simulation's "seed", say) is written as
# "param:NAME" there, so that neither overwrites the other; params.csv keeps every parameter's own name.
MANIFEST_COLUMNS = ("index", "file", "seed", "class", "source")


def manifest_column(param: str, own: Iterable[str] = MANIFEST_COLUMNS) -> str:
    """The manifest column of the parameter `param`, in a manifest whose own columns are `own`."""
    return f"param:{param}" if param in own else param


@dataclass(frozen=True)
class Item:
    """One image of a dataset being written."""
    index: int                                              # its number: the file name, and what seeds it
    folder: str = ""                                        # class folder ("" for a flat, unlabelled set)
    params: dict[str, float] = field(default_factory=dict)  # numeric parameters, for params.csv
    record: dict[str, Any] = field(default_factory=dict)    # more manifest columns (seed, class, ...)

    @property
    def file(self) -> str:
        name = f"{self.index:06d}.png"
        return f"{self.folder}/{name}" if self.folder else name

    def row(self) -> dict[str, Any]:
        return {"index": self.index, "file": self.file, **self.record,
                **{manifest_column(k): float32_text(v) for k, v in self.params.items()}}


def float32_text(value: float) -> str:
    """The shortest text that reads back as `value` in float32, the precision every dataset keeps its
    parameters in: 0.1, where the float32 value's own digits would read 0.10000000149011612."""
    return str(np.float32(value))


# ---------------------------------------------------------------------------------------------
# labels from a parameter


@dataclass(frozen=True)
class Binning:
    """Class labels from one numeric parameter: K equal-width bins over [low, high] (a value outside
    falls in the nearest end bin). Class folders are NAME0 .. NAME{K-1}, zero-padded so that they
    sort in the order of the bins."""
    name: str
    bins: int
    low: float
    high: float

    @property
    def edges(self) -> list[float]:
        return [self.low + (self.high - self.low) * k / self.bins for k in range(self.bins + 1)]

    @property
    def class_names(self) -> list[str]:
        width = len(str(self.bins - 1))
        return [f"{self.name}{k:0{width}d}" for k in range(self.bins)]

    def label(self, value: float) -> int:
        position = (value - self.low) / (self.high - self.low) * self.bins
        return min(self.bins - 1, max(0, math.floor(position)))

    def folder(self, value: float) -> str:
        return self.class_names[self.label(value)]

    def describe(self) -> dict[str, Any]:
        return {"parameter": self.name, "edges": self.edges,
                "classes": {c: [a, b] for c, a, b in zip(self.class_names, self.edges, self.edges[1:])}}


# The most bins `--classes NAME:K` cuts a parameter into. Each bin is a class folder that the judge and any classifier
# trained on the set must tell apart, and a set holds hundreds of images (500 by default in the sweep): past a few
# hundred bins most classes hold an image or two. The same bound as a sample grid's columns
# (ddpm.conditioning.MAX_COLUMNS), since a class sweep shows one column per class. Anything past it is a typo: two
# billion bins would take minutes and gigabytes just to name.
MAX_BINS = 256


def binning_option(text: str) -> str:
    """argparse type of --classes NAME:K[:LOW:HIGH]: K is refused beyond `MAX_BINS` as the command line is parsed
    (the rest, K below 2 included, is checked against the data's parameters by `parse_binning`)."""
    cli.text_option(text)
    parts = text.split(":")
    try:
        bins = int(parts[1]) if len(parts) in (2, 4) else None
    except ValueError:
        bins = None  # not a whole number: parse_binning says what the form is
    if bins is not None and bins > MAX_BINS:
        raise argparse.ArgumentTypeError(f"K of {text} is {bins:,} but must be at most {MAX_BINS} (each bin is a "
                                         f"class folder)")
    return text


binning_option.__name__ = "NAME:K[:LOW:HIGH]"  # as argparse names it in "invalid ... value"


def parse_binning(spec: str, info: DatasetInfo, option: str = "--classes") -> Binning:
    """NAME:K (bins over the data's own range of NAME) or NAME:K:LOW:HIGH (over [LOW, HIGH])."""
    parts = spec.split(":")
    if len(parts) not in (2, 4) or parts[0] not in info.param_names:
        raise UserError(f"{option} {spec!r} is not NAME:K or NAME:K:LOW:HIGH with NAME one of "
                        f"{', '.join(info.param_names) or '(this data has no parameters)'}.")
    name = parts[0]
    try:
        bins = int(parts[1])
        low, high = (float(parts[2]), float(parts[3])) if len(parts) == 4 else info.param_ranges[info.param_names.index(name)]
    except ValueError:
        raise UserError(f"{option} {spec!r}: K must be a whole number and LOW, HIGH numbers.") from None
    if not 2 <= bins <= MAX_BINS:
        raise UserError(f"{option} {spec!r}: K must be from 2 to {MAX_BINS} bins.")
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UserError(f"{option} {spec!r}: the range of {name} ({low}, {high}) is empty; give LOW < HIGH, as "
                        f"NAME:K:LOW:HIGH.")
    data_low, data_high = info.param_ranges[info.param_names.index(name)]
    if high <= data_low or low >= data_high:  # every value would land in one edge bin, labelled as it is not
        raise UserError(f"{option} {spec!r}: the bins over [{low:g}, {high:g}] miss the range of {name} in the data "
                        f"[{data_low:g}, {data_high:g}], so every image would fall in one edge bin; give LOW:HIGH "
                        f"that overlap it.")
    binning = Binning(name, bins, float(low), float(high))
    first, last = binning.label(data_low), binning.label(data_high)
    if last - first + 1 < bins:  # bins beyond the data's range: classes without an image
        empty = [c for k, c in enumerate(binning.class_names) if not first <= k <= last]
        raise UserError(f"{option} {spec!r}: the range of {name} in the data [{data_low:g}, {data_high:g}] reaches only "
                        f"{last - first + 1} of the {bins} bins over [{low:g}, {high:g}], so {', '.join(empty)} would "
                        f"hold no image; give LOW:HIGH within that range or fewer bins, the same for every split (a "
                        f"split that must keep another split's edges needs more images, so that its values reach "
                        f"every bin).")
    return binning


# ---------------------------------------------------------------------------------------------
# the writer


def _normal(x: Any) -> Any:
    return json.loads(json.dumps(x))


class DatasetWriter:
    """Writes `Item`s and their images into `root` (see the module docstring). Use inside the caller's
    `core.lock.FolderLock(root)`; `open()` checks the folder before anything is drawn."""

    def __init__(self, root: str | Path, request: dict[str, Any], about: dict[str, Any] | None = None):
        # `request` decides the images (a rerun must repeat it); `about` is recorded but may change
        # (e.g. where the checkpoint lies).
        self.root, self.request, self.about = Path(root), _normal(request), _normal(about or {})
        self.rows: dict[int, dict[str, Any]] = {}

    def open(self, items: Sequence[Item]) -> int:
        """Check that `root` is empty or holds a set made by the same request, and that no class folder of
        `items` (what the request will write) takes the name of one of the set's own files; returns the
        images `root` has."""
        own = {name.casefold(): name for name in (MANIFEST, PARAMS, REQUEST)}  # (case-insensitive file systems too)
        reserved = sorted(folder for folder in {item.folder for item in items} if folder.casefold() in own)
        if reserved:
            raise UserError(f"A class named {reserved[0]!r} would be a folder where the set's own "
                            f"{own[reserved[0].casefold()]} belongs; rename that class folder of the data the classes "
                            f"come from.")
        self.check_early(every_entry=True)
        made_by = self.root / REQUEST
        if made_by.is_file():
            self.rows = _read_manifest(self.root / MANIFEST, self.request.get("param_names", []))
        else:
            write_json({"format": FORMAT, "request": self.request, "about": self.about}, made_by)
        # Images written after the last manifest update (a kill between the two) are complete too.
        return sum(1 for _ in self.root.rglob("*.png"))

    def check_early(self, every_entry: bool = False) -> None:
        """Refuse a `root` that is a file, holds files not of a set, or holds a set made with other values of this
        writer's request entries. A caller that knows only part of the request yet (a dataset not read) checks
        that part before the work; `open` checks every entry, also those only the folder's request has."""
        if self.root.exists() and not self.root.is_dir():
            raise ExistsError(f"{self.root} is a file; choose a folder for the dataset.")
        if (self.root / REQUEST).is_file():
            differ = self.differences(only=None if every_entry else flat_fields(self.request))
            if differ:
                raise UserError(f"{self.root} holds a dataset made with other options ({differ}); rerun with those "
                                f"options to continue it, or choose another folder.")
        elif holds_files(self.root):
            raise ExistsError(f"{self.root} already holds files that are not a dataset of ours; choose an empty or "
                              f"new folder.")

    def differences(self, only: Iterable[str] | None = None, ignore: Iterable[str] = ()) -> str:
        """How the request recorded in `root` differs from this one ("" where it is the same, or none is there),
        in the entries (flattened names) `only` lists, or in all but those `ignore` lists."""
        made_by = self.root / REQUEST
        if not made_by.is_file():
            return ""
        before, now = flat_fields(_read_request(made_by)), flat_fields(self.request)
        if "precision" not in before and before.get("amp") in FORMER_PRECISION:  # --amp as typed names its precision
            before["precision"] = FORMER_PRECISION[before["amp"]]
        differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and (only is None or k in only)
                        and k not in ignore and k not in FORMER_ENTRIES
                        and not (k in LATER_ENTRIES and k not in before))
        return "; ".join(f"{k} {_shown(before.get(k))} there, {_shown(now.get(k))} now"
                         + (f" (--amp {AMP_OF_PRECISION[before[k]]})" if k == "precision" and before.get(k)
                            in AMP_OF_PRECISION else "") for k in differ[:4])

    def pending(self, items: Sequence[Item]) -> list[Item]:
        """The items whose image is not on disk yet. Images on disk beyond `items` (an earlier run asked for
        more) are kept, never deleted, and said so in one line: the folder then holds more than was asked."""
        wanted = {item.index for item in items}
        known = {row["file"] for row in self.rows.values()} | {item.file for item in items}
        unlisted = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*.png")
                          if IMAGE_FILE.fullmatch(p.name) and p.relative_to(self.root).as_posix() not in known)
        folders = {Path(file).parent for file in known}
        strays = [file for file in unlisted if Path(file).parent not in folders]
        if strays:
            raise UserError(f"{self.root} holds {len(strays)} image(s) in folders that are no class of this set (such "
                            f"as {strays[0]}); move them out of {self.root} and run again.")
        if unlisted:  # a kill between an image and the manifest's update, or a deleted manifest, in a set made larger
            raise UserError(f"{self.root} holds {len(unlisted)} image(s) its manifest does not list (such as "
                            f"{unlisted[0]}), written by a run that asked for more images than this one (stopped "
                            f"before it listed them, or listed in a manifest since deleted); run that larger request "
                            f"again to finish and record them, or delete those images.")
        beyond = sorted(k for k in self.rows if k not in wanted)
        if beyond:
            print(f"{self.root} already holds {len(beyond)} images beyond the {len(items)} asked for (from an earlier "
                  f"run that asked for more); they are kept, so the set has {len(wanted) + len(beyond)} images. "
                  f"Write to a new folder for a set of exactly {len(items)}.", flush=True)
        in_the_way = next((item.file for item in items if (self.root / item.file).is_dir()), None)
        if in_the_way is not None:
            raise UserError(f"{self.root / in_the_way} is a folder where an image of this set belongs; move it out of "
                            f"{self.root} and run again.")
        foreign = [p.relative_to(self.root).as_posix() for p in list_images(self.root)
                   if not IMAGE_FILE.fullmatch(p.name)]
        if foreign:  # read as images of the set by whatever loads it next (`folder:`, FID)
            raise UserError(f"{self.root} holds {len(foreign)} image(s) that are not of this set (such as "
                            f"{foreign[0]}); move them out of {self.root} and run again.")
        self._redraw_damaged(items)
        return [item for item in items if not (self.root / item.file).is_file()]

    def _redraw_damaged(self, items: Sequence[Item]) -> None:
        """Remove the images of `items` on disk that are no longer whole PNGs (cut short, overwritten with other
        bytes), said in one line, so that they are drawn again: item k is a function of k alone, so the new
        image is the one that was lost. (Checked by Pillow's `verify`, which reads every chunk and its checksum
        without decoding; a whole PNG written over one of ours is not noticed.)"""
        damaged = []
        for item in items:
            path = self.root / item.file
            if not path.is_file():
                continue
            try:
                with Image.open(path) as image:
                    if image.format != "PNG":
                        raise ValueError(f"a {image.format} file")
                    image.verify()
            except Exception:  # (Pillow raises many types for damaged bytes: the file is at fault whichever)
                damaged.append(path)
        if damaged:
            print(f"{len(damaged)} image(s) of {self.root} are damaged (such as {damaged[0].relative_to(self.root)}); "
                  f"they are drawn again.", flush=True)
            for path in damaged:
                path.unlink()

    def write(self, items: Sequence[Item], images: torch.Tensor, every_item: Sequence[Item] = ()) -> None:
        """Save `images` (B, C, H, W) in [-1, 1] as `items`, then the manifest and params.csv of every
        image on disk; `every_item` lists the items of this request, so images that an interrupted run
        wrote before it could update the manifest are recorded too."""
        assert len(items) == images.shape[0], f"{len(items)} items for {images.shape[0]} images"
        for item in items:
            (self.root / item.file).parent.mkdir(parents=True, exist_ok=True)
        save_images(images, self.root, [item.file for item in items])
        for item in (*every_item, *items):
            if (self.root / item.file).is_file():
                self.rows[item.index] = {k: str(v) for k, v in item.row().items()}
        self._write_tables()

    def _write_tables(self) -> None:
        rows = [self.rows[k] for k in sorted(self.rows)]
        write_csv(rows, self.root / MANIFEST)
        names = list(self.request.get("param_names", []))
        if names:
            write_csv([{PATH_COLUMN: r["file"], **{n: r[manifest_column(n)] for n in names}} for r in rows],
                      self.root / PARAMS, fields=[PATH_COLUMN, *names])


def _shown(value: Any) -> str:
    """A recorded value as a message shows it: JSON, cut short if long; "(none)" where it is absent."""
    text = "(none)" if value is None else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_request(path: Path) -> dict[str, Any]:
    """The request a dataset.json records, refused unless it is one this toolkit wrote."""
    try:
        saved = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError:  # not UTF-8, or not JSON
        saved = None
    if not (isinstance(saved, dict) and saved.get("format") == FORMAT and isinstance(saved.get("request"), dict)):
        raise UserError(f"{path} is not a dataset description written by this toolkit (a JSON record with "
                        f"\"format\": \"{FORMAT}\" and a \"request\" record); choose another folder, or restore "
                        f"that file.")
    return saved["request"]


def _read_manifest(path: Path, param_names: Sequence[str]) -> dict[int, dict[str, str]]:
    """The rows of a manifest.csv by index (none if there is no file yet), each checked: an index, the file
    that index is written to, and a value for every parameter of the request."""
    if not path.is_file():
        return {}
    # The manifest is a record of the images on disk, so the advice for a damaged one is to rebuild it.
    rebuild = f"delete {path.name} and run the same command again, which rebuilds it from the images on disk"
    try:
        reader = csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8"), newline=""))
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error):
        raise UserError(f"{path} is not a CSV table of UTF-8 text; {rebuild}.") from None
    columns = ["index", "file", *map(manifest_column, param_names)]
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{path} has no column {', '.join(missing)}; {rebuild}.")
    table: dict[int, dict[str, str]] = {}
    for line, row in enumerate(rows, start=2):
        if None in row or None in row.values():  # more cells than the header names, or fewer
            raise UserError(f"{path} line {line} does not have one cell per column of the header; {rebuild}.")
        index = row["index"].strip()
        if not (index.isascii() and index.isdigit()) or Path(row["file"]).name != f"{int(index):06d}.png":
            raise UserError(f"{path} line {line} names image {row['index']!r} as {row['file']!r}, not an index "
                            f"and its file NNNNNN.png; {rebuild}.")
        if not all(_is_number(row[manifest_column(name)]) for name in param_names):
            raise UserError(f"{path} line {line} has a parameter ({', '.join(param_names)}) that is not a number; "
                            f"{rebuild}.")
        if int(index) in table:
            raise UserError(f"{path} lists image {int(index)} twice; {rebuild}.")
        table[int(index)] = row
    return table


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
