"""Typed configuration shared by every stage, and the command line built from it.

Each stage's config is a dataclass of dataclasses. It is stored in the checkpoint (as plain dicts)
next to the weights, so a run is described by its checkpoint alone. The command line is generated
from the same fields, so `--help` can never drift from what the code reads: every option shows the
value of the default preset, and only options the user actually passes override the chosen preset.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from core.checkpoint import describe
from core.cli import int_option
from core.errors import FieldError, UserError
from core.runtime import AMP_HELP, AMP_MODES, KERNEL_BACKENDS, KERNELS_HELP

LR_SCHEDULES = ("constant", "cosine", "onecycle")  # see training.loop.lr_factor


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its `--help` text (and optionally its `choices`) beside its declaration."""
    return field(default=default, metadata={"help": help, **extra})


def require(ok: bool, message: str) -> None:
    """Refuse with a one-sentence message, worded by the caller (raised as ValueError). A config's own checks raise
    `FieldError` instead, which names its fields by structure."""
    if not ok:
        raise UserError(message)


def check_choice(field: str, value: Any, choices: Iterable[str]) -> None:
    """Refuse a config field's `value` that is none of `choices`, naming the field by structure (`FieldError`)."""
    choices = tuple(choices)
    if value not in choices:
        raise FieldError("{" + field + "} must be one of {choices}, got {value!r}.", choices=", ".join(choices),
                         value=value)


def folder_of(spec: str) -> Path | None:
    """The folder a `folder:PATH` dataset spec names (with ~ expanded); None for any other spec."""
    return Path(spec[len("folder:"):]).expanduser() if spec.startswith("folder:") and len(spec) > len("folder:") else None


