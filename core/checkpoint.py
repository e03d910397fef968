"""Checkpoints: self-describing dictionaries of tensors and plain values, written atomically.

A checkpoint is data, never code: it holds only tensors, numbers, strings, lists and dicts, so it
loads with `torch.load(..., weights_only=True)`. Every checkpoint names its `stage` and carries the
resolved config and the dataset description, so `sample.py` (and later stages) need only the path.

Layout (version 2), written by the training loop:
    format, version, stage, config, data_info, step,
    models      {name: state_dict}   every trained model ("model" is the stage's main one)
    ema         {name: state_dict}   exponential moving averages, for the models that keep one
    optimizers  {name: state_dict}, scaler, rng
    ...         anything the stage adds (e.g. a latent model's VAE)
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from core.runtime import atomic_write

FORMAT = "synthdiff-checkpoint"
VERSION = 2


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `payload` to `path` atomically (see `core.runtime.atomic_write`): a crash mid-write never
    leaves a truncated checkpoint where the previous good one was."""
    assert "stage" in payload, "a checkpoint must name its stage"
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **payload}, f))


def load_checkpoint(path: str | os.PathLike, stage: str | Iterable[str] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` and check that it belongs to `stage` (None: any).

    Every failure a user can cause (a missing path, a truncated or foreign file, a checkpoint of
    another stage) raises a one-sentence error saying what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; pass the checkpoint.pt of a finished or running training run.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"Checkpoint {path} is corrupt or not a PyTorch checkpoint ({type(err).__name__}); "
                         f"point --ckpt at an intact checkpoint.pt.") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by this toolkit; point --ckpt at a checkpoint.pt from a run directory.")
    if not isinstance(payload.get("version"), int) or payload["version"] > VERSION:
        raise ValueError(f"Checkpoint {path} has format version {payload.get('version')}, newer than this code "
                         f"understands ({VERSION}); update the toolkit.")
    if payload["version"] == 1:
        payload = _upgrade_v1(payload)
    if stage is not None:
        stages = (stage,) if isinstance(stage, str) else tuple(stage)
        if payload.get("stage") not in stages:
            raise ValueError(f"Checkpoint {path} is from stage '{payload.get('stage')}', but this needs "
                             f"{' or '.join(repr(s) for s in stages)}; pass a checkpoint of that stage.")
    return payload


def _upgrade_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """Version 1 held one model: its weights, EMA and optimizer at the top level."""
    payload = dict(payload)
    for old, new in (("model", "models"), ("ema", "ema"), ("optimizer", "optimizers")):
        if old in payload:
            payload[new] = {"model": payload.pop(old)}
    payload["version"] = VERSION
    return payload


def require_keys(payload: dict[str, Any], keys: Iterable[str], path: str | os.PathLike) -> None:
    """Refuse a checkpoint that lacks fields a loader needs (a hand-edited or half-written payload)."""
    missing = [k for k in keys if k not in payload]
    if missing:
        raise ValueError(f"Checkpoint {path} lacks {', '.join(missing)}; it is incomplete, so point --ckpt at an "
                         f"intact checkpoint.pt.")


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A short hash of a state dict's names, shapes, dtypes and values: the same weights give the same
    fingerprint on any machine, and any change to a weight gives another."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
