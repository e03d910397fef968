"""Judging images with a classifier trained here: the shared measures of `evaluate.consistency` and
`evaluate.sweep`.

`check_pair` refuses a judge whose classes or parameters are not the model's (or the set's); `measure`
draws a model's images and judges them; `judge_dataset` judges a set already written against its own
labels. Both give the same report: for a class model, the share of images the judge puts in the class
asked for (overall, per class) and the confusion matrix; for a parameter model, per parameter the mean
absolute error, correlation and slope between requested and predicted values. `write_report` writes it
for `evaluate.consistency` (a check planned as a `Judging`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from classify.model import Classifier
from classify.plots import confusion_matrix_image, scatter_plot, side_by_side
from core.errors import UserError
from core.runtime import write_csv, write_json
from data import FolderLabels
from data.dataset import DatasetInfo, ImageDataset
from data.imageio import atomic_save_image, from_uint8, save_grid
from ddpm.config import SamplingConfig
from ddpm.generate import DiffusionSampler
from ddpm.synthetic import plan_dataset
from core.progress import progress
from sampling.draw import Drawer

DEFAULT_PER_CLASS, DEFAULT_NUM = 50, 200  # images drawn per class (class models), in all (parameter models)
CONDITIONED_ON = {"class": "classes", "params": "parameters"}
# How messages name a model conditioned on each kind of label, its judge, and what the judge does with a label.
JUDGE_OF = {"class": ("class-conditional", "classifier", "know"),
            "params": ("parameter-conditional", "parameter regressor", "predict")}


def check_pair(kind: str, info: DatasetInfo | FolderLabels, judge: Classifier, what: str = "diffusion model") -> None:
    """Refuse a judge that cannot judge the `kind` ("class" or "params") of labels `info` names, before
    anything is drawn or loaded: a judge of the other target, or one that lacks some of those labels."""
    if kind == "none":
        raise UserError("This diffusion model was trained without conditioning, so there is nothing to check; pass "
                        "the checkpoint of a class- or parameter-conditional one as --ckpt.")
    conditioned, needed, verb = JUDGE_OF[kind]
    if judge.config.target != kind:
        raise UserError(f"A {conditioned} {what} needs a {needed} as --judge (trained with train.py --stage classify "
                        f"--target {kind}), not a {JUDGE_OF[judge.config.target][1]}; pass one.")
    labels = CONDITIONED_ON[kind]
    missing = [n for n in (info.class_names if kind == "class" else info.param_names) if n not in judge.output_names]
    if missing:
        raise UserError(f"The --judge {needed} does not {verb} the {labels} {', '.join(missing)} of the {what} (it "
                        f"{verb}s {', '.join(judge.output_names)}); pass one trained on the same {labels}.")


def judge_images(judge: Classifier, images: torch.Tensor) -> torch.Tensor:
    """The judge's predictions, after resizing images of another size to its resolution (antialiased
    bilinear), as the classifier only knows its own."""
    size = judge.info.resolution
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return judge.predict(images)


def compare(judge: Classifier, kind: str, info: DatasetInfo, predicted: torch.Tensor, records: list[dict[str, Any]],
            wanted: Sequence[str] | torch.Tensor) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and report of the judge's predictions against what each image should show: class names
    (kind "class"), or parameter values (N, P) in the order of `info.param_names` (kind "params").
    `records` identify the images (index, seed or source) and open each row."""
    rows, report = [], {"images": len(records)}
    if kind == "class":
        names = list(info.class_names)
        asked = torch.tensor([names.index(c) for c in wanted])
        said = [judge.output_names[int(p)] for p in predicted]
        said_index = torch.tensor([names.index(s) if s in names else -1 for s in said])
        agree = asked == said_index
        report["agreement"] = float(agree.float().mean())
        report["per_class"] = {n: float(agree[asked == k].float().mean()) for k, n in enumerate(names) if (asked == k).any()}
        columns = list(judge.output_names)
        confusion = torch.zeros(len(names), len(columns), dtype=torch.long)
        for a, p in zip(asked, predicted):
            confusion[a, p] += 1
        report["confusion"] = {"requested": names, "predicted": columns, "counts": confusion.tolist()}
        for record, c, s in zip(records, wanted, said):
            rows.append({**record, "requested": c, "predicted": s})
    else:
        order = [judge.output_names.index(p) for p in info.param_names]
        got, wanted = predicted[:, order].double(), torch.as_tensor(wanted, dtype=torch.float64)
        report["mae"] = {p: float((got[:, j] - wanted[:, j]).abs().mean()) for j, p in enumerate(info.param_names)}
        report["pearson_r"] = {p: _pearson(wanted[:, j], got[:, j]) for j, p in enumerate(info.param_names)}
        report["slope"] = {p: _slope(wanted[:, j], got[:, j]) for j, p in enumerate(info.param_names)}
        for record, w, g in zip(records, wanted, got):
            rows.append({**record, **{f"requested_{p}": float(v) for p, v in zip(info.param_names, w)},
                         **{f"predicted_{p}": float(v) for p, v in zip(info.param_names, g)}})
        report["requested"], report["predicted"] = wanted.tolist(), got.tolist()
    return rows, report


