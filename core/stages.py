"""What a stage is: the contract between a stage (ddpm, vae, ldm, classify, invert), the
one training loop, and the entry points `train.py` and `sample.py`.

A stage module exposes one `StageSpec`: its config class, presets, command-line sections, a
`build` that turns a config into a `TrainingStage` for the loop, and optionally a loader that turns
one of its checkpoints into a sampler. The loop and the entry points only ever see these types, so
none of them names a stage (the registry is `stages.py` at the top of the repository).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from core.runtime import Runtime

Models = Mapping[str, nn.Module]
# loss(models, batch, generator, step) -> (losses, metrics). `models` are the training versions of
# the stage's trainables (wrapped for DDP or compiled). `losses` is one scalar, or one scalar per
# trainable that this step updates (a trainable without an entry is left alone this step);
# `metrics` are detached scalars the loop averages over each logging window.
LossFn = Callable[[Models, Any, torch.Generator, int], tuple[Tensor | dict[str, Tensor], dict[str, Tensor]]]


OPTIMIZERS = ("adamw", "sgd", "lazy_adamw")


@dataclass
class Trainable:
    """A model the loop optimises, with its own optimizer settings."""
    model: nn.Module
    lr: float                                   # peak learning rate; the run's schedule scales it per step
    optimizer: str = "adamw"                    # adamw (Loshchilov & Hutter 2019), sgd (with momentum), or
                                                # lazy_adamw (AdamW on the rows a step touches: embedding tables)
    betas: tuple[float, float] = (0.9, 0.999)   # AdamW's; GAN training uses (0.5, 0.9)
    weight_decay: float = 0.0                   # AdamW: decoupled; SGD: the classic L2 term in the gradient
    momentum: float = 0.0                       # SGD's
    nesterov: bool = False                      # SGD: Nesterov momentum (Sutskever et al. 2013)
    ema: bool = False                           # keep an exponential moving average (what sampling uses)

    def __post_init__(self) -> None:
        assert self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
        assert not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0), "Nesterov needs SGD with momentum"


@dataclass
class TrainingStage:
    """Everything a stage hands the training loop. The loop knows nothing else about the stage."""
    name: str                                   # the checkpoint's "stage" field
    trainables: dict[str, Trainable]            # "model" is the main one: its loss is the logged "loss"
    loss: LossFn
    dataset: Dataset                            # items are named tuples (data.Batch or a stage's own)
    config: dict[str, Any]                      # the resolved config, stored in checkpoints and config.json
    data_info: dict[str, Any]                   # what the model was trained on
    augment: Callable[[Any, torch.Generator], Any] | None = None        # batch -> batch, drawn from the step's generator
    preview: Callable[[Models], Tensor] | None = None                   # images in [-1, 1] for a PNG grid
    preview_nrow: int | None = None                                     # images per grid row (None: square)
    # Held-out metrics, logged as a line of their own. An entry "figures", {name: PIL image}, is written
    # as pictures instead: RUN_DIR/figures/NAME-step-N.png, and RUN_DIR/NAME.png for the latest.
    evaluate: Callable[[Models], dict[str, Any]] | None = None
    payload: Callable[[Models], dict[str, Any]] | None = None           # extra checkpoint entries
    # Batches drawn from consecutive parts of `dataset` in fixed shares: (items, images per global
    # batch) per part, the counts summing to the batch size. None: uniformly from the whole dataset.
    mix: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        assert "model" in self.trainables, "a stage's main trainable is called 'model'"
        assert self.mix is None or sum(n for n, _ in self.mix) == len(self.dataset), "mix parts cover the dataset"


@dataclass(frozen=True)
class Section:
    """One group of command-line options: the fields of the config dataclass at `name`."""
    name: str                                   # attribute of the stage config, e.g. "unet"
    cls: type
    skip: frozenset[str] = frozenset()          # fields decided by the data, not by the user
    help: Mapping[str, str] = field(default_factory=dict)   # help text replacing the field's own


@dataclass(frozen=True)
class Prerequisite:
    """A run that must exist before this one can start (e.g. the VAE a latent model encodes with)."""
    stage: str
    argv: tuple[str, ...]                       # train.py arguments that create (or finish) it
    message: str                                # printed before it starts


# Options that may change when a run is resumed; everything else is fixed by its checkpoint.
# How fast a step runs (compile, kernels) never changes what it computes beyond float rounding.
RESUMABLE = frozenset({"train.steps", "train.log_every", "train.sample_every", "train.ckpt_every", "train.compile",
                       "train.kernels"})


@dataclass(frozen=True)
class StageSpec:
    name: str
    summary: str                                                # one line for --help
    config_class: type
    presets: Mapping[str, Callable[[], Any]]
    default_preset: str
    sections: tuple[Section, ...]
    # build(config, runtime, resume_from) -> (config resolved against the data, the stage for the loop)
    build: Callable[[Any, Runtime, dict[str, Any] | None], tuple[Any, TrainingStage]]
    # load_sampler(checkpoint payload, device, weights "ema" | "model", path) -> a ddpm.generate.DiffusionSampler
    load_sampler: Callable[[dict[str, Any], torch.device, str, Path], Any] | None = None
    # load_inversion(checkpoint payload, device, path) -> an invert.variations.Inverted: learned vectors
    # and the frozen model they condition, for sample.py to draw variations from
    load_inversion: Callable[[dict[str, Any], torch.device, Path], Any] | None = None
    # prerequisite(config, device name) -> a run to create first, or None
    prerequisite: Callable[[Any, str], Prerequisite | None] | None = None
    # check(config) raises a one-sentence error for options that do not fit together, before any work
    check: Callable[[Any], None] | None = None
    resumable: frozenset[str] = RESUMABLE
