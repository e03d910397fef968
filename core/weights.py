"""Reading published weight files (FID Inception, VGG-16, LPIPS heads, the Stable Diffusion VAE) as data.

A weights file is never executed: PyTorch files load with `weights_only=True` and `.safetensors`
files are parsed here (an 8-byte header length, a JSON header, raw little-endian tensors). Every
loader checks the file's keys and shapes against the names the publisher used before any weight is
copied, so a wrong file is refused with one sentence instead of being half-used.
"""

from __future__ import annotations

import json
import mmap as mmap_module
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import torch

from core.errors import MissingFileError, UserError

# safetensors dtype names -> torch dtypes
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def hub_checkpoint(filename: str) -> Path:
    """Where torch.hub keeps downloaded weights: <torch hub dir>/checkpoints/<filename>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def failed_checksum(path: str | os.PathLike) -> str | None:
    """The first entry of a zip-format PyTorch file whose bytes fail their CRC-32, or None.

    `torch.load` does not check the CRCs that `torch.save` writes, so a bit flipped on a disk, in a copy or
    in a download loads as a silently changed weight (or one of 1e37: NaN at the next step). Reading the
    file once more for the check costs about a second per gigabyte. A file that is not a readable zip
    gives None: `torch.load` then says why.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None


def read_state_dict(path: str | os.PathLike, what: str, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, keyed by name; `what` names the file's role in error messages.

    Accepts a plain PyTorch state dict (zip or legacy format; tensors saved on a GPU are mapped to
    the CPU), a training checkpoint that wraps one under "state_dict" (Lightning, latent-diffusion),
    and `.safetensors`. `mmap` maps a zip-format PyTorch file or a `.safetensors` file instead of reading
    it, so that checking its names and shapes (a start-up check) reads almost nothing of a file of
    hundreds of megabytes.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what} file {path} is a folder; pass the path of the published weights file in it.")
    if not path.is_file():
        raise MissingFileError(f"{what} file {path} does not exist; pass the path of the published weights file.")
    damaged = None if mmap else failed_checksum(path)  # (a start-up check of names reads almost nothing)
    if damaged is not None:
        raise UserError(f"{what} file {path} is damaged: its entry {damaged} fails its checksum (a broken download "
                        f"or copy); download the published file again.")
    try:
        if path.suffix == ".safetensors":
            tensors = _read_safetensors(path, mmap=mmap)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True,
                                 mmap=mmap and zipfile.is_zipfile(path))  # the legacy format cannot be mapped
    except Exception as err:  # torch raises a zoo of types for truncated, foreign or code-carrying files
        summary = " ".join(str(err).split())[:200]
        if isinstance(err, pickle.UnpicklingError):  # (not PyTorch's advice to load it as code, which we never do)
            summary = "it holds Python objects besides tensors, which are never loaded, or is damaged"
        raise UserError(f"Cannot read {what} file {path} as weights ({type(err).__name__}: {summary}); "
                         f"download the published file again.") from err
    if isinstance(tensors, Mapping) and isinstance(tensors.get("state_dict"), Mapping):
        tensors = tensors["state_dict"]
    if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise UserError(f"{what} file {path} does not hold a dictionary of tensors; pass the published weights file.")
    return dict(tensors)


