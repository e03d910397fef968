"""FID and KID in a domain's own features: the penultimate layer of a classifier trained here.

Inception's features were learnt on ImageNet photographs; on plumes or fluid fields they may not see
what matters. A classifier or parameter regressor trained on the domain (`train.py --stage classify`)
has learnt features for it, and its penultimate layer (ResNet-18's 512 averaged channels, the input
of its `fc` head) serves as the feature space of the same Fréchet distance and KID.

Images reach the network as the classify stage's training data reaches it. A folder's files are decoded
as `load_dataset` decodes them (`data.folder.decode_square`: upright by EXIF, transparency on black,
the centre square resized with antialiased Lanczos, in the classifier's channels), so that `python -m
fid --features` and the sweep measure the same features; images handed over as tensors are brought to
the classifier's resolution by `fit_to` (centre square, antialiased bicubic, as
`data.dataset.resize_uint8`; images already at that size, as generated samples are, pass untouched).
Then they are mapped from [0, 1] to [-1, 1] (`data.imageio.from_uint8`), in the classifier's channels
(ITU-R 601 luma or grey replicated, `Classifier.prepare`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from classify.model import Classifier, load_classifier
from core.checkpoint import state_fingerprint

FEATURES_OPTION = "--features"


def network_name(classifier: Classifier) -> str:
    """What statistics record as their feature network: stage, architecture, layer and size, and what the
    head was trained to predict (two classifiers with other names never compare)."""
    info = classifier.info
    return (f"classify ResNet-18/penultimate-{feature_dim(classifier)} ({classifier.config.target} target, "
            f"{info.resolution} px, {info.channels} channels)")


def feature_dim(classifier: Classifier) -> int:
    return classifier.net.fc.in_features


def fit_to(images: Tensor, resolution: int) -> Tensor:
    """Float (B, C, H, W) -> (B, C, resolution, resolution): centre square, antialiased bicubic resize."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[..., top:top + side, left:left + side]
    if side == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bicubic", antialias=True,
                         align_corners=False).clamp(0, 1)


class ClassifierFeatures:
    """The penultimate features of a classify-stage checkpoint: a callable from images in [0, 1]
    (B, 1 or 3, H, W) to float32 features (B, 512)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device) -> None:
        self.classifier = load_classifier(path, device, option=FEATURES_OPTION)
        self.name = network_name(self.classifier)
        self.dim = feature_dim(self.classifier)
        self.resolution = self.classifier.info.resolution  # where images of mixed sizes are brought together
        self.fingerprint = state_fingerprint({name: value for name, value in self.classifier.net.state_dict().items()
                                              if not name.endswith("num_batches_tracked")})

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        x = self.classifier.prepare(fit_to(images, self.resolution) * 2 - 1)
        features = penultimate(self.classifier.net, x)
        assert features.shape == (images.shape[0], self.dim)
        return features.float()


def penultimate(net: torch.nn.Module, x: Tensor) -> Tensor:
    """torchvision ResNet's forward up to its head: the pooled, flattened input of `fc` (B, 512)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(net.avgpool(x), 1)
