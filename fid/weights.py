"""Finding and loading the published FID Inception weights.

The file is the PyTorch port of TensorFlow's `inception-2015-12-05` graph released with pytorch-fid.
It is fetched through torch.hub (cached under `<torch hub dir>/checkpoints/`, hash-checked) unless a
local path is given; offline without a copy, the error says where to put one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from core.errors import MissingFileError, UserError
from core.weights import read_state_dict

from .inception import FIDInceptionV3

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILENAME}"
# Test-only sentinel: a network with random weights, so the pipeline can be exercised offline.
# Its numbers mean nothing and must never be reported.
RANDOM_WEIGHTS = "random"


def build_fid_inception(weights: str | os.PathLike | None = None) -> FIDInceptionV3:
    """The FID Inception network in eval mode with frozen parameters.

    weights: None downloads (or reuses the torch.hub cached copy of) the published file; a path
    loads that file; "random" gives a deterministic random-weight network for tests only.
    """
    if weights == RANDOM_WEIGHTS:
        model = FIDInceptionV3()
        _init_random(model)
    else:
        state_dict = _download_state_dict() if weights is None else read_state_dict(weights, "FID Inception weights")
        model = FIDInceptionV3()
        load_fid_state_dict(model, state_dict, source=str(weights or WEIGHTS_FILENAME))
    model.eval()
    model.requires_grad_(False)
    return model


def load_fid_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load strictly, so any file that is not the FID network's is refused rather than half-used."""
    state_dict = dict(state_dict)
    # The published file stores BatchNorm's `num_batches_tracked` counters; copies re-saved by other
    # tools sometimes drop them. They never affect eval-mode outputs, so fill in rather than refuse.
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros_like(value)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        summary = " ".join(str(err).split())[:300]
        raise UserError(
            f"Weights {source} do not fit the FID Inception network ({summary}); use {WEIGHTS_FILENAME}."
        ) from err


def _download_state_dict() -> dict[str, torch.Tensor]:
    try:
        return torch.hub.load_state_dict_from_url(
            WEIGHTS_URL, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except OSError as err:  # URLError, HTTPError and socket errors are all OSErrors
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        raise MissingFileError(
            f"Cannot download the FID weights {WEIGHTS_FILENAME} from {WEIGHTS_URL} ({err}); download it "
            f"elsewhere and pass --weights PATH (weights=PATH in Python) or put it in {checkpoints}."
        ) from err
    except Exception as err:  # a download that fails its hash check, or a damaged copy in the cache
        cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME
        summary = " ".join(str(err).split())[:200]
        raise UserError(
            f"The FID weights {WEIGHTS_FILENAME} from {WEIGHTS_URL} or its cached copy cannot be read "
            f"({type(err).__name__}: {summary}); delete {cached} and run again, or pass --weights PATH."
        ) from err


def _init_random(model: nn.Module) -> None:
    # He initialisation keeps activations O(1) through the 90-odd layers (PyTorch's default would
    # shrink them towards zero), so test statistics are well conditioned. Fixed seed, own generator:
    # two builds give the same network and the caller's RNG state is untouched.
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            with torch.no_grad():
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
