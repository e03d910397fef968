"""Conditioning accuracy: does a conditional diffusion model draw what it is asked for?

    python -m evaluate.consistency --ckpt DIFFUSION_CKPT --judge CLASSIFIER_CKPT [--per-class 50 | --num 300]

draws images for requested classes or parameter values, exactly as `sample.py` would (the same
plan, seeds and conditions as `sample.py --dataset-out`: image k of a check is image k of a dataset
written with the same options), and lets a classifier trained on real data judge them:
- a class-conditional model and a classifier: the share of images the classifier puts in the class
  asked for (overall and per class), and the requested x predicted confusion matrix (confusion.png);
- a parameter-conditional model and a parameter regressor (`train.py --stage classify --target
  params`): the mean absolute error, correlation and slope between requested and predicted values of
  each parameter, with a scatter plot (scatter.png). The slope (least squares, judged on requested)
  says how strongly an image shows its parameter: a regressor reads real images with a slope below 1
  (it regresses towards the mean), so compare a generated set's slope with the real images': a lower
  one means the model draws the parameter weaker than asked for. For the plumes: does a plume show the wind asked for?
Classes and parameters are matched by name. Also writes grid.png (the first 64 images),
predictions.csv and report.json into --out.

    python -m evaluate.consistency --images folder:DIR --judge CLASSIFIER_CKPT

judges an image set already written (a `sample.py --dataset-out` folder, an inversion's set, or
real images) against its own labels instead: the class folders for a classifier, params.csv for a
parameter regressor. The images are loaded at the judge's resolution and channels, and
predictions.csv names each image's file; the results go to DIR-consistency beside the set.
"""

from __future__ import annotations

from core import cli

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    cli.catch_early_sigterm()

import argparse
import functools
from typing import Any

import torch

import kernels
from classify.model import Classifier, load_classifier
from core.checkpoint import peek_checkpoint
from core.config import add_config_arguments, given_in, in_options, override
from core.errors import UserError
from core.lock import OutputFolder, check_output_folder
from core.runtime import autocast_dtype, resolve_device
from core.speed import check_compile, compile_module, speed_up
from data import check_output_outside, folder_labels, folder_of, load_dataset, trained_datasets
from ddpm.config import SamplingConfig
from evaluate.judging import (CONDITIONED_ON, DEFAULT_NUM, DEFAULT_PER_CLASS, Judging, check_dataset, check_pair,
                              judge_dataset, measure, write_report)
from sampling.command import add_drawing_options, check_drawing_batch, check_sampler_options, check_sampling_options
from stages import open_source

