"""The classifier run config and its presets: ResNet-18 trained with SGD (Nesterov momentum), a
one-cycle learning rate, label smoothing, random crops and flips, on real, synthetic or mixed data.

`classify-demo` regresses the built-in plumes' wind and temperature in minutes on a CPU;
`resnet18-cifar10` is the usual CIFAR-10 recipe (He et al. 2016's network with the small-image stem,
SGD 0.1 with momentum 0.9, weight decay 5e-4, batch 128) on a one-cycle schedule with label
smoothing 0.1 (Szegedy et al. 2016), 40 epochs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from core.config import DataConfig, StageConfig, TrainConfig, option
from core.errors import FieldError
from classify.model import ClassifierConfig, check_batch_norm_fits
from data import absolute_spec


@dataclass(frozen=True)
class ClassifyOptions:
    extra_dataset: str = option("", "more training images, e.g. a synthetic set: folder:PATH | plumes | cifar10, with "
                                    "the same class names (or parameters) as --dataset (empty: none)")
    extra_samples: int = option(0, "a seeded subset of --extra-dataset (0: all of it)")
    extra_fraction: float = option(-1.0, "share of --extra-dataset images in every batch, in [0, 1], rounded to whole "
                                         "images (0.2 of 32: 6) (-1: no fixed share; batches draw uniformly from the "
                                         "union)")
    crop_padding: int = option(-1, "random crops: pad by this many pixels (reflected) and crop back, shifting by up "
                                   "to it (-1: resolution / 8, 4 px at 32 px; 0: off)")
    noise_std: float = option(0.0, "pixel noise: add Gaussian noise of a standard deviation drawn per image from [0, "
                                   "this] (in the [-1, 1] pixel range, then clamped), so that a judge of generated images "
                                   "does not key on a noise-free background (0: off)")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy (Szegedy et al. 2016; 0: off)")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(True, "Nesterov momentum")
    init_from: str = option("", "start from the weights of this classify checkpoint, e.g. one trained on synthetic "
                                "images, to fine-tune them on --dataset; the optimizer, learning-rate schedule and "
                                "step count start anew (empty: random weights)")
    new_head: bool = option(False, "with --init-from: copy every layer but the output layer (fc), which starts from "
                                   "random weights, so the source may predict other classes, parameters or another "
                                   "target (transfer learning)")

    def __post_init__(self) -> None:
        # Each check names the fields it is about ({placeholders}): code that builds this config (and a checkpoint)
        # reads them as fields, train.py as the options that set them (core.errors.FieldError).
        if self.extra_samples < 0:
            raise FieldError("{extra_samples} must be 0 (all) or positive, got {value}.", value=self.extra_samples)
        if not (self.extra_fraction == -1 or 0 <= self.extra_fraction <= 1):
            raise FieldError("{extra_fraction} must be in [0, 1], or -1 for no fixed share, got {value}.",
                             value=self.extra_fraction)
        if self.crop_padding < -1:
            raise FieldError("{crop_padding} must be -1 (auto), 0 (off) or positive, got {value}.",
                             value=self.crop_padding)
        if not (math.isfinite(self.noise_std) and 0 <= self.noise_std <= 2):
            raise FieldError("{noise_std} must be in [0, 2] (the [-1, 1] pixel range), got {value}.",
                             value=self.noise_std)
        if not (math.isfinite(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            raise FieldError("{label_smoothing} must be in [0, 1), got {value}.", value=self.label_smoothing)
        if not 0 <= self.momentum < 1:
            raise FieldError("{momentum} must be in [0, 1), got {value}.", value=self.momentum)
        if self.nesterov and not self.momentum > 0:
            raise FieldError("{nesterov} needs a positive {momentum}; turn {nesterov} off for plain SGD.")


@dataclass(frozen=True)
class ClassifyConfig(StageConfig):
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    classify: ClassifyOptions = field(default_factory=ClassifyOptions)

    def __post_init__(self) -> None:
        # The second set's folder absolute, as DataConfig makes the others: tools that read it from the checkpoint
        # find it wherever they run, and a resume that names the same folder in other words names the same config.
        # The config is frozen, so the section is replaced as the dataclass's own __init__ sets fields.
        extra_dataset = absolute_spec(self.classify.extra_dataset)
        if extra_dataset != self.classify.extra_dataset:
            object.__setattr__(self, "classify", dataclasses.replace(self.classify, extra_dataset=extra_dataset))
        # Checks across the sections name their fields by dotted keys (core.errors.FieldError), so that
        # train.py reads them as options. The image size and batch the network must take are known before any data
        # is loaded.
        check_batch_norm_fits(self.model, self.data.resolution, self.train.batch_size)
        # Reflection repeats the image's own pixels, so it cannot pad by as many as the image has.
        if self.classify.crop_padding >= self.data.resolution:
            raise FieldError("{classify.crop_padding} must be smaller than {data.resolution} ({resolution} px), "
                             "got {value}; pass at most {most}, or -1 for an eighth of {data.resolution}.",
                             resolution=self.data.resolution, value=self.classify.crop_padding,
                             most=self.data.resolution - 1)


def classify_demo() -> ClassifyConfig:
    """ResNet-18 regressing the plumes' wind and temperature at 32x32 (the 10,000 plumes of the pixel demo),
    minutes on 2 CPU cores (docs/presets.md).

    No flips: mirroring a plume reverses its wind, so a flipped image would carry the wrong target
    (the same holds for wind classes). Classification needs labels, which plumes lack: export them
    with `python -m data.export plumes DIR --classes wind:3` and pass `--dataset folder:DIR
    --target class`.
    """
    return ClassifyConfig(
        data=DataConfig(dataset="plumes", resolution=32, hflip=False, test_samples=500),
        model=ClassifierConfig(target="params"),
        train=TrainConfig(steps=300, batch_size=32, lr=0.05, lr_schedule="onecycle", warmup_steps=90,
                          weight_decay=5e-4, grad_clip=1.0, log_every=25, sample_every=0, ckpt_every=100),
    )


def resnet18_cifar10() -> ClassifyConfig:
    return ClassifyConfig(
        data=DataConfig(dataset="cifar10", resolution=32, hflip=True, test_samples=0),
        model=ClassifierConfig(target="class"),
        train=TrainConfig(steps=15_640, batch_size=128, lr=0.1, lr_schedule="onecycle", warmup_steps=4_700,
                          weight_decay=5e-4, grad_clip=0.0, log_every=100, sample_every=1_955, ckpt_every=1_955),
    )


PRESETS = {"classify-demo": classify_demo, "resnet18-cifar10": resnet18_cifar10}
# Fields fixed by the data rather than the user.
MODEL_FROM_DATA = frozenset({"in_channels", "num_outputs"})
# TrainConfig fields that mean nothing without a weight average or image previews.
TRAIN_UNUSED = frozenset({"ema_decay", "preview_images", "preview_steps"})
