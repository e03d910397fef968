"""Checkpoints: self-describing dictionaries of tensors and plain values, written atomically.

A checkpoint is data, never code: it holds only tensors, numbers, strings, lists and dicts, so it
loads with `torch.load(..., weights_only=True)`. Every checkpoint names its `stage` and carries the
resolved config and the dataset description, so `sample.py` (and later stages) need only the path.

Layout (version 2), written by the training loop:
    format, version, stage, config, data_info, step,
    models      {name: state_dict}   every trained model ("model" is the stage's main one)
    ema         {name: state_dict}   what to sample with, for the models that keep a weight average: the
                                     average (with --ema-decay 0, the weights themselves)
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
from torch import nn

from core.errors import MissingFileError, UserError
from core.runtime import atomic_write
from core.weights import state_dict_mismatch

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
        raise MissingFileError(f"Checkpoint {path} does not exist; pass the checkpoint.pt of a finished or running training run.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise UserError(f"Checkpoint {path} is corrupt or not a PyTorch checkpoint ({type(err).__name__}); "
                        f"point --ckpt at an intact checkpoint.pt.") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this toolkit; point --ckpt at a checkpoint.pt from a run directory.")
    if not isinstance(payload.get("version"), int) or payload["version"] > VERSION:
        raise UserError(f"Checkpoint {path} has format version {payload.get('version')}, newer than this code "
                        f"understands ({VERSION}); update the toolkit.")
    if payload["version"] == 1:
        payload = _upgrade_v1(payload)
    if stage is not None:
        stages = (stage,) if isinstance(stage, str) else tuple(stage)
        if payload.get("stage") not in stages:
            raise UserError(f"Checkpoint {path} is from stage '{payload.get('stage')}', but this needs "
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
        raise UserError(f"Checkpoint {path} lacks {', '.join(missing)}; it is incomplete, so point --ckpt at an "
                        f"intact checkpoint.pt.")


def load_weights(model: nn.Module, state: Any, path: str | os.PathLike, what: str) -> nn.Module:
    """`model` with a checkpoint's weights `state` copied in, strictly: a state dict that is absent, whose
    keys or shapes differ from the model's (the network its config describes), or that holds NaN or
    infinite values is refused with one sentence naming `path`, before any weight is copied. `what`
    names the network in that sentence ("U-Net", "autoencoder")."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"Checkpoint {path} holds no {what} weights where they belong; it is incomplete, so point "
                        f"at an intact checkpoint.pt.")
    problems = state_dict_mismatch(state, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if problems:
        raise UserError(f"The {what} weights in {path} do not fit the network its config describes ({problems}); "
                        f"the checkpoint is inconsistent, so use another one or train again.")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise UserError(f"The {what} weights in {path} hold NaN or infinite values (e.g. {broken[0]}); the run "
                        f"diverged, so use an earlier checkpoint.")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # what the checks above cannot see, e.g. a dtype that cannot be cast
        raise UserError(f"The {what} weights in {path} do not load ({' '.join(str(err).split())[:200]}); the "
                        f"checkpoint is inconsistent, so use another one or train again.") from err
    return model


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A short hash of a state dict's names, shapes, dtypes and values: the same weights give the same
    fingerprint on any machine, and any change to a weight gives another."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