def absolute_spec(spec: str) -> str:
    """`spec` naming the same images from any working directory: a `folder:PATH` with PATH made absolute as the
    loader resolves it (~ expanded, links followed; a link loop left as it is, for the loader to refuse), so a
    dataset recorded in a checkpoint's config is the one `DatasetInfo.name` names; any other spec (plumes,
    cifar10, an unknown one) as it is."""
    folder = folder_of(spec)
    return spec if folder is None else f"folder:{os.path.realpath(folder)}"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = option("plumes", "training images: plumes (built in) | folder:PATH | cifar10")
    resolution: int = option(32, "image side in pixels (images are resized and centre-cropped to it)")
    num_samples: int = option(0, "plumes to simulate, or a seeded subset of another dataset (0: 10000 plumes / all images)")
    hflip: bool = option(True, "random horizontal flips (DDPM's only augmentation)")
    cache_dir: str = option(".cache/datasets", "where generated or downloaded datasets (and latent caches) are kept")
    num_workers: int = option(0, "DataLoader worker processes (0 loads in the training process)")
    test_dataset: str = option("", "held-out images for evaluation (empty: the test split of --dataset where it has one, "
                                   "as plumes and cifar10 do; a folder has none, so a seeded subset of its images is used "
                                   "and reported as such)")
    test_samples: int = option(256, "held-out images used for evaluation (0: all)")

    def __post_init__(self) -> None:
        # Folders absolute: a resume, and the tools that read a run's data from its checkpoint (evaluate.gradcam,
        # evaluate.consistency, the experiment's and sweep's kept runs), find them from any working directory, and a
        # resume that names the same folder in other words names the same config. The config is frozen, so the
        # fields are replaced as the dataclass's own __init__ sets them.
        for name in ("dataset", "test_dataset"):
            object.__setattr__(self, name, absolute_spec(getattr(self, name)))
        # Each check names the fields it is about ({placeholders}): code that builds this config (and a checkpoint)
        # reads them as fields, train.py as the options that set them (core.errors.FieldError).
        if self.resolution < 8:
            raise FieldError("{resolution} must be at least 8, got {value}.", value=self.resolution)
        if self.num_samples < 0:
            raise FieldError("{num_samples} must be 0 (all) or positive, got {value}.", value=self.num_samples)
        if self.num_workers < 0:
            raise FieldError("{num_workers} must be 0 or positive, got {value}.", value=self.num_workers)
        if self.cache_dir.strip() == "":
            raise FieldError("{cache_dir} is empty; give a folder (default .cache/datasets).")
        if self.test_samples < 0:
            raise FieldError("{test_samples} must be 0 (all) or positive, got {value}.", value=self.test_samples)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = option(3000, "optimizer steps to train for (on --resume: the new total)")
    batch_size: int = option(32, "global batch size, split evenly across processes under torchrun")
    lr: float = option(1e-3, "peak learning rate, reached after the warm-up")
    lr_schedule: str = option("constant", "learning rate after the warm-up: constant (DDPM), cosine (decays to 0 at "
                                          "the end of the run) or onecycle (warm-up from lr/25, then a cosine to ~0)",
                              choices=LR_SCHEDULES)
    warmup_steps: int = option(200, "linear learning-rate warm-up (from 0; onecycle: from lr/25)")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay (0 = DDPM's plain Adam)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)")
    ema_decay: float = option(0.999, "decay of the exponential moving average of the weights used for sampling")
    amp: str = option("auto", AMP_HELP, choices=AMP_MODES)
    compile: bool = option(False, "torch.compile the trained networks (faster on CUDA after a warm-up of a minute or two)")
    kernels: str = option("auto", KERNELS_HELP, choices=KERNEL_BACKENDS)
    seed: int = option(0, "seed for weights, data order, noise and preview samples")
    log_every: int = option(50, "steps between metrics.jsonl entries")
    sample_every: int = option(1000, "steps between previews and held-out evaluations (0: only at the end)")
    ckpt_every: int = option(500, "steps between checkpoints (one is always written at the end)")
    preview_images: int = option(36, "images in each preview grid")
    preview_steps: int = option(50, "DDIM steps for preview grids")

    def __post_init__(self) -> None:
        # Each check names the fields it is about, as DataConfig's do.
        if self.steps < 0:
            raise FieldError("{steps} must be 0 or positive, got {value}.", value=self.steps)
        if self.batch_size < 1:
            raise FieldError("{batch_size} must be at least 1, got {value}.", value=self.batch_size)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise FieldError("{lr} must be a positive number, got {value}.", value=self.lr)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.warmup_steps < 0:
            raise FieldError("{warmup_steps} must be 0 or positive, got {value}.", value=self.warmup_steps)
        if self.lr_schedule == "onecycle" and 0 < self.steps <= self.warmup_steps:
            raise FieldError("{warmup_steps} {value} leaves no annealing phase in a one-cycle schedule of {steps} "
                             "{steps_value}; pass {warmup_steps} {usual} (30% of the run is usual).",
                             value=self.warmup_steps, steps_value=self.steps, usual=round(0.3 * self.steps))
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise FieldError("{weight_decay} must be 0 or a positive number, got {value}.", value=self.weight_decay)
        if not self.grad_clip >= 0:  # inf: off too
            raise FieldError("{grad_clip} must be 0 (off) or positive, got {value}.", value=self.grad_clip)
        if not 0 <= self.ema_decay < 1:
            raise FieldError("{ema_decay} must be in [0, 1), got {value}.", value=self.ema_decay)
        check_choice("amp", self.amp, AMP_MODES)
        check_choice("kernels", self.kernels, KERNEL_BACKENDS)
        if self.seed < 0:
            raise FieldError("{seed} must be 0 or positive, got {value}.", value=self.seed)
        if self.log_every < 1:
            raise FieldError("{log_every} must be at least 1, got {value}.", value=self.log_every)
        if self.sample_every < 0:
            raise FieldError("{sample_every} must be 0 (only at the end) or positive, got {value}.",
                             value=self.sample_every)
        if self.ckpt_every < 1:
            raise FieldError("{ckpt_every} must be at least 1, got {value}.", value=self.ckpt_every)
        if self.preview_images < 1:
            raise FieldError("{preview_images} must be at least 1, got {value}.", value=self.preview_images)
        if self.preview_steps < 1:
            raise FieldError("{preview_steps} must be at least 1, got {value}.", value=self.preview_steps)


@dataclass(frozen=True)
class StageConfig:
    """What every stage's config holds: the data it trains on and how it trains. A stage's config adds
    its own sections (its network, its loss) as fields of further config dataclasses."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def idle_options(self) -> dict[str, str]:
        """The options ("section.field") that can have no effect on this run, each with the sentence that refuses it
        when the user gives it (`training.run.resolve_config`; every config holds a value for each, so only what was
        typed can be refused). A section with such options names them by a method `idle_options(config)` of its
        own, which sees the whole config (the diffusion section's condition dropout needs the U-Net's --cond)."""
        idle = {}
        for f in dataclasses.fields(self):
            part = getattr(self, f.name)
            if hasattr(part, "idle_options"):
                idle.update({f"{f.name}.{name}": why for name, why in part.idle_options(self).items()})
        return idle

    def divergence_advice(self, diverged: str, step: int) -> str:
        """What to change for a new run after training diverged at `step`, `diverged` saying how (a phrase of
        `training.loop.Trainer._divergence`, such as "the loss/disc became nan"): completes "start a new run with
        ...". A stage whose other options can throw training off names those."""
        return "a lower --lr"


# ---------------------------------------------------------------------------------------------
# dataclass <-> plain dict (for checkpoints and config.json)


def flat_fields(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`record` (a config's `to_dict`, or any JSON record) with nested records spelled out as dotted keys
    ("train.lr", "sampling.guidance_scale"), values as JSON gives them back (tuples as lists)."""
    flat = {}
    for key, value in json.loads(json.dumps(record)).items():
        if isinstance(value, dict) and value:
            flat.update(flat_fields(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type, values: Any, source: str | os.PathLike | None = None, _section: str = "") -> Any:
    """Rebuild a (nested) config dataclass from `to_dict`'s output; lists become tuples again.

    `source` names the file the values were read from (a checkpoint) in the one-sentence error that
    refuses values of the wrong shape: a section that is not a record, a key this code does not know,
    a field of the wrong type, or values that fail the config's own checks.
    """
    where = "The config" + (f" in {source}" if source is not None else "")
    fix = "the file is damaged or was edited, so use an intact copy" if source is not None else "fix it"
    if not isinstance(values, dict):
        held = (f"holds {_section} as {describe(values)} where a record of settings belongs" if _section
                else f"is {describe(values)}, not a record of settings")
        raise UserError(f"{where} {held}; {fix}.")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue  # a field added after the checkpoint was written keeps its default
        value, hint, name = values[f.name], hints[f.name], f"{_section}.{f.name}".lstrip(".")
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, source, name)
        elif not _fits(value, hint):
            raise UserError(f"{where} holds {name} as {describe(value)} where {_kind(hint)} belongs; {fix}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)} - getattr(cls, "retired_keys", frozenset())
    if unknown:
        names = ", ".join(f"{_section}.{key}".lstrip(".") for key in sorted(map(str, unknown)))
        raise UserError(f"{where} has unknown keys ({names}); a newer toolkit wrote it, so update this one, or it "
                        f"was edited, so use an intact copy.")
    try:
        return cls(**kwargs)
    except UserError as err:  # the values were read, not typed: the file is at fault, not an option
        section = f" in its {_section} section" if _section else ""
        raise UserError(f"{where} fails its own checks{section} ({str(err).rstrip('.')}); {fix}.") from None


def _fits(value: Any, hint: Any) -> bool:
    """Whether a value read back from JSON or a checkpoint is of a config field's type (bool, int,
    float, str, or a tuple of one of those)."""
    if typing.get_origin(hint) is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is float:
        return type(value) in (int, float)
    if hint in (bool, int, str):
        return type(value) is hint
    return True  # a type these configs do not use: left to the dataclass


_KINDS = {bool: ("true or false", "true or false values"), int: ("a whole number", "whole numbers"),
          float: ("a number", "numbers"), str: ("text", "texts")}


def _kind(hint: Any) -> str:
    """What a config field holds, as an error message says it."""
    if typing.get_origin(hint) is tuple:
        return f"a list of {_KINDS.get(typing.get_args(hint)[0], (None, 'values'))[1]}"
    return _KINDS.get(hint, (str(hint),))[0]


# ---------------------------------------------------------------------------------------------
# command line


def _arg_type(hint: Any, metavar: str | None) -> dict[str, Any]:
    def typed(t: Any) -> Any:  # whole numbers within range (cli.int_option), else the type itself
        return int_option if t is int else t
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is tuple:  # tuple[int, ...] -> "--channel-mult 1 2 2"
        return {"type": typed(typing.get_args(hint)[0]), "nargs": "*", "metavar": metavar}
    return {"type": typed(hint), "metavar": metavar}


def option_name(key: str) -> str:
    """The command-line option of a config field, by its name or its dotted key: "train.lr" -> "--lr"."""
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def option_names(cls: type, skip: Iterable[str] = (), section: str = "") -> dict[str, str]:
    """The option that sets each field of `cls` on a command line, by the field's name, or by its dotted key where
    `cls` is the `section` of a stage's config ("train.lr": "--lr"); the fields in `skip` have none."""
    skip, prefix = set(skip), f"{section}." if section else ""
    return {prefix + f.name: option_name(f.name) for f in dataclasses.fields(cls) if f.name not in skip}


def in_option_words(err: Exception, cls: type, skip: Iterable[str] = ()) -> str:
    """`err`'s message as a command line that sets the fields of `cls` says it: a `FieldError` spells the fields
    it names as their options, except those in `skip` (the data decides them: no option sets them), which keep
    their names; any other error reads as it is."""
    if not isinstance(err, FieldError):
        return str(err)
    return err.naming(option_names(cls, skip))


@contextlib.contextmanager
def in_options(cls: type, names: dict[str, str] | None = None, skip: Iterable[str] = ()) -> Iterator[None]:
    """Within the body, a `FieldError` of `cls`'s checks (as it is built, or run after, such as
    `SamplingConfig.check_against`) reads in the words of the options that set its fields (those in `skip` have
    none); `names` spells those a tool names otherwise (the sweep's --guidance for guidance_scale)."""
    try:
        yield
    except FieldError as err:
        raise UserError(err.naming({**option_names(cls, skip), **(names or {})})) from None


def add_config_arguments(parser: argparse.ArgumentParser, section: str, cls: type, shown: Any,
                         skip: Iterable[str] = (), help_overrides: dict[str, str] | None = None) -> None:
    """Add one `--option` per field of `cls` under an argument group named `section`.

    `shown` is the instance whose values `--help` prints as defaults. The parsed default is None
    (meaning "not given"), so `apply_arguments` changes only what the user typed.
    """
    group = parser.add_argument_group(section)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        text = (help_overrides or {}).get(f.name) or f.metadata.get("help", "")
        value = getattr(shown, f.name)
        shown_value = " ".join(map(str, value)) if isinstance(value, tuple) else ("''" if value == "" else value)
        choices = f.metadata.get("choices")
        # (choices only where there are some: a bool's BooleanOptionalAction takes none since Python 3.14)
        group.add_argument(option_name(f.name), dest=f"{section}.{f.name}", default=None,
                           help=f"{text} (default: {shown_value})", **({"choices": choices} if choices else {}),
                           **_arg_type(hints[f.name], None if choices else f.name.upper()))


def given_in(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The fields of `section` that the user passed on the command line."""
    given = {name.split(".", 1)[1]: value for name, value in vars(args).items()
             if name.startswith(section + ".") and value is not None}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


def override(values: Any, args: argparse.Namespace, section: str, skip: Iterable[str] = ()) -> Any:
    """`values` (one config dataclass) with the options of `section` that the user passed applied. Its checks
    refuse them in the words of those options (`in_options`; the fields in `skip` have none)."""
    with in_options(type(values), skip=skip):
        return dataclasses.replace(values, **given_in(args, section))


def apply_arguments(config: Any, args: argparse.Namespace, section: str, skip: Iterable[str] = ()) -> Any:
    """`config` with the user's options applied to its field `section` (see `override`). A check of the whole
    config is left to the caller to word (a `FieldError` naming dotted keys: `training.run.with_options`)."""
    return dataclasses.replace(config, **{section: override(getattr(config, section), args, section, skip)})


def given_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The config options (section.field) the user typed."""
    return {name: value for name, value in vars(args).items() if "." in name and value is not None}
