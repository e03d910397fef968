"""Datasets: images in [-1, 1] with labels and/or numeric parameters, chosen by a spec string.

    "plumes"       procedural smoke plumes (built in, offline), parameters ("wind", "temperature")
    "folder:PATH"  a folder of images; class subfolders become labels, PATH/params.csv gives parameters
    "cifar10"      CIFAR-10 through torchvision, ten classes
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

from core import cli
from core.errors import MissingFileError, UserError

if cli.started_as("data.export"):  # a stop while data.dataset imports torch is one line (see core.cli)
    cli.catch_early_sigterm()

from core.config import absolute_spec, folder_of  # noqa: E402 (configs record their folders absolute)
from data.dataset import Batch, DatasetInfo, ImageDataset, grey_as_rgb, shared_images, subset_indices  # noqa: E402

SPECS = ("plumes", "folder:PATH", "cifar10")

__all__ = ["Batch", "DatasetInfo", "ImageDataset", "SPECS", "absolute_spec", "dataset_size", "grey_as_rgb",
           "label_counts", "load_dataset", "shared_images", "trained_datasets"]


def check_spec(spec: str, option: str = "--dataset") -> None:
    """Refuse a dataset spec that names no known source, or a folder that does not exist, before any work."""
    if not spec:
        raise UserError(f"No dataset was given (this preset has none); pass {option} folder:PATH, plumes or cifar10.")
    if spec in ("plumes", "cifar10"):
        return
    folder = folder_of(spec)
    if folder is not None:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{option} {spec}: {folder} is a file, not a folder; pass a directory of images.")
        if not folder.is_dir():
            raise MissingFileError(f"{option} {spec}: the folder {folder} does not exist; pass a directory of images.")
        return
    raise UserError(f"Unknown {option} {spec!r}; choose one of {', '.join(SPECS)}.")


def fetch_missing(spec: str, option: str, *, cache_dir: str | Path = ".cache/datasets", train: bool = True) -> None:
    """Download the split of a built-in dataset `spec` (named by `option`) that `load_dataset(spec, ...,
    train=train)` will read, where it is not in `cache_dir` yet (cifar10; plumes are made, folders listed), so
    that a run refuses to start without it, rather than after loading its other datasets."""
    if spec != "cifar10":
        return
    from data.cifar import fetch_split
    try:
        fetch_split(cache_dir, train)
    except MissingFileError as err:
        raise MissingFileError(f"{option} cifar10: {err}") from None


def check_output_outside(output: str | Path, option: str, inputs: dict[str, str]) -> None:
    """Refuse, before any work, an output folder (named by `option`) that is, or lies inside, an image folder the
    command reads (`inputs`: option -> dataset spec): what it writes there would be read as images of that
    folder by every later command (and by this one, where it reads the folder again)."""
    from data.imageio import is_skipped_folder
    output = Path(output).expanduser().resolve()
    for name, spec in inputs.items():
        folder = folder_of(spec or "")
        if folder is not None:
            folder = folder.resolve()
            if output == folder or (folder in output.parents
                                    # (a hidden or system folder inside it is never read: data.imageio.list_images)
                                    and not any(map(is_skipped_folder, output.relative_to(folder).parts))):
                where = "is" if output == folder else "lies inside"
                raise UserError(f"{option} {output} {where} the image folder of {name} ({folder}), so what is "
                                f"written there would be read as images of it; choose a {option} outside it.")
    from data.writer import REQUEST  # (data.writer imports this package)
    for folder in output.parents:  # a dataset this toolkit wrote, which any command may read later
        if (folder / REQUEST).is_file() and not any(map(is_skipped_folder, output.relative_to(folder).parts)):
            raise UserError(f"{option} {output} lies inside the dataset {folder} (it holds {REQUEST}), so what is "
                            f"written there would be read as images of that dataset; choose a {option} outside it.")


def config_datasets(config: dict[str, Any]) -> dict[str, str]:
    """The datasets a run's config (its `to_dict`, as saved) names: "--dataset" -> spec, and so on for every
    `*dataset` field of any section, for `check_output_outside`. A relative folder (as other stages record
    --dataset, and as classifier checkpoints older than `absolute_spec` recorded every set) is taken from the
    current directory, as the run's command presumably was."""
    from core.config import flat_fields, option_name
    return {option_name(key): value for key, value in flat_fields(config).items()
            if key.endswith("dataset") and isinstance(value, str) and value}