# Options that only choose what is drawn from a --ckpt; with --images they would be silently ignored.
DRAWING_OPTIONS = ("per_class", "num", "param", "seed", "weights", "amp")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m evaluate.consistency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=cli.path_option, help="checkpoint of a conditional diffusion model to draw from")
    source.add_argument("--images", metavar="folder:DIR",
                        help="judge a written image set instead (a --dataset-out folder, or real images) against its "
                             "own class folders or params.csv")
    parser.add_argument("--judge", type=cli.path_option, required=True,
                        help="checkpoint of a classifier (class models) or parameter regressor (parameter models) "
                             "trained on real data (required)")
    parser.add_argument("--out", type=cli.path_option, default=None,
                        help="output folder (default: RUN_DIR/consistency next to --ckpt, DIR-consistency beside --images DIR)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out (default: off)")
    parser.add_argument("--per-class", type=cli.int_option, default=None,
                        help=f"class models: images per class (default: {DEFAULT_PER_CLASS})")
    parser.add_argument("--num", type=cli.int_option, default=None,
                        help=f"parameter models: images, parameters drawn over the training ranges (default: {DEFAULT_NUM})")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="parameter models: fix a parameter instead of drawing it (default: none)")
    parser.add_argument("--seed", type=cli.seed_option, default=0, help="image k uses a seed derived from (seed, k) (default: 0)")
    add_drawing_options(parser)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the diffusion network and the judge (default: off)")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {cli.DEBUG_ENV}=1) (default: off)")
    add_config_arguments(parser, "sampling", SamplingConfig, SamplingConfig())
    args = parser.parse_args(argv)
    if args.images is not None:
        drawing = [f"--{name.replace('_', '-')}" for name in DRAWING_OPTIONS
                   if getattr(args, name) != parser.get_default(name)]
        drawing += ["--sampler and its options"] if given_in(args, "sampling") else []
        if drawing:
            raise UserError(f"With --images nothing is drawn, so drop {', '.join(drawing)} (they choose what a --ckpt "
                            f"draws).")
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse impossible counts, an --images that names no folder and another sampler's options, before anything
    is loaded."""
    for option, value in (("--per-class", args.per_class), ("--num", args.num), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{option} must be at least 1, got {value}.")
    if args.images is not None and (not args.images.startswith("folder:") or args.images == "folder:"):
        raise UserError(f"--images takes folder:DIR (a written image set), got {args.images!r}.")
    check_sampler_options(args)


def plan_image_set(args: argparse.Namespace, judge: Classifier, judged_on: dict[str, str]) -> Judging:
    """--images: judge a written set against its own labels, into DIR-consistency beside it (or --out); the folder
    and its labels checked by listing it, before any image is decoded."""
    # Resolved as the loader resolves it ("folder:." or "folder:~/set" name a folder by where it is).
    folder = folder_of(args.images).resolve()
    # Beside the set, not in it: a folder inside would read as one more class the next time it is loaded.
    out = args.out or folder.parent / f"{folder.name}-consistency"
    check_output_outside(out, "--out", {"--images": args.images, **judged_on})
    check_output_folder(out, args.overwrite)
    check_dataset(folder_labels(args.images), judge)  # by listing the folder: before any image is decoded
    dataset = load_dataset(args.images, judge.info.resolution, channels=judge.info.channels)
    return Judging(out, functools.partial(judge_dataset, dataset, judge, batch_size=args.batch_size),
                   dataset.info.param_names, "of their folder", "Labelled", {"image_set": args.images})


def plan_drawing(args: argparse.Namespace, sampling: SamplingConfig, device: torch.device, judge: Classifier,
                 judged_on: dict[str, str]) -> Judging:
    """--ckpt: draw the requested images with `sampling` as `sample.py --dataset-out` would and judge them, into
    RUN_DIR/consistency (or --out); every option checked against the model first."""
    image_source = open_source(args.ckpt, device, args.weights)
    if not image_source.draws_requests:
        raise UserError(f"{args.ckpt} does not draw images of requested classes or parameters (an inversion "
                        f"draws variations of learned vectors); measure consistency on the diffusion model it "
                        f"was learned against, or judge the images it wrote with --images folder:DIR.")
    model = image_source.model
    check_sampling_options(args, model)
    speed_up(model.net, device, compile=args.compile)
    with in_options(SamplingConfig):
        sampling.check_against(model.schedule)
    check_pair(model.net.config.cond, model.info, judge)
    cond = model.net.config.cond
    for option, given, owner in (("--per-class", args.per_class, "class"), ("--num", args.num, "params"),
                                 ("--param", args.param, "params")):
        if given and cond != owner:
            raise UserError(f"{option} applies to models conditioned on {CONDITIONED_ON[owner]}, and {args.ckpt} "
                            f"is conditioned on {CONDITIONED_ON[cond]}; drop it.")
    per_class, num = args.per_class or DEFAULT_PER_CLASS, args.num or DEFAULT_NUM
    check_drawing_batch(args.batch_size, per_class * len(model.info.class_names) if cond == "class" else num, model)
    out = args.out or args.ckpt.parent / "consistency"
    check_output_outside(out, "--out", {**image_source.trained_on, **judged_on})  # the grid: training images
    check_output_folder(out, args.overwrite)
    run = functools.partial(measure, model, judge, sampling, seed=args.seed, per_class=per_class, num=num,
                            params=args.param, batch_size=args.batch_size, amp=autocast_dtype(args.amp, device))
    return Judging(out, run, model.info.param_names, "asked for", "Requested",
                   {"diffusion": str(args.ckpt), "seed": args.seed, "sampling": given_in(args, "sampling")})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    check_args(args)
    sampling = override(SamplingConfig(), args, "sampling")
    device = resolve_device(args.device)
    kernels.use(args.kernels, device)
    check_compile(args.compile, device)
    judge = load_classifier(args.judge, device, option="--judge")
    # Nor inside the judge's training or test images (as evaluate.gradcam refuses for its classifiers): the grid
    # would be read as one more image, or a folder of them one more class, of those sets.
    judged_on = {f"the judge's {option}": spec
                 for option, spec in trained_datasets(peek_checkpoint(args.judge) or {}).items()}
    if args.compile:
        compile_module(judge.net)
    if args.images is not None:
        judging = plan_image_set(args, judge, judged_on)
    else:
        judging = plan_drawing(args, sampling, device, judge, judged_on)
    with OutputFolder(judging.out):
        report, summary = write_report(judging, judging.run(), judge, args.judge)
    print(summary)
    print(f"Wrote {judging.out}")
    return report


if __name__ == "__main__":
    cli.main(main)
