"""Runtime pieces every stage and entry point shares: seeds, devices, mixed precision, atomic files.

Each exists once, here, so that sampling, evaluation and training agree on them and none of them
needs to import the training loop.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import io
import json
import os
import re
import socket
import warnings
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, ContextManager

import numpy as np
import torch

from core.errors import UserError

# ---------------------------------------------------------------------------------------------
# seeds


def derive_seed(*keys: int) -> int:
    """An independent 63-bit seed for a tuple of integer keys, e.g. (run seed, image index); numpy's SeedSequence
    mixes them so nearby keys give unrelated streams.

    SeedSequence pads its keys with zeros to four words, so keys that differ only by trailing zeros give the same
    seed: derive_seed(s, e, 0) == derive_seed(s, e). Two uses that must not share a stream each end their keys with
    a non-zero purpose key of their own (training.loop.step_seed)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------------
# devices


@dataclass(frozen=True)
class Runtime:
    """Where this process runs and which share of the work it does (see core.distributed.setup)."""
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and shows progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present; an explicit 'cuda' on a machine without it is an error. A GPU named by
    number becomes this process's current one: what runs on the current GPU rather than on its tensors' (our
    Triton kernels' launches, CUDA streams and graphs) would otherwise run on GPU 0."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"Unknown --device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for but PyTorch sees no CUDA GPU; "
                            f"use --device cpu or install a CUDA build of PyTorch.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name} does not exist: this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}.")
        if device.index is not None:
            torch.cuda.set_device(device)
    return device


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory `device` has in all (a GPU's own; a CPU's: the machine's RAM), None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return None


def check_num_workers(count: int, saved_in: Path | None = None) -> None:
    """Refuse a --num-workers below 0, or far past the CPU's cores: each worker is a process of its own, and a
    mistyped 100000000 forks until the machine stops. `saved_in`: the checkpoint the count comes from, where a
    resumed run was not given one (it was written on a machine with more cores)."""
    most = 4 * (os.cpu_count() or 1)
    if not 0 <= count <= most:
        came = (f", the count {saved_in} was written with; resume here with --num-workers 0 to {most}"
                if saved_in is not None else "")
        raise UserError(f"--num-workers must be from 0 (decode in this process) to {most} (4 per CPU core; each "
                        f"worker is a process), got {count}{came}.")


def check_fits_memory(need: int, device: torch.device, what: str, advice: str) -> None:
    """Refuse, before any work, `what` (the subject of "... take N GiB") if its `need` bytes exceed all of `device`'s
    memory: such a value is a typo (an extra zero or three) that would otherwise fail minutes later, after the data
    is made, or stall the machine swapping. `advice` ends the sentence."""
    memory = device_memory(device)
    if memory is not None and need > memory:
        where = "this machine" if device.type == "cpu" else "this GPU"
        raise UserError(f"{what} take {need / 2**30:,.1f} GiB, more than the {memory / 2**30:,.1f} GiB of memory "
                        f"{where} has; {advice}.")


def parameter_count(net: torch.nn.Module) -> int:
    """The weights of `net` (built on the meta device, this costs no memory)."""
    return sum(p.numel() for p in net.parameters())


def training_bytes(parameters: int, averaged: bool) -> int:
    """fp32 bytes a network of `parameters` weights holds while AdamW trains it: the weights, their gradients and
    the two moments, and a weight average (EMA) when `averaged`. Activations come on top, and depend on the batch."""
    return 4 * parameters * (5 if averaged else 4)


def check_training_fits(need: int, device: torch.device, what: str, advice: str) -> None:
    """Refuse, before any data is read, networks whose `training_bytes` (`need`) exceed the memory of `device`: a
    width typed with extra digits built them only after the data was loaded, to die there of an out-of-memory error
    or to swap."""
    check_fits_memory(need, device, f"{what}, trained with AdamW in fp32,", advice)


def check_batch_fits(batch: int, size: int, option: str, device: torch.device, channels: int = 3) -> None:
    """Refuse a batch whose `channels` x `size` x `size` fp32 images alone outgrow `device` (a step needs many
    times more)."""
    check_fits_memory(batch * channels * size * size * 4, device,
                      f"{option} {batch} asks for {size}x{size} images whose pixels alone", f"give a smaller {option}")


# ---------------------------------------------------------------------------------------------
# mixed precision

AMP_MODES = ("auto", "none", "bf16", "fp16")
FIXED_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the --amp modes that name their dtype
AMP_HELP = ("mixed precision (auto: bf16 on CUDA, or fp16 with loss scaling where bf16 is unsupported; bf16 on CPUs "
            "with native bf16 (AVX512-BF16, AMX); none on other CPUs)")
# --kernels: which implementation of our fused ops runs (the kernels package reads the choice)
KERNEL_BACKENDS = ("auto", "triton", "torch")
KERNELS_HELP = ("fused kernels: auto (our Triton kernels on CUDA when Triton is importable, PyTorch's ops otherwise), "
                "triton or torch; both give the same results within the kernels' stated tolerances")


@functools.cache
def _cpu_flags() -> str:
    """/proc/cpuinfo, which lists the CPU's instruction-set flags ("" where it cannot be read: not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.cache
def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo's flags.

    Where it does, oneDNN's bf16 convolutions and matmuls run about 2-2.5x faster than fp32 ones
    (`python -m bench` measures it); elsewhere PyTorch emulates bf16 and autocast is many times slower.
    Not Linux: False, to be conservative.
    """
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", _cpu_flags()))


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX's bf16 tile multiplier (Intel Xeon since Sapphire Rapids), from /proc/cpuinfo.
    PyTorch's CPU flash attention multiplies in its tiles, which changes which attention form is faster
    (`kernels.attention`)."""
    return bool(re.search(r"\bamx_bf16\b", _cpu_flags()))


def cuda_computes_bf16(device: torch.device) -> bool:
    """Whether the GPU `device` computes in bf16 natively: compute capability 8.0 (Ampere) or newer, or a ROCm
    GPU. (`torch.cuda.is_bf16_supported()` also says yes for older GPUs that merely hold bf16 tensors, a T4 or
    a V100, where autocast would emulate it, slowly; fp16 with loss scaling is for those.)"""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp`, or None for full precision.

    "auto" is bf16 on CUDA (fp16 with loss scaling on GPUs without native bf16, `cuda_computes_bf16`), bf16 on CPUs that compute
    natively in bf16 (`cpu_computes_bf16`), and full precision on other CPUs, where bf16 autocast is
    many times slower than fp32.
    """
    if amp not in AMP_MODES:
        raise UserError(f"Unknown --amp {amp!r}; choose one of {', '.join(AMP_MODES)}.")
    if amp == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if cpu_computes_bf16() else None
        return torch.bfloat16 if cuda_computes_bf16(device) else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA GPU (loss scaling is a GPU technique); use --amp bf16 or none on the CPU.")
    return FIXED_AMP[amp]


def precision_name(dtype: torch.dtype | None) -> str:
    """What `autocast_dtype` resolved to, as a record says it: "fp32" (full precision), "bf16" or "fp16"."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    """`torch.autocast` for `dtype`, or a no-op context for full precision (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# files


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], replace: bool = True) -> None:
    """Create or replace `path` with what `write(file)` writes, all or nothing.

    The bytes go to a temporary file beside `path` (named for this host and process, so two writers
    never share one), are flushed to disk, and only then renamed over `path`; a crash at any point
    leaves either the old file or the new one, never a torn mix. On failure the temporary file is
    removed; temporary files of writers that died (a `kill -9`) are removed by the next write there.
    With `replace=False` a `path` that exists by then (another writer's, finished meanwhile) is kept and
    FileExistsError raised: the file is linked into place, which fails where a name exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    handled = sys.exc_info()[1]  # an error the caller is handling is not this write's
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = _cause_behind(err, handled)
        if isinstance(cause, OSError) and cause.filename is None and cause.errno is not None:
            # A write to an open file names none (nor does torch.save's zip writer): name the one being written.
            raise OSError(cause.errno, cause.strerror, str(path)).with_traceback(cause.__traceback__) from None
        if cause is not None and cause is not err:
            raise cause from None
        raise
    _fsync_directory(path.parent)


def _link_new(tmp: Path, path: Path) -> None:
    """Give the finished `tmp` the name `path` unless that name exists (FileExistsError); `tmp` goes."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system (FAT, some network ones): a check, then the rename
        if path.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)
    else:
        tmp.unlink()


