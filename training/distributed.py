"""Process setup for one device or many (`torchrun` + DistributedDataParallel)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where this process runs and which share of the work it does."""
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
    """'auto' picks CUDA when present; an explicit 'cuda' on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or install a CUDA build of PyTorch.")
    return device


def setup(device: str = "auto") -> Runtime:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and device in ("auto", "cuda"):
        torch.cuda.set_device(local_rank)
        run_device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        run_device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Runtime(run_device, rank, world_size)


def teardown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def mean_across_processes(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= runtime.world_size
    return value
