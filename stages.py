"""The registry of stages: `train.py --stage NAME` and `sample.py` (through a checkpoint's "stage")
dispatch on it, and name no stage themselves. `open_source` opens any checkpoint that draws images. See core/contract.py for what a stage provides.

    ddpm      pixel diffusion                         ddpm/stage.py
    vae       KL autoencoder (first stage)            vae/stage.py
    ldm       latent diffusion on a VAE               ldm/stage.py
    classify  ResNet-18 on real, synthetic or mixed   classify/stage.py
    invert    one vector per real image, model frozen invert/stage.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from classify.stage import SPEC as CLASSIFY
from core.checkpoint import advice, load_checkpoint
from core.contract import StageSpec
from core.errors import UserError
from data import trained_datasets
from ddpm.source import ImageSource
from ddpm.stage import SPEC as DDPM
from invert.stage import SPEC as INVERT
from ldm.stage import SPEC as LDM
from vae.stage import SPEC as VAE

STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (DDPM, VAE, LDM, CLASSIFY, INVERT)}
DEFAULT_STAGE = DDPM.name
GENERATIVE: dict[str, StageSpec] = {name: spec for name, spec in STAGES.items() if spec.load_source is not None}


def get_stage(name: str) -> StageSpec:
    if name not in STAGES:
        raise UserError(f"Unknown stage {name!r}; choose one of {', '.join(STAGES)}.")
    return STAGES[name]


def open_source(path: Path, device: torch.device, weights: str = "ema", option: str = "--ckpt") -> ImageSource:
    """Any generative stage's checkpoint as a source of images (the checkpoint names its stage); `option`
    is the command's option that named the file, for the advice of an error."""
    payload = load_checkpoint(path, option=option)
    stage = str(payload.get("stage"))
    if stage not in STAGES:  # (written by train.py, so the file was damaged or edited, not an option mistyped)
        raise UserError(f"{path} records the stage {stage!r}, which is none of {', '.join(STAGES)}; it is damaged or "
                        f"was edited, so {advice(option)}.")
    spec = STAGES[stage]
    if spec.load_source is None:
        raise UserError(f"{path} is a checkpoint of stage '{spec.name}', which does not generate images; pass the "
                        f"checkpoint of a run that does ({', '.join(GENERATIVE)}).")
    source = spec.load_source(payload, device, weights, path)
    source.trained_on = {f"the model's {option}": spec for option, spec in trained_datasets(payload).items()}
    # An inversion: the frozen model's training images too.
    source.trained_on.update({f"the frozen model's {option}": spec for option, spec in source.drawn_through.items()})
    return source