def _cause_behind(err: BaseException, handled: BaseException | None) -> KeyboardInterrupt | OSError | None:
    """The interruption (Ctrl-C, or a stop signal raised as one) or the failed write (an OSError: a full
    disk, a file-size limit) that `err` was raised while handling, if any.

    torch.save's zip writer meets either in its writes by failing with a RuntimeError of its own
    ("unexpected pos ..."); the cause is what happened, and what the user must hear.
    """
    while err is not None and err is not handled:
        if isinstance(err, (KeyboardInterrupt, OSError)):
            return err
        err = err.__context__
    return None


_TEMP_NAME = re.compile(r"^\.(?P<stem>.+)\.(?P<pid>\d+)\.tmp$")


def is_temporary(name: str) -> bool:
    """Whether `name` is that of a temporary file `atomic_write` writes before renaming it."""
    return _TEMP_NAME.match(name) is not None


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files in `folder` that `atomic_write` calls on this host left behind when
    their process died; temporaries of live processes, or of other hosts sharing the folder, stay."""
    host, removed = socket.gethostname(), []
    for candidate in Path(folder).glob(".*.tmp"):
        match = _TEMP_NAME.match(candidate.name)
        if match and match["stem"].endswith("." + host) and not process_alive(int(match["pid"])):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _fsync_directory(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(values: Any, path: str | os.PathLike) -> None:
    """Write `values` as indented JSON, atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(values, indent=2) + "\n").encode()))


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike, fields: list[str] | None = None) -> None:
    """Write `rows` as a CSV with a header, atomically; the columns are `fields`, or every key of the rows in
    order of first appearance."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields or list(dict.fromkeys(key for row in rows for key in row)),
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def read_metrics(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The records of a metrics.jsonl, each with its line: a line that is not JSON is torn (the run was
    cut off while writing it, or the disk filled) and is dropped with a warning; a line that is JSON but
    not a record with a whole-number "step" was edited, and is refused in one sentence naming it."""
    records = []
    # Bytes that are not UTF-8 make their line torn, like any other line that is not JSON.
    for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path} line {number} is torn (the run was cut off while writing it); dropping it.",
                          stacklevel=3)
            continue
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise UserError(f"{path} line {number} is not a metrics record (a JSON object with a whole-number "
                            f"\"step\"), so the file was edited; fix or delete that line.")
        records.append((line, record))
    return records
