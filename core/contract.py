"""What a stage is: the contract between a stage (ddpm, vae, ldm, classify, invert), the one
training loop, and the entry points. The registry of stages is `stages.py` at the top of the
repository; the loop and the entry points only ever see the types below, so none names a stage.

The call path of `python train.py --stage NAME ...`:

    train.py                  picks STAGES[NAME], a StageSpec, and parses its options
    training.run.train        spec.presets[PRESET]() + options -> config (the checkpoint's, on --resume);
                              spec.check(config, checkpoint, device, run_dir); spec.prerequisite(config) -> a run to train
                              first, if any;
                              spec.build(config, runtime, checkpoint, run_dir) -> (resolved config, TrainingStage)
    training.loop.Trainer     each step: stage.augment(batch) -> stage.loss(TrainingModels, batch, ...)
                              -> one backward and optimizer step per trainable; before each log line and
                              checkpoint, the loop's divergence tests and stage.diverged(trained models);
                              every so often stage.outputs.preview / evaluate / payload, given the weight averages

and of `python sample.py --ckpt CKPT`: the checkpoint's "stage" picks the spec, whose
`load_source` turns the checkpoint into a `ddpm.source.ImageSource` that the sampling package draws
from.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from core.runtime import Runtime

MAIN = "model"  # the main trainable: its loss is the logged "loss", and sampling loads its weights


class TrainingModels(Mapping[str, nn.Module]):
    """The stage's trainables as a loss sees them, in two versions.

    `models[name]` is the version to train through: wrapped by DDP when several processes train (so its
    gradients are averaged across them) and compiled when asked. Call it for every forward pass whose
    gradients update that model.

    `models.raw[name]` is the module itself. Read its attributes through it (a layer's weight), and call
    it for a forward pass whose gradients must not update it: the generator term of a GAN goes through
    the discriminator but trains only the generator, and a DDP-wrapped discriminator would wait for
    gradients that never come.
    """

    def __init__(self, wrapped: Mapping[str, nn.Module], raw: Mapping[str, nn.Module]):
        assert wrapped.keys() == raw.keys(), "one wrapped and one raw version of each trainable"
        self._wrapped, self.raw = dict(wrapped), dict(raw)

    def __getitem__(self, name: str) -> nn.Module:
        return self._wrapped[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._wrapped)

    def __len__(self) -> int:
        return len(self._wrapped)


Models = Mapping[str, nn.Module]  # what previews, evaluations and payloads get: the weight averages, in eval mode
# loss(models, batch, generator, step) -> (losses, metrics). `losses` is one scalar (the main
# trainable's), or one scalar per trainable that this step updates (a trainable without an entry is
# left alone this step); `metrics` are detached scalars the loop averages over each logging window.
LossFn = Callable[[TrainingModels, Any, torch.Generator, int], tuple[Tensor | dict[str, Tensor], dict[str, Tensor]]]


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
    broadcast_buffers: bool = True              # under DDP: rank 0's buffers (BatchNorm's statistics) copied to
                                                # every process at each call of the wrapped model

    def __post_init__(self) -> None:
        assert self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
        assert not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0), "Nesterov needs SGD with momentum"


@dataclass
class Outputs:
    """What the loop writes besides weights, each given the weight averages in eval mode (`Models`)."""
    preview: Callable[[Models], Tensor] | None = None               # images in [-1, 1] for a PNG grid
    preview_nrow: int | None = None                                 # images per grid row (None: square)
    # Held-out metrics, logged as a line of their own. An entry "figures", {name: PIL image}, is written
    # as pictures instead: RUN_DIR/figures/NAME-step-N.png, and RUN_DIR/NAME.png for the latest.
    evaluate: Callable[[Models], dict[str, Any]] | None = None
    payload: Callable[[Models], dict[str, Any]] | None = None       # extra checkpoint entries


@dataclass
class TrainingStage:
    """Everything a stage hands the training loop. The loop knows nothing else about the stage."""
    name: str                                   # the checkpoint's "stage" field
    trainables: dict[str, Trainable]            # by name; MAIN is the main one
    loss: LossFn
    dataset: Dataset                            # items: tensors, or (named) tuples, lists or dicts of them
    config: dict[str, Any]                      # the resolved config, stored in checkpoints and config.json
    data_info: dict[str, Any]                   # what the model was trained on
    augment: Callable[[Any, torch.Generator], Any] | None = None    # batch -> batch, drawn from the step's generator
    # Batches drawn from consecutive parts of `dataset` in fixed shares: (items, images per global
    # batch) per part, the counts summing to the batch size. None: uniformly from the whole dataset.
    mix: tuple[tuple[int, int], ...] | None = None
    outputs: Outputs = field(default_factory=Outputs)
    # diverged(trained models, the logging window's mean metrics) -> what shows that training has diverged
    # (a phrase, e.g. "the largest vector's RMS became 3e+07, ..."), or None. For what the loop's own tests
    # (a loss or gradient norm that is not finite) cannot see; checked on every process before each log
    # line and checkpoint, so a diverged state is never saved.
    diverged: Callable[[Models, Mapping[str, float]], str | None] | None = None

    def __post_init__(self) -> None:
        assert MAIN in self.trainables, f"a stage's main trainable is called {MAIN!r}"
        assert self.mix is None or sum(n for n, _ in self.mix) == len(self.dataset), "mix parts cover the dataset"


@dataclass(frozen=True)
class Section:
    """One group of command-line options: the fields of the config dataclass at `name`."""
    name: str                                   # attribute of the stage config, e.g. "unet"
    cls: type
    skip: frozenset[str] = frozenset()          # fields decided by the data, not by the user
    help: Mapping[str, str] = field(default_factory=dict)   # help text replacing the field's own


def sections_of(config_class: type, **custom: Mapping[str, Any]) -> tuple[Section, ...]:
    """One `Section` per field of a stage's config: data first, train last, the stage's own between in the
    order the config declares them. `custom[name]` holds that section's `skip` and `help`."""
    fields = [f.name for f in dataclasses.fields(config_class)]
    assert set(custom) <= set(fields), f"{config_class.__name__} has no sections {sorted(set(custom) - set(fields))}"
    hints = typing.get_type_hints(config_class)
    order = ["data", *(name for name in fields if name not in ("data", "train")), "train"]
    return tuple(Section(name, hints[name], **custom.get(name, {})) for name in order)


# Options that may change when a run is resumed; everything else is fixed by its checkpoint.
# How fast a step runs (compile, kernels) never changes what it computes beyond float rounding; where the
# data is kept and how many processes load it (a job requeued on another machine) never change the data,
# which a resume checks by its fingerprint.
RESUMABLE = frozenset({"train.steps", "train.log_every", "train.sample_every", "train.ckpt_every", "train.compile",
                       "train.kernels", "data.num_workers", "data.cache_dir"})


@dataclass(frozen=True)
class StageSpec:
    """One stage as the entry points see it."""
    name: str
    summary: str                                                # one line for --help
    config_class: type
    presets: Mapping[str, Callable[[], Any]]                    # the first is the default
    sections: tuple[Section, ...]
    # build(config, runtime, resume_from, run_dir) -> (config resolved against the data, the stage for the loop);
    # run_dir is the run's folder, where its checkpoints go (an inversion records its model's path from there)
    build: Callable[[Any, Runtime, dict[str, Any] | None, Path | None], tuple[Any, TrainingStage]]
    # check(config, resume_from, device, run_dir) raises a one-sentence error for options that do not fit together
    # (networks that cannot take the image size, or outgrow the device's memory, files that do not exist), before
    # any data is loaded or anything written; resume_from is the checkpoint a resumed run continues (None for a
    # new run), and run_dir the run's folder, as for build
    check: Callable[[Any, dict[str, Any] | None, torch.device, Path | None], None] | None = None
    # prerequisite(config, device name) -> a run to create first, or None
    prerequisite: Callable[[Any, str], Prerequisite | None] | None = None
    # load_source(checkpoint payload, device, weights "ema" | "model", path) -> a ddpm.source.ImageSource:
    # the trained model and what each image it draws is conditioned on (None: the stage draws no images)
    load_source: Callable[[dict[str, Any], torch.device, str, Path], Any] | None = None
    # sample.py option groups that only this stage's checkpoints read (an inversion's variations)
    sample_options: tuple[Section, ...] = ()

    @property
    def default_preset(self) -> str:
        return next(iter(self.presets))


@dataclass(frozen=True)
class Prerequisite:
    """A run that must exist before this one can start (e.g. the VAE a latent model encodes with)."""
    spec: StageSpec                             # its stage
    argv: tuple[str, ...]                       # train.py arguments that create (or finish) it
    message: str                                # printed before it starts