def measure(model: DiffusionSampler, judge: Classifier, sampling: SamplingConfig, *, seed: int = 0,
            per_class: int = DEFAULT_PER_CLASS, num: int = DEFAULT_NUM, params: Sequence[str] = (), batch_size: int = 64,
            amp: torch.dtype | None = None) -> dict[str, Any]:
    """Draw the requested images and judge them: {"images", "rows", "report"}."""
    kind, info = model.net.config.cond, model.info
    check_pair(kind, info, judge)
    plan = plan_dataset(model, seed, per_class=per_class if kind == "class" else None, num=num, params=params)
    draw = Drawer(model, sampling, amp, batch_size)
    images, predictions = [], []
    for start in progress(range(0, len(plan.items), batch_size), desc="draw and judge", unit="batch"):
        part = plan.items[start:start + batch_size]
        batch = draw.batch([item.record["seed"] for item in part], plan.conditions([i.index for i in part]))
        images.append(batch)
        predictions.append(judge_images(judge, batch))
    images, predicted = torch.cat(images), torch.cat(predictions)
    records = [{"index": item.index, "seed": item.record["seed"]} for item in plan.items]
    if kind == "class":
        wanted = [item.record["class"] for item in plan.items]
    else:
        wanted = torch.tensor([[item.params[p] for p in info.param_names] for item in plan.items], dtype=torch.float64)
    rows, report = compare(judge, kind, info, predicted, records, wanted)
    report["resized"] = images.shape[-1] != judge.info.resolution
    return {"images": images, "rows": rows, "report": report}


def check_dataset(info: DatasetInfo | FolderLabels, judge: Classifier) -> None:
    """Refuse an image set that lacks the labels this judge reads, or names others."""
    kind = judge.config.target
    if kind == "class" and not info.class_names:
        raise UserError("This image set has no class folders for a classifier to check; pass a parameter regressor "
                        "as --judge (if the set has params.csv), or a set with class subfolders as --images.")
    if kind == "params" and not info.param_names:
        raise UserError("This image set has no params.csv for a parameter regressor to check; pass a classifier as "
                        "--judge (if the set has class folders), or a set with params.csv as --images.")
    check_pair(kind, info, judge, what="image set")


def judge_dataset(dataset: ImageDataset, judge: Classifier, batch_size: int = 64) -> dict[str, Any]:
    """Judge a labelled image set (a written synthetic set, or real images) against its own labels:
    a classifier against the class folders, a parameter regressor against params.csv. Returns
    {"images", "rows", "report"} as `measure` does, "images" holding only the first 64 (for the
    grid): the set stays uint8 and is converted a batch at a time."""
    check_dataset(dataset.info, judge)
    kind, info = judge.config.target, dataset.info
    predicted = torch.cat([judge_images(judge, from_uint8(chunk)) for chunk in
                           progress(dataset.images.split(batch_size), desc="judge", unit="batch")])
    records = [{"index": i, "source": dataset.source(i)} for i in range(len(dataset))]
    if kind == "class":
        wanted = [info.class_names[int(k)] for k in dataset.labels]
    else:
        wanted = dataset.params.double()
    rows, report = compare(judge, kind, info, predicted, records, wanted)
    report["resized"] = dataset.images.shape[-1] != judge.info.resolution
    return {"images": from_uint8(dataset.images[:64]), "rows": rows, "report": report}


