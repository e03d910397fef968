"""The classifier every judging tool shares: torchvision's ResNet-18 (He et al. 2016), with the stem of
the CIFAR ResNets for small images, and the loader that turns a classify-stage checkpoint into it.

ImageNet's stem (7x7 convolution with stride 2, then a 3x3 max-pool) divides a 224 px image by 4
before the first residual block; on a 32 px image it would leave the last stage 1x1. The CIFAR
variant (He et al. 2016, section 4.2) keeps full resolution with one 3x3 convolution of stride 1 and
no pool; we use it for inputs of at most 64 px (`small_stem="auto"`).

A `Classifier` predicts either classes (logits over the training data's class names) or numeric
parameters (in the data's units, trained on their values normalised to [-1, 1] over the training
range). Grad-CAM, the experiment runner and the conditioning-accuracy check all load it with
`load_classifier` and never look inside a checkpoint themselves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.checkpoint import load_checkpoint, load_weights, require_keys
from core.config import check_choice, from_dict, option, require
from core.errors import FieldError, UserError
from core.speed import inference_layout
from data import DatasetInfo
from data.dataset import LUMA
from data.imageio import as_rgb

NAME = "classify"
TARGETS = ("class", "params")
STEMS = ("auto", "small", "imagenet")
SMALL_IMAGE = 64  # largest side that gets the CIFAR stem under small_stem="auto"


@dataclass(frozen=True)
class ClassifierConfig:
    target: str = option("class", "what to predict: class (the data's labels) or params (its numeric parameters, "
                                  "regressed)", choices=TARGETS)
    stem: str = option("auto", "ResNet stem: small (3x3 conv, stride 1, no max-pool, as CIFAR ResNets), imagenet "
                               "(7x7 conv, stride 2, max-pool), auto (small up to 64 px)", choices=STEMS)
    # Fixed by the data (filled in by the stage from the training set), not options.
    in_channels: int = 3
    num_outputs: int = 0           # classes, or parameters

    def __post_init__(self) -> None:
        # Each check names the fields it is about: code reads them as fields, train.py as the options that set them
        # (core.errors.FieldError); in_channels, which the data decides, by its name on a command line too.
        check_choice("target", self.target, TARGETS)
        check_choice("stem", self.stem, STEMS)
        if self.in_channels not in (1, 3):
            raise FieldError("{in_channels} must be 1 or 3, got {value}.", value=self.in_channels)


def small_stem(config: ClassifierConfig, resolution: int) -> bool:
    return config.stem == "small" or (config.stem == "auto" and resolution <= SMALL_IMAGE)


def last_feature_map(config: ClassifierConfig, resolution: int) -> int:
    """Side of the feature maps in ResNet-18's last stage for `resolution`-pixel images: each stride-2 layer
    (a padded 3x3 or 7x7 convolution, the padded 3x3 max-pool) halves the side, rounding up; layer2 to layer4
    make three halvings, and the ImageNet stem two more."""
    halvings = 3 if small_stem(config, resolution) else 5
    return -(-resolution // 2**halvings)


def check_batch_norm_fits(config: ClassifierConfig, resolution: int, batch_size: int) -> None:
    """Batch norm in training needs more than one value per channel: a batch of one image shrunk to 1x1 by the
    last stage has one, and fails at the first step. A check of the classify stage's config across its sections
    (`classify.config.ClassifyConfig`): it names the batch size and the stem by their keys there."""
    if batch_size > 1 or last_feature_map(config, resolution) > 1:
        return
    alternative = ("" if last_feature_map(dataclasses.replace(config, stem="small"), resolution) == 1
                   else ", or {model.stem} small")
    raise FieldError("ResNet-18 shrinks {resolution} px images to 1x1 in its last stage, where batch norm needs "
                     "more than one value per channel, so {train.batch_size} 1 cannot train it; pass "
                     "{train.batch_size} 2 or more" + alternative + ".", resolution=resolution)


def build_resnet18(config: ClassifierConfig, resolution: int) -> nn.Module:
    """torchvision's ResNet-18 with `config.num_outputs` outputs, `config.in_channels` input channels and
    the stem chosen for `resolution`. Layer names are torchvision's (conv1, layer1..layer4, fc), so
    Grad-CAM and published ResNet weights find them where they expect."""
    # torchvision is imported here, not with this module: importing it imports PyTorch's compiler (2-3 s), a cost
    # that commands which only read a classifier's config (every train.py start) should not pay.
    from torchvision.models import resnet18
    require(config.num_outputs >= 1, "A classifier needs at least one output (a class or a parameter).")
    net = resnet18(weights=None, num_classes=config.num_outputs)
    if small_stem(config, resolution):
        net.conv1 = nn.Conv2d(config.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif config.in_channels != 3:
        net.conv1 = nn.Conv2d(config.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


@dataclass
class Classifier:
    """A trained classifier or parameter regressor, frozen and in eval mode, ready to judge images."""
    net: nn.Module
    config: ClassifierConfig
    info: DatasetInfo                  # what it was trained on: resolution, channels, class or parameter names

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def output_names(self) -> tuple[str, ...]:
        """The name of each output: class names (logits) or parameter names (regressed values)."""
        return self.info.class_names if self.config.target == "class" else self.info.param_names

    def prepare(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] (B, C, H, W) at the training resolution, in the classifier's channels."""
        info = self.info
        assert images.dim() == 4, f"expected images (B, C, H, W), got {tuple(images.shape)}"
        if images.shape[-2:] != (info.resolution, info.resolution):
            raise UserError(f"This classifier takes {info.resolution}x{info.resolution} images, got "
                            f"{images.shape[-1]}x{images.shape[-2]}; resize them or load them at --resolution "
                            f"{info.resolution}.")
        if images.shape[1] == info.channels:
            return images
        if images.shape[1] == 1 and info.channels == 3:
            return as_rgb(images)
        if images.shape[1] == 3 and info.channels == 1:  # ITU-R 601 luma, as data.dataset.to_channels
            weights = torch.tensor(LUMA, device=images.device, dtype=images.dtype)
            return (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        raise UserError(f"This classifier takes {info.channels}-channel images, got {images.shape[1]}.")

    @torch.no_grad()
    def outputs(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Raw network outputs (B, num_outputs): logits, or parameters normalised to [-1, 1]."""
        device = self.device
        parts = [self.net(self.prepare(chunk.to(device)).float()).float().cpu() for chunk in images.split(batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.config.num_outputs)

    def predict(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Predicted class indices (B,) int64, or predicted parameters (B, P) in the data's units."""
        out = self.outputs(images, batch_size)
        if self.config.target == "class":
            return out.argmax(dim=1)
        return self.info.denormalize_params(out)


def load_classifier(path: str | Path, device: torch.device | str = "cpu", option: str | None = None) -> Classifier:
    """The classifier or regressor saved by `train.py --stage classify` at `path`, frozen, in eval mode, in the
    layout its inference runs fastest in (`core.speed.inference_layout`: channels-last on the CPU, where
    ResNet-18's forward ran 1.4-1.8x faster in bf16); `option` is the command's option that named the file, for
    the advice of an error."""
    path = Path(path)
    payload: dict[str, Any] = load_checkpoint(path, NAME, option=option)
    require_keys(payload, ("config", "data_info", "models"), path, option=option)
    config = from_dict(ClassifierConfig, payload["config"]["model"], source=path)
    info = DatasetInfo.from_dict(payload["data_info"])
    net = load_weights(build_resnet18(config, info.resolution), payload["models"].get("model"), path, "ResNet-18")
    device = torch.device(device)
    return Classifier(inference_layout(net.to(device).eval().requires_grad_(False), device), config, info)
