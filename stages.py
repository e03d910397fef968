"""The registry of stages: `train.py --stage NAME` and `sample.py` (through a checkpoint's "stage")
dispatch on it, and name no stage themselves. See core/stages.py for what a stage provides.

    ddpm      pixel diffusion                         ddpm/stage.py
    vae       KL autoencoder (first stage)            vae/stage.py
    ldm       latent diffusion on a VAE               ldm/stage.py
    classify  ResNet-18 on real, synthetic or mixed   classify/stage.py
    invert    one vector per real image, model frozen invert/stage.py
"""

from __future__ import annotations

from classify.stage import SPEC as CLASSIFY
from core.stages import StageSpec
from ddpm.stage import SPEC as DDPM
from invert.stage import SPEC as INVERT
from ldm.stage import SPEC as LDM
from vae.stage import SPEC as VAE

STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (DDPM, VAE, LDM, CLASSIFY, INVERT)}
DEFAULT_STAGE = DDPM.name


def get_stage(name: str) -> StageSpec:
    if name not in STAGES:
        raise ValueError(f"Unknown stage {name!r}; choose one of {', '.join(STAGES)}.")
    return STAGES[name]
