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
    seeding     the seeding scheme of the run's steps (training.loop.SEEDING; absent: scheme 1)
    elapsed_s   the training time up to the checkpoint, across resumes (absent: older than the record)
    metrics_window, outputs_due   the open logging window, and what follows the checkpoint at its step
    ...         anything the stage adds (e.g. a latent model's VAE)

A checkpoint is read back only through `load_checkpoint` and `require_keys`, which check the layout's
types (`FIELDS`), so a damaged or hand-edited file is refused with one sentence naming it and the
field, never met later as a KeyError. Their `option` names the command-line option the file came
from, so that the advice in that sentence is one the command in hand can follow.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from core.errors import MissingFileError, UserError
from core.runtime import atomic_write
from core.weights import failed_checksum, state_dict_mismatch

FORMAT = "synthdiff-checkpoint"
VERSION = 2

# What each field of the layout above must be wherever it is present. "data_info" is a dataset's
# description (data.DatasetInfo.to_dict, plus a fingerprint); `require_keys` checks its own fields.
FIELDS: dict[str, type] = {"stage": str, "config": dict, "data_info": dict, "step": int, "models": dict,
                           "ema": dict, "optimizers": dict, "scaler": dict, "rng": dict, "seeding": int,
                           "elapsed_s": float}
DATA_INFO_FIELDS: dict[str, type] = {"name": str, "resolution": int, "channels": int, "class_names": list,
                                     "param_names": list, "param_ranges": list, "num_samples": int}
_KINDS = {str: "text", int: "a whole number", float: "a number", dict: "a record", list: "a list"}


def advice(option: str | None) -> str:
    """What to do about an unusable checkpoint that the command read from `option` (None: a path no
    option of the command names, such as one recorded in another checkpoint)."""
    if option is None:
        return "replace it with an intact checkpoint.pt"
    if option == "--resume":  # the run's own RUN_DIR/checkpoint.pt
        return "restore it from a copy, or start a new --run-dir"
    return f"point {option} at an intact checkpoint.pt"


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `payload` to `path` atomically (see `core.runtime.atomic_write`): a crash or an interruption
    mid-write never leaves a truncated checkpoint where the previous good one was."""
    assert "stage" in payload, "a checkpoint must name its stage"
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **payload}, f))


def not_a_checkpoint_file(path: Path, run: str) -> str:
    """Why `path`, which is not a file, cannot be read as a checkpoint, and what to pass instead (`run`
    describes the run whose checkpoint.pt is wanted): the end of a one-sentence error."""
    if path.is_dir():
        inside = path / "checkpoint.pt"
        return (f"is a run folder; pass its checkpoint, {inside}" if inside.is_file() else
                f"is a folder, not a file; pass the checkpoint.pt of {run}")
    return f"does not exist; pass the checkpoint.pt of {run}"


def load_checkpoint(path: str | os.PathLike, stage: str | Iterable[str] | None = None,
                    map_location: str | torch.device = "cpu", *, option: str | None = None) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` and check that it belongs to `stage` (None: any).

    Every failure a user can cause (a missing path, a file that is not a PyTorch file, a truncated or
    foreign one, a field of the wrong type, a checkpoint of another stage) raises a one-sentence error
    naming the file; `option` is the option of the command that named it (see `advice`).
    """
    path = Path(path)
    if not path.is_file():
        where = f"{option} {path}" if option and option != "--resume" else f"Checkpoint {path}"
        raise MissingFileError(f"{where} {not_a_checkpoint_file(path, 'a finished or running training run')}.")
    damaged = failed_checksum(path)
    if damaged is not None:
        raise UserError(f"Checkpoint {path} is damaged: its entry {damaged} fails its checksum (a bit changed on the "
                        f"disk or in a copy); {advice(option)}.")
    foreign = _unreadable(path)  # (refused before torch reads it, which warns of a pickle's protocol first)
    if foreign is not None:
        raise UserError(f"Checkpoint {path} {foreign}; {advice(option)}.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises a zoo of types (KeyError for a text file, RuntimeError, ...)
        raise UserError(f"Checkpoint {path} {_unreadable(path, err)}; {advice(option)}.") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this toolkit (train.py writes RUN_DIR/checkpoint.pt); "
                        f"{advice(option)}.")
    version = payload.get("version")
    if "version" not in payload:
        raise UserError(f"Checkpoint {path} has no format version, so it was damaged or edited; {advice(option)}.")
    if type(version) is not int or version < 1:
        raise UserError(f"Checkpoint {path} has format version {version!r}, which is not a version number, so it "
                        f"was damaged or edited; {advice(option)}.")
    if version > VERSION:
        raise UserError(f"Checkpoint {path} has format version {version}, newer than this code understands "
                        f"({VERSION}); update the toolkit.")
    if version == 1:
        payload = _upgrade_v1(payload)
    require_keys(payload, ("stage",), path, option=option)
    for key in FIELDS.keys() & payload.keys():  # every field present has its type, needed or not
        _check_type(payload, key, path, option)
    if stage is not None:
        stages = (stage,) if isinstance(stage, str) else tuple(stage)
        if payload["stage"] not in stages:
            if option == "--resume":
                what_to_do = f"resume it with --stage {payload['stage']}, or start a new --run-dir"
            else:
                what_to_do = f"point {option} at a checkpoint of that stage" if option else "pass one of that stage"
            raise UserError(f"Checkpoint {path} is from stage '{payload['stage']}', but this needs "
                            f"{' or '.join(repr(s) for s in stages)}; {what_to_do}.")
    return payload


def peek_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """A checkpoint's entries with its tensors memory-mapped, not read: cheap when only its stage or config
    is needed. None for a file that is not a readable checkpoint of ours (`load_checkpoint` says why)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 -- any unreadable file is simply not peeked into
        return None
    return payload if isinstance(payload, dict) and payload.get("format") == FORMAT else None


def checkpoint_stage(path: str | os.PathLike) -> str | None:
    """The stage a checkpoint names, its tensors left unread; None for a file that is not a checkpoint of ours."""
    stage = (peek_checkpoint(path) or {}).get("stage")
    return stage if isinstance(stage, str) else None


LEGACY_START = b"\x80\x02\x8a\x0a"  # a PyTorch file of the format before zip archives: pickle 2, a 10-byte magic number


def _unreadable(path: Path, err: Exception | None = None) -> str | None:
    """Why `torch.load` failed (`err`), said of the file rather than of torch's internals; without `err`, why the
    file is no PyTorch file at all, found from its first bytes before torch reads it (None: it may be one)."""
    try:
        with open(path, "rb") as f:
            start = f.read(4)
    except OSError as reading:  # the file system's refusal (permissions, a device error), not the bytes
        return f"cannot be read ({reading.strerror or reading})"
    if not start:
        return "is empty (a write that never finished)"
    if not (start.startswith(b"PK") or start == LEGACY_START):  # a zip archive, or a legacy PyTorch pickle
        return ("is a pickle of plain Python objects, not a PyTorch file" if start.startswith(b"\x80")
                else "is not a PyTorch file at all")
    if err is None:
        return None
    if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
        return "holds Python objects besides tensors and plain values, so it is not one of ours and is not loaded"
    return f"is corrupt: a truncated or damaged PyTorch file ({type(err).__name__})"


def _upgrade_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """Version 1 held one model: its weights, EMA and optimizer at the top level."""
    payload = dict(payload)
    for old, new in (("model", "models"), ("ema", "ema"), ("optimizer", "optimizers")):
        if old in payload:
            payload[new] = {"model": payload.pop(old)}
    payload["version"] = VERSION
    return payload


def require_keys(payload: dict[str, Any], keys: Iterable[str], path: str | os.PathLike, *,
                 option: str | None = None) -> None:
    """Refuse a checkpoint that lacks fields a loader needs (a hand-edited or half-written payload), or
    holds them with the wrong type (`FIELDS`); a "data_info" must hold every field of a dataset
    description, each of its type."""
    keys = tuple(keys)
    missing = [k for k in keys if k not in payload]
    if missing:
        raise UserError(f"Checkpoint {path} lacks {', '.join(missing)}; it is incomplete, so {advice(option)}.")
    for key in keys:
        _check_type(payload, key, path, option)
    if "data_info" in keys:
        _check_data_info(payload["data_info"], path, option)


def _check_type(payload: Mapping[str, Any], key: str, path: str | os.PathLike, option: str | None,
                expected: type | None = None, prefix: str = "") -> None:
    expected = expected or FIELDS.get(key)
    if expected is not None and not _is(payload[key], expected):
        raise UserError(f"Checkpoint {path} holds {prefix}{key} as {describe(payload[key])} where {_KINDS[expected]} "
                        f"belongs; it is damaged or was edited, so {advice(option)}.")


def _is(value: Any, expected: type) -> bool:
    if expected is int:
        return type(value) is int  # not a bool, not a float
    if expected is float:
        return type(value) in (int, float)
    if expected is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, expected)


def describe(value: Any) -> str:
    """A value as an error message names it: its kind, and the value itself when it is short."""
    if value is None or isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    if isinstance(value, Mapping):
        return "a record"
    if isinstance(value, (list, tuple)):
        return f"the list {list(value)!r}" if len(repr(list(value))) <= 40 else "a list"
    if isinstance(value, torch.Tensor):
        return "a tensor"
    return f"a {type(value).__name__}"


def _check_data_info(info: dict[str, Any], path: str | os.PathLike, option: str | None) -> None:
    """A dataset description that data.DatasetInfo.from_dict can read: every field of its type, names
    that are text, one (low, high) range of finite numbers per parameter, 1 or 3 channels."""
    for key, expected in DATA_INFO_FIELDS.items():
        if key not in info:
            raise UserError(f"Checkpoint {path} lacks data_info.{key}; it is incomplete, so {advice(option)}.")
        _check_type(info, key, path, option, expected, prefix="data_info.")
    ranges = info["param_ranges"]
    if not all(isinstance(n, str) for n in (*info["class_names"], *info["param_names"])):
        problem = "class or parameter names that are not text"
    elif len(ranges) != len(info["param_names"]):
        problem = f"{len(ranges)} param_ranges for {len(info['param_names'])} parameters"
    elif not all(isinstance(r, (list, tuple)) and len(r) == 2 and all(_is(v, float) and math.isfinite(v) for v in r)
                 for r in ranges):
        problem = "a parameter range that is not two finite numbers"
    elif info["channels"] not in (1, 3) or info["resolution"] < 1 or info["num_samples"] < 0:
        problem = (f"{info['channels']} channels, {info['resolution']} px and {info['num_samples']} images, which "
                   f"no dataset has")
    else:
        return
    raise UserError(f"Checkpoint {path} holds a data_info with {problem}; it is damaged or was edited, so "
                    f"{advice(option)}.")


def load_weights(model: nn.Module, state: Any, path: str | os.PathLike, what: str, *,
                 option: str | None = None) -> nn.Module:
    """`model` with a checkpoint's weights `state` copied in, strictly: a state dict that is absent, whose
    keys or shapes differ from the model's (the network its config describes), or that holds NaN or
    infinite values is refused with one sentence naming `path`, before any weight is copied. `what`
    names the network in that sentence ("U-Net", "autoencoder"); `option` is as for `load_checkpoint`."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"Checkpoint {path} holds no {what} weights where they belong; it is incomplete, so "
                        f"{advice(option)}.")
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
