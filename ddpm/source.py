"""A trained model as a source of images: the sampler and what each image is conditioned on.

Each generative stage turns one of its checkpoints into an `ImageSource` (`StageSpec.load_source`),
and the sampling package (sample.py, the consistency check, the benchmarks) draws through it without
knowing the stage.
The plain source is a conditional or unconditional diffusion model: image k's condition is the class
or the parameters asked for (by default the classes in turn, or parameters drawn from their training
range). A stage whose images are conditioned otherwise (an inversion: learned vectors) subclasses it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from core.config import given_in
from core.errors import UserError
from data.dataset import DatasetInfo
from data.writer import REQUEST, parse_binning
from ddpm.conditioning import Conditions, check_request, parse_class, parse_param_values, requested
from ddpm.generate import DiffusionSampler
from ddpm.synthetic import DatasetPlan, plan_dataset


def source_loader(load_sampler: Callable[[dict[str, Any], torch.device, str, Path], DiffusionSampler]
                  ) -> Callable[[dict[str, Any], torch.device, str, Path], ImageSource]:
    """A diffusion stage's `load_source`: its checkpoint loader (payload, device, weights, path) ->
    sampler, as a plain source of images."""
    return lambda payload, device, weights, path: ImageSource(load_sampler(payload, device, weights, path))


class ImageSource:
    """A diffusion model that draws image k under the condition sample.py's options ask for.

    `args` below is sample.py's parsed command line (see its --help for each option).
    """
    default_guidance: float | None = None  # the guidance scale when none is given (None: SamplingConfig's)
    option_sections: tuple[str, ...] = ()  # sample.py option groups only this kind of source reads
    draws_requests = True                  # image k's condition is a class or parameters asked for (or none)
    # The datasets the model learnt from (option -> spec, from its run's config; `stages.open_source` sets
    # them): sample.py writes nothing inside those folders, where it would become training data.
    trained_on: dict[str, str] = {}
    # The datasets of another model these images are drawn through (an inversion's frozen model, by option):
    # off limits too.
    drawn_through: dict[str, str] = {}

    def __init__(self, model: DiffusionSampler):
        self.model = model

    @property
    def kind(self) -> str:
        """The model's conditioning: none, class or params."""
        return self.model.net.config.cond

    def check(self, args: argparse.Namespace) -> None:
        """Refuse options this model cannot use, instead of ignoring them."""
        if args.per_image is not None:
            raise UserError("--per-image applies to inversion checkpoints (train.py --stage invert) only; drop it.")
        check_request(self.kind, args.label, args.param)
        if self.kind == "none":
            if given_in(args, "sampling").get("guidance_scale", 1.0) != 1.0:
                raise UserError("This model was trained without conditioning, so --guidance-scale has nothing to "
                                "guide; drop it.")
            if args.interpolate_to:
                raise UserError("This model was trained without conditioning, so there is no condition to "
                                "interpolate to; drop --interpolate-to.")
        if args.dataset_out is not None:
            if self.kind == "class" and args.num is not None:
                raise UserError("A class-conditional model writes --per-class N images of each class; use "
                                "--per-class instead of --num.")
            if self.kind != "class" and args.per_class is not None:
                raise UserError("--per-class needs a class-conditional model; use --num N for this one.")
            if args.classes is not None and self.kind != "params":
                raise UserError("--classes bins a parameter into class folders, and this model is not conditioned "
                                "on parameters; drop it.")
            if args.classes:
                parse_binning(args.classes, self.model.info)  # checked before any folder is touched

    def conditions(self, indices: Sequence[int], args: argparse.Namespace) -> Conditions:
        """The condition of image k for each k in `indices`, with what the manifest records of it."""
        return requested(self.kind, self.model.info, indices, args.seed, label=args.label, params=args.param)

    def dataset(self, args: argparse.Namespace) -> tuple[DatasetPlan, dict[str, Any]]:
        """The images of `--dataset-out`, and what else (besides the model, weights, seed and sampler) makes
        them: entries of the folder's request, which a rerun must repeat to continue the folder."""
        info = self.model.info
        binning = parse_binning(args.classes, info) if args.classes else None
        plan = plan_dataset(self.model, args.seed, per_class=args.per_class or 100 if self.kind == "class" else None,
                            num=args.num or 64, label=args.label, params=args.param, binning=binning)
        asked = resolved_request(info, args.label, args.param)
        return plan, {**asked, **former_request(args.dataset_out, asked, info),
                      "classes": binning.describe() if binning else None}


def resolved_request(info: DatasetInfo, label: str | None, params: Sequence[str]) -> dict[str, Any]:
    """--class and --param as the images see them, the class's index and each parameter's value, so that --class
    red and --class 2 (or wind=0.5 and wind=.5) are one request of a --dataset-out set."""
    values = parse_param_values(params, info, warn=False)  # (a value beyond the training range: warned of by the plan)
    return {"class": None if label is None else parse_class(label, info), "param": dict(sorted(values.items()))}


def former_request(folder: Path, asked: dict[str, Any], info: DatasetInfo) -> dict[str, Any]:
    """The --class and --param entries of a set in `folder` written before they were resolved (as the options
    were typed) that resolve to those `asked` for: kept as recorded, so that the writer, which compares
    requests as recorded, continues the set. Empty where there is no such set."""
    try:
        before = json.loads((Path(folder) / REQUEST).read_bytes())["request"]
        label, params = before["class"], before["param"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no set there, or one the writer refuses with its own reason
    if not (isinstance(params, list) and all(isinstance(p, str) for p in params)
            and (label is None or isinstance(label, str))):
        return {}  # recorded resolved (or not by us): compared as it is
    try:
        then = resolved_request(info, label, params)
    except UserError:  # strings this model cannot read: another request
        return {}
    return {key: before[key] for key in ("class", "param") if then[key] == asked[key]}
