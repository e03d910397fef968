"""LPIPS, the learned perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric", version 0.1 with the VGG-16 trunk), and its offline fallback.

Both images go through the convolutional trunk of VGG-16 (Simonyan & Zisserman 2015, configuration
D, as torchvision lays it out) after a fixed per-channel scaling. At each of five taps (relu1_2,
relu2_2, relu3_3, relu4_3, relu5_3) the features are normalised to unit length over channels, and
the distance is paper eq. 1 in the form the released code and weights use (the head weighs the
squared difference rather than the difference before squaring):

    d(x, y) = sum_l  mean_{h,w}  sum_c  w_{l,c} (f^l_{hwc}(x) - f^l_{hwc}(y))^2,   w_{l,c} >= 0,

where the head weights w_l were fitted to human judgements of which of two distortions looks closer
to a reference. `build_perceptual(kind="lpips")` loads the trunk from torchvision's ImageNet VGG-16
file and the heads from LPIPS's v0.1 file.

Offline, without those files, `kind="random"` keeps the same network with seeded random trunk
weights (torchvision's Kaiming initialisation) and uniform heads (w = 1, the sum over channels that
LPIPS reports as its "baseline"). Liu et al. 2021 ("Generic Perceptual Loss for Modeling Structured
Output Dependencies") show that such an untrained network already makes a useful perceptual
training loss: its structure, not its trained weights, is what captures the dependencies between
neighbouring output pixels. Its values are not LPIPS numbers and must not be reported as such.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from core.errors import MissingFileError, UserError
from core.weights import check_state_dict, download, hub_checkpoint, read_state_dict
from kernels.lpips import tap_distance

TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
PERCEPTUAL_KINDS = ("auto", "lpips", "random")

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"
VGG16_SHA256_PREFIX = "397923af"  # torchvision names its weight files by the start of their sha256
LPIPS_FILENAME = "lpips_v0.1_vgg.pth"  # our cache name for lpips/weights/v0.1/vgg.pth
LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
_VGG16_WHAT = "torchvision VGG-16"  # the files' roles in error messages
_LPIPS_WHAT = "LPIPS v0.1 VGG head"

# VGG configuration D up to relu5_3: output channels of each 3x3 convolution, "M" a 2x2 max-pool.
# Every convolution is followed by a ReLU, so the layer indices (and the file's `features.<i>` keys)
# come out as torchvision's; the pool after relu5_3 is never needed.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAP_CHANNELS = (64, 128, 256, 512, 512)

# LPIPS v0.1 input scaling for images in [-1, 1]: (x - shift) / scale per RGB channel, which maps
# them roughly onto the ImageNet-standardised inputs the VGG-16 weights were trained on.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# Seed of the private generator for kind="random": every build draws the same trunk.
RANDOM_TRUNK_SEED = 0


def _vgg16_layers() -> tuple[list[tuple[int, int, int]], list[int]]:
    """Torchvision's layer indices: (index, in channels, out channels) of the 13 convolutions, and the
    index of the ReLU each tap reads (the one before each pool, and the last)."""
    convs, taps, index, in_channels = [], [], 0, 3
    for entry in _VGG16_LAYOUT:
        if entry == "M":
            taps.append(index - 1)
            index += 1
        else:
            convs.append((index, in_channels, entry))
            in_channels, index = entry, index + 2  # the conv and its ReLU
    taps.append(index - 1)
    return convs, taps


_VGG16_CONVS, _TAP_LAYERS = _vgg16_layers()  # taps at layers 3, 8, 15, 22, 29

VGG16_SHAPES = {key: shape for index, c_in, c_out in _VGG16_CONVS
                for key, shape in ((f"features.{index}.weight", (c_out, c_in, 3, 3)),
                                   (f"features.{index}.bias", (c_out,)))}
LPIPS_SHAPES = {f"lin{tap}.model.1.weight": (1, channels, 1, 1) for tap, channels in enumerate(TAP_CHANNELS)}


class PerceptualDistance(nn.Module):
    """LPIPS-style distance between image pairs over the first `taps` VGG-16 taps.

    A fresh instance is the random-network variant (kind "random"); `load_published` swaps in the
    LPIPS weights (kind "lpips"). The module is frozen: nothing in it learns, but gradients reach the
    inputs, which is what a training loss needs. Use `build_perceptual` rather than this directly.
    """

    def __init__(self, taps: int = 5) -> None:
        super().__init__()
        if not isinstance(taps, int) or not 1 <= taps <= len(TAPS):
            raise UserError(f"taps must be one of 1, 2, 3, 4, 5 (the first n of {', '.join(TAPS)}), not {taps!r}.")
        self.kind = "random"  # "lpips" once load_published has run
        self.taps = taps  # leading taps used; the trunk is cut after the last one
        layers: list[nn.Module] = []
        in_channels = 3
        for entry in _VGG16_LAYOUT:
            if entry == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                # skip_init: PyTorch's default initialisation would draw from the global RNG.
                # In-place ReLU is safe: a convolution's backward does not need its output, and the
                # ReLU's own backward reads only its result, which nothing after it modifies.
                layers += [nn.utils.skip_init(nn.Conv2d, in_channels, entry, 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = entry
        self.features = nn.Sequential(*layers[:_TAP_LAYERS[taps - 1] + 1])  # indices stay torchvision's
        # Channels-last: oneDNN's fastest layout for these convolutions on CPU (docs/speed.md).
        self.features.to(memory_format=torch.channels_last)
        self.heads = nn.ParameterList(nn.Parameter(torch.empty(channels)) for channels in TAP_CHANNELS[:taps])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self._init_random()
        self.requires_grad_(False)
        self.eval()  # no layer depends on the mode; set for callers that check it

    def _init_random(self) -> None:
        # torchvision's VGG initialisation (Kaiming normal, fan_out, ReLU gain, zero bias) from a
        # private generator, so two builds agree and the caller's RNG is untouched. Layers are drawn
        # in order, so a network with fewer taps is a prefix of the full one.
        generator = torch.Generator().manual_seed(RANDOM_TRUNK_SEED)
        with torch.no_grad():
            for layer in self.features:
                if isinstance(layer, nn.Conv2d):
                    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu", generator=generator)
                    layer.bias.zero_()
            for head in self.heads:
                head.fill_(1.0)

    def load_published(self, vgg: Mapping[str, Tensor], lpips: Mapping[str, Tensor], *, vgg_source: str,
                       lpips_source: str) -> None:
        """Copy torchvision's VGG-16 state dict into the trunk and LPIPS v0.1's heads into the heads.

        Both dictionaries are checked in full (all 13 convolutions, all 5 heads, whatever `taps` is)
        before anything is copied, so a wrong or truncated file is refused rather than half-used.
        """
        check_state_dict(vgg, VGG16_SHAPES, source=vgg_source, what=_VGG16_WHAT, ignore_prefixes=("classifier.",))
        check_state_dict(lpips, LPIPS_SHAPES, source=lpips_source, what=_LPIPS_WHAT)
        for key, weight in lpips.items():
            # LPIPS clamps its heads at zero while fitting them; a negative weight would reward
            # differences, so such a file was not produced by LPIPS training.
            if not bool((weight >= 0).all()):
                raise UserError(f"{lpips_source} has negative or non-finite head weights under {key}, which LPIPS "
                                f"heads never have; pass the published v0.1 vgg.pth.")
        with torch.no_grad():
            for index, layer in enumerate(self.features):
                if isinstance(layer, nn.Conv2d):
                    layer.weight.copy_(vgg[f"features.{index}.weight"])
                    layer.bias.copy_(vgg[f"features.{index}.bias"])
            for tap, head in enumerate(self.heads):
                head.copy_(lpips[f"lin{tap}.model.1.weight"].reshape(-1))
        self.kind = "lpips"

    def _tap_activations(self, x: Tensor) -> list[Tensor]:
        """The trunk's ReLU outputs at the used taps for images x in [-1, 1], as they are (channels_last)."""
        h = ((x - self.shift) / self.scale).contiguous(memory_format=torch.channels_last)
        activations = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in _TAP_LAYERS:
                activations.append(h)
        return activations

    def tap_distances(self, x: Tensor, y: Tensor) -> Tensor:
        """(B, taps) float32: each tap's term of the distance between x and y, (B, 3, H, W) in [-1, 1]."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape != y.shape:
            raise UserError(f"Perceptual distance needs two image batches of one shape (B, 3, H, W), got "
                            f"{tuple(x.shape)} and {tuple(y.shape)}; pass RGB images of matching size.")
        smallest = 2 ** (self.taps - 1)
        if min(x.shape[-2:]) < smallest:
            raise UserError(f"Images of size {tuple(x.shape[-2:])} are too small for {self.taps} taps (each tap "
                            f"after the first halves the size); use at least {smallest}x{smallest} or fewer taps.")
        # Separate passes, not one batch of both: y is usually a target without gradient, and a joint
        # batch would carry its half through the backward pass for nothing. Each tap's normalisation and
        # weighted difference is one fused op (`kernels.lpips`).
        terms = [tap_distance(fx, fy, head)
                 for fx, fy, head in zip(self._tap_activations(x), self._tap_activations(y), self.heads)]
        return torch.stack(terms, dim=1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(B,) float32 distance between each pair of images x[i], y[i], (B, 3, H, W) in [-1, 1]."""
        return self.tap_distances(x, y).sum(dim=1)


