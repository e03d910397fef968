"""Checkpoints: self-describing dictionaries of tensors and plain values, written atomically.

A checkpoint is data, never code: it holds only tensors, numbers, strings, lists and dicts, so it
loads with `torch.load(..., weights_only=True)`. Every checkpoint names its `stage` and carries the
resolved config and the dataset description, so `sample.py` (and later stages) need only the path.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "synthdiff-checkpoint"
VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `payload` to `path` through a temporary file and a rename, so a crash mid-write never
    leaves a truncated checkpoint where the previous good one was."""
    path = Path(path)
    assert "stage" in payload, "a checkpoint must name its stage"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, stage: str | tuple[str, ...], map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` and check that it belongs to `stage`.

    Every failure a user can cause (a missing path, a truncated or foreign file, a checkpoint of
    another stage) raises a one-sentence error saying what to do.
    """
    path = Path(path)
    stages = (stage,) if isinstance(stage, str) else tuple(stage)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; pass the checkpoint.pt of a finished or running training run.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"Checkpoint {path} is corrupt or not a PyTorch checkpoint ({type(err).__name__}); "
                         f"point --ckpt at an intact checkpoint.pt.") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by this toolkit; point --ckpt at a checkpoint.pt from a run directory.")
    if payload["version"] > VERSION:
        raise ValueError(f"Checkpoint {path} has format version {payload['version']}, newer than this code "
                         f"understands ({VERSION}); update the toolkit.")
    if payload["stage"] not in stages:
        raise ValueError(f"Checkpoint {path} is from stage '{payload['stage']}', but this needs "
                         f"{' or '.join(repr(s) for s in stages)}; pass a checkpoint of that stage.")
    return payload


def rng_state() -> dict[str, Any]:
    """Every global random number generator torch uses in a training step (dropout draws from these)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
