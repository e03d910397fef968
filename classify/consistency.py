"""Conditioning accuracy: does a conditional diffusion model draw what it is asked for?

    python -m classify.consistency --ckpt DIFFUSION_CKPT --judge CLASSIFIER_CKPT [--per-class 50 | --num 300]

draws images for requested classes or parameter values, exactly as `sample.py` would (the same
plan, seeds and conditions as `sample.py --dataset-out`: image k of a check is image k of a dataset
written with the same options), and lets a classifier trained on real data judge them:
- a class-conditional model and a classifier: the share of images the classifier puts in the class
  asked for (overall and per class), and the requested x predicted confusion matrix (confusion.png);
- a parameter-conditional model and a parameter regressor (`train.py --stage classify --target
  params`): the mean absolute error and correlation between requested and predicted values of each
  parameter, with a scatter plot (scatter.png). For the plumes: does a plume show the wind asked for?
Classes and parameters are matched by name. Also writes grid.png (the first 64 images),
predictions.csv and report.json into --out.
"""

from __future__ import annotations

import argparse
import csv
import io
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from classify.model import Classifier, load_classifier
from classify.plots import confusion_matrix_image, scatter_plot, side_by_side
from core import cli
from core.config import add_config_arguments, given_in, override
from core.lock import FolderLock, check_output_folder
from core.runtime import AMP_MODES, atomic_write, autocast_dtype, resolve_device, write_json
from data.imageio import atomic_save_image, save_grid
from ddpm.config import SamplingConfig
from ddpm.generate import DiffusionSampler
from ddpm.synthetic import plan_dataset


def check_pair(model: DiffusionSampler, judge: Classifier) -> None:
    """Refuse a judge that cannot judge this model's conditions, before anything is drawn."""
    kind = model.net.config.cond
    if kind == "none":
        raise ValueError("This diffusion model was trained without conditioning, so there is nothing to check; pass "
                         "a class- or parameter-conditional checkpoint.")
    if kind == "class":
        if judge.config.target != "class":
            raise ValueError("A class-conditional model needs a classifier as judge (--target class), not a "
                             "parameter regressor.")
        missing = [c for c in model.info.class_names if c not in judge.output_names]
        if missing:
            raise ValueError(f"The judge does not know the classes {', '.join(missing)} of the diffusion model (it "
                             f"knows {', '.join(judge.output_names)}); train it on data with the same class names.")
    else:
        if judge.config.target != "params":
            raise ValueError("A parameter-conditional model needs a parameter regressor as judge (train.py --stage "
                             "classify --target params), not a classifier.")
        missing = [p for p in model.info.param_names if p not in judge.output_names]
        if missing:
            raise ValueError(f"The judge does not predict the parameters {', '.join(missing)} of the diffusion model "
                             f"(it predicts {', '.join(judge.output_names)}); train it on the same parameters.")


def judge_images(judge: Classifier, images: torch.Tensor) -> torch.Tensor:
    """The judge's predictions, after resizing images of another size to its resolution (antialiased
    bilinear), as the classifier only knows its own."""
    size = judge.info.resolution
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return judge.predict(images)