def trained_datasets(payload: dict[str, Any]) -> dict[str, str]:
    """The datasets of a checkpoint's run, by option (for `check_output_outside`): as its config names them, and
    the training folders as their loader resolved them (absolute, wherever the command ran from). A classifier
    trained on two sets records each (its data_info's "parts": --dataset's, then --extra-dataset's), and names
    the union "NAME+NAME", which is no folder."""
    datasets = config_datasets(payload.get("config", {}))
    info = payload.get("data_info") or {}
    parts = info.get("parts") if isinstance(info.get("parts"), list) else [info]
    for option, part in zip(("--dataset", "--extra-dataset"), parts):
        trained = str(part.get("name", "")) if isinstance(part, dict) else ""
        if trained.startswith("folder:"):
            datasets[option] = trained
    return datasets


def label_counts(spec: str) -> tuple[int, bool]:
    """(number of classes, whether it has per-image parameters) of the dataset `spec` names, found
    without decoding an image (a folder is only listed), so that options needing labels are refused
    before plumes are simulated or a folder is decoded. `load_dataset` is the authority on the rest."""
    if spec == "plumes":
        return 0, True
    if spec == "cifar10":
        return 10, False
    from data.folder import PARAMS_FILE
    return len(folder_classes(spec)), (folder_of(spec) / PARAMS_FILE).is_file()


def dataset_size(spec: str, *, cache_dir: str | Path = ".cache/datasets", train: bool = True) -> int:
    """How many images `load_dataset(spec, ..., train=train)` gives without `num_samples`, found without
    decoding, resizing or simulating one (a folder is only listed), so that a caller who wants at most N of
    them can ask for just those."""
    if spec == "plumes":
        from data.plumes import DEFAULT_NUM_SAMPLES
        return DEFAULT_NUM_SAMPLES
    if spec == "cifar10":
        from data.cifar import split_size
        return split_size(cache_dir, train)
    folder = folder_of(spec)
    if folder is None:
        raise UserError(f"Unknown dataset {spec!r}; choose one of {', '.join(SPECS)}.")
    from data.imageio import list_images
    return len(list_images(folder.resolve()))


class FolderLabels(NamedTuple):
    """The labels a folder gives its images, as listing it and reading its params.csv header tell them."""
    class_names: tuple[str, ...]
    param_names: tuple[str, ...]


def folder_labels(spec: str) -> FolderLabels:
    """The class and parameter names of the folder `spec` (folder:PATH), found without decoding an image."""
    from data.folder import param_names
    return FolderLabels(folder_classes(spec), param_names(folder_of(spec)))


def folder_classes(spec: str) -> tuple[str, ...]:
    """The class names the folder `spec` (folder:PATH) gives its images, found by listing it: its subfolders
    that hold images, sorted, in NFC (as `load_dataset` names them); () for a folder without classes."""
    from data.folder import nfc, warn_imageless_folders
    from data.imageio import list_images
    root = folder_of(spec)
    names = tuple(sorted({nfc(f.relative_to(root).parts[0]) for f in list_images(root)
                          if len(f.relative_to(root).parts) > 1}))
    if names:
        warn_imageless_folders(root, names)
    return names


def check_same_classes(spec: str, option: str, reference: str, reference_option: str) -> None:
    """Refuse, by listing both folders, a folder `spec` whose classes differ from those of the folder
    `reference` (the message of `classify.stage.same_targets`, which checks the decoded sets); either not a
    folder: nothing to check here."""
    folder = folder_of(spec)
    if folder is None or folder_of(reference) is None:
        return
    ours, theirs = folder_classes(spec), folder_classes(reference)
    if ours != theirs:
        from data.imageio import list_images
        for named, typed in ((spec, option), (reference, reference_option)):  # (no classes, for want of images)
            place = folder_of(named).resolve()
            if place.is_dir() and not list_images(place):
                raise UserError(f"{typed} {named} holds no images (in class folders or not); put images in it, or "
                                f"name a folder that holds some.")
        raise UserError(classes_differ(option, ours, reference_option, theirs, folder.resolve()))