def _read_safetensors(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A `.safetensors` file's tensors; with `mmap`, views of a private mapping of the file, read from disk only
    where touched."""
    if mmap:
        with open(path, "rb") as file:
            data = mmap_module.mmap(file.fileno(), 0, access=mmap_module.ACCESS_COPY) if path.stat().st_size else b""
    else:
        data = path.read_bytes()
    if len(data) < 8:
        raise ValueError("file shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError(f"header length {header_len} runs past the end of the file")
    header = json.loads(data[8:8 + header_len])
    body = memoryview(data)[8 + header_len:]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        count = 1
        for n in shape:
            count *= n
        if not 0 <= begin <= end <= len(body) or end - begin != count * torch.empty((), dtype=dtype).element_size():
            raise ValueError(f"tensor {name} has data offsets {begin}..{end} that do not fit its shape {shape}")
        if count == 0:  # frombuffer refuses an empty buffer
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif mmap:  # a view of the mapping (copy-on-write: writable, so torch takes it without a copy)
            tensors[name] = torch.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
        else:
            tensors[name] = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype).reshape(shape)
    return tensors


# The weights file of a diffusers model folder, in the order diffusers itself prefers them.
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                          "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
# How diffusers names an attention block's q, k, v and output projections (linear layers): since 0.14, and before.
DIFFUSERS_ATTENTION = {"diffusers": ("to_q", "to_k", "to_v", "to_out.0"),
                       "diffusers-legacy": ("query", "key", "value", "proj_attn")}


def diffusers_weights_file(path: str | os.PathLike, part: str = "") -> Path:
    """The weights file `path` names: itself, or the weights file of the diffusers model folder it is
    (the `vae/` or `unet/` of a pipeline, say); a folder without one is refused, naming its subfolder `part`
    where it is a pipeline's, and so is one that does not exist (before a config beside it is read)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"{path} does not exist; pass the path of the published weights file or folder.")
    if not path.is_dir():
        return path
    for name in DIFFUSERS_WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    advice = f"pass {path / part}" if part and (path / part).is_dir() else "pass the path of the weights file"
    raise MissingFileError(f"{path} is a folder without a diffusers weights file ({DIFFUSERS_WEIGHT_FILES[0]} or "
                           f"{DIFFUSERS_WEIGHT_FILES[1]}); {advice}.")


def diffusers_config(folder: Path, name: str = "config.json") -> dict | None:
    """The diffusers config file `name` in `folder` (a model's, beside its weights), or None where there is none
    (a weights file handed over on its own) or diffusers did not write it; a damaged one is refused."""
    path = folder / name
    if not path.is_file():
        return None
    try:
        fields = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise UserError(f"{path} is not a readable JSON config ({type(err).__name__}: {err}); download it again, or "
                        f"move the weights file to a folder of its own to import it unchecked.") from None
    if not isinstance(fields, dict):
        raise UserError(f"{path} holds {type(fields).__name__}, not the record of settings a diffusers config is; "
                        f"download it again, or move the weights file to a folder of its own to import it unchecked.")
    if "_class_name" not in fields and "_diffusers_version" not in fields:
        return None  # another program's config (one of our run folders, say): nothing diffusers wrote
    return fields


def diffusers_linear(name: str, naming: str) -> bool:
    """Whether a diffusers tensor is an attention projection's weight, which diffusers holds as a linear
    layer's (out, in) where our 1x1 convolutions hold (out, in, 1, 1)."""
    return name.endswith(".weight") and any(f".{layer}.weight" in name for layer in DIFFUSERS_ATTENTION[naming])


def diffusers_attention_naming(keys: Iterable[str]) -> str:
    """Which of DIFFUSERS_ATTENTION's namings a diffusers file's keys use."""
    legacy = DIFFUSERS_ATTENTION["diffusers-legacy"]
    return "diffusers-legacy" if any(k.endswith((f".{legacy[0]}.weight", f".{legacy[3]}.weight")) for k in keys) \
        else "diffusers"


def state_dict_mismatch(found: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> str:
    """How `found`'s keys and shapes differ from `expected`'s ('' when they are the same): the first few
    missing, unexpected and mis-shaped keys, so a user can tell a wrong file from a truncated one."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found) if tuple(found[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if misshaped:
        k = misshaped[0]
        problems.append(f"{len(misshaped)} with the wrong shape (e.g. {k}: {tuple(found[k].shape)} instead of "
                        f"{tuple(expected[k])})")
    return "; ".join(problems)


def check_state_dict(found: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], *, source: str,
                     what: str, ignore_prefixes: Iterable[str] = ()) -> None:
    """Refuse `found` unless its keys and shapes are exactly `expected`'s (keys under `ignore_prefixes` aside)."""
    ignore = tuple(ignore_prefixes)
    kept = {k: v for k, v in found.items() if not k.startswith(ignore)} if ignore else found
    problems = state_dict_mismatch(kept, expected)
    if problems:
        raise UserError(f"{source} is not a {what} weights file: its keys do not match ({problems}); "
                         f"pass the published {what} file.")


def download(url: str, filename: str, what: str, advice: str, hash_prefix: str | None = None) -> Path:
    """Fetch `url` into the torch hub cache as `filename` (once) and return its path.

    `hash_prefix`, where the publisher gives one, is checked against the file's sha256. Offline, the
    error says where to put a copy fetched elsewhere; `advice` names the option that takes a path instead.
    """
    target = hub_checkpoint(filename)
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), hash_prefix=hash_prefix, progress=True)
    except OSError as err:  # URLError, HTTPError and socket errors are all OSErrors
        raise MissingFileError(f"Cannot download the {what} weights from {url} ({err}); fetch {filename} "
                                f"elsewhere and put it in {target.parent}, or {advice}.") from err
    return target