def _slope(x: torch.Tensor, y: torch.Tensor) -> float:
    """The least-squares slope of y on x; NaN when x does not vary (a parameter fixed with --param). That is
    asked of x itself: once its mean is subtracted, equal values can leave float residue, whose spread is not 0."""
    if x.max() == x.min():
        return float("nan")
    x = x - x.mean()
    return float((x * (y - y.mean())).sum()) / float((x * x).sum())


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """The correlation of x and y; NaN when either does not vary (asked as `_slope` asks)."""
    if x.max() == x.min() or y.max() == y.min():
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# the consistency check's report


@dataclass(frozen=True)
class Judging:
    """One consistency check, planned: where its results go, how its images are judged, and how its report
    names what each image should show."""
    out: Path                          # the results folder
    run: Callable[[], dict[str, Any]]  # draws or loads the images and judges them (`measure`, `judge_dataset`)
    param_names: tuple[str, ...]       # the parameters a regressor judges
    asked: str                         # whose class an image should show: "asked for" (drawn), "of their folder"
    requested: str                     # whose parameters: "Requested" (drawn) or "Labelled" (a written set)
    source: dict[str, Any]             # what report.json records of the images


def write_report(judging: Judging, result: dict[str, Any], judge: Classifier, judge_path: str | os.PathLike
                 ) -> tuple[dict[str, Any], str]:
    """Write a judged `result` into `judging.out`: grid.png (the first 64 images), predictions.csv, the confusion
    matrix or the scatter plots, and report.json; returns the report and its one-sentence summary."""
    out, report = judging.out, result["report"]
    save_grid(result["images"][:64], out / "grid.png")
    write_csv(result["rows"], out / "predictions.csv")
    if "confusion" in report:
        c = report["confusion"]
        matrix = np.zeros((len(c["predicted"]),) * 2, dtype=np.int64)
        for i, name in enumerate(c["requested"]):
            matrix[c["predicted"].index(name)] = c["counts"][i]
        picture = confusion_matrix_image(matrix, c["predicted"], title=f"requested (rows) vs judged: "
                                                                      f"{100 * report['agreement']:.1f}% agree")
        atomic_save_image(picture, out / "confusion.png")
        summary = (f"{100 * report['agreement']:.1f}% of {report['images']} images are judged to be the class "
                   f"{judging.asked} (" + ", ".join(f"{n} {100 * v:.0f}%" for n, v in report["per_class"].items())
                   + ").")
    else:
        names = judging.param_names
        wanted, got = np.array(report["requested"]), np.array(report["predicted"])
        panels = [scatter_plot(wanted[:, j], got[:, j], title=f"{n}: MAE {report['mae'][n]:.3g}, r "
                                                              f"{report['pearson_r'][n]:.3f}, slope {report['slope'][n]:.3f}")
                  for j, n in enumerate(names)]
        atomic_save_image(side_by_side(panels), out / "scatter.png")
        summary = (f"{judging.requested} against judged parameters over {report['images']} images: " +
                   ", ".join(f"{n} MAE {report['mae'][n]:.3g} (r = {report['pearson_r'][n]:.3f}, "
                             f"slope {report['slope'][n]:.3f})" for n in names)
                   + ".")
    if report["resized"]:
        summary += f" Images were resized to the judge's {judge.info.resolution} px."
    write_json({**judging.source, "judge": str(judge_path), **report, "summary": summary}, out / "report.json")
    # With --overwrite, the figure of the other kind of judge an earlier run left would sit beside this report.
    (out / ("scatter.png" if "confusion" in report else "confusion.png")).unlink(missing_ok=True)
    return report, summary