def classes_differ(option: str, classes: Sequence[str], reference_option: str, reference_classes: Sequence[str],
                   folder: Path | None = None) -> str:
    """The sentence that refuses a set (named by `option`) whose classes differ from the reference set's; a
    missing class that `folder` (the set's, if it is a folder) has as an empty folder is named."""
    empty = next((name for name in reference_classes if name not in classes and folder is not None
                  and (folder / name).is_dir()), None)
    if empty is not None:
        return (f"The class folder {folder / empty} of {option} holds no images, so {option} lacks a class that "
                f"{reference_option} has; add images of {empty} to it.")
    return (f"The classes of {option} ({', '.join(classes) or 'none'}) differ from those of {reference_option} "
            f"({', '.join(reference_classes) or 'none'}); give both the same class folder names.")


def load_dataset(spec: str, resolution: int, *, cache_dir: str | Path = ".cache/datasets", train: bool = True,
                 num_samples: int | None = None, seed: int = 0, channels: int | None = None) -> ImageDataset:
    """Load the dataset named by `spec` at `resolution` x `resolution`, decoded into memory.

    `num_samples` picks a seeded subset (folder, cifar10) or sets how many plumes to simulate;
    `train` picks the split of plumes and cifar10 (a folder is one split); `channels` forces
    1 (greyscale) or 3 (RGB), None keeps the source's own.
    """
    if not isinstance(resolution, int) or resolution < 8:
        raise UserError(f"resolution must be an integer of at least 8, got {resolution!r}.")
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 (greyscale), 3 (RGB) or None (the data's own), got {channels!r}.")
    # Imported lazily so that asking for one source never pays for (or fails on) another's imports.
    if not spec:
        raise UserError("No dataset was given (this preset has none); pass --dataset folder:PATH, plumes or cifar10.")
    if spec == "plumes":
        from data.plumes import load_plumes
        return load_plumes(resolution, cache_dir, train=train, num_samples=num_samples, seed=seed, channels=channels)
    if spec == "cifar10":
        from data.cifar import load_cifar10
        return load_cifar10(resolution, cache_dir, train=train, num_samples=num_samples, seed=seed, channels=channels)
    if folder_of(spec) is not None:
        from data.folder import load_folder
        return load_folder(folder_of(spec), resolution, num_samples=num_samples, seed=seed, channels=channels)
    raise UserError(f"Unknown dataset {spec!r}; choose one of {', '.join(SPECS)}.")


SPLITS_WITH_TEST = ("plumes", "cifar10")


def load_test_set(train: ImageDataset, spec: str, test_spec: str, num_samples: int, *,
                  cache_dir: str | Path = ".cache/datasets", seed: int = 0) -> tuple[ImageDataset, str]:
    """Images to evaluate a model trained on `train` (from `spec`) with, and what they are.

    `test_spec` names a dataset of its own (its test split, where it is plumes or cifar10); empty means
    the test split of `spec` where it has one, else a seeded subset of the training images, which is then reported as
    "trainset" rather than "heldout" so no one mistakes it for held-out data. At most `num_samples`
    images (0: all), at the training set's resolution and channels.
    """
    info = train.info
    num_samples = num_samples or None
    if test_spec or spec in SPLITS_WITH_TEST:
        source = test_spec or spec  # plumes or cifar10 named as a test set give their test split too
        if source == "plumes":  # simulated: only as many as asked for
            return load_dataset(source, info.resolution, cache_dir=cache_dir, train=False, num_samples=num_samples,
                                channels=info.channels), "heldout"
        test = load_dataset(source, info.resolution, cache_dir=cache_dir, train=False, channels=info.channels)
        what = f"test dataset {test_spec}" if test_spec else f"the {spec} test split"
        return test.subset(subset_indices(len(test), min(num_samples or len(test), len(test)), seed, what)), "heldout"
    keep = subset_indices(len(train), min(num_samples or len(train), len(train)), seed, f"dataset {spec}")
    return train.subset(keep), "trainset"
