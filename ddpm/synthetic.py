"""Plans of synthetic datasets: which image k of a dataset is (its seed, its condition, its class
folder), for `sample.py --dataset-out`, which draws them and hands them to `data.writer`.

Image k depends on (seed, k) alone, exactly as in plain sampling (`ddpm.generate.image_seed`, and
`ddpm.conditioning.requested` for its condition), so `sample.py --first-index k --num 1` redraws it
and a larger count extends a dataset without changing the images it has. For a class-conditional
model image k has class k mod C, so N per class means images 0 .. N*C - 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from core.errors import UserError
from data.writer import Binning, Item
from ddpm.conditioning import Conditions, parse_class, requested
from ddpm.generate import DiffusionSampler, image_seed


# The most images one command plans: a plan holds every image's seed and condition in memory (about a kilobyte
# each), so two billion would take the machine's memory before the first image is drawn.
MAX_IMAGES = 10_000_000


def check_image_count(count: int, option: str) -> None:
    """Refuse a request for more than `MAX_IMAGES` images (`option` asked for them) before anything is planned."""
    if count > MAX_IMAGES:
        raise UserError(f"{option} asks for {count:,} images, more than the {MAX_IMAGES:,} one command draws; ask for "
                        f"fewer (a dataset grows by rerunning its command with a larger count).")


@dataclass
class DatasetPlan:
    """Every image of a request, and how to condition any subset of them."""
    items: list[Item]
    conditions: Callable[[Sequence[int]], Conditions]   # indices -> their conditions, in that order
    param_names: tuple[str, ...] = ()                   # columns of params.csv (none: no params.csv)


def plan_dataset(model: DiffusionSampler, seed: int, *, per_class: int | None = None, num: int | None = None,
                 label: str | None = None, params: Sequence[str] = (), binning: Binning | None = None) -> DatasetPlan:
    """The images a diffusion model writes: `per_class` of each class (or of class `label` only), or
    `num` images with parameters drawn per image over the training ranges (those in `params` fixed),
    labelled by `binning` if given, or `num` unconditional images."""
    kind, info = model.net.config.cond, model.info
    if kind == "class":
        classes = len(info.class_names)
        check_image_count(per_class * classes, "--per-class")
        only = None if label is None else parse_class(label, info)
        indices = [k for k in range(per_class * classes) if only is None or k % classes == only]
        conditions = (lambda idx: requested(kind, info, list(idx), seed))   # class k mod C
        items = [Item(k, r["class"], record={"seed": image_seed(seed, k), **r})
                 for k, r in zip(indices, conditions(indices).records)]
        return DatasetPlan(items, conditions)
    check_image_count(num, "--num")
    indices = list(range(num))
    conditions = (lambda idx: requested(kind, info, list(idx), seed, params=params))
    items = []
    for k, record in zip(indices, conditions(indices).records):
        folder = binning.folder(record[binning.name]) if binning else ""
        extra = {"class": folder} if folder else {}
        items.append(Item(k, folder, params=dict(record), record={"seed": image_seed(seed, k), **extra}))
    return DatasetPlan(items, conditions, param_names=info.param_names if kind == "params" else ())