def measure(model: DiffusionSampler, judge: Classifier, sampling: SamplingConfig, *, seed: int = 0,
            per_class: int = 50, num: int = 200, params: Sequence[str] = (), batch_size: int = 64,
            amp: torch.dtype | None = None) -> dict[str, Any]:
    """Draw the requested images and judge them: {"images", "rows", "report"}."""
    from sample import Drawer  # the drawing code sample.py itself uses
    check_pair(model, judge)
    kind, info = model.net.config.cond, model.info
    plan = plan_dataset(model, seed, per_class=per_class if kind == "class" else None, num=num, params=params)
    draw = Drawer(model, sampling, amp, batch_size)
    images, predictions = [], []
    for start in tqdm(range(0, len(plan.items), batch_size), desc="draw and judge", unit="batch"):
        part = plan.items[start:start + batch_size]
        batch = draw.batch([item.record["seed"] for item in part], plan.conditions([i.index for i in part]))
        images.append(batch)
        predictions.append(judge_images(judge, batch))
    images, predicted = torch.cat(images), torch.cat(predictions)
    rows, report = [], {"images": len(plan.items), "resized": images.shape[-1] != judge.info.resolution}
    if kind == "class":
        names = list(info.class_names)
        asked = torch.tensor([names.index(item.record["class"]) for item in plan.items])
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
        for item, s in zip(plan.items, said):
            rows.append({"index": item.index, "seed": item.record["seed"], "requested": item.record["class"],
                         "predicted": s})
    else:
        order = [judge.output_names.index(p) for p in info.param_names]
        got = predicted[:, order].double()
        wanted = torch.tensor([[item.params[p] for p in info.param_names] for item in plan.items], dtype=torch.float64)
        report["mae"] = {p: float((got[:, j] - wanted[:, j]).abs().mean()) for j, p in enumerate(info.param_names)}
        report["pearson_r"] = {p: _pearson(wanted[:, j], got[:, j]) for j, p in enumerate(info.param_names)}
        for item, g in zip(plan.items, got):
            rows.append({"index": item.index, "seed": item.record["seed"],
                         **{f"requested_{p}": item.params[p] for p in info.param_names},
                         **{f"predicted_{p}": float(v) for p, v in zip(info.param_names, g)}})
        report["requested"], report["predicted"] = wanted.tolist(), got.tolist()
    return {"images": images, "rows": rows, "report": report}


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m classify.consistency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint of a conditional diffusion model (required)")
    parser.add_argument("--judge", type=Path, required=True,
                        help="checkpoint of a classifier (class models) or parameter regressor (parameter models) "
                             "trained on real data (required)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/consistency next to --ckpt)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out (default: off)")
    parser.add_argument("--per-class", type=int, default=50, help="class models: images per class (default: 50)")
    parser.add_argument("--num", type=int, default=200,
                        help="parameter models: images, parameters drawn over the training ranges (default: 200)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="parameter models: fix a parameter instead of drawing it (default: none)")
    parser.add_argument("--seed", type=int, default=0, help="image k uses a seed derived from (seed, k) (default: 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw weights (default: ema)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--amp", default="auto", choices=AMP_MODES, help="mixed precision for sampling (default: auto)")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {cli.DEBUG_ENV}=1) (default: off)")
    add_config_arguments(parser, "sampling", SamplingConfig, SamplingConfig())
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from sample import load_model
    args = parse_args(argv)
    for option, value in (("--per-class", args.per_class), ("--num", args.num), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}.")
    sampling = override(SamplingConfig(), args, "sampling")
    device = resolve_device(args.device)
    judge = load_classifier(args.judge, device)
    model, inverted = load_model(args.ckpt, device, args.weights)
    if inverted is not None:
        raise ValueError(f"{args.ckpt} is an inversion; measure consistency on the diffusion model it was learned "
                         f"against ({inverted.record['path']}), or judge the inversion's images with classify.experiment.")
    sampling.check_against(model.schedule)
    check_pair(model, judge)
    if args.param and model.net.config.cond != "params":
        raise ValueError("--param applies to parameter-conditional models; drop it.")
    out = args.out or args.ckpt.parent / "consistency"
    check_output_folder(out, args.overwrite)
    with FolderLock(out):
        result = measure(model, judge, sampling, seed=args.seed, per_class=args.per_class, num=args.num,
                         params=args.param, batch_size=args.batch_size, amp=autocast_dtype(args.amp, device))
        report = result["report"]
        save_grid(result["images"][:64], out / "grid.png")
        rows = result["rows"]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(out / "predictions.csv", lambda f: f.write(text.getvalue().encode()))
        if "confusion" in report:
            c = report["confusion"]
            matrix = np.zeros((len(c["predicted"]),) * 2, dtype=np.int64)
            for i, name in enumerate(c["requested"]):
                matrix[c["predicted"].index(name)] = c["counts"][i]
            picture = confusion_matrix_image(matrix, c["predicted"], title=f"requested (rows) vs judged: "
                                                                          f"{100 * report['agreement']:.1f}% agree")
            atomic_save_image(picture, out / "confusion.png")
            summary = (f"{100 * report['agreement']:.1f}% of {report['images']} images are judged to be the class asked "
                       f"for (" + ", ".join(f"{n} {100 * v:.0f}%" for n, v in report["per_class"].items()) + ").")
        else:
            names = model.info.param_names
            wanted, got = np.array(report["requested"]), np.array(report["predicted"])
            panels = [scatter_plot(wanted[:, j], got[:, j], title=f"{n}: MAE {report['mae'][n]:.3g}, "
                                                                  f"r {report['pearson_r'][n]:.3f}")
                      for j, n in enumerate(names)]
            atomic_save_image(side_by_side(panels), out / "scatter.png")
            summary = (f"Requested against judged parameters over {report['images']} images: " +
                       ", ".join(f"{n} MAE {report['mae'][n]:.3g} (r = {report['pearson_r'][n]:.3f})" for n in names)
                       + ".")
        if report["resized"]:
            summary += f" Images were resized to the judge's {judge.info.resolution} px."
        write_json({"diffusion": str(args.ckpt), "judge": str(args.judge), "seed": args.seed,
                    "sampling": given_in(args, "sampling"), **report, "summary": summary}, out / "report.json")
    print(summary)
    print(f"Wrote {out}")
    return report


if __name__ == "__main__":
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, cli.terminate_as_interrupt)
    sys.exit(cli.run(main))
