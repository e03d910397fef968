"""A trained model as a source of images: the sampler and what each image is conditioned on.

Each generative stage turns one of its checkpoints into an `ImageSource` (`StageSpec.load_source`),
and the sampling package (sample.py, the consistency check, the benchmarks) draws through it without
knowing the stage.
The plain source is a conditional or unconditional diffusion model: image k's condition is the class
or the parameters asked for (by default the classes in turn, or parameters drawn from their training
range). A stage whose images are conditioned otherwise (an inversion: learned vectors) subclasses it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

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


@dataclasses.dataclass(frozen=True)
class Request:
    """What a command asks of an `ImageSource`: the options of sample.py (see its --help) that decide which images
    it draws and under which conditions, as typed (None or empty: not given). sample.py builds one from its
    command line; the sweep builds one per setting."""
    seed: int = 0                           # --seed: image k's noise and draws come from (seed, k)
    label: str | None = None                # --class NAME|INDEX
    params: tuple[str, ...] = ()            # --param NAME=VALUE, repeated
    sweep: str | None = None                # --sweep NAME=START:STOP:N
    interpolate: bool = False               # --interpolate
    interpolate_to: tuple[str, ...] = ()    # --interpolate-to CLASS|NAME=VALUE, repeated
    dataset_out: Path | None = None         # --dataset-out DIR: write a dataset, not grids
    num: int | None = None                  # --num
    per_class: int | None = None            # --per-class (a class-conditional model's dataset)
    per_image: int | None = None            # --per-image (an inversion's dataset)
    classes: str | None = None              # --classes NAME:K[:LOW:HIGH]: bin a parameter into class folders
    guidance_scale: float | None = None     # --guidance-scale
    # The option groups that one kind of source reads (`ImageSource.option_sections`): group -> field -> value.
    sections: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        """The options of group `name` given, by field."""
        return dict(self.sections.get(name, {}))


class ImageSource:
    """A diffusion model that draws image k under the condition a `Request` asks for."""
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

    def check(self, request: Request) -> None:
        """Refuse options this model cannot use, instead of ignoring them."""
        if request.per_image is not None:
            raise UserError("--per-image applies to inversion checkpoints (train.py --stage invert) only; drop it.")
        check_request(self.kind, request.label, request.params)
        if self.kind == "none":
            if request.guidance_scale not in (None, 1.0):
                raise UserError("This model was trained without conditioning, so --guidance-scale has nothing to "
                                "guide; drop it.")
            if request.interpolate_to:
                raise UserError("This model was trained without conditioning, so there is no condition to "
                                "interpolate to; drop --interpolate-to.")
        if request.dataset_out is not None:
            if self.kind == "class" and request.num is not None:
                raise UserError("A class-conditional model writes --per-class N images of each class; use "
                                "--per-class instead of --num.")
            if self.kind != "class" and request.per_class is not None:
                raise UserError("--per-class needs a class-conditional model; use --num N for this one.")
            if request.classes is not None and self.kind != "params":
                raise UserError("--classes bins a parameter into class folders, and this model is not conditioned "
                                "on parameters; drop it.")
            if request.classes:
                parse_binning(request.classes, self.model.info)  # checked before any folder is touched

    def conditions(self, indices: Sequence[int], request: Request) -> Conditions:
        """The condition of image k for each k in `indices`, with what the manifest records of it."""
        return requested(self.kind, self.model.info, indices, request.seed, label=request.label,
                         params=request.params)

    def dataset(self, request: Request) -> tuple[DatasetPlan, dict[str, Any]]:
        """The images of `--dataset-out`, and what else (besides the model, weights, seed and sampler) makes
        them: entries of the folder's request, which a rerun must repeat to continue the folder."""
        info = self.model.info
        binning = parse_binning(request.classes, info) if request.classes else None
        per_class = request.per_class or 100 if self.kind == "class" else None
        plan = plan_dataset(self.model, request.seed, per_class=per_class, num=request.num or 64, label=request.label,
                            params=request.params, binning=binning)
        asked = resolved_request(info, request.label, request.params)
        return plan, {**asked, **former_request(request.dataset_out, asked, info),
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