def build_perceptual(kind: str = "auto", taps: int = 5, vgg_weights: str = "",
                     lpips_weights: str = "") -> PerceptualDistance:
    """The frozen perceptual distance used as a reconstruction loss.

    kind: "lpips" loads the published weights (the explicit paths, else the torch hub cache, else a
    download into that cache); "random" is the seeded random network, for offline use; "auto" is
    "lpips" when both files are on disk (explicit paths or the cache) and "random" otherwise, and
    never downloads. For both, an explicit path that does not exist is an error, so a typo cannot
    silently swap the loss; "random" ignores the paths.
    taps: how many of relu1_2 .. relu5_3 to use (LPIPS uses all 5).
    """
    if kind not in PERCEPTUAL_KINDS:
        raise UserError(f"Perceptual kind must be one of {', '.join(PERCEPTUAL_KINDS)}, not {kind!r}.")
    net = PerceptualDistance(taps)
    if kind == "random":
        return net
    vgg_path = _local_file(vgg_weights, VGG16_FILENAME)
    lpips_path = _local_file(lpips_weights, LPIPS_FILENAME)
    if kind == "auto" and (vgg_path is None or lpips_path is None):
        return net
    if vgg_path is None:
        vgg_path = download(VGG16_URL, VGG16_FILENAME, _VGG16_WHAT,
                            "pass its path with --vgg-weights (vgg_weights= in Python)",
                            hash_prefix=VGG16_SHA256_PREFIX)
    if lpips_path is None:
        lpips_path = download(LPIPS_URL, LPIPS_FILENAME, _LPIPS_WHAT,
                              "pass the path of LPIPS's v0.1 vgg.pth with --lpips-weights (lpips_weights= in Python)")
    net.load_published(read_state_dict(vgg_path, _VGG16_WHAT), read_state_dict(lpips_path, _LPIPS_WHAT),
                       vgg_source=str(vgg_path), lpips_source=str(lpips_path))
    return net


def check_weight_files(vgg_weights: str | os.PathLike = "", lpips_weights: str | os.PathLike = "") -> None:
    """Refuse a given VGG-16 or LPIPS file that is not one (names and shapes) before any work starts; the run
    reads them again when it builds the loss. Files are mapped, not read, where PyTorch can (see read_state_dict)."""
    for path, what, shapes, ignored in ((vgg_weights, _VGG16_WHAT, VGG16_SHAPES, ("classifier.",)),
                                        (lpips_weights, _LPIPS_WHAT, LPIPS_SHAPES, ())):
        if path:
            check_state_dict(read_state_dict(path, what, mmap=True), shapes, source=str(path), what=what,
                             ignore_prefixes=ignored)


def _local_file(explicit: str | os.PathLike, filename: str) -> Path | None:
    """The explicit path if given (it must exist), else the torch hub cached copy if present, else None."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise MissingFileError(f"Weights file {path} does not exist; pass the path of {filename} or leave the "
                                   f"option empty to use the torch hub cache ({hub_checkpoint(filename).parent}).")
        return path
    cached = hub_checkpoint(filename)
    return cached if cached.is_file() else None
